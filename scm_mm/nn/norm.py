"""Normalisation layers that survive torch.func.jvp (no BatchNorm: its in-place running statistics
break functorch transforms, pytorch #85533).

- `pixel_norm`: x / sqrt(mean(x²) + eps) over the channel dim (PixelNorm).
- `AdaptiveDoubleNorm`: sCM §4.1's replacement of AdaGN,
  y = norm(x) ⊙ pnorm(s(emb)) + pnorm(b(emb)).
- `GroupNorm`, `RMSNorm` (QK-normalisation): the torch layers computed in at least fp32. Both torch
  layers have forward-mode rules that match central differences to ~1e-10 in float64 (checked
  through the nets in tests/test_networks.py).

While a tangent is live every normalisation here goes through `_Normalize` and, for a gain and bias
without a tangent, `_ConstantAffine`: hand-written rules of a few ops each. The stock ones cost up to
15x a forward (torch 2.14, 1 CPU thread: rms_norm with a gain 663 us against 37 us; group_norm 743
against 49): an op that meets an input without a tangent (a parameter, a constant) builds a ZeroTensor
tangent for it, and arithmetic on a ZeroTensor infers its result's shape through the Python reference
of the op on the meta device, 130-450 us a call whatever the size (docs/benchmarks.md 2).
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scm_mm.nn.attention import tangent_is_live
from scm_mm.nn.layers import Linear32, _constants


class _Normalize(torch.autograd.Function):
    """h = (x - mean) rstd (`center`) or x rstd (RMS) over the last dim, rstd = 1 / sqrt(mean(x_c²) + eps).

    apply(x, center, eps) -> (h, rstd), rstd (..., 1) non-differentiable. The Jacobian is symmetric,
    J = rstd (I - 11ᵀ/n - h hᵀ/n) (without 11ᵀ/n for RMS), so one projection is both jvp and backward.
    """

    @staticmethod
    def forward(x: Tensor, center: bool, eps: float) -> tuple[Tensor, Tensor]:
        if center:  # one fused kernel that also returns the statistics
            h, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
            return h, rstd
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return x * rstd, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.center = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_forward(*output)
        ctx.save_for_backward(*output)

    @staticmethod
    def _project(ctx: Any, v: Tensor) -> Tensor:
        # J v = rstd (v - mean(v) - mean(h v) h): four kernels (six centred), products and means that
        # autocast leaves in fp32 (a vecdot or matmul it would run in bf16).
        h, rstd = ctx.saved_tensors
        centered = v - v.mean(-1, keepdim=True) if ctx.center else v
        return torch.addcmul(centered, h, (h * v).mean(-1, keepdim=True), value=-1).mul_(rstd)

    @staticmethod
    def jvp(ctx: Any, tx: Tensor, *_: None) -> tuple[Tensor, None]:
        return _Normalize._project(ctx, tx), None

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_rstd: Tensor | None) -> tuple[Tensor, None, None]:
        return _Normalize._project(ctx, grad), None, None


class _ConstantAffine(torch.autograd.Function):
    """y = x ⊙ scale + shift for a scale and shift without tangent or gradient, whose forward-mode rule is
    tx ⊙ scale alone. They ride in a tuple that autograd does not see (see scm_mm.nn.layers)."""

    @staticmethod
    def forward(x: Tensor, const: tuple[Tensor, Tensor | None]) -> Tensor:
        scale, shift = const
        return x * scale if shift is None else torch.addcmul(shift, x, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.scale = inputs[1][0]

    @staticmethod
    def jvp(ctx: Any, tx: Tensor, *_: None) -> Tensor:
        return tx * ctx.scale


def _normalize_live(x: Tensor, center: bool, eps: float, groups: int | None = None) -> Tensor:
    """`_Normalize` over x's last dim, or for `groups`, over each of `groups` channel groups of x (B, C, *dims)."""
    if groups is None:
        return _Normalize.apply(x, center, eps)[0]
    return _Normalize.apply(x.reshape(x.shape[0], groups, -1), center, eps)[0].reshape(x.shape)


