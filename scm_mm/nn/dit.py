"""DiT-style transformer for 1-D (audio frames), 2-D (images, mels) and 3-D (video) inputs.

len(patch_size) sets the number of spatial dims. Patchify with einops, fixed factorized sin-cos
position codes over the token grid (built per call: any frame count), blocks with sCM's adaptive
double normalisation (§4.1) in place of adaLN's (1 + scale, shift), and zero-initialised gates
(adaLN-Zero) so each block starts as the identity. All attention goes through
`scm_mm.nn.attention.attention`, the one op with a forward-mode derivative (STYLE 3).
`SelfAttention` is shared with the U-Net.
"""

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from scm_mm.nn.attention import attention
from scm_mm.nn.embeddings import ConditionEmbedding, sincos_grid_embedding
from scm_mm.nn.layers import Linear
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


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens with optional QK-normalisation.

    QK-norm (RMSNorm per head on q and k) bounds the attention logits by about sqrt(head_dim) times
    the gains, which keeps the softmax and its tangent in range under fp16/bf16 (SANA-Sprint's sCM
    config and rCM's Wan both keep QK-norm).

    forward: x (B, N, C) -> (B, N, C).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        o = attention(self.q_norm(q), self.k_norm(k), v)  # (B, heads, N, head_dim)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """x + g_a ⊙ Attn(ADN(x)), then x + g_m ⊙ MLP(ADN(x)); gates g = W·emb, W zero-initialised.

    forward: x (B, N, hidden), emb (B, emb_dim) -> (B, N, hidden).
    """

    def __init__(
        self,
        hidden: int,  # token width
        emb_dim: int,  # condition embedding width
        heads: int,  # attention heads
        mlp_ratio: float = 4.0,  # MLP hidden = mlp_ratio * hidden
        qk_norm: bool = True,  # see SelfAttention
        dropout: float = 0.0,  # in the MLP, after GELU
    ) -> None:
        super().__init__()
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
        # each with a zero gradient forever.
        self.gates = Linear(emb_dim, 2 * hidden)
        nn.init.zeros_(self.gates.weight)
        nn.init.zeros_(self.gates.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_mlp = self.gates(emb)[:, None, :].chunk(2, dim=-1)  # (B, 1, hidden) each
        x = x + gate_attn * self.attn(self.norm1(x, emb))
        return x + gate_mlp * self.mlp(self.norm2(x, emb))


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
        noise_channels: int = 256,  # sinusoid width for c_noise and s (DiT's frequency size)
        max_positions: float = 10000,  # of the time and token-grid sinusoids
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.ndim = len(self.patch_size)
        if self.ndim not in PATCHIFY:
            raise ValueError(f"patch_size must have 1, 2 or 3 entries, got {self.patch_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.hidden = hidden
        self.max_positions = max_positions
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
            DiTBlock(hidden, hidden, heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, dropout=dropout) for _ in range(depth)
        )
        self.norm_out = AdaptiveDoubleNorm(hidden, hidden, norm="layer", channels_last=True)
        self.proj_out = Linear(hidden, patch_pixels * self.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _check_input(self, x: torch.Tensor, c_noise: torch.Tensor) -> None:
        if x.ndim != 2 + self.ndim:
            raise ValueError(
                f"DiT with {self.ndim}-D patches expects x of {2 + self.ndim} dims "
                f"(B, C, {', '.join(GRID_AXES[self.ndim])}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DiT expects {self.in_channels} channels, got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch_size, strict=True)):
            raise ValueError(f"spatial size {spatial} is not divisible by patch_size {self.patch_size}")
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
        grid = [s // p for s, p in zip(x.shape[2:], self.patch_size, strict=True)]
        axes = GRID_AXES[self.ndim]
        patch = {f"p{i + 1}": p for i, p in enumerate(self.patch_size)}

        emb = self.embed(c_noise, labels, guidance)  # (B, hidden)
        tokens = rearrange(x, PATCHIFY[self.ndim], **patch)  # (B, N, prod(patch) * C)
        h = self.proj_in(tokens)  # (B, N, hidden)
        pos = sincos_grid_embedding(grid, self.hidden, self.max_positions, h.device, h.dtype)
        h = h + pos  # (N, hidden) broadcast over the batch
        for block in self.blocks:
            h = block(h, emb)
        h = self.proj_out(self.norm_out(h, emb))  # (B, N, prod(patch) * out_channels)
        sizes = dict(zip(axes, grid, strict=True))
        return rearrange(h, UNPATCHIFY[self.ndim], **patch, **sizes)  # (B, out_channels, *dims)
