"""The video codec (the `Codec` protocol of scm_mm.modality): uint8 clips <-> normalised latents.

    x0_c = (latent_c - mean_c) * sigma_d / std_c        latent = the autoencoder's posterior mean

as the paper normalises SD-VAE latents per channel ("Latents at 512^2") and as Wan's VAE config ships
`latents_mean`/`latents_std`. The autoencoder is either the library's own causal 3-D VAE (trained on
the data by `scm-mm-train experiment=digits_vae`, a folder written by `save_video_vae`) or one of
diffusers' video VAEs (CogVideoX, Wan, LTX-Video) from a local folder; both sit behind the small
`VideoAutoencoder` interface below. Statistics come from the VAE's config when it has them, else they
are measured on the training data (`fit`), in float64.

Every checkpoint stores `state()`: where the autoencoder was, what it is (`describe()`: its kind,
configuration and a digest of its weights) and the statistics. `codec_from_state` rebuilds the codec
and refuses an autoencoder whose description differs, field by field, so a model is never decoded
by a VAE it was not trained with.

Memory: decoding takes `batch_size` clips per call, so it does not grow with the number of clips. In time,
the library's VAE (`chunk_frames` latent frames), Wan (frame by frame, with a cache) and CogVideoX (latent
frames in pairs) decode a few latent frames at a time, so memory does not grow with the clip length either.
LTX-Video decodes the whole clip in one call unless `tiling=True`, which turns on diffusers' tiles: spatial
for all three diffusers VAEs, and for LTX-Video temporal too (overlapping tiles of 16 frames, blended, so the
numbers change slightly). `tiling` and `dtype` are run-time choices, not recorded in `state()`: a checkpoint
decodes with either. They are the codec's `encoding()`, which keys the training set's encode cache beside the
state, so a cache encoded with one is not read for the other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from scm_mm.modality import as_dtype, check_state

KIND = "video-vae"


@runtime_checkable
class VideoAutoencoder(Protocol):
    """What the codec needs of a video autoencoder (the library's VideoVAE, or DiffusersVideoVAE)."""

    in_channels: int       # pixel channels it encodes
    latent_channels: int
    temporal_factor: int   # T = 1 + temporal_factor * (t - 1)
    frame_step: int        # the clip lengths it takes: T = 1 + frame_step * k (a multiple of temporal_factor)
    spatial_factor: int    # H = spatial_factor * h

    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """float (B, C, T, H, W) in [-1, 1] -> posterior mean (B, z, t, h, w), raw units."""
        ...

    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, z, t, h, w) -> float video (B, C, T, H, W), about [-1, 1]."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON settings that identify it (kind, configuration, weights digest); never its path."""
        ...


def load_autoencoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    media_channels: int | None = None,  # clip channels; 1 lets a 3-channel diffusers VAE take grey clips
    tiling: bool = False,               # diffusers VAEs: diffusers' tiles (see the module docstring)
    dtype: str | torch.dtype | None = None,  # diffusers VAEs: compute dtype; None: float32
) -> VideoAutoencoder:
    """A video autoencoder from a local folder: a `scm-mm-train experiment=digits_vae` run (its vae/),
    a folder written by save_video_vae, or a diffusers video VAE (or a pipeline folder with vae/)."""
    folder = Path(path).expanduser()
    torch_dtype = as_dtype(dtype)
    for candidate in (folder, folder / "vae"):
        config = candidate / "config.json"
        if not config.is_file():
            continue
        fields = json.loads(config.read_text())
        if fields.get("kind") == "scm-mm-video-vae":
            from .autoencoder import load_video_vae

            if tiling or torch_dtype not in (None, torch.float32):
                raise ValueError(f"tiling={tiling}, dtype={dtype}: these options are for diffusers VAEs; the library's "
                                 f"autoencoder at {candidate} runs in float32 and decodes a few latent frames at a "
                                 "time")  # fmt: skip
            vae = load_video_vae(candidate).to(device).eval().requires_grad_(False)
            if media_channels not in (None, vae.in_channels):
                raise ValueError(f"the autoencoder at {candidate} encodes {vae.in_channels}-channel clips, not "
                                 f"media_channels={media_channels}")  # fmt: skip
            return vae
        if "_class_name" in fields:
            from .diffusers_vae import load_diffusers_video_vae

            return load_diffusers_video_vae(candidate, dtype=torch_dtype or torch.float32, device=device,
                                            tiling=tiling, media_channels=media_channels)  # fmt: skip
    raise FileNotFoundError(
        f"no video autoencoder at {folder}: expected a folder with config.json written by save_video_vae (or the "
        "run folder of `scm-mm-train experiment=digits_vae`, which holds vae/), or a local diffusers "
        "AutoencoderKLWan / AutoencoderKLCogVideoX / AutoencoderKLLTXVideo folder. scm-mm never downloads weights."
    )


