"""`VideoDiT`: a spatiotemporal DiT over video latents (B, C, T, H, W), built from the core DiT's pieces.

    net(x (B, C, T, H, W), c_noise (B,), labels=None, guidance=None) -> (B, out_channels, T, H, W)

x is x_t / sigma_d and c_noise = 1000 t (scm_mm.precond.TrigFlowPrecond does both). The block is the
core's `scm_mm.nn.dit.DiTBlock` (adaptive double normalisation, sCM §4.1; QK-norm; adaLN-Zero gates;
dropout in the MLP) with its attention swapped for `RoPESelfAttention`, and the conditioning is the
core's `ConditionEmbedding` (time, class label -1 = null, the sCD student's CFG scale, App. G.2). The
output Linear is zero-initialised, so F == 0 and its JVP == 0 at init. Parameter names are the core
DiT's: with pos_embed="sincos" and attention="full" a VideoDiT *is* `scm_mm.nn.dit.DiT` with 3-D
patches (same state dict, same function; tests/video/test_dit.py checks it).

What the video version adds:

- Patches of (pt, ph, pw) latent voxels, (1, 2, 2) by default as Wan; any frame count T divisible by pt.
- Positions, `pos_embed`:
  "rope"   3-D rotary embeddings on q and k of every head (Wan2.1, rcm/networks/wan2pt1_jvp.py): a head's
           channels split into temporal / height / width parts of h = w = 2 (head_dim // 6) and t = the
           rest (44/42/42 for head_dim 128, 24/20/20 for 64), each rotated by its axis index. Attention
           scores then depend on relative offsets only, so a net trained on 5 latent frames meets no
           unseen absolute code at 9. Angles are built per call in float64.
  "sincos" the core DiT's fixed factorized sin-cos code added to the tokens (built per call).
- Attention, `attention`:
  "full"       one attention over all T*H*W tokens (Wan; what rCM distils with sCM).
  "factorized" alternating blocks (Latte "variant 1", Vchitect/Latte models/latte.py): even blocks attend
               within each frame (B*T sequences of H*W tokens), odd blocks across frames at each position
               (B*H*W sequences of T tokens). Alternating blocks rather than spatial+temporal attention in
               one block (STDiT) because (a) Latte's ablation found the interleaved variant best, (b) the
               blocks stay the core DiTBlock, so full and factorized nets of one preset have the same
               parameters, names and MLP compute and differ only in which tokens meet, a clean comparison.
               Only the grouping of tokens changes: RoPE is applied once with all three axes, and inside a
               frame the temporal rotation cancels in q.k (equal t), so each group sees relative codes
               of its own axes.
  All attention goes through `scm_mm.nn.attention.attention`, which picks SDPA / xformers for plain
  passes and the JVP-capable op under torch.func.jvp (STYLE 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from scm_mm.nn.attention import attention as attend
from scm_mm.nn.dit import PATCHIFY, UNPATCHIFY, DiTBlock, SelfAttention
from scm_mm.nn.embeddings import ConditionEmbedding, sincos_grid_embedding
from scm_mm.nn.layers import Linear
from scm_mm.nn.norm import AdaptiveDoubleNorm

POS_EMBEDS = ("rope", "sincos")
ATTENTIONS = ("full", "factorized")
Group = Literal["full", "spatial", "temporal"]

# Token order is einops "(t s)" with s = h * w, row-major, as PATCHIFY[3] makes it.
_GROUP_IN = {"spatial": "b h (t s) d -> (b t) h s d", "temporal": "b h (t s) d -> (b s) h t d"}
_GROUP_OUT = {"spatial": "(b t) h s d -> b h (t s) d", "temporal": "(b s) h t d -> b h (t s) d"}


# ---------------------------------------------------------------------------------------------- 3-D RoPE


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the (t, h, w) rotations, Wan's split: h = w = 2 (head_dim // 6), t = rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3-D RoPE needs an even head_dim >= 6 (hidden / heads), got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(
    grid: Sequence[int],  # token grid (T', H', W')
    head_dim: int,  # channels per head
    theta: float = 10000.0,  # base of the frequencies, as RoFormer and Wan
    device: torch.device | None = None,
) -> torch.Tensor:
    """Rotation angles (prod(grid), head_dim // 2), float64, tokens in "(t h w)" order.

    Channel pair i of an axis part of d channels turns by pos * theta^(-2i / d) (Wan's rope_params); the
    pairs of the t part come first, then h, then w.
    """
    coords = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float64) for n in grid), indexing="ij")
    parts = []
    for pos, dim in zip(coords, rope_axis_dims(head_dim), strict=True):
        freqs = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim / 2,)
        parts.append(pos.reshape(-1, 1) * freqs)
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x (..., N, D) by the angles whose cos, sin are (N, D/2).

    Real arithmetic (no complex view: bf16 has none, and it keeps torch.func.jvp on plain ops), in at
    least float32; the result is in x's dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)  # (..., N, D/2) each
    cos, sin = cos.to(dtype), sin.to(dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


# ------------------------------------------------------------------------------------------- the network


class RoPESelfAttention(SelfAttention):
    """The core SelfAttention (same parameters) with 3-D RoPE on q and k and a choice of token groups.

    forward: x (B, N, C) with N = T' H' W' in "(t h w)" order, grid (T', H', W'), rope None or (cos, sin)
    of shape (N, head_dim / 2), group "full" | "spatial" (within each frame) | "temporal" (across frames
    at each position) -> (B, N, C).
    """

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        grid: Sequence[int],
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        group: Group = "full",
    ) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm before the rotation, as Wan
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if group == "full":
            o = attend(q, k, v)
        else:
            frames, spatial = grid[0], grid[1] * grid[2]
            q, k, v = (rearrange(a, _GROUP_IN[group], t=frames, s=spatial) for a in (q, k, v))
            o = rearrange(attend(q, k, v), _GROUP_OUT[group], t=frames, s=spatial)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class VideoDiTBlock(DiTBlock):
    """The core DiTBlock (adaptive double norm, adaLN-Zero gates, MLP dropout) with RoPESelfAttention.

    forward: x (B, N, hidden), emb (B, emb_dim), grid (T', H', W'), rope -> (B, N, hidden).
    """

    def __init__(
        self,
        hidden: int,  # token width
        emb_dim: int,  # condition embedding width
        heads: int,  # attention heads
        mlp_ratio: float = 4.0,  # MLP hidden = mlp_ratio * hidden
        qk_norm: bool = True,  # RMSNorm on q and k per head
        dropout: float = 0.0,  # in the MLP, after GELU
        group: Group = "full",  # which tokens attend to each other (RoPESelfAttention)
    ) -> None:
        super().__init__(hidden, emb_dim, heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, dropout=dropout)
        self.attn = RoPESelfAttention(hidden, heads, qk_norm=qk_norm)
        self.group = group

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        grid: Sequence[int],
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(emb)[:, None, :].chunk(2, dim=-1)  # (B, 1, hidden) each
        x = x + gate_attn * self.attn(self.norm1(x, emb), grid, rope, self.group)
        return x + gate_mlp * self.mlp(self.norm2(x, emb))

    def extra_repr(self) -> str:
        return f"group={self.group!r}"


class VideoDiT(nn.Module):
    """net(x, c_noise, labels=None, guidance=None) -> (B, out_channels, T, H, W).

    x: (B, in_channels, T, H, W), T, H, W divisible by patch_size = (pt, ph, pw); x is x_t / sigma_d and
    c_noise = 1000 t. labels: None or (B,) integer, -1 = null class (CFG's unconditional branch).
    guidance: None or (B,) float, the sCD student's CFG scale input (App. G.2), None = 1. F == 0 at init.
    """

    def __init__(
        self,
        in_channels: int,  # latent channels
        out_channels: int | None = None,  # None: same as in_channels
        patch_size: Sequence[int] = (1, 2, 2),  # (pt, ph, pw) latent voxels per token
        hidden: int = 384,  # token width, also the condition embedding width
        depth: int = 12,  # number of blocks
        heads: int = 6,  # attention heads; hidden divisible by heads
        mlp_ratio: float = 4.0,  # MLP hidden = mlp_ratio * hidden
        qk_norm: bool = True,  # RMSNorm on q and k per head
        dropout: float = 0.0,  # in each block's MLP
        num_classes: int = 0,  # 0 = unconditional
        guidance_embed: bool = False,  # take the CFG scale s as an input (sCD student, App. G.2)
        pos_embed: Literal["rope", "sincos"] = "rope",  # see the module docstring
        attention: Literal["full", "factorized"] = "full",  # see the module docstring
        rope_theta: float = 10000.0,  # base of the RoPE frequencies
        noise_channels: int = 256,  # sinusoid width for c_noise and s
        max_positions: float = 10000,  # of the time sinusoids and the sin-cos token code
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw), got {tuple(patch_size)}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if hidden % heads:
            raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden = hidden
        self.heads = heads
        self.head_dim = hidden // heads
        self.pos_embed = pos_embed
        self.attention = attention
        self.rope_theta = rope_theta
        self.max_positions = max_positions
        if pos_embed == "rope":
            rope_axis_dims(self.head_dim)  # fail at construction, not at the first call
        patch_voxels = math.prod(self.patch_size)

        self.embed = ConditionEmbedding(
            hidden,
            noise_channels=noise_channels,
            num_classes=num_classes,
            guidance_embed=guidance_embed,
            max_positions=max_positions,
        )
        self.proj_in = Linear(patch_voxels * in_channels, hidden)
        self.blocks = nn.ModuleList(
            VideoDiTBlock(
                hidden,
                hidden,
                heads,
                mlp_ratio=mlp_ratio,
                qk_norm=qk_norm,
                dropout=dropout,
                group=block_group(attention, i),
            )
            for i in range(depth)
        )
        self.norm_out = AdaptiveDoubleNorm(hidden, hidden, norm="layer", channels_last=True)
        self.proj_out = Linear(hidden, patch_voxels * self.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def token_grid(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(T', H', W') tokens for latent dims (T, H, W), or a ValueError naming the axis that does not divide."""
        grid = []
        for axis, size, patch in zip("THW", shape, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(
                    f"VideoDiT: axis {axis} has size {size}, not divisible by patch_size {self.patch_size} "
                    f"(patch {patch} on {axis}); pad or crop the latent"
                )
            grid.append(size // patch)
        return grid[0], grid[1], grid[2]

    def _check_input(self, x: torch.Tensor, c_noise: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"VideoDiT expects x of 5 dims (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"VideoDiT expects {self.in_channels} channels, got shape {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")

    def rope(self, grid: Sequence[int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the RoPE angles of the grid, each (N, head_dim / 2), float64 for float64 `like`
        else float32, whatever the autocast state."""
        with torch.autocast(like.device.type, enabled=False):
            angles = rope_angles(grid, self.head_dim, self.rope_theta, like.device)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input(x, c_noise)
        grid = self.token_grid(x.shape[2:])
        patch = dict(zip(("p1", "p2", "p3"), self.patch_size, strict=True))

        emb = self.embed(c_noise, labels, guidance)  # (B, hidden)
        h = self.proj_in(rearrange(x, PATCHIFY[3], **patch))  # (B, N, hidden), N = T' H' W'
        rope = None
        if self.pos_embed == "sincos":
            h = h + sincos_grid_embedding(grid, self.hidden, self.max_positions, h.device, h.dtype)  # (N, hidden)
        else:
            rope = self.rope(grid, x)
        for block in self.blocks:
            h = block(h, emb, grid, rope)
        h = self.proj_out(self.norm_out(h, emb))  # (B, N, pt ph pw out_channels)
        sizes = dict(zip("thw", grid, strict=True))
        return rearrange(h, UNPATCHIFY[3], **patch, **sizes)  # (B, out_channels, T, H, W)


def block_group(attention: str, index: int) -> Group:
    """The token grouping of block `index`: "full", or spatial (even) / temporal (odd) when factorized."""
    if attention == "full":
        return "full"
    return "spatial" if index % 2 == 0 else "temporal"
