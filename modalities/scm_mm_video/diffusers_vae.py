"""diffusers' video VAEs (CogVideoX, Wan, LTX-Video) from a local folder, behind the codec's `VideoAutoencoder`
interface (scm_mm_video.codec): `encode_raw` gives the posterior MEAN in raw units (before any
scaling_factor or latents_mean/std), `decode_raw` inverts it; `describe()` identifies the VAE.

Each class maps T = 1 + f (t - 1) frames to t latent frames and H x W to H / s x W / s; the frame counts it
takes and gives back unchanged are T = 1 + frame_step * k (all measured on tiny random models in
tests/video/test_diffusers_vae.py):

    AutoencoderKLWan        f = 2^(count of True in temperal_downsample), s = 2^(len(dim_mult) - 1) * patch_size;
                            frame_step = lcm(4, f): 4k + 1 frames for the released Wan VAEs (f = 4)
    AutoencoderKLCogVideoX  f = temporal_compression_ratio, s = 2^(len(block_out_channels) - 1);
                            frame_step = 2f: t odd, 8k + 1 frames (its 49)
    AutoencoderKLLTXVideo   f, s = the model's temporal/spatial_compression_ratio: patch_size_t and patch_size
                            times 2^(count of True in spatio_temporal_scaling) unless the config sets them;
                            frame_step = f: 8k + 1 frames for the released LTX-Video VAEs

- Wan encodes the first frame, then chunks of 4 frames (hard-coded in diffusers), whatever f is: T = 16
  gives 4 latent frames that decode to 13 frames. Its factors come from the architecture, not from the
  config's nominal scale_factor_temporal/spatial, which tiny debug configs may leave at 4 and 8.
- CogVideoX decodes latent frames in pairs after an odd-sized first group (num_latent_frames_batch_size=2):
  4 latent frames (from 13 frames) decode to 16 frames, not 13. Hence T = 8k + 1 for f = 4 (its 49 frames).
- LTX-Video patchifies by patch_size (space) and patch_size_t (time) before its (causal) encoder; diffusers'
  encoder does not run with patch_size_t > 1 (its conv_in ignores it), so such a config is refused. A
  decoder with timestep_conditioning (LTX-Video 0.9.1 and later) decodes at `decode_timestep` (default
  0.0, as the LTXPipeline) WITHOUT the pipeline's decode_noise_scale mixing of noise into the latents, so
  decode_raw is deterministic; a decoder whose config sets decoder_inject_noise draws that noise from
  torch's global RNG (its scales start at 0).

Grey clips: with `media_channels=1` a 3-channel VAE gets the grey frame replicated to RGB by encode_raw, and
decode_raw returns the mean of the decoded RGB channels.

Statistics: `latents_mean`/`latents_std` are the per-channel lists the VAE ships (Wan: config fields;
LTX-Video: its buffers, unless they hold diffusers' initial zeros and ones, which are no statistics; CogVideoX
configs may carry them, usually not), else None: the caller then measures them on data (VideoLatentCodec.fit).
CogVideoX's scaling_factor is a single number for the scaled latents and is recorded by describe(), never applied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scm_mm.train.checkpoint import weights_digest as checkpoint_digest  # this module's weights_digest is the VAE's

KIND = "diffusers-video-vae"

# Config fields that change what encode_raw / decode_raw compute (or name the latent units), per class;
# describe() records them. Left out: tiling defaults and pipeline hints (sample_height, force_upcast, the
# nominal scale factors), which a re-saved copy of the same VAE may change.
IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "AutoencoderKLCogVideoX": (
        "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "latent_channels", "layers_per_block", "act_fn", "norm_eps", "norm_num_groups",
        "temporal_compression_ratio", "use_quant_conv", "use_post_quant_conv", "scaling_factor", "shift_factor",
        "latents_mean", "latents_std",
    ),
    "AutoencoderKLWan": (
        "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
        "is_residual", "in_channels", "out_channels", "patch_size", "latents_mean", "latents_std",
    ),
    "AutoencoderKLLTXVideo": (
        "in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
        "decoder_block_out_channels", "layers_per_block", "decoder_layers_per_block", "spatio_temporal_scaling",
        "decoder_spatio_temporal_scaling", "decoder_inject_noise", "downsample_type", "upsample_residual",
        "upsample_factor", "timestep_conditioning", "patch_size", "patch_size_t", "resnet_norm_eps",
        "scaling_factor", "encoder_causal", "decoder_causal",
    ),
}  # fmt: skip
SUPPORTED = tuple(IDENTITY_FIELDS)


def weights_digest(vae: nn.Module) -> str:
    """sha256 (16 hex digits) of the fp16 bytes of the boundary layers: conv_in and conv_out of the encoder
    and of the decoder (pixels in, latents out, latents in, pixels out) and every tensor outside the two
    (quant convs, LTX-Video's latent statistics). Cheap for a 400M-parameter VAE; it tells apart two
    trainings of one architecture, not an edit deep inside one."""
    boundary = tuple(f"{part}.{end}." for part in ("encoder", "decoder") for end in ("conv_in", "conv_out"))
    return checkpoint_digest(
        vae.state_dict(), lambda name: name.split(".")[0] not in ("encoder", "decoder") or name.startswith(boundary)
    )


def _factors(name: str, vae: Any) -> tuple[int, int, int]:
    """(temporal_factor, spatial_factor, frame_step) of a loaded diffusers VAE; see the module docstring."""
    config = vae.config
    if name == "AutoencoderKLWan":
        temporal = 2 ** sum(bool(d) for d in config.temperal_downsample)
        spatial = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        return temporal, spatial, math.lcm(4, temporal)
    if name == "AutoencoderKLCogVideoX":  # the down blocks but the last halve time, up to the ratio's log2
        levels = len(config.block_out_channels) - 1
        temporal = 2 ** min(int(math.log2(config.temporal_compression_ratio)), levels)
        return temporal, 2**levels, 2 * temporal
    if config.patch_size_t != 1:
        raise ValueError(f"AutoencoderKLLTXVideo with patch_size_t={config.patch_size_t}: diffusers' LTX-Video "
                         "encoder does not run with patch_size_t > 1 (its conv_in ignores it), and no released "
                         "LTX-Video VAE uses it")
    temporal = int(vae.temporal_compression_ratio)
    return temporal, int(vae.spatial_compression_ratio), temporal


def _pixel_channels(name: str, config: Any) -> tuple[int, int]:
    """(in, out) channels of the clips: a Wan2.2 VAE (patch_size 2) folds 2x2 pixels into its in_channels
    (12 for RGB) inside the model, so the clips have in_channels / 4."""
    fold = (config.get("patch_size") or 1) ** 2 if name == "AutoencoderKLWan" else 1
    if config.in_channels % fold or config.out_channels % fold:
        raise ValueError(f"{name} with patch_size {config.patch_size} needs in_channels and out_channels divisible by "
                         f"{fold}, got {config.in_channels} and {config.out_channels}")  # fmt: skip
    return config.in_channels // fold, config.out_channels // fold


def _statistics(name: str, vae: Any, channels: int) -> tuple[list[float] | None, list[float] | None]:
    """The per-channel latent mean and std the VAE ships (raw units), or (None, None)."""
    if name == "AutoencoderKLLTXVideo":
        mean, std = vae.latents_mean.float().tolist(), vae.latents_std.float().tolist()
        if all(m == 0 for m in mean) and all(s == 1 for s in std):
            # diffusers' initial buffers, not statistics: a converted or fine-tuned VAE that never had them
            # trained (and tiny debug models) would otherwise count as fitted and x0 would miss sigma_d.
            return None, None
    else:
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None and std is None:
        return None, None
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise ValueError(f"{name}: latents_mean / latents_std ({None if mean is None else len(mean)} / "
                         f"{None if std is None else len(std)} entries) do not match its {channels} latent channels; "
                         "fix the VAE's config.json")
    return [float(m) for m in mean], [float(s) for s in std]


class DiffusersVideoVAE(nn.Module):
    """A diffusers video VAE as a `VideoAutoencoder`: float video (B, C, T, H, W) in [-1, 1] <-> raw latent
    posterior mean (B, z, t, h, w), with T = 1 + temporal_factor * (t - 1) and H = spatial_factor * h.
    Build it with `load_diffusers_video_vae`; the diffusers model is `.vae`."""

    vae: Any  # a diffusers ModelMixin (typed loosely: diffusers' config attributes are dynamic)

    def __init__(
        self,
        vae: Any,                           # AutoencoderKLCogVideoX, AutoencoderKLWan or AutoencoderKLLTXVideo
        media_channels: int | None = None,  # channels of the clips; 1 on a 3-channel VAE: grey <-> RGB
        decode_timestep: float = 0.0,       # LTX-Video decoders with timestep_conditioning decode at this t
    ) -> None:
        super().__init__()
        name = type(vae).__name__
        if name not in SUPPORTED:
            raise ValueError(f"{name} is not a supported diffusers video VAE; supported: {', '.join(SUPPORTED)}")
        self.vae = vae.eval().requires_grad_(False)
        self.class_name = name
        self.weights_digest = weights_digest(vae)
        self.vae_channels, out_channels = _pixel_channels(name, vae.config)
        self.in_channels = self.vae_channels if media_channels is None else int(media_channels)
        if self.in_channels not in (1, self.vae_channels) or out_channels != self.vae_channels:
            raise ValueError(f"{name} maps {self.vae_channels} -> {out_channels} channels; media_channels "
                             f"must be {self.vae_channels} or 1 (grey, replicated), got {media_channels}")
        self.latent_channels = int(vae.config.z_dim if name == "AutoencoderKLWan" else vae.config.latent_channels)
        self.temporal_factor, self.spatial_factor, self.frame_step = _factors(name, vae)
        self.latents_mean, self.latents_std = _statistics(name, vae, self.latent_channels)
        self.timestep_conditioned = bool(getattr(vae.config, "timestep_conditioning", False))
        self.decode_timestep = float(decode_timestep)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def describe(self) -> dict[str, Any]:
        """JSON settings that identify the VAE and how it is used: kind, diffusers class, the config fields of
        IDENTITY_FIELDS, media channels, the decode timestep where it matters, a weights digest; no path."""
        config = {field: _json(self.vae.config.get(field)) for field in IDENTITY_FIELDS[self.class_name]}
        out = {"kind": KIND, "class": self.class_name, "config": config, "media_channels": self.in_channels}
        if self.timestep_conditioned:
            out["decode_timestep"] = self.decode_timestep
        return {**out, "weights_digest": self.weights_digest}

    def check_frames(self, frames: int) -> None:
        """ValueError unless `frames` is 1 + frame_step * k, naming the nearest valid counts."""
        step = self.frame_step
        if frames < 1 or (frames - 1) % step:
            below = 1 + step * max((frames - 1) // step, 0)
            raise ValueError(f"{frames} frames: {self.class_name} takes 1 + {step}k frames (e.g. {below} or "
                             f"{below + step}); other counts are cropped or decode to another length")

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """float video (B, C, T, H, W) in [-1, 1] -> posterior mean (B, z, t, h, w), float32, raw units."""
        b, c, t, h, w = video.shape
        if c != self.in_channels or h % self.spatial_factor or w % self.spatial_factor:
            raise ValueError(f"{self.class_name} takes video (B, {self.in_channels}, T, H, W) with H and W multiples "
                             f"of {self.spatial_factor}, got {tuple(video.shape)}")
        self.check_frames(t)
        x = video.to(self.device, self.dtype)
        if c != self.vae_channels:
            x = x.expand(b, self.vae_channels, t, h, w)  # grey -> RGB
        return self.vae.encode(x).latent_dist.mean.float()

    @torch.no_grad()
    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """posterior-mean latent (B, z, t, h, w) -> float32 video (B, C, 1 + temporal_factor (t - 1), H, W)."""
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"{self.class_name} decodes latents (B, {self.latent_channels}, t, h, w), got "
                             f"{tuple(latent.shape)}")
        self.check_frames(1 + self.temporal_factor * (latent.shape[2] - 1))
        z = latent.to(self.device, self.dtype)
        if self.timestep_conditioned:
            # diffusers 0.42's sliced LTX decode pairs latents with latents when given a timestep (it iterates
            # `(z.split(1), temb.split(1))`, not their zip), so slicing happens here, one clip per call.
            chunks = z.split(1) if self.vae.use_slicing else (z,)
            video = torch.cat([self.vae.decode(c, torch.full((len(c),), self.decode_timestep, device=c.device,
                                                             dtype=c.dtype)).sample for c in chunks])
        else:
            video = self.vae.decode(z).sample
        if self.in_channels != self.vae_channels:
            video = video.mean(1, keepdim=True)  # RGB -> grey
        return video.float()


def _json(value: Any) -> Any:
    """Config values as JSON data (tuples -> lists)."""
    return json.loads(json.dumps(value))


def find_vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's config.json: `path` itself, or the vae/ subfolder of a pipeline folder."""
    folder = Path(path).expanduser()
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no diffusers video VAE at {folder}: expected a local folder holding config.json and "
        "diffusion_pytorch_model.safetensors (as written by save_pretrained, e.g. the vae/ folder of a downloaded "
        f"Wan2.1, CogVideoX or LTX-Video pipeline: {', '.join(SUPPORTED)}), or a pipeline folder with such a "
        "vae/ subfolder. scm-mm never downloads weights."
    )