def to_unit(media: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, C, T, H, W) -> float32 in [-1, 1]."""
    if media.dtype != torch.uint8 or media.ndim != 5:
        raise TypeError(f"expected uint8 clips (B, C, T, H, W), got {media.dtype} {tuple(media.shape)}")
    return (media.float() - 127.5) / 127.5


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8, rounded to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VideoLatentCodec:
    """uint8 clips (B, C, T, H, W) <-> x0 (B, z, t, h, w) with per-channel std about sigma_d."""

    cacheable = True  # a VAE is expensive: encode the dataset once (scm_mm.data.training_set)

    def __init__(
        self,
        vae: str | Path | VideoAutoencoder,       # a local folder (see load_autoencoder) or a loaded autoencoder
        sigma_d: float = 0.5,                      # std of x0 after normalisation
        mean: Sequence[float] | None = None,       # per-channel latent mean, raw units; None: the VAE's, or fit()
        std: Sequence[float] | None = None,        # per-channel latent std, raw units
        batch_size: int = 8,                       # clips per autoencoder call
        device: str | torch.device = "cpu",        # where the autoencoder runs
        media_channels: int | None = None,         # for a folder: 1 = grey clips on a 3-channel diffusers VAE
        tiling: bool = False,                      # for a diffusers VAE folder: diffusers' tiles (see above)
        dtype: str | torch.dtype | None = None,    # for a diffusers VAE folder: compute dtype ("bfloat16"); None: fp32
    ) -> None:
        if isinstance(vae, (str, Path)):
            self.path: str | None = str(Path(vae).expanduser().resolve())
            self.vae = load_autoencoder(self.path, device, media_channels, tiling=tiling, dtype=dtype)
        else:
            self.path, self.vae = None, vae
        if mean is None and std is None:  # a VAE that ships its statistics (Wan, LTX-Video)
            mean, std = getattr(self.vae, "latents_mean", None), getattr(self.vae, "latents_std", None)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then fit() measures them on the data)")
        channels = self.vae.latent_channels
        if mean is not None and std is not None:
            if len(mean) != channels or len(std) != channels:
                raise ValueError(f"the autoencoder has {channels} latent channels but mean has {len(mean)} and std "
                                 f"{len(std)} entries")  # fmt: skip
            if min(std) <= 0:
                raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.sigma_d, self.batch_size = float(sigma_d), int(batch_size)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def frames_for(self, latent_frames: int) -> int:
        """Clip length in frames that `latent_frames` latent frames decode to."""
        return 1 + self.vae.temporal_factor * (latent_frames - 1)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` frames; ValueError naming valid counts otherwise."""
        step = self.vae.frame_step
        if frames < 1 or (frames - 1) % step:
            below = 1 + step * max((frames - 1) // step, 0)
            raise ValueError(f"{frames} frames: this autoencoder takes 1 + {step}k frames, e.g. {below} or "
                             f"{below + step}")  # fmt: skip
        return 1 + (frames - 1) // self.vae.temporal_factor

    def latent_frames_at_least(self, frames: int, multiple: int = 1) -> int:
        """The fewest latent frames that decode to at least `frames` frames, give a clip length the
        autoencoder takes back (1 + frame_step k) and are a multiple of `multiple` (a temporal patch)."""
        stride = self.vae.frame_step // self.vae.temporal_factor  # latent frames per valid clip-length step
        latent = 1 + stride * math.ceil(max(frames - 1, 0) / self.vae.frame_step)
        for _ in range(multiple):  # the residues of latent mod multiple repeat within `multiple` strides
            if latent % multiple == 0:
                return latent
            latent += stride
        raise ValueError(f"no latent length 1 + {stride}k is a multiple of the temporal patch {multiple}; "
                         "use a temporal patch of 1 with this autoencoder")  # fmt: skip

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("the codec's latent statistics are not set: call fit(dataset) or give mean and std")
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        return mean, torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)

    def to(self, device: str | torch.device) -> VideoLatentCodec:
        """Run the autoencoder on `device`; returns self."""
        move = getattr(self.vae, "to", None)  # an nn.Module, or a wrapper that may not move
        if move is not None:
            move(device)
        return self

    def _weight(self) -> torch.Tensor | None:
        """One of the autoencoder's weights (an nn.Module, or a wrapper exposing parameters()), or None."""
        parameters = getattr(self.vae, "parameters", None)
        return next(iter(parameters()), None) if parameters is not None else None

    def _device(self) -> torch.device:
        """Where the autoencoder's weights are."""
        weight = self._weight()
        return weight.device if weight is not None else torch.device("cpu")

    @torch.no_grad()
    def encode_raw(self, media: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, T, H, W) -> raw latents float32 (B, z, t, h, w), on media's device."""
        x = to_unit(media)
        return torch.cat([self.vae.encode_raw(chunk.to(self._device())).float().to(media.device)
                          for chunk in x.split(self.batch_size)])  # fmt: skip

    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, T, H, W) -> x0 float32 (B, z, t, h, w)."""
        latent = self.encode_raw(media)
        mean, std = self._stats(latent)
        return (latent - mean) * (self.sigma_d / std)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, z, t, h, w) -> uint8 clips (B, C, T, H, W), on x0's device."""
        mean, std = self._stats(x0.float())
        latent = x0.float() * (std / self.sigma_d) + mean
        return torch.cat([to_uint8(self.vae.decode_raw(chunk.to(self._device())).float()).to(x0.device)
                          for chunk in latent.split(self.batch_size)])  # fmt: skip

    @torch.no_grad()
    def fit(self, dataset: Any, n: int = 512, seed: int = 0) -> VideoLatentCodec:
        """A copy with the per-channel mean and std of the raw latents of n random clips (float64)."""
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        total = torch.zeros(self.vae.latent_channels, dtype=torch.float64)
        squares, count = torch.zeros_like(total), 0
        for start in range(0, len(order), self.batch_size):
            media = torch.stack([torch.as_tensor(dataset[i][0]) for i in order[start : start + self.batch_size]])
            latent = self.encode_raw(media).double()  # (B, z, t, h, w)
            total += latent.sum((0, 2, 3, 4))
            squares += latent.square().sum((0, 2, 3, 4))
            count += latent[:, 0].numel()
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        fitted = VideoLatentCodec(self.vae, self.sigma_d, mean.tolist(), std.tolist(), self.batch_size)
        fitted.path = self.path
        return fitted

    def encoding(self) -> dict[str, Any]:
        """Settings that change the encodings but not what decodes them (see scm_mm.modality)."""
        weight, inner = self._weight(), getattr(self.vae, "vae", None)  # inner: a diffusers VAE's own module
        dtype = weight.dtype if weight is not None else torch.float32
        return {"dtype": str(dtype), "tiling": bool(getattr(inner, "use_tiling", False))}

    def state(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "path": self.path,                      # where it was; may be overridden with vae=
            "autoencoder": self.vae.describe(),     # what it is: kind, configuration, weights digest
            "mean": self.mean,                      # raw latent units
            "std": self.std,
            "sigma_d": self.sigma_d,
        }


