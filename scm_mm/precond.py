"""The one boundary between a backbone and TrigFlow: everything that maps (x_t, t) to F.

`TrigFlowPrecond` wraps a backbone trained natively in TrigFlow (sCM Eq. 3, 5):
    F = F_theta(x_t / sigma_d, c_noise(t)),  c_noise(t) = time_scale * t,
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F          (the consistency function, Eq. 5)
    dx_t/dt   = sigma_d F                              (the PF-ODE, Eq. 3)
`ConvertedTeacher` wraps a network trained as EDM, VP (epsilon- or v-prediction) or flow matching and
presents it as the same F (App. B.2), so sCD can distil any of them. `ClassifierFreeGuidance` applies
a teacher's CFG with a per-sample guidance scale (App. G.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from .nn.embeddings import PositionalEmbedding
from .trigflow import (
    check_sigma_d,
    check_time,
    expand_time,
    flow_s_from_t,
    time_dtype,
    trigflow_scale,
    vp_alpha_sigma_from_t,
)


class TrigFlowModel(nn.Module):
    """Anything that gives the TrigFlow F(x_t, t). Subclasses set `sigma_d` and implement `forward`.

    Shapes: x_t (B, C, *dims) or (B, C); t (B,) or a scalar; labels (B,) long (-1 = none);
    guidance (B,) float. The result has the shape and dtype of x_t.
    """

    sigma_d: float

    def forward(  # type: ignore[override]
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor | float, **cond: torch.Tensor | None) -> torch.Tensor:
        """The consistency function f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (Eq. 5).

        For a diffusion model this is the first-order (DDIM) estimate of x0.
        """
        t_b = expand_time(t, x_t)
        F = self(x_t, t_b.flatten(), **cond)
        return (torch.cos(t_b) * x_t - torch.sin(t_b) * self.sigma_d * F).to(x_t.dtype)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor | float, **cond: torch.Tensor | None) -> torch.Tensor:
        """dx_t/dt = sigma_d F along the probability-flow ODE (Eq. 3)."""
        t_b = expand_time(t, x_t)
        return self.sigma_d * self(x_t, t_b.flatten(), **cond)


def _check_inputs(x_t: torch.Tensor, t: torch.Tensor) -> None:
    if x_t.ndim < 2:
        raise ValueError(f"x_t must have shape (B, C, *dims), got {tuple(x_t.shape)}")
    if t.shape != (x_t.shape[0],):
        raise ValueError(f"t must have shape ({x_t.shape[0]},) to match x_t {tuple(x_t.shape)}, got {tuple(t.shape)}")
    check_time(t)


class TrigFlowPrecond(TrigFlowModel):
    """A backbone `net(x, c_noise, labels=None, guidance=None)` trained in TrigFlow.

    Preconditioning runs in the input's precision (fp32, or fp64 in tests); the backbone may run
    under autocast, and its output is cast back. `logvar` is the adaptive weight head w(t) of the
    loss (Eq. 8, EDM2): it lives here, as in EDM2, so that it is optimised, saved and copied from the
    teacher to the student with the rest of the weights.
    """

    def __init__(
        self,
        net: nn.Module,                 # backbone: net(x, c_noise, labels=None, guidance=None) -> like x
        sigma_d: float = 0.5,           # data standard deviation
        time_scale: float = 1000.0,     # c_noise(t) = time_scale * t (§4.1: identity time, scaled)
        logvar_channels: int = 128,     # width of the adaptive-weight head; 0 = no head
    ) -> None:
        super().__init__()
        self.net = net
        self.sigma_d = check_sigma_d(sigma_d)
        self.time_scale = float(time_scale)
        self.logvar = AdaptiveWeight(logvar_channels) if logvar_channels > 0 else None

    def forward(  # type: ignore[override]
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_inputs(x_t, t)
        t = t.to(torch.promote_types(x_t.dtype, torch.float32))  # c_noise never in half precision
        F = self.net(x_t / self.sigma_d, self.time_scale * t, labels=labels, guidance=guidance)
        return F.to(x_t.dtype)


class AdaptiveWeight(nn.Module):
    """w(t): a learned log-weight per time (sCM Eq. 8, after EDM2's uncertainty weighting).

    A positional embedding of 1000 t (the kind §4.1 prescribes for the network; no large Fourier
    scales) and one linear layer, zero-initialised so that training starts with unit weights.
    """

    def __init__(self, channels: int = 128) -> None:
        super().__init__()
        self.embed = PositionalEmbedding(channels)
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> w: (B,) in fp32 (fp64 for fp64 t), whatever the autocast state."""
        emb = self.embed(1000.0 * t)
        with torch.autocast(t.device.type, enabled=False):
            return nn.functional.linear(emb, self.linear.weight.to(emb.dtype), self.linear.bias.to(emb.dtype))[:, 0]


Process = Literal["edm", "vp", "flow"]
Prediction = Literal["x0", "eps", "v", "velocity"]


class ConvertedTeacher(TrigFlowModel):
    """A diffusion network from another parameterization, seen as TrigFlow's F (App. B.2).

    The network sees x' = alpha x0 + sigma eps, eps ~ N(0, I), with
      process="edm":  alpha = 1, sigma the EDM noise level       (time input: sigma)
      process="vp":   alpha^2 + sigma^2 = 1                     (time input: `time_input(alpha, sigma)`)
      process="flow": alpha = 1 - s, sigma = s (rectified flow)  (time input: s)
    and predicts `prediction`: "x0" (EDM's denoiser D), "eps", "v" = alpha eps - sigma x0 (VP only), or
    "velocity" = eps - x0 (flow only). TrigFlow time t corresponds to sigma / alpha = sigma_d tan t and
    x_t = c x' with c = sigma_d / sqrt(alpha^2 sigma_d^2 + sigma^2). From the prediction we recover
    (x0, eps) and return F = v_t / sigma_d = cos(t) eps - sin(t) x0 / sigma_d (Eq. 4 with z = sigma_d eps).

    x0- and eps-predictions are singular where they are ill-posed (x0 at t = 0, eps at t = pi/2); v and
    velocity are regular on the whole interval. `time_input` maps (alpha, sigma) to what the network
    takes as time, e.g. `ddpm_timestep(alphas_cumprod)` for a discrete DDPM/diffusers network or
    `lambda a, s: 1000 * s` for a flow network trained on t in [0, 1000].
    """

    def __init__(
        self,
        net: nn.Module,                 # net(x', time, labels=None) -> prediction, shaped like x'
        process: Process,               # the forward process the network was trained with
        prediction: Prediction,         # what it predicts
        sigma_d: float = 0.5,           # TrigFlow data std to present it in
        time_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        conditional: bool = False,      # pass labels through to the network
    ) -> None:
        super().__init__()
        valid = {"edm": ("x0", "eps"), "vp": ("x0", "eps", "v"), "flow": ("x0", "eps", "velocity")}
        if process not in valid:
            raise ValueError(f"process must be one of {list(valid)}, got {process!r}")
        if prediction not in valid[process]:
            raise ValueError(f"a {process!r} teacher can predict {valid[process]}, not {prediction!r}")
        if process == "vp" and time_input is None:
            raise ValueError("a 'vp' teacher needs time_input(alpha, sigma), e.g. ddpm_timestep(alphas_cumprod)")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.sigma_d = check_sigma_d(sigma_d)
        self.time_input = time_input or (lambda alpha, sigma: sigma)
        self.conditional = conditional

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.process == "edm":
            return torch.ones_like(t), self.sigma_d * torch.tan(t)
        if self.process == "vp":
            return vp_alpha_sigma_from_t(t, self.sigma_d)
        s = flow_s_from_t(t, self.sigma_d)
        return 1 - s, s

    def forward(  # type: ignore[override]
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_inputs(x_t, t)
        if guidance is not None:
            raise ValueError("a converted teacher takes no guidance input; wrap it in ClassifierFreeGuidance")
        t = t.to(time_dtype(x_t))  # the conversion in fp32 at least, the network in x_t's precision
        alpha, sigma = self.alpha_sigma(t)
        a, s, c, tb = (expand_time(v, x_t) for v in (alpha, sigma, trigflow_scale(alpha, sigma, self.sigma_d), t))
        x = x_t / c
        kwargs = {"labels": labels} if self.conditional else {}
        out = self.net(x.to(x_t.dtype), self.time_input(alpha, sigma), **kwargs).to(x.dtype)
        if self.prediction == "x0":
            x0, eps = out, (x - a * out) / s
        elif self.prediction == "eps":
            x0, eps = (x - s * out) / a, out
        elif self.prediction == "v":  # VP: x' = a x0 + s eps, v = a eps - s x0, a^2 + s^2 = 1
            x0, eps = a * x - s * out, s * x + a * out
        else:  # flow: x' = (1 - s) x0 + s eps, velocity = eps - x0
            x0, eps = x - s * out, x + (1 - s) * out
        return (torch.cos(tb) * eps - torch.sin(tb) * x0 / self.sigma_d).to(x_t.dtype)


def ddpm_timestep(alphas_cumprod: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Time input for a discrete-time DDPM network: the fractional index with the same log-SNR.

    alphas_cumprod: (N,) decreasing, as in DDPM and diffusers schedulers. log-SNR is interpolated
    linearly between the training indices; outside the trained range the end index is used.
    """
    log_snr = torch.log(alphas_cumprod.double()) - torch.log1p(-alphas_cumprod.double())  # (N,) decreasing

    def time_input(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        target = (2 * (torch.log(alpha.double()) - torch.log(sigma.double()))).clamp(log_snr[-1], log_snr[0])
        # searchsorted needs increasing values: work on -log_snr.
        hi = torch.searchsorted(-log_snr.to(target.device), -target).clamp(1, len(log_snr) - 1)
        l_lo, l_hi = log_snr.to(target.device)[hi - 1], log_snr.to(target.device)[hi]
        frac = (l_lo - target) / (l_lo - l_hi)
        return (hi - 1 + frac).to(alpha.dtype)

    return time_input


class ClassifierFreeGuidance(TrigFlowModel):
    """F = F_uncond + s (F_cond - F_uncond) with a per-sample scale s (the teacher's CFG in sCD, App. G.2).

    Both branches run as one batch. Where labels are None (or guidance is None) the plain model is
    used. Guidance is linear in F, so it is the same whether applied to F, the velocity or x0.
    """

    def __init__(self, model: TrigFlowModel) -> None:
        super().__init__()
        self.model = model
        self.sigma_d = model.sigma_d

    def forward(  # type: ignore[override]
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labels is None or guidance is None:
            return self.model(x_t, t, labels=labels)
        null = torch.full_like(labels, -1)
        both = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])
        F_c, F_u = self.model(both[0], both[1], labels=both[2]).chunk(2)
        s = expand_time(guidance, F_c).to(F_c.dtype)
        return F_u + s * (F_c - F_u)
