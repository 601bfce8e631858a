"""The offline recipe of the SC09 benchmark (WaveGAN, DiffWave), shared by the modalities: a small
classifier trained on the dataset itself, whose penultimate layer gives the features of a Frechet
distance and whose logits give the Inception Score.

A modality supplies the network, an nn.Module mapping a batch of media to (features (B, D), logits
(B, K)); these functions train it, run it, and score features. Numbers are comparable only between
runs that use the same classifier file.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .frechet import FeatureStats, frechet_distance
from .inception_score import inception_score
from .precision_recall import precision_recall
from .reference import media_batches

Classifier = TypeVar("Classifier", bound=nn.Module)
FEW_ITEMS = 16  # `fit_classifier` warns when trained on fewer items than this


def cached_classifier(
    reference: Any,                             # the labelled dataset (num_classes, fingerprint)
    path: str | Path | None,                    # a saved classifier to use as it is
    cache_dir: str | Path | None,               # where one trained here is kept, by the data's fingerprint
    load: Callable[[str | Path], Classifier],   # folder -> classifier
    train: Callable[[Any, int], Classifier],    # (reference, num_classes) -> classifier with .save(folder)
    name: str = "classifier",                   # the cache folder's prefix
) -> Classifier:
    """The feature network of the offline metrics: loaded from `path`, from the cache, or trained once on
    `reference` and cached (a dataset without a `fingerprint` is never cached)."""
    if path is not None:
        return load(path)
    fingerprint = str(getattr(reference, "fingerprint", ""))
    folder = None
    if cache_dir is not None and fingerprint:
        folder = Path(cache_dir) / f"{name}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"
        if (folder / "model.safetensors").exists():
            return load(folder)
    num_classes = int(getattr(reference, "num_classes", 0))
    if num_classes < 2:
        raise ValueError(f"the offline metrics train their classifier on labelled data; {type(reference).__name__} "
                         f"has {num_classes} classes (pass the path of a trained classifier instead)")  # fmt: skip
    classifier = train(reference, num_classes)
    if folder is not None:
        classifier.save(folder)  # type: ignore[operator]  # nn.Module attributes type as Tensor | Module
    return classifier


def fit_classifier(
    model: nn.Module,                    # media (B, ...) -> (features (B, D), logits (B, num_classes))
    dataset: torch.utils.data.Dataset,   # items (media, int label in [0, num_classes))
    num_classes: int,
    epochs: int,                         # passes over the dataset
    batch_size: int = 64,
    lr: float = 3e-3,                    # peak AdamW learning rate of a one-cycle schedule
    seed: int = 0,                       # shuffling; the global RNG is left untouched
    device: str | torch.device = "cpu",
    max_steps: int | None = None,        # stop early after this many steps (tests)
    log_every: int = 0,                  # print the loss every so many steps; 0: silent
) -> nn.Module:
    """Train `model` with cross-entropy; returns it in eval mode without gradients. A dataset smaller
    than `batch_size` trains in batches of all its items (a warning below `FEW_ITEMS`); larger ones
    train exactly as asked (full batches, the last partial one dropped)."""
    items = len(dataset)  # type: ignore[arg-type]
    if items < 1:
        raise ValueError("the classifier needs a labelled dataset of at least one item, got an empty one")
    if items < batch_size:  # a small reference set: one batch of all of it per epoch
        if items < FEW_ITEMS:
            warnings.warn(f"training the metrics' classifier on {items} items: its features, hence the "
                          "scores, mean little", RuntimeWarning, stacklevel=2)  # fmt: skip
        batch_size = items
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    steps = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    if steps < 1:
        raise ValueError(f"fit_classifier takes at least one step, got epochs={epochs}, max_steps={max_steps}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.to(device).train()
    step, start = 0, time.perf_counter()
    while step < steps:
        for media, labels in loader:
            labels = torch.as_tensor(labels)
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}; "
                                 "an unlabelled dataset (label -1) cannot train the classifier")  # fmt: skip
            _, logits = model(media.to(device))
            loss = F.cross_entropy(logits, labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"classifier step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - start:.1f} s")
            if step == steps:
                break
    return model.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(
    extractor: nn.Module,                           # media (B, ...) -> (features (B, D), logits (B, K))
    media: torch.Tensor | Iterable[torch.Tensor],   # (N, ...), or an iterable of batches
    batch_size: int = 100,                          # items per forward pass at most
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, K)), float32 on the CPU; the extractor runs where its weights lie."""
    batches = [media] if isinstance(media, torch.Tensor) else media
    weight = next(extractor.parameters(), None)
    device = weight.device if weight is not None else None
    outputs = [tuple(o.float().cpu() for o in extractor(chunk.to(device)))
               for batch in batches for chunk in batch.split(batch_size)]  # fmt: skip
    return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