def codec_from_state(state: Mapping[str, Any], vae: str | Path | None = None, **overrides: Any) -> VideoLatentCodec:
    """The codec a checkpoint was trained with. `vae`: where its autoencoder lives on this machine (default:
    the recorded path). Refuses an autoencoder or statistics that differ from the recorded ones."""
    if state.get("kind") != KIND:
        raise ValueError(f"unknown video codec kind {state.get('kind')!r} in state; expected {KIND!r}")
    source = vae if vae is not None else state.get("path")
    if source is None:
        raise ValueError("the checkpoint's codec records no autoencoder path: pass vae=<local folder>")
    if not Path(str(source)).expanduser().exists():
        raise FileNotFoundError(f"the autoencoder of this checkpoint was at {source}, which does not exist here: "
                                "pass vae=<local folder> (scm-mm-sample ... +codec.vae=<folder>)")  # fmt: skip
    # A diffusers VAE records the clip channels it was used with (grey clips on an RGB VAE).
    overrides.setdefault("media_channels", state["autoencoder"].get("media_channels"))
    codec = VideoLatentCodec(source, state["sigma_d"], state["mean"], state["std"], **overrides)
    check_state(state["autoencoder"], codec.vae.describe(), f"autoencoder at {source} (checkpoint's != this one)")
    return codec
