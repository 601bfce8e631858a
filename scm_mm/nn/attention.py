"""Attention with a forward-mode derivative. (Placeholder: naive math; replaced by the blockwise op.)"""
import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, H, Nq, D), k, v: (B, H, Nk, D); mask: bool, broadcastable to (B, H, Nq, Nk), True = attend."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v
