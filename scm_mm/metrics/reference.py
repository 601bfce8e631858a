"""The real items a generated set is scored against: a seeded uniform subset, read in batches.

Not the first n items: folder datasets list their items class by class (ImageFolder, VideoFolder), so
the first 50,000 of ImageNet's 1.28M images hold about 39 of its 1000 classes, and FID, precision and
recall would compare against a few classes. A fixed seed keeps scores reproducible; batches keep
memory at one batch of media (50,000 images of 512x512 would take 39 GB stacked).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def subset_indices(size: int, n: int, seed: int = 0) -> torch.Tensor:
    """min(n, size) distinct indices into `size` items, uniform with `seed` and sorted (all when n >= size)."""
    if n >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def media_batches(dataset: Any, indices: torch.Tensor, batch_size: int = 100) -> Iterator[torch.Tensor]:
    """The media of `dataset[i]` (items (media, label)) for i in `indices`, stacked `batch_size` at a time."""
    for chunk in indices.split(batch_size):
        yield torch.stack([torch.as_tensor(dataset[i][0]) for i in chunk.tolist()])
