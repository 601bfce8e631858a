"""TrigFlow: forward process, time proposal, conversions, and adapters from other parameterizations."""

import math

import pytest
import torch
from helpers import TinyNet

from scm_mm import ConvertedTeacher, GaussianMixture, TrigFlowPrecond, ddpm_timestep
from scm_mm.trigflow import (
    add_noise,
    edm_sigma_from_t,
    flow_s_from_t,
    sample_time,
    t_from_alpha_sigma,
    t_from_edm_sigma,
    t_from_flow_s,
    t_max,
    trigflow_scale,
    vp_alpha_sigma_from_t,
)

SIGMA_D = 0.7
T = torch.linspace(0.01, math.pi / 2 - 0.01, 50, dtype=torch.float64)


def test_t_max_matches_paper():
    assert t_max(0.5) == pytest.approx(1.56454, abs=1e-5)  # App. G.2


def test_time_proposal_is_lognormal_in_sigma_d_tan_t():
    t = sample_time(200_000, P_mean=-1.0, P_std=1.4, sigma_d=0.5, generator=torch.Generator().manual_seed(0))
    log_sigma = torch.log(0.5 * torch.tan(t.double()))
    assert ((t > 0) & (t < math.pi / 2)).all()
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.02)


def test_conversions_round_trip():
    assert torch.allclose(t_from_edm_sigma(edm_sigma_from_t(T, SIGMA_D), SIGMA_D), T, atol=1e-12)
    assert torch.allclose(t_from_flow_s(flow_s_from_t(T, SIGMA_D), SIGMA_D), T, atol=1e-12)
    alpha, sigma = vp_alpha_sigma_from_t(T, SIGMA_D)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(T), atol=1e-12)
    assert torch.allclose(t_from_alpha_sigma(alpha, sigma, SIGMA_D), T, atol=1e-12)
    half_pi = torch.tensor(math.pi / 2, dtype=torch.float64)
    assert flow_s_from_t(half_pi, SIGMA_D).item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("process", ["edm", "vp", "flow"])
def test_rescaled_process_equals_trigflow(process):
    """x_t = c x' for x' = alpha x0 + sigma eps and the TrigFlow pair (t, z = sigma_d eps) (App. B.2)."""
    x0 = torch.randn(len(T), 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    teacher = ConvertedTeacher(torch.nn.Identity(), process, "eps", sigma_d=SIGMA_D, time_input=lambda a, s: s)
    alpha, sigma = teacher.alpha_sigma(T)
    assert torch.allclose(t_from_alpha_sigma(alpha, sigma, SIGMA_D), T, atol=1e-12)
    x_prime = alpha[:, None] * x0 + sigma[:, None] * eps
    x_t = add_noise(x0, SIGMA_D * eps, T)
    assert torch.allclose(trigflow_scale(alpha, sigma, SIGMA_D)[:, None] * x_prime, x_t, atol=1e-12)


class NativeTeacher(torch.nn.Module):
    """The exact denoiser of a Gaussian mixture, written in another parameterization.

    It recovers (alpha, sigma) from its time input, maps x' to TrigFlow itself, and returns the
    native prediction; ConvertedTeacher must turn that back into the mixture's exact F.
    """

    def __init__(self, gm, process, prediction):
        super().__init__()
        self.gm, self.process, self.prediction = gm, process, prediction

    def forward(self, x, time):
        if self.process == "edm":
            alpha, sigma = torch.ones_like(time), time
        elif self.process == "flow":
            alpha, sigma = 1 - time, time
        else:  # time is the VP angle
            alpha, sigma = torch.cos(time), torch.sin(time)
        t = t_from_alpha_sigma(alpha, sigma, self.gm.sigma_d)
        x0, z = self.gm.posterior(trigflow_scale(alpha, sigma, self.gm.sigma_d)[:, None] * x, t)
        eps = z / self.gm.sigma_d
        a, s = alpha[:, None], sigma[:, None]
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "velocity": eps - x0}[self.prediction]


@pytest.mark.parametrize(
    "process,prediction",
    [("edm", "x0"), ("edm", "eps"), ("vp", "eps"), ("vp", "v"), ("vp", "x0"), ("flow", "velocity"), ("flow", "x0")],
)
def test_converted_teacher_reproduces_exact_F(process, prediction):
    gm = GaussianMixture(torch.randn(3, 4, dtype=torch.float64), 0.4, sigma_d=SIGMA_D)
    native = NativeTeacher(gm, process, prediction)
    time_input = (lambda a, s: torch.atan2(s, a)) if process == "vp" else None
    teacher = ConvertedTeacher(native, process, prediction, sigma_d=SIGMA_D, time_input=time_input)
    t = torch.linspace(0.05, 1.5, 16, dtype=torch.float64)
    x_t = add_noise(gm.sample(16), SIGMA_D * torch.randn(16, 4, dtype=torch.float64), t)
    assert torch.allclose(teacher(x_t, t), gm(x_t, t), atol=1e-9)


def test_zero_snr_teachers_at_float32s_half_pi():
    """float32(pi/2) = 1.5707964 lies past pi/2, where tan t is -2.3e7: the VP pair read off tan t was
    (0, -1) there, so a v-prediction teacher sampled from pi/2 saw a NaN time and returned -F."""
    half_pi = torch.tensor([math.pi / 2], dtype=torch.float32)
    assert half_pi.item() > math.pi / 2
    alpha, sigma = vp_alpha_sigma_from_t(half_pi, SIGMA_D)
    assert (alpha.item(), sigma.item()) == (0.0, 1.0)
    assert flow_s_from_t(half_pi, SIGMA_D).item() == 1.0
    gm = GaussianMixture(torch.randn(3, 4, dtype=torch.float64), 0.4, sigma_d=SIGMA_D)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    schedule = ddpm_timestep(torch.cumprod(1 - betas, 0))
    seen = []
    native = NativeTeacher(gm, "vp", "v")
    teacher = ConvertedTeacher(native, "vp", "v", sigma_d=SIGMA_D,
                               time_input=lambda a, s: seen.append(schedule(a, s)) or torch.atan2(s, a))  # fmt: skip
    x_t = SIGMA_D * torch.randn(8, 4, dtype=torch.float64)
    exact = gm(x_t, torch.full((8,), math.pi / 2, dtype=torch.float64))  # F at zero SNR: -E[x0] / sigma_d
    F = teacher.to(torch.float32)(x_t.float(), half_pi.expand(8))
    assert F.dtype == torch.float32 and torch.allclose(F.double(), exact, atol=1e-5)
    assert seen[-1].tolist() == [999.0] * 8  # the end of the DDPM schedule, not NaN


def test_ddpm_timestep_inverts_the_schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    time_input = ddpm_timestep(alphas_cumprod)
    idx = torch.tensor([0, 1, 10, 500, 998, 999])
    a = alphas_cumprod[idx].sqrt()
    s = (1 - alphas_cumprod[idx]).sqrt()
    assert torch.allclose(time_input(a, s), idx.double(), atol=1e-6)
    mid = time_input(a[3:4] * 0.999, s[3:4])  # between indices: fractional, in range
    assert 0 < mid.item() < 999


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="sigma_d"):
        TrigFlowPrecond(TinyNet(), sigma_d=0.0)
    with pytest.raises(ValueError, match="sigma_d"):
        TrigFlowPrecond(TinyNet(), sigma_d=-1.0)
    with pytest.raises(ValueError, match="time_input"):
        ConvertedTeacher(torch.nn.Identity(), "vp", "eps")
    with pytest.raises(ValueError, match="predict"):
        ConvertedTeacher(torch.nn.Identity(), "edm", "v")
