"""Distances between sample sets."""

from .sliced_wasserstein import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
