"""The sliced Wasserstein-2 distance between two sample sets."""

from __future__ import annotations

import torch


def sliced_wasserstein(
    x: torch.Tensor,                    # (N, ...) samples
    y: torch.Tensor,                    # (N, ...) samples, same count
    projections: int = 512,             # random directions on the unit sphere
    generator: torch.Generator | None = None,
) -> float:
    """sqrt(E_u[W_2^2(u.x, u.y)]) over random unit directions u; each 1-D W_2 is exact (sorted samples)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    if x.shape != y.shape:
        raise ValueError(f"need equally many samples of equal size, got {tuple(x.shape)} and {tuple(y.shape)}")
    u = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64).to(x.device)
    u = u / u.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ u, dim=0)
    py, _ = torch.sort(y @ u, dim=0)
    return float((px - py).square().mean().sqrt())
