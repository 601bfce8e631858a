"""EMA: classic half-life and EDM2's power-function profile, against closed forms."""

import numpy as np
import pytest
import torch

from scm_mm.train import EMA, PowerEMA, power_exponent


class Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_exponent_solves_edm2_relation(sigma_rel):
    gamma = power_exponent(sigma_rel)
    assert gamma > 0
    assert (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)) == pytest.approx(sigma_rel**2, rel=1e-10)
    with pytest.raises(ValueError):
        power_exponent(0.3)


@pytest.mark.parametrize("batch", [1, 3])
def test_power_ema_weights_follow_the_power_profile(batch):
    """With beta = (1 - b/s)^(gamma+1), the average after n updates weights update k exactly by
    s_k^(gamma+1) - s_{k-1}^(gamma+1): the discrete form of EDM2's t^gamma profile."""
    model = Scalar()
    ema = PowerEMA(model, sigma_rels=(0.1,))
    gamma = ema.gammas[0]
    values = np.random.default_rng(0).normal(size=40)
    for k, v in enumerate(values, start=1):
        model.p.data.fill_(v)
        ema.update(model, seen=k * batch, batch=batch)
    s = np.arange(0, len(values) + 1) * batch
    w = np.diff(s.astype(float) ** (gamma + 1))
    assert ema.averages[0].p.item() == pytest.approx(float((w * values).sum() / w.sum()), rel=1e-10)


def test_classic_ema_half_life_and_rampup():
    model = Scalar()
    ema = EMA(model, halflife_samples=100, rampup=None)
    model.p.data.fill_(1.0)
    for k in range(1, 11):  # 10 updates of 10 samples = one half-life
        ema.update(model, seen=k * 10, batch=10)
    assert ema.ema.p.item() == pytest.approx(0.5, rel=1e-12)
    ramped = EMA(Scalar(), halflife_samples=1e9, rampup=0.5)
    assert ramped.beta(seen=100, batch=10) == pytest.approx(0.5 ** (10 / 50))


def test_ema_copies_do_not_train():
    ema = PowerEMA(torch.nn.Linear(2, 2))
    assert all(not p.requires_grad for p in ema.parameters())
