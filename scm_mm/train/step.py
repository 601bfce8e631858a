"""Optimiser steps that never write a non-finite value into the weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def apply_gradients(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None = None,  # clip the global gradient norm; None: no clipping
    scaler: torch.amp.GradScaler | None = None,  # fp16 loss scaling; None in fp32/bf16
) -> tuple[bool, torch.Tensor]:
    """Clip and step on gradients already accumulated by backward().

    Returns (applied, grad_norm). A non-finite gradient norm skips the step and leaves the weights
    untouched (under DDP/FSDP the norm is taken after the all-reduce, so every rank agrees); with a
    scaler, the scaler also lowers its scale, as GradScaler does.
    """
    params = [p for p in parameters if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    applied = bool(torch.isfinite(grad_norm))
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself on inf/NaN
        scaler.update()
    elif applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied, grad_norm.detach()


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None = None,  # clip the global gradient norm; None: no clipping
) -> bool:
    """backward, check, clip, step. Returns False (and leaves the weights untouched) when the loss or
    any gradient is NaN/inf, so the caller can count and log the skipped step."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    return apply_gradients(optimizer, parameters, max_grad_norm)[0]
