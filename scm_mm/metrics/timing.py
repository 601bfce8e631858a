"""Wall time of generation, for speed metrics of any modality (frames/s, real-time factor)."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(
    fn: Callable[[], Any],   # the work to time, e.g. sampling and decoding one batch
    repeats: int = 3,        # timed calls; the median is returned
    warmup: int = 1,         # untimed calls first (compilation, allocator, caches)
) -> float:
    """The median wall time of one call of fn. Pending CUDA work is synchronised before and after each
    timed call, so the time includes it."""
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
