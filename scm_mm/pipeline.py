"""From a checkpoint to media: the model, its codec and its modality, and one `generate` for all of them.

Modality APIs (ImageSCM, AudioSCM, VideoSCM) are thin layers over `SCMPipeline` that add their own
writers. Only the registry is consulted for the modality, so the core never imports one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .modality import Codec, Modality, codec_to, get_modality
from .precond import TrigFlowPrecond
from .samplers import sample
from .train.build import load_model


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of a draw seeded with `seed`: numpy's SeedSequence mixes the two, so that
    neighbouring seeds and batches start unrelated streams."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0])


class SCMPipeline:
    """A trained model with its codec: `generate(n)` returns decoded media (e.g. uint8 images)."""

    def __init__(
        self,
        model: TrigFlowPrecond,
        codec: Codec,
        modality: Modality,
        sample_shape: Sequence[int],    # (C, *dims) of x0
        num_classes: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.codec, self.modality = model, codec, modality
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.meta = meta or {}

    @classmethod
    def load(
        cls,
        run_or_checkpoint: str | Path,
        which: str | None = None,       # "model" or an EMA name; None: the first EMA
        device: str | torch.device = "cpu",
        **codec_overrides: Any,         # e.g. path= for a VAE that moved
    ) -> SCMPipeline:
        model, meta = load_model(run_or_checkpoint, which)
        for key in ("modality", "codec", "sample_shape"):
            if key not in meta:
                raise ValueError(f"{run_or_checkpoint}: the checkpoint's meta.json has no {key!r}")
        modality = get_modality(meta["modality"])
        codec = codec_to(modality.codec_from_state(meta["codec"], **codec_overrides), device)  # decode there too
        if cls is SCMPipeline:  # the modality's own API (ImageSCM, AudioSCM) when it names one
            cls = getattr(modality, "pipeline", cls)
        return cls(model.to(device), codec, modality, meta["sample_shape"], meta.get("num_classes", 0), meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def labels_for(self, n: int, labels: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        """None: unconditional (or cycling through the classes for a class-conditional model)."""
        if labels is None:
            return torch.arange(n) % self.num_classes if self.num_classes else None
        if self.num_classes == 0:
            raise ValueError("this model is unconditional; it takes no labels")
        out = torch.as_tensor(labels)
        if out.is_floating_point() or out.is_complex() or out.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got {out.dtype}")
        out = out.long().expand(n) if out.ndim == 0 else out.long()  # one label for all
        if out.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(out.shape)}")
        if ((out < -1) | (out >= self.num_classes)).any():
            raise ValueError(f"labels must be in [0, {self.num_classes}) or -1 (none), got {out.tolist()}")
        return out

    def latent_batches(
        self,
        n: int,
        steps: int | None = None,       # None: 2 consistency steps for a student, 32 for a teacher (`sampler_for`)
        labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance: float | None = None,  # the CFG scale input of an sCD student (App. G.2)
        seed: int | None = None,
        method: str | None = None,      # "consistency" or a teacher ODE sampler: "euler", "heun", "dpmpp_2m";
                                        # None: the checkpoint's (heun for a diffusion teacher)
        t_mid: float = 1.1,
        churn: float = 0.0,             # method="heun" only: EDM's stochastic sampling (S_churn)
        batch_size: int = 64,
        shape: Sequence[int] | None = None,  # (C, *dims) of one sample; None: the training shape
        shard: tuple[int, int] = (0, 1),     # (rank, world size): draw batches rank, rank + world, ... only
    ) -> Iterator[torch.Tensor]:
        """x0 samples before decoding, `batch_size` at a time on the model's device. Batch k draws its noise
        from a generator of its own, seeded with `batch_seed(seed, k)`: the same seed and batch size give the
        same samples, however the batches are shared between processes (`shard`, `Shards`). The labels are
        checked now, the samples drawn as the batches are asked for."""
        method, steps = self.sampler_for(method, steps)
        ys = self.labels_for(n, labels)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world size) with 0 <= rank < world size, got {shard}")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])  # fresh; the global RNG untouched

        @torch.no_grad()
        def batches() -> Iterator[torch.Tensor]:
            for start in range(rank * batch_size, n, world * batch_size):
                b = min(batch_size, n - start)
                cond: dict[str, Any] = {}
                if ys is not None:
                    cond["labels"] = ys[start : start + b].to(self.device)
                if guidance is not None:
                    cond["guidance"] = torch.full((b,), float(guidance), device=self.device)
                generator = torch.Generator(self.device).manual_seed(batch_seed(seed, start // batch_size))
                batch_shape = (b, *(self.sample_shape if shape is None else shape))
                yield sample(self.model, batch_shape, method=method, steps=steps, t_mid=t_mid, generator=generator,
                             churn=churn, device=self.device, **cond)  # fmt: skip

        return batches()

    def sample_latents(self, n: int, **kwargs: Any) -> torch.Tensor:
        """x0 samples (n, C, *dims) before decoding; keywords as in `latent_batches`."""
        return torch.cat(list(self.latent_batches(n, **kwargs)))

    def decoded_batches(self, n: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Decoded media on the CPU, a batch of `latent_batches` at a time: the device holds one batch of
        decoded media, and the caller may score or write each before the next is sampled. In the codec's
        layout: the modality APIs' `generate` may rearrange (video: (N, T, H, W, C)) or crop (audio)."""
        return (self.codec.decode(x0).cpu() for x0 in self.latent_batches(n, **kwargs))

    def sampler_for(self, method: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(method, steps), each as given or else suited to the checkpoint's recorded training method: a
        diffusion teacher takes an ODE solver (heun, 32 steps), an sCD or sCT student 2 consistency steps."""
        if method is None:
            method = "heun" if self.meta.get("method") == "diffusion" else "consistency"
        if steps is None:
            steps = 2 if method == "consistency" else 32
        return method, steps

    def shape_for(self, seconds: float) -> list[int]:
        """The x0 shape of one sample lasting `seconds` (audio, video); other media have no duration."""
        raise ValueError(f"{self.modality.name} samples have no duration")

    def cut_to_seconds(self, media: torch.Tensor, seconds: float) -> torch.Tensor:
        """Decoded media of `shape_for(seconds)` cut to `seconds` (the network's shapes round a duration up)."""
        return media

    def shape_for_frames(self, frames: int) -> list[int]:
        """The x0 shape of one sample of `frames` frames (video); other media have no frames."""
        raise ValueError(f"{self.modality.name} samples have no frames")

    def generate(self, n: int, **kwargs: Any) -> torch.Tensor:
        """Decoded media for n samples, on the CPU; keywords as in `latent_batches`."""
        return torch.cat(list(self.decoded_batches(n, **kwargs)))

    def media_options(self) -> dict[str, Any]:
        """What the modality's writer and metrics need to know besides the media (e.g. a sample rate)."""
        return {}

    def save_media(self, media: torch.Tensor, path: str | Path, **options: Any) -> list[Path]:
        """Write decoded media with the modality's writer; returns the paths written."""
        return self.modality.save(media, path, **{**self.media_options(), **options})
