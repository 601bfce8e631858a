"""Samplers on an exact Gaussian-mixture teacher, where the right answer is known."""

import math

import pytest
import torch

from scm_mm import (
    ClassifierFreeGuidance,
    ExactConsistencyModel,
    GaussianMixture,
    consistency_times,
    sample,
    sample_heun,
    teacher_times,
)
from scm_mm.analytic import consistency_function
from scm_mm.metrics import sliced_wasserstein

N = 4000


@pytest.fixture(scope="module")
def gm():
    means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, 0.2)


@pytest.fixture(scope="module")
def reference(gm):
    """Two independent data sets: the reference, and a floor for what N samples can achieve."""
    return gm.sample(N, torch.Generator().manual_seed(10)), gm.sample(N, torch.Generator().manual_seed(11))


def swd(x, y):
    return sliced_wasserstein(x, y, projections=256, generator=torch.Generator().manual_seed(0))


# With 4000 samples of this mixture, two independent data sets are 0.03 to 0.08 apart (mostly from
# the multinomial counts per component; seeds 10 to 15 measured); a sampler "reproduces the mixture"
# below 0.12. Two Euler steps measure 0.34.
BOUND = 0.12


def test_floor_is_below_bound(reference):
    assert swd(*reference) < BOUND


@pytest.mark.parametrize("method,steps", [("heun", 32), ("dpmpp_2m", 32), ("euler", 128)])
def test_teacher_ode_samplers_reproduce_the_mixture(gm, reference, method, steps):
    x = sample(gm, (N, 2), method=method, steps=steps, seed=1, dtype=torch.float64)
    assert swd(x, reference[0]) < BOUND


def test_stochastic_heun_reproduces_the_mixture(gm, reference):
    """EDM's stochastic sampler (churn > 0) on the exact teacher, at the largest re-noising it allows."""
    x = sample(gm, (N, 2), method="heun", steps=32, churn=math.inf, seed=1, dtype=torch.float64)
    assert swd(x, reference[0]) < BOUND


def test_stochastic_heun_keeps_the_marginals():
    """On one Gaussian the exact denoiser makes the sampler's only errors discretisation and noise scale:
    the moments match to 2% at 128 steps (the statistical error of a std at n = 40,000 is 0.35%), while
    re-noising 10% too strongly (s_noise 1.1) inflates the stds by about 10%."""
    gauss = GaussianMixture(torch.tensor([[0.3, -0.2]]), torch.tensor([[0.5, 0.2]]), sigma_d=0.5)
    t_steps = teacher_times(128, sigma_d=0.5)

    def draw(s_noise):
        gen = torch.Generator().manual_seed(1)
        noise = torch.randn(40_000, 2, generator=gen, dtype=torch.float64) * 0.5
        return sample_heun(gauss, noise, t_steps, churn=math.inf, s_noise=s_noise, generator=gen)

    x, too_noisy = draw(1.0), draw(1.1)
    torch.testing.assert_close(x.mean(0), gauss.means[0], atol=0.01, rtol=0)
    torch.testing.assert_close(x.std(0), gauss.stds[0], atol=0, rtol=0.02)
    assert (too_noisy.std(0) > 1.07 * gauss.stds[0]).all()


def test_churn_zero_is_the_ode_needs_heun_and_refuses_bad_settings(gm):
    kw = dict(steps=8, seed=3, dtype=torch.float64)
    ode = sample(gm, (64, 2), method="heun", **kw)
    assert torch.equal(sample(gm, (64, 2), method="heun", churn=0.0, **kw), ode)
    assert not torch.equal(sample(gm, (64, 2), method="heun", churn=5.0, **kw), ode)
    with pytest.raises(ValueError, match="churn"):
        sample(gm, (64, 2), method="dpmpp_2m", churn=5.0, **kw)
    for bad in ({"churn": -1.0}, {"churn": math.nan}, {"s_noise": -0.5}, {"churn_sigmas": (50.0, 0.05)}):
        with pytest.raises(ValueError, match="churn >= 0"):
            sample_heun(gm, torch.zeros(4, 2, dtype=torch.float64), [1.5, 0.7, 0.0], **{"churn": 1.0, **bad})


def test_too_few_steps_fail_the_bound(gm, reference):
    """The bound has teeth: two Euler steps do not reproduce the mixture."""
    x = sample(gm, (N, 2), method="euler", steps=2, seed=1, dtype=torch.float64)
    assert swd(x, reference[0]) > 2 * BOUND


@pytest.mark.parametrize("steps", [1, 2])
def test_exact_consistency_model_samples_the_mixture(gm, reference, steps):
    x = sample(ExactConsistencyModel(gm, steps=32), (N, 2), steps=steps, seed=2, dtype=torch.float64)
    assert swd(x, reference[0]) < BOUND


