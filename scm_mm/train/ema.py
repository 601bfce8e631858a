"""Exponential moving averages of weights: classic (fixed half-life) and EDM2's power-function EMA.

Progress is counted in samples (images, clips), as in EDM2, so the averages do not depend on the batch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def _copy_for_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded parameter (a DTensor); other tensors as they are.

    The averages keep full copies on every rank, so sampling needs no collective; with FSDP this costs
    one all-gather of the weights per update, the price of keeping the EMA code single-process simple.
    """
    return p.full_tensor() if hasattr(p, "full_tensor") else p


@torch.no_grad()
def _lerp_(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) model, for parameters and floating-point buffers."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(_full(p.detach()).to(e.dtype), 1 - beta)
    for e_buf, buf in zip(ema.buffers(), model.buffers()):
        if e_buf.is_floating_point():
            e_buf.lerp_(buf.to(e_buf.dtype), 1 - beta)
        else:
            e_buf.copy_(buf)


class EMA(nn.Module):
    """Classic EMA with a half-life in samples and EDM's ramp-up (the half-life never exceeds
    `rampup` times the samples seen, so early averages are not dominated by the initialisation)."""

    def __init__(
        self,
        model: nn.Module,
        halflife_samples: float = 500_000,  # the paper's CIFAR-10 EMA: half-life 0.5 Mimg (T4)
        rampup: float | None = 0.05,        # EDM's ema_rampup_ratio; None disables
    ) -> None:
        super().__init__()
        self.ema = _copy_for_ema(model)
        self.halflife_samples = halflife_samples
        self.rampup = rampup

    def beta(self, seen: int, batch: int) -> float:
        halflife = self.halflife_samples
        if self.rampup is not None:
            halflife = min(halflife, seen * self.rampup)
        return 0.5 ** (batch / max(halflife, 1e-8))

    def update(self, model: nn.Module, seen: int, batch: int) -> None:
        """Call after each optimiser step; `seen` counts samples including this batch."""
        _lerp_(self.ema, model, self.beta(seen, batch))

    def named_averages(self) -> dict[str, nn.Module]:
        return {"ema": self.ema}


def power_exponent(sigma_rel: float) -> float:
    """gamma with relative standard deviation sigma_rel (EDM2, Eq. 3 / App. C):
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the largest real root of the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0."""
    if not 0 < sigma_rel < 12**-0.5:  # gamma > 0 needs sigma_rel^2 < 1/12
        raise ValueError(f"sigma_rel must be in (0, {12**-0.5:.4f}), got {sigma_rel}")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


class PowerEMA(nn.Module):
    """EDM2's power-function EMA: after s samples, the average weights the sample at s' as s'^gamma.

    One average per sigma_rel; beta = (1 - batch / seen)^(gamma + 1) keeps the exact profile for any
    batch size. `averages[i]` is the model averaged with `sigma_rels[i]`.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: tuple[float, ...] = (0.05, 0.10),  # the paper samples with sigma_rel = 0.05 (T5)
    ) -> None:
        super().__init__()
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [power_exponent(s) for s in self.sigma_rels]
        self.averages = nn.ModuleList(_copy_for_ema(model) for _ in self.sigma_rels)

    def update(self, model: nn.Module, seen: int, batch: int) -> None:
        for ema, gamma in zip(self.averages, self.gammas):
            _lerp_(ema, model, (1 - batch / seen) ** (gamma + 1))

    def named_averages(self) -> dict[str, nn.Module]:
        """"ema-<sigma_rel>" -> average, e.g. "ema-0.050"; the first is the one sampling uses."""
        return {f"ema-{s:.3f}": ema for s, ema in zip(self.sigma_rels, self.averages)}
