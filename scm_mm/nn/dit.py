"""DiT-style transformer for 1-D (audio frames), 2-D (images, mels) and 3-D (video) inputs.

len(patch_size) sets the number of spatial dims. Patchify with einops, blocks with sCM's adaptive double
normalisation (§4.1) in place of adaLN's (1 + scale, shift), and zero-initialised gates (adaLN-Zero) so
each block starts as the identity. All attention goes through `scm_mm.nn.attention.attention`, the one op
with a forward-mode derivative (STYLE 3). `SelfAttention` is shared with the U-Net.

Positions, `pos_embed`, both built per call from the token grid (any frame count):
  "sincos" a fixed factorized sin-cos code added to the tokens.
  "rope"   rotary embeddings on q and k of every head (RoFormer; Wan's 3-D split, which rCM distils with
           sCM): a head's channels split into one part per axis (scm_mm.nn.embeddings.rope_axis_dims),
           each rotated by its axis index, so scores depend on relative offsets only and a net trained on
           5 frames meets no unseen absolute code at 9.
Which tokens meet, `attention` (the first grid axis is "time": frames, or the rows of an image):
  "full"       one attention over all tokens.
  "factorized" alternating blocks (Latte's "variant 1"): even blocks attend within each slice of the
               first axis ("spatial"), odd blocks along the first axis at each position ("temporal").
               Only the grouping changes, so a full and a factorized net of one size have the same
               parameters; RoPE is applied once with all axes (within a group the other rotations cancel
               in q.k).
"""

import math
from collections.abc import Sequence
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from scm_mm.nn.attention import attention
from scm_mm.nn.embeddings import (
    ConditionEmbedding,
    Rotation,
    apply_rotation,
    rope_angles,
    rope_axis_dims,
    rope_rotation,
    sincos_grid_embedding,
)
from scm_mm.nn.layers import Linear, Linear32
from scm_mm.nn.norm import AdaptiveDoubleNorm, RMSNorm

# Patch pixels go before channels in a token, one einops pattern per number of spatial dims.
PATCHIFY = {
    1: "b c (l p1) -> b l (p1 c)",
    2: "b c (h p1) (w p2) -> b (h w) (p1 p2 c)",
    3: "b c (t p1) (h p2) (w p3) -> b (t h w) (p1 p2 p3 c)",
}
UNPATCHIFY = {
    1: "b l (p1 c) -> b c (l p1)",
    2: "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
    3: "b (t h w) (p1 p2 p3 c) -> b c (t p1) (h p2) (w p3)",
}
GRID_AXES = {1: ("l",), 2: ("h", "w"), 3: ("t", "h", "w")}
POS_EMBEDS = ("sincos", "rope")
ATTENTIONS = ("full", "factorized")
Group = Literal["full", "spatial", "temporal"]

