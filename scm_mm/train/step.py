"""One optimiser step that never writes a non-finite value into the weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None = None,  # clip the global gradient norm; None: no clipping
) -> bool:
    """backward, check, clip, step. Returns False (and leaves the weights untouched) when the loss or
    any gradient is NaN/inf, so the caller can count and log the skipped step."""
    params = [p for p in parameters if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True
