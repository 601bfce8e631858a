"""Samplers in TrigFlow time, shared by every modality: consistency 1/2/N-step and teacher ODE solvers.

Each sampler is a short function of (model, noise, t_steps) where `model` is a TrigFlowModel,
`noise` ~ N(0, sigma_d^2 I) is the state at t_steps[0] and t_steps decreases to 0. Conditioning
(labels, guidance) passes through as keywords. `sample` draws the noise from a seed or generator, so
the same seed gives the same result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .precond import TrigFlowModel
from .trigflow import HALF_PI, SIGMA_MAX, check_sigma_d, t_max

Times = Sequence[float] | torch.Tensor


def _check_times(t_steps: Times) -> list[float]:
    ts = [float(t) for t in t_steps]
    ts = [HALF_PI if HALF_PI < t <= HALF_PI + 1e-6 else t for t in ts]  # float32(pi/2) rounds up by 4e-8
    if len(ts) < 2 or ts[-1] != 0.0:
        raise ValueError(f"t_steps must have at least two entries and end at 0, got {ts}")
    if any(not (0.0 <= t <= HALF_PI) for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"t_steps must decrease strictly within [0, pi/2], got {ts}")
    return ts


def consistency_times(
    steps: int = 2,
    *,
    sigma_d: float,
    t_mid: float = 1.1,                 # the paper's intermediate time for two steps (§5.2)
    intermediate: Sequence[float] | None = None,  # the steps - 1 intermediate times, if given
    sigma_max: float = SIGMA_MAX,       # start at t_max = atan(sigma_max / sigma_d) (App. G.2)
) -> list[float]:
    """[t_max, *intermediate, 0]. Two steps go through t_mid; N > 2 steps default to equal spacing in t."""
    start = t_max(check_sigma_d(sigma_d), sigma_max)
    if intermediate is None:
        if steps == 2:
            intermediate = [t_mid]
        else:
            intermediate = [start * (1 - i / steps) for i in range(1, steps)]
    if len(intermediate) != steps - 1:
        raise ValueError(f"{steps} steps need {steps - 1} intermediate times, got {list(intermediate)}")
    return _check_times([start, *intermediate, 0.0])


def teacher_times(
    steps: int,
    *,
    sigma_d: float,
    sigma_min: float = 0.002,           # EDM's smallest noise level
    sigma_max: float = SIGMA_MAX,       # EDM's largest noise level
    rho: float = 7.0,                   # EDM's spacing exponent
) -> list[float]:
    """EDM's time steps (Karras et al. 2022, Eq. 5) mapped to TrigFlow by t = atan(sigma / sigma_d), then 0."""
    check_sigma_d(sigma_d)
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    sigma = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [*torch.atan(sigma / sigma_d).tolist(), 0.0]


@torch.no_grad()
def sample_consistency(
    model: TrigFlowModel,
    noise: torch.Tensor,
    t_steps: Times,
    *,
    generator: torch.Generator | None = None,
    **cond: torch.Tensor | None,
) -> torch.Tensor:
    """Multistep consistency sampling: x0 = f(x, t), then re-noise to the next time with fresh z."""
    ts = _check_times(t_steps)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = model.denoise(x, t, **cond)
        if t_next == 0.0:
            return x0
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * model.sigma_d
        x = math.cos(t_next) * x0 + math.sin(t_next) * z
    return x


@torch.no_grad()
def sample_euler(
    model: TrigFlowModel, noise: torch.Tensor, t_steps: Times, **cond: torch.Tensor | None
) -> torch.Tensor:
    """Euler in t on dx/dt = sigma_d F (Eq. 3). NFE = steps."""
    ts = _check_times(t_steps)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model.velocity(x, t, **cond)
    return x