# Tokens are in "(t s)" order, t the first grid axis and s the rest, row-major, as PATCHIFY makes them.
_GROUP_IN = {"spatial": "b h (t s) d -> (b t) h s d", "temporal": "b h (t s) d -> (b s) h t d"}
_GROUP_OUT = {"spatial": "(b t) h s d -> b h (t s) d", "temporal": "(b s) h t d -> b h (t s) d"}


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens with optional QK-normalisation.

    QK-norm (RMSNorm per head on q and k) bounds the attention logits by about sqrt(head_dim) times
    the gains, which keeps the softmax and its tangent in range under fp16/bf16 (SANA-Sprint's sCM
    config and rCM's Wan both keep QK-norm).

    forward: x (B, N, C), rope None or the rotation of `rope_rotation` (DiT.rope), group "full" | "spatial" |
    "temporal" with the token grid for the latter two (see the module docstring) -> (B, N, C).
    """

    def __init__(
        self,
        channels: int,  # C, model width
        heads: int,  # C must be divisible by heads
        qk_norm: bool = True,  # RMSNorm on q and k per head, with a learned gain
        eps: float = 1e-6,  # of the RMSNorm
    ) -> None:
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        head_dim = channels // heads
        self.qkv = Linear(channels, 3 * channels)
        self.q_norm = RMSNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = Linear(channels, channels)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotation | None = None,
        group: Group = "full",
        grid: Sequence[int] = (),
    ) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        if rope is not None or not isinstance(self.q_norm, nn.Identity):
            # QK-norm, then the rotation (as Wan), in at least fp32 with one cast in and one out: under
            # autocast each layer casting on its own took two more kernels per tensor and tangent
            # (docs/benchmarks.md 2).
            dtype = q.dtype
            q, k = (a.to(torch.promote_types(dtype, torch.float32)) for a in (q, k))
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rotation(q, rope), apply_rotation(k, rope)
            q, k = q.to(dtype), k.to(dtype)
        if group == "full":
            o = attention(q, k, v)  # (B, heads, N, head_dim)
        else:
            sizes = {"t": grid[0], "s": math.prod(grid[1:])}
            q, k, v = (rearrange(a, _GROUP_IN[group], **sizes) for a in (q, k, v))
            o = rearrange(attention(q, k, v), _GROUP_OUT[group], **sizes)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """x + g_a ⊙ Attn(ADN(x)), then x + g_m ⊙ MLP(ADN(x)); gates g = W·emb, W zero-initialised.

    forward: x (B, N, hidden), emb (B, emb_dim), rope and grid as SelfAttention's -> (B, N, hidden).
    """

    def __init__(
        self,
        hidden: int,  # token width
        emb_dim: int,  # condition embedding width
        heads: int,  # attention heads
        mlp_ratio: float = 4.0,  # MLP hidden = mlp_ratio * hidden
        qk_norm: bool = True,  # see SelfAttention
        dropout: float = 0.0,  # in the MLP, after GELU
        group: Group = "full",  # which tokens attend to each other (SelfAttention)
    ) -> None:
        super().__init__()
        self.group = group
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = AdaptiveDoubleNorm(hidden, emb_dim, norm="layer", channels_last=True)
        self.attn = SelfAttention(hidden, heads, qk_norm=qk_norm)
        self.norm2 = AdaptiveDoubleNorm(hidden, emb_dim, norm="layer", channels_last=True)
        self.mlp = nn.Sequential(
            Linear(hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            Linear(mlp_hidden, hidden),
        )
        # adaLN-Zero gates, not pnorm-ed (pnorm of a zero vector is degenerate). The branches
        # themselves keep their default init: zeroing both the gate and attn.proj would leave
        # each with a zero gradient forever. In fp32 like all modulation (Linear32).
        self.gates = Linear32(emb_dim, 2 * hidden)
        nn.init.zeros_(self.gates.weight)
        nn.init.zeros_(self.gates.bias)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        rope: Rotation | None = None,
        grid: Sequence[int] = (),
    ) -> torch.Tensor:
        # fp32 gates meet the residual stream in its dtype (bf16 under autocast).
        gate_attn, gate_mlp = self.gates(emb)[:, None, :].to(x.dtype).chunk(2, dim=-1)  # (B, 1, hidden) each
        x = torch.addcmul(x, gate_attn, self.attn(self.norm1(x, emb), rope, self.group, grid))
        return torch.addcmul(x, gate_mlp, self.mlp(self.norm2(x, emb)))

    def extra_repr(self) -> str:
        return f"group={self.group!r}"


class DiT(nn.Module):
    """net(x, c_noise, labels=None, guidance=None) -> (B, out_channels, *dims).

    x: (B, in_channels, *dims), len(dims) = len(patch_size), each dim divisible by its patch size;
    x is x_t/σ_d and c_noise = 1000·t (the TrigFlow wrapper does both). labels -1/None = null class;
    guidance is the App. G.2 CFG scale input (None = 1). The output Linear is zero-initialised
    (as in DiT), so F ≡ 0 and its JVP ≡ 0 at init.
    """

    def __init__(
        self,
        in_channels: int,  # channels of x (latent or pixel channels)
        out_channels: int | None = None,  # None: same as in_channels
        patch_size: Sequence[int] = (2, 2),  # per spatial axis; its length sets 1-D/2-D/3-D
        hidden: int = 384,  # token width, also the condition embedding width
        depth: int = 6,  # number of DiTBlocks
        heads: int = 6,  # attention heads; hidden must be divisible by heads
        mlp_ratio: float = 4.0,  # MLP hidden = mlp_ratio * hidden
        qk_norm: bool = True,  # RMSNorm on q and k per head
        dropout: float = 0.0,  # in each block's MLP
        num_classes: int = 0,  # 0 = unconditional
        guidance_embed: bool = False,  # take the CFG scale s as an input (sCD student, App. G.2)
        pos_embed: Literal["sincos", "rope"] = "sincos",  # see the module docstring
        attention: Literal["full", "factorized"] = "full",  # see the module docstring
        rope_theta: float = 10000.0,  # base of the RoPE frequencies
        noise_channels: int = 256,  # sinusoid width for c_noise and s (DiT's frequency size)
        max_positions: float = 10000,  # of the time sinusoids and the sin-cos token code
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.ndim = len(self.patch_size)
        if self.ndim not in PATCHIFY or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must have 1, 2 or 3 positive entries, got {self.patch_size}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "factorized" and self.ndim < 2:
            raise ValueError("attention='factorized' needs 2-D or 3-D patches (it groups along the first axis)")
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
            rope_axis_dims(self.head_dim, self.ndim)  # fail at construction, not at the first call
        patch_pixels = math.prod(self.patch_size)

        self.embed = ConditionEmbedding(
            hidden,
            noise_channels=noise_channels,
            num_classes=num_classes,
            guidance_embed=guidance_embed,
            max_positions=max_positions,
        )
        self.proj_in = Linear(patch_pixels * in_channels, hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(
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
        self.proj_out = Linear(hidden, patch_pixels * self.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def token_grid(self, dims: Sequence[int]) -> list[int]:
        """Tokens per axis for input dims, or a ValueError naming the axis that does not divide."""
        grid = []
        for axis, size, patch in zip(GRID_AXES[self.ndim], dims, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(
                    f"{type(self).__name__}: axis {axis.upper()} has size {size}, not divisible by patch_size "
                    f"{self.patch_size} (patch {patch} on {axis.upper()}); pad or crop the input"
                )
            grid.append(size // patch)
        return grid

    def _check_input(self, x: torch.Tensor, c_noise: torch.Tensor) -> None:
        name = type(self).__name__
        if x.ndim != 2 + self.ndim:
            axes = ", ".join(a.upper() for a in GRID_AXES[self.ndim])
            raise ValueError(
                f"{name} with {self.ndim}-D patches expects x of {2 + self.ndim} dims (B, C, {axes}), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects {self.in_channels} channels, got shape {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")

    def rope(self, grid: Sequence[int], like: torch.Tensor) -> Rotation:
        """The RoPE angles of the grid as `rope_rotation` lays them out for every block, float64 for float64
        `like` else float32, whatever the autocast state."""
        with torch.autocast(like.device.type, enabled=False):
            angles = rope_angles(grid, self.head_dim, self.rope_theta, like.device)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return rope_rotation(angles.cos().to(dtype), angles.sin().to(dtype))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_input(x, c_noise)
        grid = self.token_grid(x.shape[2:])
        axes = GRID_AXES[self.ndim]
        patch = {f"p{i + 1}": p for i, p in enumerate(self.patch_size)}

        emb = self.embed(c_noise, labels, guidance)  # (B, hidden)
        h = self.proj_in(rearrange(x, PATCHIFY[self.ndim], **patch))  # (B, N, hidden)
        rope = None
        if self.pos_embed == "sincos":
            h = h + sincos_grid_embedding(grid, self.hidden, self.max_positions, h.device, h.dtype)  # (N, hidden)
        else:
            rope = self.rope(grid, x)
        for block in self.blocks:
            h = block(h, emb, rope, grid)
        h = self.proj_out(self.norm_out(h, emb))  # (B, N, prod(patch) * out_channels)
        sizes = dict(zip(axes, grid, strict=True))
        return rearrange(h, UNPATCHIFY[self.ndim], **patch, **sizes)  # (B, out_channels, *dims)


def block_group(attention: str, index: int) -> Group:
    """The token grouping of block `index`: "full", or spatial (even) / temporal (odd) when factorized."""
    if attention == "full":
        return "full"
    return "spatial" if index % 2 == 0 else "temporal"
