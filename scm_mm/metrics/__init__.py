"""Distances between sample sets and feature-based quality metrics, for any modality.

A modality supplies the feature extractor (Inception for images, a classifier trained on the data,
VGGish, ...); these functions see only features (N, D) or class scores (N, K).
"""

from .frechet import FeatureStats, frechet_distance
from .inception_score import inception_score
from .precision_recall import knn_radii, manifold_coverage, precision_recall
from .reference import media_batches, subset_indices
from .sliced_wasserstein import sliced_wasserstein
from .timing import median_seconds

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "inception_score",
    "knn_radii",
    "manifold_coverage",
    "media_batches",
    "median_seconds",
    "precision_recall",
    "sliced_wasserstein",
    "subset_indices",
]
