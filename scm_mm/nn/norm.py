"""Normalisation layers that survive torch.func.jvp (no BatchNorm: its in-place running statistics
break functorch transforms, pytorch #85533).

- `pixel_norm`: x / sqrt(mean(x²) + eps) over the channel dim (PixelNorm).
- `AdaptiveDoubleNorm`: sCM §4.1's replacement of AdaGN,
  y = norm(x) ⊙ pnorm(s(emb)) + pnorm(b(emb)).
- `GroupNorm`, `RMSNorm` (QK-normalisation): the torch layers computed in at least fp32. Both torch
  layers have forward-mode rules that match central differences to ~1e-10 in float64 (checked
  through the nets in tests/test_networks.py).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from scm_mm.nn.layers import Linear


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """PixelNorm: x / sqrt(mean(x², dim) + eps). Shape preserved; computed in at least float32."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.rsqrt(x32.square().mean(dim=dim, keepdim=True) + eps)).to(x.dtype)


def num_groups(channels: int, groups: int = 32, min_channels_per_group: int = 4) -> int:
    """GroupNorm group count: at most `groups`, at least `min_channels_per_group` channels each
    (the EDM rule), lowered until it divides `channels`."""
    g = max(1, min(groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed in at least float32, returned in the input's dtype (x (B, C, *dims)).

    Besides the fp32 statistics, this sidesteps a forward-AD dtype bug: under CPU bf16 autocast,
    nn.GroupNorm with affine parameters returns an fp32 tangent for a bf16 primal (torch 2.14),
    and the next conv then fails inside torch.func.jvp.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _norm_dtype(x)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (QK-normalisation) computed in at least float32, returned in the input's dtype.

    torch.nn.RMSNorm itself is fine under torch.func.jvp; this only keeps the statistics in fp32
    under autocast, where q and k arrive in bf16/fp16 next to an fp32 gain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _norm_dtype(x)
        weight = None if self.weight is None else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), self.normalized_shape, weight, self.eps).to(x.dtype)


class AdaptiveDoubleNorm(nn.Module):
    """Adaptive double normalisation (sCM §4.1): y = norm(x) ⊙ pnorm(s(emb)) + pnorm(b(emb)).

    norm has no affine parameters: GroupNorm ("group", the U-Net) or per-token LayerNorm
    ("layer", the DiT and MLP). s and b are one Linear of the embedding. §4.1 uses this in place of
    AdaGN, whose scale and shift are unnormalised, to stabilise continuous-time training;
    PixelNorm keeps the RMS of the scale and of the shift at 1 whatever the embedding does.
    Because pnorm(0) is degenerate, s and b keep the default init (never zero-init them;
    adaLN-Zero gates live elsewhere).

    forward: x (B, C, *dims) if channels_last=False, else (B, *, C); emb (B, emb_dim) -> x's shape.
    """

    def __init__(
        self,
        num_channels: int,  # C, the normalised and modulated channels
        emb_dim: int,  # width of the condition embedding
        norm: Literal["group", "layer"] = "group",  # GroupNorm (C/G, *dims) or LayerNorm (C)
        groups: int = 32,  # upper bound on the GroupNorm groups (see num_groups)
        channels_last: bool = False,  # False: x is (B, C, *dims); True: x is (B, *, C)
        eps: float = 1e-6,  # of the GroupNorm / LayerNorm
    ) -> None:
        super().__init__()
        if norm not in ("group", "layer"):
            raise ValueError(f"norm must be 'group' or 'layer', got {norm!r}")
        self.num_channels = num_channels
        self.norm = norm
        self.groups = num_groups(num_channels, groups)
        self.channels_last = channels_last
        self.eps = eps
        self.affine = Linear(emb_dim, 2 * num_channels)  # -> (scale, shift), each pnorm-ed

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        cdim = -1 if self.channels_last else 1
        if x.shape[cdim] != self.num_channels:
            raise ValueError(
                f"AdaptiveDoubleNorm expects {self.num_channels} channels on dim {cdim}, got shape {tuple(x.shape)}"
            )
        # Statistics and modulation in at least fp32 (STYLE 5); the result returns to x's dtype.
        h = x.to(_norm_dtype(x))
        if self.norm == "group":
            h = h.movedim(-1, 1) if self.channels_last else h
            h = F.group_norm(h, self.groups, eps=self.eps)
            h = h.movedim(1, -1) if self.channels_last else h
        else:
            h = h if self.channels_last else h.movedim(1, -1)
            h = F.layer_norm(h, (self.num_channels,), eps=self.eps)
            h = h if self.channels_last else h.movedim(-1, 1)

        scale, shift = self.affine(emb).chunk(2, dim=1)  # (B, C) each
        scale, shift = pixel_norm(scale.to(h.dtype), dim=1), pixel_norm(shift.to(h.dtype), dim=1)
        # Broadcast (B, C) against x: (B, 1.., 1, C) channels-last, (B, C, 1.., 1) channel-first.
        ones = [1] * (x.ndim - 2)
        if self.channels_last:
            bshape = [x.shape[0], *ones, self.num_channels]
        else:
            bshape = [x.shape[0], self.num_channels, *ones]
        return (h * scale.reshape(bshape) + shift.reshape(bshape)).to(x.dtype)
