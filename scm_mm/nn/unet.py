"""One U-Net family for 1-D (audio frames), 2-D (images, mels) and 3-D (video) inputs.

ADM/EDM layout (residual blocks, self-attention at chosen levels, skip connections by
concatenation) with sCM §4.1's changes: positional time embedding of c_noise = 1000·t, adaptive
double normalisation in place of AdaGN, GroupNorm only (no BatchNorm, so torch.func.jvp works).
`dims` picks Conv1d/2d/3d (from scm_mm.nn.layers, for a cheaper JVP). Downsampling is a stride-2
3-tap conv (ADM); upsampling is nearest neighbour then a 3-tap conv, which avoids the checkerboard
of transposed convs. With `resample_blocks=True` both are ResBlocks that resample inside instead
(ADM's resblock_updown, the down/up blocks of EDM's DDPM++ and of EDM2), with a box average down and
nearest neighbour up (EDM2's [1,1] filter). All act on `resample_axes`, so video can keep its frame
count while halving height and width.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from scm_mm.nn.dit import SelfAttention
from scm_mm.nn.embeddings import ConditionEmbedding
from scm_mm.nn.layers import CONV
from scm_mm.nn.norm import AdaptiveDoubleNorm, GroupNorm, num_groups

# Spatial positions <-> attention tokens, one einops pattern per dims.
TO_TOKENS = {1: "b c l -> b l c", 2: "b c h w -> b (h w) c", 3: "b c t h w -> b (t h w) c"}
FROM_TOKENS = {1: "b l c -> b c l", 2: "b (h w) c -> b c h w", 3: "b (t h w) c -> b c t h w"}
SPATIAL_AXES = {1: ("l",), 2: ("h", "w"), 3: ("t", "h", "w")}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: torch.Tensor, mode: Literal["none", "down", "up"], factors: tuple[int, ...]) -> torch.Tensor:
    """Parameter-free resampling of x (B, C, *dims) by `factors` per spatial axis: "down" averages
    each box, "up" repeats each value (EDM2's [1,1] filter both ways). Linear, so its JVP is itself."""
    if mode == "down":
        return AVG_POOL[len(factors)](x, factors)
    if mode == "up":
        return F.interpolate(x, scale_factor=factors, mode="nearest")
    return x


class ResBlock(nn.Module):
    """skip(x) + conv2(Dropout(SiLU(ADN(conv1(SiLU(GN(x))), emb)))); conv2 zero-initialised, so
    the block starts as (a projection of) the identity (ADM, EDM). With `resample`, both branches
    are resampled just before conv1 and skip (ADM's resblock_updown), so both convs run at the
    output resolution.

    forward: x (B, in_channels, *dims), emb (B, emb_dim) -> (B, out_channels, *dims resampled).
    """

    def __init__(
        self,
        in_channels: int,  # channels of x
        out_channels: int,  # channels of the output
        emb_dim: int,  # condition embedding width
        dims: int = 2,  # 1, 2 or 3 spatial dims
        dropout: float = 0.0,  # nn.Dropout before conv2 (sCT uses 0.2 to 0.45, App. G)
        groups: int = 32,  # GroupNorm groups, upper bound (see norm.num_groups)
        resample: Literal["none", "down", "up"] = "none",  # resample by `factors` inside the block
        factors: Sequence[int] | None = None,  # per spatial axis; None: 2 on every axis
    ) -> None:
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"resample must be 'none', 'down' or 'up', got {resample!r}")
        conv = CONV[dims]
        self.resample: Literal["none", "down", "up"] = resample
        self.factors = (2,) * dims if factors is None else tuple(factors)
        self.norm1 = GroupNorm(num_groups(in_channels, groups), in_channels, eps=1e-6)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaptiveDoubleNorm(out_channels, emb_dim, norm="group", groups=groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(conv(out_channels, out_channels, 3, padding=1))
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_resample(F.silu(self.norm1(x)), self.resample, self.factors))
        x = _resample(x, self.resample, self.factors)
        h = self.conv2(self.dropout(F.silu(self.norm2(h, emb))))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nn.Module):
    """x + SelfAttention(GN(x)) over all spatial positions as tokens; output projection
    zero-initialised so the block starts as the identity.

    forward: x (B, C, *dims) -> same shape.
    """

    def __init__(
        self,
        channels: int,  # C
        dims: int = 2,  # 1, 2 or 3 spatial dims
        head_channels: int = 64,  # width per head; heads = max(C // head_channels, 1)
        qk_norm: bool = True,  # RMSNorm on q and k per head
        groups: int = 32,  # GroupNorm groups, upper bound
    ) -> None:
        super().__init__()
        if channels > head_channels and channels % head_channels != 0:
            raise ValueError(f"channels={channels} do not split into heads of head_channels={head_channels}")
        heads = max(channels // head_channels, 1)
        self.dims = dims
        self.norm = GroupNorm(num_groups(channels, groups), channels, eps=1e-6)
        self.attn = SelfAttention(channels, heads, qk_norm=qk_norm)
        _zero_(self.attn.proj)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        sizes = dict(zip(SPATIAL_AXES[self.dims], x.shape[2:], strict=True))
        h = self.attn(rearrange(self.norm(x), TO_TOKENS[self.dims]))  # (B, N, C)
        return x + rearrange(h, FROM_TOKENS[self.dims], **sizes)


class Downsample(nn.Module):
    """Stride-2 3-tap conv on the resampled axes: (B, C, *dims) -> (B, C, *dims / factors)."""

    def __init__(self, channels: int, dims: int, factors: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = CONV[dims](channels, channels, 3, stride=factors, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 on the resampled axes, then a 3-tap conv: (B, C, *dims * factors)."""

    def __init__(self, channels: int, dims: int, factors: tuple[int, ...]) -> None:
        super().__init__()
        self.factors = factors
        self.conv = CONV[dims](channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factors, mode="nearest"))


class Stage(nn.Module):
    """A ResBlock, optionally followed by an AttentionBlock."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """net(x, c_noise, labels=None, guidance=None) -> (B, out_channels, *dims).

    x: (B, in_channels, *dims) with len(dims) = `dims`; each resampled axis divisible by
    2^(len(channel_mult) - 1). x is x_t/σ_d and c_noise = 1000·t (the TrigFlow wrapper does both).
    labels -1/None = null class; guidance is the App. G.2 CFG scale input (None = 1).
    The output conv is zero-initialised (ADM), so F ≡ 0 and its JVP ≡ 0 at init.
    """

    def __init__(
        self,
        in_channels: int,  # channels of x
        out_channels: int | None = None,  # None: same as in_channels
        dims: int = 2,  # spatial dims: 1 audio frames, 2 images/mels, 3 video (T, H, W)
        model_channels: int = 64,  # channels at the first level
        channel_mult: Sequence[int] = (1, 2, 2),  # per level, times model_channels
        num_blocks: int = 2,  # ResBlocks per encoder level (decoder: num_blocks + 1)
        attn_levels: Sequence[int] | None = None,  # levels with self-attention; None: the lowest
        head_channels: int = 64,  # attention width per head
        qk_norm: bool = True,  # RMSNorm on q and k per head
        dropout: float = 0.0,  # in the ResBlocks at dropout_levels
        dropout_levels: Sequence[int] | None = None,  # levels whose ResBlocks drop out; None: all
        num_classes: int = 0,  # 0 = unconditional
        guidance_embed: bool = False,  # take the CFG scale s as an input (sCD student, App. G.2)
        resample_axes: Sequence[int] | None = None,  # spatial axes halved per level; None: all
        emb_dim: int | None = None,  # condition embedding width; None: 4 * model_channels (ADM)
        noise_channels: int | None = None,  # sinusoid width for c_noise and s; None: model_channels
        groups: int = 32,  # GroupNorm groups, upper bound (see norm.num_groups)
        resample_blocks: bool = False,  # resample with ResBlocks (ADM resblock_updown, EDM2), not one conv
    ) -> None:
        super().__init__()
        if dims not in CONV:
            raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
        levels = len(channel_mult)
        attn_levels = (levels - 1,) if attn_levels is None else tuple(attn_levels)
        if any(not 0 <= lv < levels for lv in attn_levels):
            raise ValueError(f"attn_levels {attn_levels} outside the {levels} levels")
        dropout_levels = tuple(range(levels)) if dropout_levels is None else tuple(dropout_levels)
        if any(not 0 <= lv < levels for lv in dropout_levels):
            raise ValueError(f"dropout_levels {dropout_levels} outside the {levels} levels")
        resample_axes = tuple(range(dims)) if resample_axes is None else tuple(resample_axes)
        if any(not 0 <= a < dims for a in resample_axes):
            raise ValueError(f"resample_axes {resample_axes} outside the {dims} spatial axes")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.dims = dims
        self.resample_axes = resample_axes
        self.levels = levels
        factors = tuple(2 if a in resample_axes else 1 for a in range(dims))
        emb_dim = emb_dim or 4 * model_channels
        conv = CONV[dims]

        # A block belongs to the level of its output resolution (resamplers too); that level sets
        # its dropout, e.g. sCM's ImageNet CMs drop out only at resolution <= 16 (App. G, T4-T5).
        def res_block(cin: int, cout: int, level: int, resample: Literal["none", "down", "up"] = "none") -> ResBlock:
            p = dropout if level in dropout_levels else 0.0
            return ResBlock(cin, cout, emb_dim, dims, p, groups, resample, factors)

        def stage(cin: int, cout: int, level: int) -> Stage:
            attn = AttentionBlock(cout, dims, head_channels, qk_norm, groups) if level in attn_levels else None
            return Stage(res_block(cin, cout, level), attn)

        def downsample(ch: int, level: int) -> nn.Module:
            return res_block(ch, ch, level, "down") if resample_blocks else Downsample(ch, dims, factors)

        def upsample(ch: int, level: int) -> nn.Module:
            return res_block(ch, ch, level, "up") if resample_blocks else Upsample(ch, dims, factors)

        self.embed = ConditionEmbedding(
            emb_dim,
            noise_channels=noise_channels or model_channels,
            num_classes=num_classes,
            guidance_embed=guidance_embed,
        )
        self.conv_in = conv(in_channels, model_channels, 3, padding=1)

        # Encoder; skip_channels records what each entry leaves for the decoder.
        ch = model_channels
        skip_channels = [ch]
        self.enc = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.enc.append(stage(ch, model_channels * mult, level))
                ch = model_channels * mult
                skip_channels.append(ch)
            if level != levels - 1:
                self.enc.append(downsample(ch, level + 1))
                skip_channels.append(ch)

        # Bottleneck at the lowest resolution: always attends (ADM).
        self.mid = nn.ModuleList(
            [
                Stage(res_block(ch, ch, levels - 1), AttentionBlock(ch, dims, head_channels, qk_norm, groups)),
                Stage(res_block(ch, ch, levels - 1), None),
            ]
        )

        # Decoder: each stage concatenates one encoder output along the channels.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.dec.append(stage(ch + skip_channels.pop(), model_channels * mult, level))
                ch = model_channels * mult
            if level != 0:
                self.dec.append(upsample(ch, level - 1))

        self.norm_out = GroupNorm(num_groups(ch, groups), ch, eps=1e-6)
        self.conv_out = _zero_(conv(ch, self.out_channels, 3, padding=1))

    def _check_input(self, x: torch.Tensor, c_noise: torch.Tensor) -> None:
        if x.ndim != 2 + self.dims:
            raise ValueError(
                f"UNet with dims={self.dims} expects x of {2 + self.dims} dims "
                f"(B, C, {', '.join(SPATIAL_AXES[self.dims])}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} channels, got shape {tuple(x.shape)}")
        multiple = 2 ** (self.levels - 1)
        for a in self.resample_axes:
            if x.shape[2 + a] % multiple:
                raise ValueError(
                    f"spatial axis {SPATIAL_AXES[self.dims][a]} has size {x.shape[2 + a]}, "
                    f"not divisible by {multiple} (2^(levels-1) for {self.levels} levels); "
                    f"got shape {tuple(x.shape)}"
                )
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input(x, c_noise)
        emb = self.embed(c_noise, labels, guidance)  # (B, emb_dim)
        h = self.conv_in(x)  # (B, model_channels, *dims)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.dec:
            if isinstance(block, Stage):  # the upsamplers take no skip
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, *dims)