def _affine(h: Tensor, weight: Tensor | None, bias: Tensor | None, shape: list[int]) -> Tensor:
    """h ⊙ weight + bias with the parameters viewed as `shape` (no weight: no bias either, as torch's norms);
    `_ConstantAffine` for constants under a tangent."""
    if weight is None:
        return h
    weight, bias = weight.reshape(shape), None if bias is None else bias.reshape(shape)
    const = _constants(weight, bias, (tangent_is_live(weight), bias is not None and tangent_is_live(bias)))
    if const is not None and tangent_is_live(h):
        return _ConstantAffine.apply(h, const)
    return h * weight if bias is None else torch.addcmul(bias, h, weight)


def pixel_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """PixelNorm: x / sqrt(mean(x², dim) + eps). Shape preserved; computed in at least float32."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    if tangent_is_live(x):
        return _normalize_live(x32.movedim(dim, -1), False, eps).movedim(-1, dim).to(x.dtype)
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
        if tangent_is_live(x):
            h = _normalize_live(x.to(dtype), True, self.eps, self.num_groups)
            return _affine(h, weight, bias, [1, -1] + [1] * (x.ndim - 2)).to(x.dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (QK-normalisation) computed in at least float32, returned in the input's dtype.

    torch.nn.RMSNorm itself is fine under torch.func.jvp; this only keeps the statistics in fp32
    under autocast, where q and k arrive in bf16/fp16 next to an fp32 gain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _norm_dtype(x)
        weight = None if self.weight is None else self.weight.to(dtype)
        if tangent_is_live(x) and len(self.normalized_shape) == 1:
            eps = torch.finfo(dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
            return _affine(_normalize_live(x.to(dtype), False, eps), weight, None, [-1]).to(x.dtype)
        return F.rms_norm(x.to(dtype), self.normalized_shape, weight, self.eps).to(x.dtype)


class AdaptiveDoubleNorm(nn.Module):
    """Adaptive double normalisation (sCM §4.1): y = norm(x) ⊙ pnorm(s(emb)) + pnorm(b(emb)).

    norm has no affine parameters: GroupNorm ("group", the U-Net) or per-token LayerNorm
    ("layer", the DiT and MLP). s and b are one Linear of the embedding. §4.1 uses this in place of
    AdaGN, whose scale and shift are unnormalised, to stabilise continuous-time training;
    PixelNorm keeps the RMS of the scale and of the shift at 1 whatever the embedding does.
    Because pnorm(0) is degenerate, s and b keep the default init (never zero-init them;
    adaLN-Zero gates live elsewhere). s, b and their pnorm run in fp32 whatever autocast says (a
    `Linear32`, as rCM and Wan keep the modulation in fp32), as do the statistics; they meet x in fp32
    and the result returns to x's dtype.

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
        self.affine = Linear32(emb_dim, 2 * num_channels)  # -> (scale, shift), each pnorm-ed

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        cdim = -1 if self.channels_last else 1
        if x.shape[cdim] != self.num_channels:
            raise ValueError(
                f"AdaptiveDoubleNorm expects {self.num_channels} channels on dim {cdim}, got shape {tuple(x.shape)}"
            )
        # Statistics and modulation in at least fp32 (STYLE 5); the result returns to x's dtype.
        h, live = x.to(_norm_dtype(x)), tangent_is_live(x)
        if self.norm == "group":
            h = h.movedim(-1, 1) if self.channels_last else h
            h = _normalize_live(h, True, self.eps, self.groups) if live else F.group_norm(h, self.groups, eps=self.eps)
            h = h.movedim(1, -1) if self.channels_last else h
        else:
            h = h if self.channels_last else h.movedim(1, -1)
            h = _normalize_live(h, True, self.eps) if live else F.layer_norm(h, (self.num_channels,), eps=self.eps)
            h = h if self.channels_last else h.movedim(-1, 1)

        # (B, C) each, from fp32 (Linear32), pnorm-ed apart in one call: half the kernels of two
        # (docs/benchmarks.md 2).
        scale, shift = pixel_norm(self.affine(emb).unflatten(1, (2, -1)).to(h.dtype), dim=2).unbind(1)
        # Broadcast (B, C) against x: (B, 1.., 1, C) channels-last, (B, C, 1.., 1) channel-first.
        ones = [1] * (x.ndim - 2)
        if self.channels_last:
            bshape = [x.shape[0], *ones, self.num_channels]
        else:
            bshape = [x.shape[0], self.num_channels, *ones]
        return torch.addcmul(shift.reshape(bshape), h, scale.reshape(bshape)).to(x.dtype)
