"""Image codecs (the `Codec` protocol of scm_mm.modality): uint8 images <-> x0 with std about sigma_d.

- `PixelCodec`: x0 = x / 127.5 - 1 in [-1, 1], whose std is about 0.5 = sigma_d for natural images
  (the paper's pixel-space setting; CIFAR-10, ImageNet 64x64).
- `SDVAECodec`: a Stable-Diffusion-style diffusers `AutoencoderKL` from a local folder, with the
  paper's per-channel normalisation of its latents (sCM, "Latents at 512^2"):

      x0_c = (latent_c - mean_c) * sigma_d / std_c

  `latent` is the RAW posterior of the VAE (`vae.encode(x).latent_dist`, its mean by default), i.e. in
  the units before diffusers' `scaling_factor` (0.18215 for SD-VAE) is applied. The paper's
  mean = (1.56, -0.695, 0.483, 0.729), std = (5.27, 5.91, 4.21, 4.31) for SD-VAE ft-mse are in those raw
  units: raw SD latents have std about 1 / 0.18215 = 5.5, scaled ones about 1. EDM2's encoders.py
  normalises raw latents the same way. Statistics given in scaled units convert by dividing by
  scaling_factor. `latent_statistics` measures them for another VAE or data set.

`codec_from_state` rebuilds either codec from the `state()` stored in a checkpoint and refuses a VAE
whose settings differ (`check_compatible`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from scm_mm.modality import LOCATION_FIELDS, as_dtype, check_state
from scm_mm.train.checkpoint import weights_digest

SD_VAE_FT_MSE_MEAN = (1.56, -0.695, 0.483, 0.729)  # raw latent units (before scaling_factor); sCM, latents at 512^2
SD_VAE_FT_MSE_STD = (5.27, 5.91, 4.21, 4.31)


def to_unit(media: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    if media.dtype != torch.uint8 or media.ndim != 4:
        raise TypeError(f"expected a uint8 image batch (B, C, H, W), got {media.dtype} {tuple(media.shape)}")
    return (media.float() - 127.5) / 127.5  # x - 127.5 is exact: one rounding, and x0(255 - k) = -x0(k)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clamped) -> uint8, rounded to the nearest level."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class _CheckCompatible:
    def state(self) -> dict[str, Any]:
        raise NotImplementedError

    def check_compatible(self, saved_state: Mapping[str, Any], ignore: Sequence[str] = LOCATION_FIELDS) -> None:
        """Raise ValueError naming each field in which `saved_state` (e.g. a checkpoint's) differs from
        this codec's state. `ignore`: fields that may differ (by default the VAE's location)."""
        saved = {k: v for k, v in saved_state.items() if k not in ignore}
        mine = {k: v for k, v in self.state().items() if k not in ignore}
        check_state(saved, mine, "codec settings (saved != this codec)")


class PixelCodec(_CheckCompatible):
    """Pixels as they are: x0 = x / 127.5 - 1 in [-1, 1] (B, C, H, W). Decoding clamps and rounds, so
    decode(encode(x)) == x exactly for uint8 x. sigma_d = 0.5, about the std of natural images."""

    cacheable = False  # cheap: encode on the fly

    def __init__(
        self,
        sigma_d: float = 0.5,         # data std in [-1, 1] units (paper: 0.5 for pixels)
        channels: int | None = None,  # if set, encode/decode check the channel count
    ) -> None:
        self.sigma_d = float(sigma_d)
        self.channels = channels

    def _check_channels(self, x: torch.Tensor) -> None:
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"PixelCodec expects {self.channels} channels, got shape {tuple(x.shape)}")

    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> x0 float32 (B, C, H, W) in [-1, 1]."""
        self._check_channels(media)
        return to_unit(media)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, H, W) -> uint8 (B, C, H, W)."""
        self._check_channels(x0)
        return to_uint8(x0)

    def state(self) -> dict[str, Any]:
        return {"kind": "pixels", "sigma_d": self.sigma_d, "channels": self.channels}


def _vae_folder(path: str | Path) -> Path:
    folder = Path(path)
    for candidate in (folder, folder / "vae"):  # the VAE itself, or a Stable Diffusion pipeline folder
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no diffusers AutoencoderKL at {folder}: expected a local folder holding config.json and "
        "diffusion_pytorch_model.safetensors (as written by AutoencoderKL.save_pretrained, e.g. a downloaded "
        "copy of stabilityai/sd-vae-ft-mse), or a pipeline folder with such a vae/ subfolder. "
        "scm-mm never downloads weights."
    )


def load_vae(path: str | Path) -> Any:
    """A diffusers AutoencoderKL from a local folder (float32, CPU, eval, no grad); never downloads."""
    from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import

    vae = AutoencoderKL.from_pretrained(str(_vae_folder(path)), local_files_only=True)
    return vae.float().eval().requires_grad_(False)


def _weights_digest(vae: torch.nn.Module) -> str:
    """A short hash of the layers at the latent boundary, cast to fp16 (so an fp16 copy of the same VAE
    matches). Two VAEs with one config but different training (SD-VAE ft-ema vs ft-mse) differ here."""
    boundary = ("encoder.conv_out", "quant_conv", "post_quant_conv", "decoder.conv_out")
    return weights_digest(vae.state_dict(), lambda name: name.rsplit(".", 1)[0] in boundary)


@torch.no_grad()
def encode_raw(
    vae: Any,                               # diffusers AutoencoderKL
    media: torch.Tensor,                    # uint8 (B, 3, H, W)
    sample: bool = False,                   # a posterior sample instead of its mean
    generator: torch.Generator | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Raw VAE latents (before scaling_factor), float32 (B, latent_channels, H / f, W / f), on media's device."""
    param = next(vae.parameters())
    out = []
    for chunk in media.split(batch_size):
        posterior = vae.encode(to_unit(chunk).to(param.device, param.dtype)).latent_dist
        latent = posterior.sample(generator=generator) if sample else posterior.mean
        out.append(latent.float().to(media.device))
    return torch.cat(out)


