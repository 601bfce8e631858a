import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the fused JVP attention) run in Triton's CPU interpreter; the flag is read
    # when a kernel is defined, so it must be set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