def reference_features(
    extractor: nn.Module,                  # media (B, ...) -> (features (B, D), logits (B, K))
    reference: Any,                        # the real items; a dataset with a `fingerprint` can be cached
    indices: torch.Tensor,                 # which of them (scm_mm.metrics.subset_indices)
    batch_size: int = 100,
    cache_dir: str | Path | None = None,   # where features computed here are kept; None: never kept
) -> torch.Tensor:
    """(M, D) features of reference[indices], float32 on the CPU: computed once per data, items and extractor
    weights, then read from `cache_dir` (`cached_features`), so an evaluation every N training iterations
    reads ImageNet's 50,000 reference images once, not at every evaluation."""

    def compute() -> dict[str, torch.Tensor]:
        return {"features": extract_features(extractor, media_batches(reference, indices, batch_size), batch_size)[0]}

    return cached_features(cache_dir, reference, indices, [extractor], compute)["features"]


def cached_features(
    cache_dir: str | Path | None,              # where they are kept; None: always computed
    reference: Any,                            # the real items; without a `fingerprint`, always computed
    indices: torch.Tensor,                     # which of them
    extractors: Sequence[nn.Module],           # the networks the features come from
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """compute(), or what an earlier call with the same data, items and extractor weights kept in cache_dir
    (a file of tensors named by a hash of the three: the weights themselves, not where they were loaded;
    torch's format, as the core's metrics depend on torch alone, read with weights_only)."""
    fingerprint = str(getattr(reference, "fingerprint", ""))
    if cache_dir is None or not fingerprint:
        return compute()
    key = hashlib.sha256(fingerprint.encode())
    key.update(indices.to(torch.int64).numpy().tobytes())
    for extractor in extractors:
        key.update(type(extractor).__name__.encode())
        for name, tensor in sorted(extractor.state_dict().items()):
            key.update(name.encode())
            key.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    path = Path(cache_dir) / f"reference-features-{key.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)  # tensors and containers only, no arbitrary objects
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)  # atomic: a killed evaluation leaves no half-written file
    return tensors


def feature_scores(
    features: torch.Tensor,                      # (N, D) of the generated samples
    logits: torch.Tensor,                        # (N, K) of the generated samples
    reference: torch.Tensor | FeatureStats,      # (M, D) reference features, or their FeatureStats
    splits: int = 10,                            # IS splits (at most N: fewer samples, one split each)
    k: int = 3,                                  # neighbour rank of precision / recall
    reference_radii: torch.Tensor | None = None,  # (M,) cached knn_radii of the reference features
    device: str | torch.device | None = None,    # where precision and recall's distances run; None: the reference's
) -> dict[str, float]:
    """{"frechet", "is_mean", "is_std", "precision", "recall"}; precision and recall only when the
    reference is given as features (not FeatureStats alone), nan when a set has k samples or fewer. The
    distances of precision and recall, N x M of them (2.5e9 for FID-50k), are what takes long: on a GPU
    with `device`."""
    ref_stats = reference if isinstance(reference, FeatureStats) else FeatureStats().update(reference)
    stats = FeatureStats().update(features)
    is_mean, is_std = inception_score(logits, splits=min(splits, len(logits)))
    out = {"frechet": frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma),
           "is_mean": is_mean, "is_std": is_std}  # fmt: skip
    if not isinstance(reference, FeatureStats):
        real, fake = reference.to(device), features.to(device)
        if min(len(real), len(fake)) > k:  # each set's k-th neighbour radius needs k others
            out["precision"], out["recall"] = precision_recall(real, fake, k=k, real_radii=reference_radii)
        else:
            out["precision"] = out["recall"] = math.nan
    return out
