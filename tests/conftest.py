import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (the fused JVP attention) run in Triton's CPU interpreter; the flag is read
    # when a kernel is defined, so it must be set before any test imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches the library writes by default ($SCM_MM_CACHE: audio manifests, the examples' runs) stay in a
    temporary folder, not the user's ~/.cache."""
    if "SCM_MM_CACHE" not in os.environ:
        os.environ["SCM_MM_CACHE"] = str(tmp_path_factory.mktemp("scm-mm-cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