@torch.no_grad()
def sample_heun(
    model: TrigFlowModel,
    noise: torch.Tensor,
    t_steps: Times,
    *,
    churn: float = 0.0,                 # EDM's S_churn: 0 is the ODE; > 0 re-noises before each step
    churn_sigmas: tuple[float, float] = (0.05, 50.0),  # EDM's (S_tmin, S_tmax): where to re-noise, in sigma
    s_noise: float = 1.0,               # EDM's S_noise: the re-noising's std, relative
    generator: torch.Generator | None = None,
    **cond: torch.Tensor | None,
) -> torch.Tensor:
    """Heun's second-order method in t; the last step to t = 0 is Euler, as in EDM. NFE = 2 steps - 1.

    With churn > 0 this is EDM's stochastic sampler (Karras et al. 2022, Alg. 2) in TrigFlow: before
    each step whose noise level sigma = sigma_d tan t lies in churn_sigmas, raise it to
    sigma (1 + gamma), gamma = min(churn / steps, sqrt 2 - 1), by adding fresh noise, then take the
    Heun step from there (churn = inf: the largest gamma at every step). In TrigFlow
    x_t / cos t = x0 + sigma_d tan t z, so the added noise has std sqrt(sigma_hat^2 - sigma^2) in that
    variable, and the state is rescaled by cos t_hat / cos t.
    """
    ts = _check_times(t_steps)
    if not churn >= 0 or not s_noise >= 0 or not 0 <= churn_sigmas[0] <= churn_sigmas[1]:
        raise ValueError(f"need churn >= 0, s_noise >= 0 and 0 <= S_tmin <= S_tmax; got churn={churn}, "
                         f"s_noise={s_noise}, churn_sigmas={tuple(churn_sigmas)}")  # fmt: skip
    gamma = min(churn / (len(ts) - 1), math.sqrt(2) - 1) if churn > 0 else 0.0
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        sigma = model.sigma_d * math.tan(t)
        if gamma > 0 and churn_sigmas[0] <= sigma <= churn_sigmas[1]:
            sigma_hat = sigma * (1 + gamma)
            t_hat = math.atan(sigma_hat / model.sigma_d)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            extra = math.sqrt(sigma_hat**2 - sigma**2) * s_noise
            x, t = math.cos(t_hat) * (x / math.cos(t) + extra * z), t_hat
        d = model.velocity(x, t, **cond)
        x_euler = x + (t_next - t) * d
        if t_next == 0.0:
            x = x_euler
        else:
            x = x + (t_next - t) * 0.5 * (d + model.velocity(x_euler, t_next, **cond))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: TrigFlowModel, noise: torch.Tensor, t_steps: Times, **cond: torch.Tensor | None
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) written in TrigFlow. NFE = steps.

    TrigFlow is x_t = alpha x0 + sigma eps with alpha = cos t, sigma = sigma_d sin t, so the half
    log-SNR is lambda = -log(sigma_d tan t) and one first-order step from t to s is
    x_s = (sin s / sin t) x_t - cos s (e^{-h} - 1) x0_hat with h = lambda_s - lambda_t. The second
    order corrects x0_hat with the previous step's estimate. The step to t = 0 returns x0_hat.
    """
    ts = _check_times(t_steps)
    x, x0_prev, h_prev = noise, None, None
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = model.denoise(x, t, **cond)
        if t_next == 0.0:
            return x0
        h = math.log(math.tan(t)) - math.log(math.tan(t_next))
        x0_hat = x0
        if x0_prev is not None and h_prev is not None:
            ratio = h_prev / h
            x0_hat = (1 + 1 / (2 * ratio)) * x0 - 1 / (2 * ratio) * x0_prev
        x = (math.sin(t_next) / math.sin(t)) * x - math.cos(t_next) * math.expm1(-h) * x0_hat
        x0_prev, h_prev = x0, h
    return x


ODE_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(
    model: TrigFlowModel,
    shape: Sequence[int],               # (B, C, *dims)
    *,
    method: str = "consistency",        # "consistency" or one of ODE_SAMPLERS
    steps: int = 2,                     # consistency steps, or ODE steps
    t_steps: Times | None = None,       # explicit times (overrides steps)
    t_mid: float = 1.1,                 # two-step intermediate time
    seed: int | None = None,            # seed for the initial noise and any re-noising
    generator: torch.Generator | None = None,  # alternatively, a generator (seed wins if both)
    churn: float = 0.0,                 # Heun only: EDM's S_churn (stochastic sampling), 0 for the ODE
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **cond: torch.Tensor | None,
) -> torch.Tensor:
    """Draw noise ~ N(0, sigma_d^2 I) and run one sampler; the same seed gives the same samples."""
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    if t_steps is None:
        if method == "consistency":
            t_steps = consistency_times(steps, sigma_d=model.sigma_d, t_mid=t_mid)
        else:
            t_steps = teacher_times(steps, sigma_d=model.sigma_d)
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype) * model.sigma_d
    if method == "consistency":
        return sample_consistency(model, noise, t_steps, generator=generator, **cond)
    if method not in ODE_SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; choose 'consistency' or one of {list(ODE_SAMPLERS)}")
    solver = ODE_SAMPLERS[method]
    if churn:
        if method != "heun":
            raise ValueError(f"churn (EDM's stochastic sampling) needs method='heun', got {method!r}")
        solver = functools.partial(sample_heun, churn=churn, generator=generator)
    return solver(model, noise, t_steps, **cond)
