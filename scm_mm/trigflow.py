"""TrigFlow: the forward process, the time proposal and conversions from other parameterizations.

TrigFlow (sCM §3): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I) and t in [0, pi/2].
Every diffusion parameterization x' = alpha x0 + sigma eps is the same process up to a rescaling of
x and a change of time (App. B.2); this module holds those maps as small functions over tensors.
The network-facing side of the conversions (a teacher trained as EDM, VP or flow matching, seen as
a TrigFlow F) lives in `precond.py`.
"""

from __future__ import annotations

import math

import torch

HALF_PI = math.pi / 2
SIGMA_MAX = 80.0  # EDM's largest noise level; sCM starts sampling at t_max = atan(80 / sigma_d) (App. G.2)


def check_sigma_d(sigma_d: float) -> float:
    if not (isinstance(sigma_d, (int, float)) and math.isfinite(sigma_d) and sigma_d > 0):
        raise ValueError(f"sigma_d must be a positive finite number, got {sigma_d!r}")
    return float(sigma_d)


def check_time(t: torch.Tensor) -> None:
    """Refuse t outside [0, pi/2]. On CUDA the check is asynchronous, so it costs no host sync."""
    if not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
    ok = ((t >= 0) & (t <= HALF_PI)).all()  # also False for NaN
    if t.device.type == "cuda":
        torch._assert_async(ok, "TrigFlow time t must lie in [0, pi/2]")
    elif not bool(ok):
        bad = t[~((t >= 0) & (t <= HALF_PI))].flatten()[:4].tolist()
        raise ValueError(f"TrigFlow time t must lie in [0, pi/2]; got values such as {bad}")


def time_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision of times and their coefficients beside x: x's, but never below fp32. In bf16 the
    first sampling time atan(80 / 0.5) = 1.56454 rounds to 1.5625, which is sigma 61, not 80."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def expand_time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Per-sample times, (B,) or a scalar, as a (B, 1, ..., 1) tensor that broadcasts against x, in
    `time_dtype(x)`: a product with x in half precision is in fp32."""
    t = torch.as_tensor(t, dtype=time_dtype(x), device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        want = f"a scalar or shape ({x.shape[0]},)"
        raise ValueError(f"t must be {want} to match x {tuple(x.shape)}, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = cos(t) x0 + sin(t) z (sCM §3); z already carries the scale sigma_d."""
    if x0.shape != z.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and z {tuple(z.shape)} must have the same shape")
    t = expand_time(t, x0)
    return (torch.cos(t) * x0 + torch.sin(t) * z).to(x0.dtype)


def sample_time(
    batch: int,
    *,
    P_mean: float,                      # mean of log(sigma_d tan t)
    P_std: float,                       # std of log(sigma_d tan t)
    sigma_d: float,                     # data standard deviation
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The time proposal of Algorithm 1: log(sigma_d tan t) ~ N(P_mean, P_std^2). Returns (batch,) fp32."""
    tau = torch.randn(batch, generator=generator, device=device) * P_std + P_mean
    return torch.atan(torch.exp(tau) / sigma_d)


def t_max(sigma_d: float, sigma_max: float = SIGMA_MAX) -> float:
    """First sampling time, atan(sigma_max / sigma_d): 1.56454 for sigma_d = 0.5 (App. G.2)."""
    return math.atan(sigma_max / sigma_d)


# --- conversions (App. B.2) ---------------------------------------------------------------------
# A process x' = alpha x0 + sigma eps (eps ~ N(0, I)) equals TrigFlow at t = atan(sigma / (sigma_d alpha))
# after the rescaling x_t = x' * sigma_d / sqrt(alpha^2 sigma_d^2 + sigma^2).


def t_from_alpha_sigma(alpha: torch.Tensor, sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    return torch.atan2(sigma, sigma_d * alpha)


def trigflow_scale(alpha: torch.Tensor, sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """The factor c with x_t = c x' (App. B.2)."""
    return sigma_d / torch.sqrt(alpha**2 * sigma_d**2 + sigma**2)


def t_from_edm_sigma(sigma: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """EDM (alpha = 1): t = atan(sigma / sigma_d), and x_t = cos(t) x_sigma (Eq. 30)."""
    return torch.atan(sigma / sigma_d)


def edm_sigma_from_t(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    return sigma_d * torch.tan(t)


def vp_alpha_sigma_from_t(t: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The variance-preserving (alpha^2 + sigma^2 = 1) pair at TrigFlow time t.

    sigma / alpha = sigma_d tan t: (alpha, sigma) is (cos t, sigma_d sin t) normalised, which for sigma_d = 1
    is (cos t, sin t). Written without tan t, which changes sign just past pi/2, where float32's pi/2 lies
    (1.5707964): there (alpha, sigma) is (0, 1), not (0, -1).
    """
    alpha, sigma = torch.cos(t).clamp(min=0), sigma_d * torch.sin(t)
    norm = torch.hypot(alpha, sigma)
    return alpha / norm, sigma / norm


def flow_s_from_t(t: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """Rectified flow x_s = (1 - s) x0 + s eps: s / (1 - s) = sigma_d tan t.

    Written as sigma_d sin t / (cos t + sigma_d sin t) so that t = pi/2 gives s = 1 exactly (cos t
    clamped at 0: float32's pi/2 lies just past it).
    """
    s_sin = sigma_d * torch.sin(t)
    return s_sin / (torch.cos(t).clamp(min=0) + s_sin)


def t_from_flow_s(s: torch.Tensor, sigma_d: float) -> torch.Tensor:
    return t_from_alpha_sigma(1 - s, s, sigma_d)