class SDVAECodec(_CheckCompatible):
    """Stable-Diffusion-style VAE latents, normalised per channel: x0 = (latent - mean) * sigma_d / std.

    mean and std are in raw latent units (before diffusers' scaling_factor); the defaults are the
    paper's values for SD-VAE ft-mse. Images (B, 3, H, W) uint8 <-> x0 (B, latent_channels, H/f, W/f)
    float32 with f = 2 ** (len(block_out_channels) - 1) (8 for SD-VAE). Encode and decode run in
    batches of `batch_size` on `device` in `dtype` and return on the input's device. `dtype` may be named
    as a config writes it ("bfloat16", "float16"). float16 overflows in some VAEs (SDXL's, hence its
    fp16-fix fine-tune): compare a few encodings with float32 before caching a data set in another dtype
    (the cache is keyed by the dtype, `encoding()`; checkpoints do not record it).
    """

    cacheable = True  # a VAE pass is expensive: scm_mm.data encodes a dataset once and caches it

    def __init__(
        self,
        path: str | Path,                          # local diffusers AutoencoderKL folder
        mean: Sequence[float] = SD_VAE_FT_MSE_MEAN,  # per-channel latent mean, raw units
        std: Sequence[float] = SD_VAE_FT_MSE_STD,    # per-channel latent std, raw units
        sigma_d: float = 0.5,                      # std of x0 after normalisation
        sample: bool = False,                      # encode a posterior sample instead of its mean
        dtype: str | torch.dtype | None = torch.float32,  # VAE compute dtype or its name; None: fp32
        device: str | torch.device = "cpu",
        batch_size: int = 16,                      # images per VAE call
    ) -> None:
        self.path = str(path)
        self.vae = load_vae(path)
        self.weights_digest = _weights_digest(self.vae)  # before the dtype cast: independent of dtype
        self.vae.to(device=device, dtype=as_dtype(dtype))  # None: float32, as loaded
        channels = self.vae.config.latent_channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"the VAE at {self.path} has {channels} latent channels but mean has {len(mean)} and std "
                f"{len(std)} entries; measure them with latent_statistics()"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.sigma_d, self.sample, self.batch_size = float(sigma_d), bool(sample), batch_size

    def encoding(self) -> dict[str, Any]:
        """Settings that change the encodings but not what decodes them (see scm_mm.modality)."""
        return {"dtype": str(next(self.vae.parameters()).dtype), "tiling": bool(getattr(self.vae, "use_tiling", False))}

    def _per_channel(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent (B, C, h, w) -> x0 = (latent - mean) * sigma_d / std, in latent's (float) dtype."""
        return (latent - self._per_channel(self.mean, latent)) * (self.sigma_d / self._per_channel(self.std, latent))

    def denormalize(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, h, w) -> raw latent = x0 * std / sigma_d + mean (the inverse of normalize)."""
        return x0 * (self._per_channel(self.std, x0) / self.sigma_d) + self._per_channel(self.mean, x0)

    def encode(self, media: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> x0 float32 (B, C, H/f, W/f). generator: for sample=True, on the VAE's device."""
        latent = encode_raw(self.vae, media, self.sample, generator, self.batch_size)
        return self.normalize(latent)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, h, w) -> uint8 (B, 3, h * f, w * f), on x0's device."""
        param = next(self.vae.parameters())
        out = []
        for chunk in x0.split(self.batch_size):
            latent = self.denormalize(chunk.float()).to(param.device, param.dtype)
            out.append(to_uint8(self.vae.decode(latent).sample.float()).to(x0.device))
        return torch.cat(out)

    def to(self, device: str | torch.device) -> SDVAECodec:
        """Run the VAE on `device` (its dtype stays); returns self."""
        self.vae.to(device=device)
        return self

    def state(self) -> dict[str, Any]:
        config = self.vae.config
        return {
            "kind": "sd-vae",
            "path": self.path,
            "mean": self.mean,  # raw latent units (before scaling_factor)
            "std": self.std,
            "sigma_d": self.sigma_d,
            "sample": self.sample,
            "in_channels": config.in_channels,
            "latent_channels": config.latent_channels,
            "block_out_channels": list(config.block_out_channels),
            "layers_per_block": config.layers_per_block,
            "scaling_factor": config.scaling_factor,  # recorded to identify the VAE; not used by x0
            "shift_factor": getattr(config, "shift_factor", None),
            "weights_digest": self.weights_digest,
        }


