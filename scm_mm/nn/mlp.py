"""Residual MLP backbone for vector data (toy 2-D and 16-D Gaussian mixtures), CPU-fast."""

import torch
from torch import nn

from scm_mm.nn.embeddings import ConditionEmbedding
from scm_mm.nn.layers import Linear
from scm_mm.nn.norm import AdaptiveDoubleNorm


class MLPBlock(nn.Module):
    """x + W2·Dropout(SiLU(W1·ADN(x, emb))); W2 zero-initialised so the block starts as identity.

    forward: x (B, hidden), emb (B, emb_dim) -> (B, hidden).
    """

    def __init__(
        self,
        hidden: int,  # residual stream width
        emb_dim: int,  # condition embedding width
        dropout: float = 0.0,  # nn.Dropout: the sCM loss replays the RNG so both passes match
    ) -> None:
        super().__init__()
        self.norm = AdaptiveDoubleNorm(hidden, emb_dim, norm="layer", channels_last=True)
        self.fc1 = Linear(hidden, hidden)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = Linear(hidden, hidden)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x, emb))
        return x + self.fc2(self.dropout(self.act(h)))


class MLP(nn.Module):
    """net(x, c_noise, labels=None, guidance=None) -> (B, out_channels) for x (B, in_channels).

    x is x_t/σ_d and c_noise = 1000·t (the TrigFlow wrapper does both); labels -1/None = null class;
    guidance is the App. G.2 CFG scale input (None = 1). Output layer zero-initialised, so F ≡ 0 and
    its JVP ≡ 0 at init (a calm start for the tangent; as ADM/DiT).
    """

    def __init__(
        self,
        in_channels: int,  # data dimension C of x (B, C)
        out_channels: int | None = None,  # None: same as in_channels
        hidden: int = 256,  # residual stream width
        depth: int = 4,  # number of residual blocks
        dropout: float = 0.0,  # inside each block, after the activation
        num_classes: int = 0,  # 0 = unconditional
        guidance_embed: bool = False,  # take the CFG scale s as an input (sCD student, App. G.2)
        emb_dim: int | None = None,  # condition embedding width; None: hidden
        noise_channels: int | None = None,  # sinusoid width for c_noise and s; None: hidden
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        emb_dim = emb_dim or hidden
        self.embed = ConditionEmbedding(
            emb_dim,
            noise_channels=noise_channels or hidden,
            num_classes=num_classes,
            guidance_embed=guidance_embed,
        )
        self.proj_in = Linear(in_channels, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, emb_dim, dropout) for _ in range(depth))
        self.norm_out = AdaptiveDoubleNorm(hidden, emb_dim, norm="layer", channels_last=True)
        self.proj_out = Linear(hidden, self.out_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"MLP expects x of shape (B, {self.in_channels}), got {tuple(x.shape)}")
        if c_noise.shape != (x.shape[0],):
            raise ValueError(f"c_noise must have shape ({x.shape[0]},), got {tuple(c_noise.shape)}")
        emb = self.embed(c_noise, labels, guidance)  # (B, emb_dim)
        h = self.proj_in(x)  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(nn.functional.silu(self.norm_out(h, emb)))  # (B, out_channels)
