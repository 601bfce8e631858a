"""A small causal video autoencoder (KL) with (2+1)-D convolutions, trained by the library on its own clips.

Causal in time, as the CogVideoX and Wan VAEs are: every temporal convolution looks back only (the
first frame is repeated as padding), so latent frame j sees the input frames up to the last of its group
(<= temporal_factor * j), and an output frame those of the latent frames up to its own group's; within a
group, an output frame may see the group's later input frames. The first frame is encoded on its own and
every later group of `temporal_factor` frames becomes one latent frame:

    T = 1 + temporal_factor * (t - 1) frames  <->  t latent frames,   H = spatial_factor * h

(the "4k + 1" rule of the 4x-temporal video VAEs). Normalisation is per frame (GroupNorm over
(C, H, W) of each frame), never over time, so the network can be run on a clip piece by piece:
`decode_raw` decodes `chunk_frames` latent frames at a time, carrying each temporal convolution's last
two input frames into the next piece (the feature cache of the Wan and CogVideoX decoders). The
pieces give exactly the whole-clip decode while memory stays that of one piece, however long the
clip. Encoding runs on whole clips (training clips are short).

Layout and cost. Activations are kept as frames, (B, T, C, H, W), so that spatial 3x3 convolutions
are Conv2d over B*T frames and a causal temporal convolution (kernel 3, pointwise in space) is one
1x1 Conv2d over the channels of three shifted frames: this (2+1)-D factorisation (R(2+1)D, Tran et al.
2018) runs several times faster on a CPU than Conv3d and keeps the parameter count low. Pixels enter
through a 2x2 space-to-depth (`patch_size`, as Wan2.2's VAE does), so no convolution runs at full
resolution. Per level: residual blocks (spatial conv, temporal conv, spatial conv), then a stride-2
spatial downsampling, and in the deepest log2(temporal_factor) levels a causal temporal downsampling
(frame 0 alone, later frames in pairs, folded into channels). No attention: at the sizes trained
here, the convolutions' receptive field covers the latent frame.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scm_mm.train.checkpoint import load_into, load_module_folder, save_module_folder
from scm_mm.train.checkpoint import weights_digest as checkpoint_digest  # this module's weights_digest is the VAE's

KIND = "scm-mm-video-vae"
Cache = dict[nn.Module, Any]  # per-module state of a chunked pass (None: a whole-clip pass)


@dataclass(frozen=True)
class VideoVAEConfig:
    in_channels: int = 1                         # pixel channels: 1 (grey) or 3 (RGB)
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)       # per level; len - 1 stride-2 downsamplings
    num_res_blocks: int = 1                      # per level, in the encoder (the decoder has one more)
    temporal_factor: int = 2                     # power of 2, at most 2 ** (len(channel_mult) - 1)
    patch_size: int = 2                          # space-to-depth at the pixel ends
    groups: int = 8                              # GroupNorm groups (per frame)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "channel_mult": list(self.channel_mult)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> VideoVAEConfig:
        return cls(**{**fields, "channel_mult": tuple(fields["channel_mult"])})


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> (B T, C, H, W), a view."""
    return x.flatten(0, 1)


class SpatialConv(nn.Module):
    """A 3x3 Conv2d applied to every frame: (B, T, C, H, W) -> (B, T, out, H', W')."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1 if stride == 1 else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = frames_of(x)
        if self.stride == 2:  # padded right/bottom, as SD's VAE downsamples
            h = F.pad(h, (0, 1, 0, 1))
        return self.conv(h).unflatten(0, x.shape[:2])


class CausalTemporalConv(nn.Module):
    """y_t = sum_k W_k x_(t-k), k = 0..kernel-1, pointwise in space; x_(t<0) = x_0 (the first frame repeated).

    forward(x (B, T, C, H, W), cache) -> (B, T, out, H, W). In a chunked pass `cache` holds this layer's
    last kernel - 1 input frames, which take the place of the padding in the next chunk.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3) -> None:
        super().__init__()
        self.kernel = kernel
        self.mix = nn.Conv2d(kernel * in_ch, out_ch, 1)  # [x_(t-k+1), ..., x_t] stacked on channels

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        t = x.shape[1]
        past = None if cache is None else cache.get(self)
        if past is None:
            past = x[:, :1].expand(-1, self.kernel - 1, -1, -1, -1)
        padded = torch.cat([past, x], 1)  # (B, kernel - 1 + T, C, H, W)
        if cache is not None:
            cache[self] = padded[:, -(self.kernel - 1) :].detach()
        stacked = torch.cat([padded[:, k : k + t] for k in range(self.kernel)], 2)  # (B, T, kernel C, H, W)
        return self.mix(frames_of(stacked)).unflatten(0, x.shape[:2])


class FrameNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame: (B, T, C, H, W) -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(frames_of(x)).unflatten(0, x.shape[:2])


class ResBlock(nn.Module):
    """x + spatial(SiLU(norm(temporal(SiLU(norm(spatial(SiLU(norm(x))))))))), a 1x1 shortcut when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(min(groups, in_ch), in_ch), SpatialConv(in_ch, out_ch)
        self.norm2, self.temporal = FrameNorm(min(groups, out_ch), out_ch), CausalTemporalConv(out_ch, out_ch)
        self.norm3, self.conv2 = FrameNorm(min(groups, out_ch), out_ch), SpatialConv(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.temporal(F.silu(self.norm2(h)), cache)
        h = self.conv2(F.silu(self.norm3(h)))
        skip = x if self.skip is None else self.skip(frames_of(x)).unflatten(0, x.shape[:2])
        return skip + h


class Downsample(nn.Module):
    """Halve H and W (stride-2 conv); with `temporal`, also 1 + 2k -> 1 + k frames: frame 0 alone (paired with
    itself), later frames in pairs, their channels merged by a 1x1 conv."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.conv = SpatialConv(ch, ch, stride=2)
        self.temporal = nn.Conv2d(2 * ch, ch, 1) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.temporal is None:
            return x
        b, _, c, h, w = x.shape
        pairs = torch.cat([x[:, :1], x], 1).reshape(b, -1, 2 * c, h, w)  # (B, 1 + k, 2C, h, w)
        return self.temporal(frames_of(pairs)).unflatten(0, pairs.shape[:2])


