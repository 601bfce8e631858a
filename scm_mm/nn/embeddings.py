"""Time, label, guidance and token-grid (sin-cos and rotary) embeddings shared by every backbone.

sCM §4.1: the time input is c_noise(t) = t (scaled by the wrapper: c_noise = 1000·t) and is embedded
with sinusoidal *positional* embeddings, which behave like Fourier features of scale ≈ 0.02; large
Fourier scales (e.g. 16) make continuous-time training unstable (Fig. 4). The sinusoids and the whole
condition embedding (time MLP, label rows, guidance linear) are computed in float32 (float64 for float64
inputs) whatever the autocast state, as rCM and Wan keep the time embedding and the modulation in fp32:
in rCM #10 an sCM run that collapsed after a gradient spike was fixed by, among other things, an fp32
timestep embedding. The JVP's time tangent goes through the same fp32 layers.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from scm_mm.nn.attention import tangent_is_live
from scm_mm.nn.layers import Linear32


def _embedding_dtype(x: torch.Tensor) -> torch.dtype:
    # At least float32; float64 stays float64 so the fp64 checks see no rounding.
    return torch.promote_types(x.dtype, torch.float32)


def _sinusoid(positions: torch.Tensor, num_channels: int, max_positions: float) -> torch.Tensor:
    """positions (N,) -> (N, num_channels): [cos(p·ω_i), sin(p·ω_i)], ω_i = max_positions^(-i/half)."""
    half = num_channels // 2
    freqs = torch.arange(half, device=positions.device, dtype=positions.dtype) / half
    freqs = max_positions ** (-freqs)  # (half,) from 1 down to ~1/max_positions
    angles = positions[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of one scalar per sample (sCM §4.1, not Fourier features).

    forward: x (B,) float -> (B, num_channels) in float32, or float64 if x is float64.
    """

    def __init__(
        self,
        num_channels: int,  # output width; even: one cos and one sin per frequency
        max_positions: float = 10000,  # lowest frequency is ~1/max_positions rad per unit of input
    ) -> None:
        super().__init__()
        if num_channels % 2 != 0:
            raise ValueError(f"PositionalEmbedding needs an even num_channels, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 1:
            raise ValueError(f"PositionalEmbedding expects shape (B,), got {tuple(x.shape)}")
        # Frequencies are rebuilt per call (no buffer): model.to(bfloat16) cannot round them.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _sinusoid(x.to(_embedding_dtype(x)), self.num_channels, self.max_positions)


class ConditionEmbedding(nn.Module):
    """(c_noise, labels, guidance) -> emb (B, emb_dim), already passed through SiLU.

    emb = SiLU( MLP(pos(c_noise)) + E[label] + Linear_g(pos(guidance_scale · s)) ).

    - c_noise: (B,) float, the wrapper's 1000·t.
    - labels: None or (B,) integer; -1 (and None) selects the learned null row (row num_classes),
      the unconditional branch of CFG.
    - guidance: None or (B,) float, the CFG scale s given to a distilled sCD student (App. G.2: a
      positional embedding of s followed by a linear layer, added to the time embedding); None = 1.
      Linear_g is zero-initialised so a student initialised from its teacher starts with the teacher's
      function for every s (App. G.2 initialises sCD from the teacher's EMA weights).

    The returned embedding is post-activation, float32 (float64 for float64 c_noise) whatever the autocast
    state: consumers apply a `Linear32` only (modulation in fp32) and cast where it meets the activations.
    """

    def __init__(
        self,
        emb_dim: int,  # width of the embedding handed to every block
        noise_channels: int = 256,  # width of the sinusoidal embeddings of c_noise and s
        num_classes: int = 0,  # 0 = unconditional; else an (num_classes + 1)-row table, last = null
        guidance_embed: bool = False,  # add the App. G.2 guidance-scale input
        guidance_scale: float = 1000.0,  # s is embedded as pos(guidance_scale · s); see below
        max_positions: float = 10000,  # of the positional embeddings
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.guidance_embed = guidance_embed
        # Same factor as c_noise = 1000·t: s in [1, 2] (App. G.2 trains on s ~ U[1, 2]) then spans
        # about the band t in [0, π/2] does, the band the positional embedding resolves. Fed raw,
        # s in [1, 2] would move only the few highest frequencies and barely change the embedding.
        self.guidance_scale = guidance_scale
        self.pos = PositionalEmbedding(noise_channels, max_positions=max_positions)
        self.time_mlp = nn.Sequential(
            Linear32(noise_channels, emb_dim),
            nn.SiLU(),
            Linear32(emb_dim, emb_dim),
        )
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.guidance_linear = Linear32(noise_channels, emb_dim) if guidance_embed else None
        if self.guidance_linear is not None:
            nn.init.zeros_(self.guidance_linear.weight)
            nn.init.zeros_(self.guidance_linear.bias)

    def forward(
        self,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if c_noise.ndim != 1:
            raise ValueError(f"c_noise must have shape (B,), got {tuple(c_noise.shape)}")
        batch = c_noise.shape[0]
        # fp32 throughout (fp64 for fp64 c_noise): the sinusoid, then Linear32s with autocast off.
        emb = self.time_mlp(self.pos(c_noise))  # (B, emb_dim)

        if labels is not None and self.label_embed is None:
            raise ValueError("labels were given but the network was built with num_classes=0")
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((batch,), -1, dtype=torch.long, device=c_noise.device)
            if labels.shape != (batch,) or labels.dtype.is_floating_point:
                raise ValueError(
                    f"labels must be an integer tensor of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}"
                )
            # Real labels look up rows [0, num_classes), so num_classes itself fails in the lookup
            # instead of silently aliasing the null row; -1 selects the null row.
            table = self.label_embed.weight  # (num_classes + 1, emb_dim)
            null = (labels == -1)[:, None]  # (B, 1)
            real = nn.functional.embedding(labels.masked_fill(null[:, 0], 0), table[:-1])
            emb = emb + torch.where(null, table[-1], real)

        if guidance is not None and self.guidance_linear is None:
            raise ValueError("guidance was given but the network was built with guidance_embed=False")
        if self.guidance_linear is not None:
            if guidance is None:
                guidance = torch.ones(batch, dtype=c_noise.dtype, device=c_noise.device)
            if guidance.shape != (batch,):
                raise ValueError(f"guidance must have shape ({batch},), got {tuple(guidance.shape)}")
            emb = emb + self.guidance_linear(self.pos(guidance * self.guidance_scale))  # pos: (B, noise_channels)
        return nn.functional.silu(emb)


def sincos_grid_embedding(
    grid: Sequence[int],
    num_channels: int,
    max_positions: float = 10000,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Fixed sin-cos embedding of a token grid, factorized per axis: (prod(grid), num_channels).

    Each of the len(grid) axes gets an even share of the channels (leftover channels are zero)
    holding a 1-D sinusoid of its integer index. Tokens are in row-major order, i.e. the order of
    einops "(t h w)". Built from the grid at call time, so any number of audio or video frames
    works, and position i gets the same code whatever the length.
    """
    ndim = len(grid)
    per_axis = (num_channels // ndim) // 2 * 2
    if per_axis == 0:
        raise ValueError(f"num_channels={num_channels} is too small for a {ndim}-D grid")
    axes = [torch.arange(n, device=device, dtype=torch.float64) for n in grid]
    coords = torch.meshgrid(*axes, indexing="ij")  # ndim x grid
    # One (N, per_axis) block per axis.
    parts = [_sinusoid(c.reshape(-1), per_axis, max_positions) for c in coords]
    emb = torch.cat(parts, dim=1)  # (N, ndim * per_axis)
    pad = num_channels - emb.shape[1]
    if pad:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], pad)], dim=1)
    return emb.to(dtype)


def rope_axis_dims(head_dim: int, ndim: int = 3) -> tuple[int, ...]:
    """Channels of one head given to each axis's rotation, Wan's 3-D split for any number of axes: every
    axis after the first gets 2 (head_dim // (2 ndim)), the first the rest; (44, 42, 42) for 128 in 3-D."""
    if head_dim % 2 or head_dim < 2 * ndim:
        raise ValueError(f"{ndim}-D RoPE needs an even head_dim >= {2 * ndim} (hidden / heads), got {head_dim}")
    rest = 2 * (head_dim // (2 * ndim))
    return (head_dim - (ndim - 1) * rest, *([rest] * (ndim - 1)))


def rope_angles(
    grid: Sequence[int],  # token grid, e.g. (T', H', W')
    head_dim: int,  # channels per head
    theta: float = 10000.0,  # base of the frequencies, as RoFormer and Wan
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotary angles (prod(grid), head_dim // 2), float64, tokens in row-major ("(t h w)") order.

    Channel pair i of an axis part of d channels turns by pos * theta^(-2i / d) (Wan's rope_params); the
    pairs of the first axis come first. Attention scores of rotated q, k depend on relative offsets only.
    """
    coords = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for pos, dim in zip(coords, rope_axis_dims(head_dim, len(grid)), strict=True):
        freqs = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim / 2,)
        parts.append(pos.reshape(-1, 1) * freqs)
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x (..., N, D) by the angles whose cos, sin are (N, D/2).

    Real arithmetic (no complex view: bf16 has none, and it keeps torch.func.jvp on plain ops), in at
    least float32; the result is in x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    return apply_rotation(x, rope_rotation(cos.to(dtype), sin.to(dtype)))


Rotation = tuple[torch.Tensor, torch.Tensor]


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> Rotation:
    """(cos (N, D/2, 1), (-sin, sin) (N, D/2, 2)): the angles laid out for `apply_rotation`. A network builds
    it once per forward, not once for each q and k of every block (two kernels each)."""
    return cos.unsqueeze(-1), torch.stack([-sin, sin], dim=-1)


def apply_rotation(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """`apply_rope` with the angles of `rope_rotation`, computed in at least float32 (the rotation's dtype
    should be that too); the result is in x's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if tangent_is_live(x) and not tangent_is_live(*rotation):
        return _Rotate.apply(x.to(dtype), rotation).to(x.dtype)
    return _rotate(x.to(dtype), *rotation).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per channel pair as pairs cos + swapped pairs (-sin, sin):
    three kernels where the unpaired form took seven (each a launch on a GPU: docs/benchmarks.md 2, 9b)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., N, D/2, 2)
    return torch.addcmul(pairs * cos, pairs.flip(-1), signed_sin).flatten(-2)


class _Rotate(torch.autograd.Function):
    """`_rotate` with constant angles as one op: its jvp rotates the tangent, its backward rotates back.

    Stock forward-mode rules would give the angles ZeroTensor tangents, whose products are slow
    (scm_mm.nn.norm's docstring); the angles ride in a tuple that autograd does not see.
    """

    @staticmethod
    def forward(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return _rotate(x, *rotation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.rotation = inputs[1]

    @staticmethod
    def jvp(ctx: Any, tx: torch.Tensor, *_: None) -> torch.Tensor:
        return _rotate(tx, *ctx.rotation)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cos, signed_sin = ctx.rotation
        return _rotate(grad, cos, -signed_sin), None
