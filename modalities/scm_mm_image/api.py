"""The image modality's plug (`ImageModality`) and its Python API (`ImageSCM`).

    from scm_mm_image import ImageSCM
    model = ImageSCM.load("runs/mnist_scd")                 # a run (its latest checkpoint) or a checkpoint
    images = model.generate(16, steps=2, labels=[3] * 16, guidance=1.2, seed=0)   # uint8 (16, C, H, W)
    model.save_grid("digits.png")
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.utils import make_grid

from scm_mm.metrics import subset_indices
from scm_mm.metrics.classifier import cached_classifier, reference_features
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.distributed import Shards

from .codecs import PixelCodec, SDVAECodec, codec_from_state
from .metrics import ClassifierFeatures, InceptionFeatures, evaluate_images, train_classifier


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """uint8 (B, C, H, W) -> one uint8 RGB picture (3, H', W'), nearly square by default."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images, nrow=nrow, padding=padding, pad_value=0)


def save_png(picture: torch.Tensor, path: str | Path) -> Path:
    """uint8 (C, H, W) with C in {1, 3} -> .png."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = picture.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
    return path


class ImageModality:
    """The plug of scm_mm.modality.Modality for images (registered as entry point "image")."""

    name = "image"
    default_suffix = ".png"  # a grid

    @property
    def pipeline(self) -> type[ImageSCM]:
        return ImageSCM

    def codec_from_state(self, state: Mapping[str, Any], **overrides: Any) -> PixelCodec | SDVAECodec:
        return codec_from_state(state, **overrides)

    def preview(self, media: torch.Tensor) -> torch.Tensor:
        return image_grid(media)

    def save(self, media: torch.Tensor, path: str | Path, grid: bool = True, nrow: int | None = None) -> list[Path]:
        """A grid .png at `path`, or with grid=False one .png per image in the folder `path`."""
        if grid:
            return [save_png(image_grid(media, nrow), path)]
        folder = Path(path)
        return [save_png(image, folder / f"{i:06d}.png") for i, image in enumerate(media)]


    def evaluate(
        self,
        images: torch.Tensor | Iterable[torch.Tensor],  # generated uint8 (N, C, H, W), or batches of them
        reference: Dataset,             # real images: items (uint8 (C, H, W), label)
        labels: torch.Tensor | None = None,  # the classes the images were generated for (unused)
        features: str = "classifier",   # "classifier" (offline FID) or "inception"
        inception_path: str | None = None,
        classifier_path: str | None = None,
        cache_dir: str | Path | None = None,  # the classifier trained here and the reference's features
        max_reference: int = 50_000,    # real images scored against: a random subset of this size
        reference_seed: int = 0,        # which subset; fixed, so scores are reproducible
        batch_size: int = 100,          # images per forward pass of the extractor
        device: str | torch.device = "cpu",  # where the extractor and the neighbour searches run
        shards: Shards | None = None,   # a distributed evaluation: `images` are this process's share
    ) -> dict[str, float]:
        """FID, IS, precision and recall of `images` against min(max_reference, len) reference images drawn
        uniformly with `reference_seed` (`subset_indices`: not the first ones, which an ImageFolder sorts by
        class), with "reference_images" and "reference_seed", the subset's size and seed.

        "classifier": the feature space of a small classifier trained on the reference data (the
        SC09 recipe), loaded from `classifier_path` or trained once and cached by the data's
        fingerprint. "inception": the standard FID network, from a local weights file only. Batches of
        generated images are scored as they come, so only their features are kept; the reference's
        features are computed once and kept in `cache_dir` (`reference_features`). With `shards`, every
        process extracts its own images' features and scores everyone's.
        """
        if features not in ("classifier", "inception"):
            raise ValueError(f"features must be 'classifier' or 'inception', got {features!r}")
        shards = shards or Shards()
        indices = subset_indices(len(reference), max_reference, reference_seed)  # type: ignore[arg-type]
        with shards.main_first():  # the classifier and the reference's features, computed once and cached
            extractor: torch.nn.Module
            if features == "inception":
                extractor = InceptionFeatures(inception_path)
            else:
                extractor = self._classifier(reference, classifier_path, cache_dir)
            extractor.to(device)
            real = reference_features(extractor, reference, indices, batch_size, cache_dir)  # (M, D)
        scores = evaluate_images(images, real, extractor, batch_size, device=device, gather=shards.gather)
        return {**scores, "reference_images": len(indices), "reference_seed": reference_seed}

    @staticmethod
    def _classifier(reference: Dataset, path: str | None, cache_dir: str | Path | None) -> ClassifierFeatures:
        def train(data: Dataset, num_classes: int) -> ClassifierFeatures:
            return train_classifier(data, num_classes=num_classes)

        return cached_classifier(reference, path, cache_dir, ClassifierFeatures.load, train)


class ImageSCM(SCMPipeline):
    """A trained image model with its codec: `generate` returns uint8 images (N, C, H, W)."""

    last: torch.Tensor | None = None

    def generate(self, n: int, **kwargs: Any) -> torch.Tensor:
        """n images; keywords: steps, labels=None, guidance=None, seed=None, method, ... (`latent_batches`: by
        default 2 consistency steps for a student, heun 32 for a diffusion teacher)."""
        self.last = super().generate(n, **kwargs)
        return self.last

    def save_grid(self, path: str | Path, images: torch.Tensor | None = None, nrow: int | None = None) -> Path:
        """Write `images` (default: the last generated) as one .png grid."""
        images = self.last if images is None else images
        if images is None:
            raise ValueError("nothing to save: call generate() first or pass images")
        return save_png(image_grid(images, nrow), path)
