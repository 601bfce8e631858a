"""scm-mm-sample: load a checkpoint of any modality, generate, and write files with the modality's writer.

    scm-mm-sample checkpoint=runs/mnist_scd n=64 out=samples/digits.png
    scm-mm-sample checkpoint=runs/mnist_teacher solver=heun steps=32
    scm-mm-sample checkpoint=runs/notes_scd out=samples/notes.wav seconds=2 vocoder=runs/notes_vocoder
    scm-mm-sample modality=video checkpoint=runs/digits_scd out=samples/digits.mp4 n=8 frames=17
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from scm_mm.pipeline import SCMPipeline

from .train import CONFIG_PATH, plain


def pick_device(name: str) -> str:
    """The device of a single process: scm-mm-sample refuses torchrun, under which every process would sample
    the same seed and write the same files (scm-mm-eval shares its samples between the processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("scm-mm-sample runs on one process; launch it without torchrun")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def codec_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The codec overrides of a sample or eval config, with its `vocoder` (audio) when one is given."""
    overrides = plain(cfg.codec)
    if cfg.get("vocoder") is not None:
        overrides["vocoder"] = cfg.vocoder
    return overrides


def check_modality(cfg: DictConfig, pipe: SCMPipeline) -> None:
    """With modality=<name> on the command line, refuse a checkpoint of another modality."""
    wanted = cfg.get("modality")
    if wanted is not None and wanted.name != pipe.modality.name:
        raise ValueError(f"modality={wanted.name} was asked for, but {cfg.checkpoint} holds a model of modality "
                         f"{pipe.modality.name!r}")  # fmt: skip


def run(cfg: DictConfig) -> list[Path]:
    device = pick_device(cfg.device)
    pipe = SCMPipeline.load(cfg.checkpoint, which=cfg.weights, device=device, **codec_overrides(cfg))
    check_modality(cfg, pipe)
    solver, steps = pipe.sampler_for(cfg.solver, cfg.steps)  # a teacher's ODE solver unless told otherwise
    labels = cast(list[int], OmegaConf.to_container(cfg.labels)) if cfg.labels is not None else None
    start = time.perf_counter()
    shape = pipe.shape_for(cfg.seconds) if cfg.seconds is not None else None
    if cfg.get("frames") is not None:
        shape = pipe.shape_for_frames(cfg.frames)
    batches = pipe.decoded_batches(
        cfg.n, steps=steps, method=solver, t_mid=cfg.t_mid, churn=cfg.churn, labels=labels,
        guidance=cfg.guidance, seed=cfg.seed, batch_size=cfg.batch_size, shape=shape,
    )  # fmt: skip
    media = torch.cat(list(batches))  # on the CPU: the device held one batch; the time below waited for it
    if cfg.seconds is not None:
        media = pipe.cut_to_seconds(media, cfg.seconds)
    seconds = time.perf_counter() - start
    out = cfg.out if cfg.out is not None else f"samples/samples{pipe.modality.default_suffix}"
    paths = pipe.save_media(media, out)
    print(f"{cfg.n} samples in {seconds:.2f} s ({solver}, {steps} steps) -> {', '.join(map(str, paths))}")
    return paths


@hydra.main(config_path=CONFIG_PATH, config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
