"""Small models and a Hydra composer shared by the tests."""

import runpy
import socket
import sys
from pathlib import Path

import pytest
import torch


class TinyNet(torch.nn.Module):
    """A small smooth backbone with the scm-mm net contract, for tests of the core.

    net(x, c_noise, labels=None, guidance=None): x (B, C, *dims). Optional dropout, labels, guidance.
    """

    def __init__(self, channels: int = 2, hidden: int = 32, num_classes: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(channels, hidden)
        self.time = torch.nn.Linear(2, hidden)
        self.label = torch.nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.guid = torch.nn.Linear(1, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(hidden, channels)

    def forward(self, x, c_noise, labels=None, guidance=None):
        h = x.movedim(1, -1)
        c = c_noise / 1000
        emb = self.time(torch.stack([torch.sin(c), torch.cos(3 * c)], -1))
        if self.label is not None:
            lab = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long) if labels is None else labels
            emb = emb + self.label(torch.where(lab < 0, self.label.num_embeddings - 1, lab))
        if guidance is not None:
            emb = emb + self.guid(guidance[:, None].to(emb.dtype))
        emb = emb.reshape(emb.shape[0], *([1] * (h.ndim - 2)), emb.shape[-1])
        h = torch.tanh(self.inp(h) + emb)
        return self.out(self.drop(h)).movedim(-1, 1)


def config(name: str, overrides: list[str]):
    """The app config `name` (train, sample, eval) composed as the scm-mm-* commands do."""
    from hydra import compose, initialize_config_module  # here: the GPU checks' machine has no hydra

    with initialize_config_module("scm_mm_configs", version_base="1.3"):
        return compose(name, overrides=overrides)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_example_samplers(example: Path, runs: Path, out: Path, suffix: str, monkeypatch, capsys, *extra) -> Path:
    """An examples/generate_*.py script on a teacher run and an sCD run (runs/teacher, runs/scd): the teacher
    samples with its ODE solver (Heun, or --method), refuses --guidance (it has no CFG scale input), the
    student takes 2 consistency steps. `extra` goes to every call. Returns the teacher's Heun output file."""

    def run(*args) -> None:
        monkeypatch.setattr(sys, "argv", [str(example), *map(str, args), *map(str, extra)])
        runpy.run_path(str(example), run_name="__main__")

    run("--checkpoint", runs / "teacher", "--out", out / f"t{suffix}", "--steps", 2)
    assert "diffusion checkpoint: heun sampler, 2 steps" in capsys.readouterr().out  # was 2 consistency steps
    run("--checkpoint", runs / "teacher", "--out", out / f"e{suffix}", "--method", "euler", "--steps", 3, "--seed", 1)
    assert "euler sampler, 3 steps" in capsys.readouterr().out and (out / f"e{suffix}").is_file()
    with pytest.raises(ValueError, match="guidance"):  # the teacher has no CFG scale input
        run("--checkpoint", runs / "teacher", "--out", out / f"g{suffix}", "--guidance", 1.5)
    run("--checkpoint", runs / "scd", "--out", out / f"s{suffix}", "--t-mid", 0.9)
    assert "scd checkpoint: consistency sampler, 2 steps" in capsys.readouterr().out
    return out / f"t{suffix}"
