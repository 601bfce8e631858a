"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 3).

Each set approximates its manifold by the union of balls around its samples, the radius of a ball
being the distance to the sample's k-th nearest neighbour within its own set (k = 3 in the paper).
    precision = fraction of generated samples inside the real manifold,
    recall    = fraction of real samples inside the generated manifold.
Distances are computed in row batches with torch.cdist, so memory is O(batch_size * N), never N^2.
"""

from __future__ import annotations

import torch


def knn_radii(
    features: torch.Tensor,  # (N, D)
    k: int = 3,              # neighbour rank; the sample itself (distance 0) is not counted
    batch_size: int = 1024,  # rows of the (batch_size, N) distance block
) -> torch.Tensor:
    """(N,) distance from each sample to its k-th nearest neighbour among the others."""
    x = features.reshape(features.shape[0], -1).float()
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"need 1 <= k < N, got k={k}, N={x.shape[0]}")
    # kthvalue(k + 1): the smallest distance of each row is the sample to itself
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch_size)])


def manifold_coverage(
    query: torch.Tensor,     # (M, D) samples to test
    support: torch.Tensor,   # (N, D) samples that span the manifold
    radii: torch.Tensor,     # (N,) ball radii of the support, from knn_radii
    batch_size: int = 1024,
) -> float:
    """Fraction of `query` samples within radii[j] of some support[j] (inclusive, as the paper's code)."""
    q = query.reshape(query.shape[0], -1).float()
    s = support.reshape(support.shape[0], -1).float().to(q.device)
    r = radii.float().to(q.device)
    inside = [(torch.cdist(b, s) <= r).any(dim=1) for b in q.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: torch.Tensor,                     # (N, D) reference features
    fake: torch.Tensor,                     # (M, D) generated features
    k: int = 3,                             # neighbour rank for the radii
    batch_size: int = 1024,                 # rows per distance block
    real_radii: torch.Tensor | None = None,  # (N,) cached knn_radii(real, k), optional
) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` against reference features `real`."""
    real = real.reshape(real.shape[0], -1).float()
    fake = fake.reshape(fake.shape[0], -1).float().to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if real_radii is None:
        real_radii = knn_radii(real, k, batch_size)
    fake_radii = knn_radii(fake, k, batch_size)
    precision = manifold_coverage(fake, real, real_radii, batch_size)
    recall = manifold_coverage(real, fake, fake_radii, batch_size)
    return precision, recall
