"""Image metrics on CUDA, as scm-mm-eval runs them with a model there (`device=`): the CPU's scores.

Imports only what the GPU image of bench/gpu_checks.sh has (no Hydra, mlxtend or PyAV).
"""

import pytest
import torch

from scm_mm_image import ImageModality
from scm_mm_image.metrics import train_classifier

pytestmark = pytest.mark.gpu


def digits(n: int, seed: int) -> torch.Tensor:
    return torch.randint(256, (n, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def scores(device: str, tmp_path) -> tuple[dict[str, float], dict[str, float]]:
    """(scores of one tensor on the CPU, of the same images in batches on `device`)."""
    reference = [(image, i % 10) for i, image in enumerate(digits(40, 0))]
    train_classifier(reference, max_steps=5).save(tmp_path / "clf")
    images = digits(24, 1)
    options = {"classifier_path": str(tmp_path / "clf"), "max_reference": 40}
    cpu = ImageModality().evaluate(images, reference, **options)
    return cpu, ImageModality().evaluate(iter(images.split(8)), reference, device=device, **options)


def test_image_scores_on_cuda_are_the_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    cpu, cuda = scores("cuda", tmp_path)
    for key in ("fid", "is_mean"):
        assert cuda[key] == pytest.approx(cpu[key], rel=1e-3, abs=1e-4), key
    for key in ("precision", "recall"):  # counts of samples inside a radius: one may cross it
        assert abs(cuda[key] - cpu[key]) <= 1 / 24 + 1e-9, key