def load_diffusers_video_vae(
    path: str | Path,                      # a VAE folder (config.json + weights) or a pipeline folder with vae/
    dtype: torch.dtype = torch.float32,    # compute dtype
    device: str | torch.device = "cpu",
    tiling: bool = False,                  # diffusers' tiles: spatial, and for LTX-Video temporal (framewise)
                                           # too, so its memory stops growing with clip length; changes numbers
                                           # slightly (overlapping tiles are blended)
    slicing: bool = True,                  # encode / decode one clip of a batch at a time
    media_channels: int | None = None,     # 1: grey clips on a 3-channel VAE; None: the VAE's channels
    decode_timestep: float = 0.0,          # for LTX-Video decoders with timestep_conditioning
) -> DiffusersVideoVAE:
    """A local diffusers AutoencoderKLCogVideoX / AutoencoderKLWan / AutoencoderKLLTXVideo, in eval mode without
    gradients, picked by the `_class_name` of its config.json; never downloads."""
    folder = find_vae_folder(path)
    config_file = folder / "config.json"
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in SUPPORTED:
        raise ValueError(f"{config_file} names _class_name={name!r}, not a supported diffusers video VAE "
                         f"({', '.join(SUPPORTED)}); image VAEs (AutoencoderKL) belong to the image modality")
    import diffusers  # imported here: diffusers takes seconds to import

    try:
        # Loaded in float32 so the weights digest does not depend on `dtype`; cast afterwards.
        vae = getattr(diffusers, name).from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    except OSError as error:  # no weights file: diffusers raises EnvironmentError
        raise FileNotFoundError(f"could not load the {name} weights from {folder}: expected "
                                f"diffusion_pytorch_model.safetensors there (local files only, no pickled .bin; "
                                f"scm-mm never downloads): {error}") from error
    wrapper = DiffusersVideoVAE(vae, media_channels=media_channels, decode_timestep=decode_timestep)
    if tiling:
        vae.enable_tiling()
        if name == "AutoencoderKLLTXVideo":  # decodes the whole clip at once otherwise (Wan, CogVideoX never do)
            vae.use_framewise_decoding = True
    if slicing:
        vae.enable_slicing()
    return wrapper.to(device=device, dtype=dtype)