class Upsample(nn.Module):
    """Double H and W (nearest, then a 3x3 conv); with `temporal`, 1 + k -> 1 + 2k frames: a 1x1 conv to two
    frames' channels, unfolded into time, and the first of frame 0's two outputs dropped."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = nn.Conv2d(ch, 2 * ch, 1) if temporal else None
        self.conv = SpatialConv(ch, ch)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, t, c, h, w = x.shape
        if self.temporal is not None:
            x = self.temporal(frames_of(x)).reshape(b, 2 * t, c, h, w)
            first = cache is None or self not in cache
            if cache is not None:
                cache[self] = True  # later chunks keep both frames of each latent frame
            x = x[:, 1:] if first else x
        up = F.interpolate(frames_of(x), scale_factor=2, mode="nearest").unflatten(0, x.shape[:2])
        return self.conv(up)


@dataclass
class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) of the latents, each (B, z, t, h, w)."""

    mean: torch.Tensor
    logvar: torch.Tensor
    std: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Drawn where the generator lives (a CPU generator gives the same noise on any device), then moved.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent: (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class VideoVAE(nn.Module):
    """encode(video (B, C, T, H, W) in [-1, 1]) -> DiagonalGaussian over (B, z, t, h, w); decode(z) -> video."""

    def __init__(self, config: VideoVAEConfig) -> None:
        super().__init__()
        levels = len(config.channel_mult)
        temporal_downs = int(math.log2(config.temporal_factor))
        if 2**temporal_downs != config.temporal_factor or temporal_downs > levels - 1:
            raise ValueError(f"temporal_factor must be a power of 2 up to 2 ** (len(channel_mult) - 1) = "
                             f"{2 ** (levels - 1)}, got {config.temporal_factor}")  # fmt: skip
        self.config = config
        self.in_channels, self.latent_channels = config.in_channels, config.latent_channels
        self.temporal_factor, self.spatial_factor = config.temporal_factor, config.spatial_factor
        self.frame_step = self.temporal_factor  # every 1 + f k frames round-trip (causal, no grouping)
        widths = [config.base_channels * m for m in config.channel_mult]
        temporal = [i >= levels - 1 - temporal_downs for i in range(levels - 1)]  # the deepest downsamplings
        pixels = config.in_channels * config.patch_size**2  # channels after space-to-depth

        self.enc_in = SpatialConv(pixels, widths[0])
        self.enc_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            ins = [widths[max(i - 1, 0)]] + [widths[i]] * (config.num_res_blocks - 1)
            self.enc_blocks.append(nn.ModuleList(ResBlock(c, widths[i], config.groups) for c in ins))
            if i < levels - 1:
                self.downs.append(Downsample(widths[i], temporal[i]))
        self.enc_mid = ResBlock(widths[-1], widths[-1], config.groups)
        self.enc_norm = FrameNorm(min(config.groups, widths[-1]), widths[-1])
        self.enc_out = SpatialConv(widths[-1], 2 * config.latent_channels)
        # Start nearly deterministic (posterior std e^-3 = 0.05): with logvar = 0 the decoder would first see
        # unit noise on top of a small mean and learn slowly; the KL term widens the posterior as needed.
        nn.init.constant_(self.enc_out.conv.bias[config.latent_channels :], -6.0)

        self.dec_in = SpatialConv(config.latent_channels, widths[-1])
        self.dec_mid = ResBlock(widths[-1], widths[-1], config.groups)
        self.dec_blocks, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            ins = [widths[min(i + 1, levels - 1)]] + [widths[i]] * config.num_res_blocks
            self.dec_blocks.append(nn.ModuleList(ResBlock(c, widths[i], config.groups) for c in ins))
            if i > 0:
                self.ups.append(Upsample(widths[i], temporal[i - 1]))
        self.dec_norm = FrameNorm(min(config.groups, widths[0]), widths[0])
        self.dec_out = SpatialConv(widths[0], pixels)

    # ---- shapes

    def latent_frames(self, frames: int) -> int:
        f = self.temporal_factor
        if frames < 1 or (frames - 1) % f:
            below = 1 + f * max((frames - 1) // f, 0)
            raise ValueError(f"{frames} frames: this autoencoder takes 1 + {f}k frames, use {below} or {below + f}")
        return 1 + (frames - 1) // f

    def frames_for(self, latent_frames: int) -> int:
        return 1 + self.temporal_factor * (latent_frames - 1)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != self.in_channels:
            raise ValueError(f"expected video (B, {self.in_channels}, T, H, W), got shape {tuple(video.shape)}")
        self.latent_frames(video.shape[2])
        for side in video.shape[3:]:
            if side % self.spatial_factor:
                f = self.spatial_factor
                raise ValueError(f"frame size {tuple(video.shape[3:])}: sides must be multiples of {f}, "
                                 f"e.g. {side // f * f} or {(side // f + 1) * f}")  # fmt: skip

    # ---- the two halves

    def encode(self, video: torch.Tensor) -> DiagonalGaussian:
        """video float (B, C, T, H, W) in [-1, 1] -> the posterior over (B, z, t, h, w)."""
        self._check_video(video)
        x = video.transpose(1, 2)  # frames layout (B, T, C, H, W)
        h = self.enc_in(F.pixel_unshuffle(frames_of(x), self.config.patch_size).unflatten(0, x.shape[:2]))
        for i, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                h = block(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = self.enc_out(F.silu(self.enc_norm(self.enc_mid(h))))
        mean, logvar = h.transpose(1, 2).chunk(2, dim=1)  # (B, z, t, h, w) each
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """z (B, z, t, h, w) -> video float (B, C, 1 + f_t (t - 1), f_s h, f_s w); with `cache`, one chunk of
        a longer clip (see `decode_raw`)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (B, {self.latent_channels}, t, h, w), got shape {tuple(z.shape)}")
        h = self.dec_mid(self.dec_in(z.transpose(1, 2)), cache)
        for i, blocks in enumerate(self.dec_blocks):
            for block in blocks:
                h = block(h, cache)
            if i < len(self.ups):
                h = self.ups[i](h, cache)
        out = self.dec_out(F.silu(self.dec_norm(h)))  # (B, T, C p^2, H / p, W / p)
        return F.pixel_shuffle(frames_of(out), self.config.patch_size).unflatten(0, out.shape[:2]).transpose(1, 2)

    def forward(
        self, video: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction from a posterior sample, posterior), for training."""
        posterior = self.encode(video)
        return self.decode(posterior.sample(generator)), posterior

    # ---- the codec's interface (scm_mm_video.codec.VideoAutoencoder)

    @torch.no_grad()
    def encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        """video float (B, C, T, H, W) in [-1, 1] -> posterior mean (B, z, t, h, w)."""
        return self.encode(video).mean

    @torch.no_grad()
    def decode_raw(self, latent: torch.Tensor, chunk_frames: int | None = 4) -> torch.Tensor:
        """(B, z, t, h, w) -> video float (B, C, T, H, W), `chunk_frames` latent frames at a time (None: whole);
        exactly the whole-clip decode, in the memory of one chunk."""
        if chunk_frames is None or latent.shape[2] <= chunk_frames:
            return self.decode(latent)
        cache: Cache = {}
        return torch.cat([self.decode(piece, cache) for piece in latent.split(chunk_frames, dim=2)], 2)

    def describe(self) -> dict[str, Any]:
        return {"kind": KIND, **self.config.to_dict(), "weights_digest": weights_digest(self)}


def weights_digest(vae: VideoVAE) -> str:
    """sha256 of the fp16 bytes of the layers at the latent boundary and the pixel ends (16 hex digits)."""
    ends = ("enc_in", "enc_out", "dec_in", "dec_out")
    return checkpoint_digest(vae.state_dict(), lambda name: name.split(".")[0] in ends)


# CPU-sized for the embedded 32x32 Moving-MNIST clips (9 frames -> latent (4, 5, 8, 8)), and a realistic
# RGB 4x8x8 autoencoder with 16 latent channels (the compression of the CogVideoX and Wan VAEs).
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(in_channels=1, latent_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   temporal_factor=2, patch_size=2, groups=8),  # fmt: skip
    "video-4x8x8-16ch": dict(in_channels=3, latent_channels=16, base_channels=128, channel_mult=(1, 2, 4),
                             num_res_blocks=2, temporal_factor=4, patch_size=2, groups=32),  # fmt: skip
}


def vae_preset(name: str, **overrides: Any) -> VideoVAE:
    """A freshly initialised VideoVAE of a preset; overrides replace config fields (e.g. in_channels=3)."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown video VAE preset {name!r}; known: {sorted(VAE_PRESETS)}")
    fields = {**VAE_PRESETS[name], **overrides}
    fields["channel_mult"] = tuple(fields["channel_mult"])
    return VideoVAE(VideoVAEConfig(**fields))


def save_video_vae(vae: VideoVAE, path: str | Path) -> Path:
    """config.json ({"kind", "config"}) + model.safetensors, written atomically."""
    return save_module_folder(vae, {"kind": KIND, "config": vae.config.to_dict()}, path)


def load_video_vae(path: str | Path) -> VideoVAE:
    """A VideoVAE written by save_video_vae (CPU, eval mode)."""
    config_file = Path(path) / "config.json"
    kind = json.loads(config_file.read_text()).get("kind") if config_file.is_file() else None
    if config_file.is_file() and kind != KIND:
        raise ValueError(f"{config_file} describes a {kind!r}, not a {KIND!r} (save_video_vae)")
    config, weights = load_module_folder(path, "video autoencoder")
    vae = VideoVAE(VideoVAEConfig.from_dict(config["config"]))
    load_into(vae, weights, f"video autoencoder {path}")
    return vae.eval()