def test_heun_converges_to_the_exact_pf_ode(gm):
    z = torch.randn(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * gm.sigma_d
    times = teacher_times(256, sigma_d=gm.sigma_d)
    ref = consistency_function(gm, z, times[0], steps=1024)
    errors = []
    for n in (16, 64):
        ts = teacher_times(n, sigma_d=gm.sigma_d)
        x = sample(gm, (256, 2), method="heun", t_steps=ts, dtype=torch.float64, seed=3)
        errors.append((x - ref).abs().max().item())
    assert errors[1] < 0.02
    assert errors[1] < errors[0] / 4  # second order in practice


def test_same_seed_same_samples(gm):
    model = ExactConsistencyModel(gm, steps=8)
    for method, steps in (("consistency", 2), ("heun", 4), ("dpmpp_2m", 4), ("euler", 4)):
        m = model if method == "consistency" else gm
        a = sample(m, (16, 2), method=method, steps=steps, seed=7, dtype=torch.float64)
        b = sample(m, (16, 2), method=method, steps=steps, seed=7, dtype=torch.float64)
        c = sample(m, (16, 2), method=method, steps=steps, seed=8, dtype=torch.float64)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_consistency_times():
    assert consistency_times(1, sigma_d=0.5) == pytest.approx([1.56454, 0.0], abs=1e-5)
    assert consistency_times(2, sigma_d=0.5) == pytest.approx([1.56454, 1.1, 0.0], abs=1e-5)
    assert consistency_times(2, sigma_d=0.5, t_mid=1.3)[1] == 1.3
    assert consistency_times(4, sigma_d=0.5, intermediate=[1.5, 1.4, 1.0])[1:] == [1.5, 1.4, 1.0, 0.0]
    four = consistency_times(4, sigma_d=0.5)
    assert len(four) == 5 and four[-1] == 0.0
    with pytest.raises(ValueError, match="intermediate"):
        consistency_times(3, sigma_d=0.5, intermediate=[1.0])
    with pytest.raises(ValueError, match="decrease"):
        consistency_times(2, sigma_d=0.5, t_mid=1.6)


def test_sampling_may_start_at_pi_over_2_given_in_float32(gm):
    model = ExactConsistencyModel(gm, steps=8)
    t_steps = torch.tensor([math.pi / 2, 1.1, 0.0])  # float32(pi/2) is 4e-8 above pi/2
    x = sample(model, (16, 2), t_steps=t_steps, seed=0, dtype=torch.float64)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="decrease"):
        sample(model, (16, 2), t_steps=[1.5708, 1.1, 0.0], seed=0)


class TimeSpy(ExactConsistencyModel):
    def forward(self, x_t, t, **cond):
        self.seen.append(t.clone())
        return super().forward(x_t.double(), t.double(), **cond).to(x_t.dtype)


def test_bfloat16_sampling_keeps_float32_times(gm):
    """Sampling in bf16 (the state and the network) still gives the network the times in fp32: in bf16
    t_max = 1.56454 is 1.5625, sigma 61 instead of 80."""
    model = TimeSpy(gm, steps=8)
    model.seen = []
    x = sample(model, (16, 2), seed=0, dtype=torch.bfloat16)
    assert x.dtype == torch.bfloat16 and torch.isfinite(x).all()
    times = [t.unique().tolist() for t in model.seen]
    assert times == [[torch.tensor(consistency_times(2, sigma_d=gm.sigma_d)[0]).item()], [torch.tensor(1.1).item()]]
    assert all(t.dtype == torch.float32 for t in model.seen)


def test_teacher_times_follow_edm():
    ts = teacher_times(18, sigma_d=0.5)
    assert len(ts) == 19 and ts[-1] == 0.0
    assert math.tan(ts[0]) * 0.5 == pytest.approx(80.0)
    assert math.tan(ts[-2]) * 0.5 == pytest.approx(0.002)


def test_guided_sampling_sharpens_the_class(gm):
    """CFG on the exact teacher: scale 1 samples the labelled component; scale 3 narrows it and pushes it
    away from the other components (F_u + s (F_c - F_u) extrapolates away from the unconditional)."""
    n = 2000
    labels = torch.zeros(n, dtype=torch.long)
    guided = ClassifierFreeGuidance(gm)

    def draw(scale):
        guidance = torch.full((n,), scale, dtype=torch.float64)
        kw = dict(method="heun", steps=32, seed=4, dtype=torch.float64)
        return sample(guided, (n, 2), **kw, labels=labels, guidance=guidance)

    x1, x3 = draw(1.0), draw(3.0)
    torch.testing.assert_close(x1.mean(0), gm.means[0], atol=0.03, rtol=0)
    torch.testing.assert_close(x1.std(0), gm.stds[0], atol=0.02, rtol=0)
    assert (x3.std(0) < 0.8 * x1.std(0)).all()
    assert (x3.mean(0) > x1.mean(0) + 0.1).all()