CODECS = {"pixels": PixelCodec, "sd-vae": SDVAECodec}


def codec_from_state(state: Mapping[str, Any], **overrides: Any) -> PixelCodec | SDVAECodec:
    """Rebuild the codec a checkpoint was trained with. overrides: constructor arguments, e.g. path=...
    (where the VAE lives on this machine), device=..., dtype=.... The rebuilt codec must match `state`
    in every field not overridden, or ValueError lists the differences (e.g. another VAE at `path`)."""
    kind = state.get("kind")
    if kind == "pixels":
        kwargs: dict[str, Any] = {"sigma_d": state["sigma_d"], "channels": state.get("channels")}
    elif kind == "sd-vae":
        kwargs = {k: state[k] for k in ("path", "mean", "std", "sigma_d", "sample")}
    else:
        raise ValueError(f"unknown image codec kind {kind!r} in state; known: {sorted(CODECS)}")
    codec = CODECS[kind](**{**kwargs, **overrides})
    codec.check_compatible(state, ignore=(*LOCATION_FIELDS, *overrides))
    return codec


@torch.no_grad()
def latent_statistics(
    codec_or_vae: SDVAECodec | Any,  # an SDVAECodec, or a diffusers AutoencoderKL
    dataset: Any,                    # raw image dataset: items (uint8 (3, H, W), label)
    n: int = 2048,                   # images to use, drawn at random (datasets are often sorted by class)
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents (before scaling_factor) of n random dataset images:
    the `mean` and `std` to give SDVAECodec for another VAE or another kind of data. A codec's own
    `sample` setting is honoured; a bare VAE uses the posterior mean."""
    if isinstance(codec_or_vae, SDVAECodec):
        vae, sample = codec_or_vae.vae, codec_or_vae.sample
    else:
        vae, sample = codec_or_vae, False
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sums, square_sums, count = [], [], 0  # per batch, in float64
    for start in range(0, len(order), batch_size):
        media = torch.stack([torch.as_tensor(dataset[i][0]) for i in order[start : start + batch_size]])
        latent = encode_raw(vae, media, sample, batch_size=batch_size).double()  # (B, C, h, w)
        sums.append(latent.sum((0, 2, 3)))
        square_sums.append(latent.square().sum((0, 2, 3)))
        count += latent.shape[0] * latent.shape[2] * latent.shape[3]
    mean = torch.stack(sums).sum(0) / count
    std = (torch.stack(square_sums).sum(0) / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
