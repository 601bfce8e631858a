"""Training objectives: the TrigFlow diffusion loss (teachers) and the sCM loss (sCT and sCD).

Notation of the paper: t the TrigFlow angle, x0 data, z ~ N(0, sigma_d^2 I), x_t = cos t x0 + sin t z,
F the network output, F- = stopgrad(F), dxt_dt the tangent of x_t along the PF-ODE, g the target
direction of Algorithm 1, w(t) the learned adaptive log-weight, D the per-sample dimensionality.
Network outputs are cast to `loss_dtype` (fp32, or fp64 for tests) before any of the math below.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from .jvp import CUDAGraphJVP, finite_difference_jvp, jvp, replay_rng, unwrap
from .precond import ClassifierFreeGuidance, TrigFlowModel
from .trigflow import add_noise, check_sigma_d, expand_time, sample_time

Stats = dict[str, torch.Tensor | int]  # detached scalars, so logging decides when to sync
Draws = dict[str, torch.Tensor]  # a loss's random inputs, one row per sample (see DiffusionLoss.draw)


class SCMTerms(NamedTuple):
    F: torch.Tensor                     # F_theta(x_t, t), with grad, in loss_dtype
    F_minus: torch.Tensor               # the same values without grad (same dropout masks)
    g: torch.Tensor                     # the normalised tangent target of Algorithm 1
    t: torch.Tensor                     # (B,) times used
    nonfinite_samples: int              # samples dropped for NaN/inf


def drop_nonfinite(
    x0: torch.Tensor, labels: torch.Tensor | None, draws: dict[str, torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, Draws, int]:
    """Remove samples with NaN/inf (and their rows of `draws`) before they reach the network.

    Masking their loss is not enough: a NaN input gives NaN activations, and 0 * NaN = NaN in the
    weight gradients. The count goes into the loss statistics; an all-bad batch is an error.
    """
    given = {k: v for k, v in (draws or {}).items() if v is not None}
    for key, value in given.items():
        if value.shape[0] != x0.shape[0]:
            raise ValueError(f"{key} has {value.shape[0]} rows for a batch of {x0.shape[0]}")
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape (B, C, *dims), got {tuple(x0.shape)}")
    if labels is not None and labels.shape != (x0.shape[0],):
        raise ValueError(f"labels must have shape ({x0.shape[0]},), got {tuple(labels.shape)}")
    keep = torch.isfinite(x0).flatten(1).all(1)
    dropped = int((~keep).sum())
    if dropped == x0.shape[0]:
        raise ValueError(f"every one of the {dropped} samples in the batch contains NaN or inf")
    if dropped:
        x0 = x0[keep]
        labels = labels[keep] if labels is not None else None
        given = {k: v[keep] for k, v in given.items()}
    return x0, labels, given, dropped


def per_sample_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 over all but the batch dim: (B, ...) -> (B,)."""
    return x.square().flatten(1).sum(1)


def weighted_loss(
    residual: torch.Tensor, w: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_B[(e^w / D) ||residual||^2 - w] (Eq. 8); w = 0 without an adaptive-weight head.

    Returns the loss and the unweighted per-sample mean square error (B,).
    """
    mse = per_sample_sq_norm(residual) / math.prod(residual.shape[1:])
    if w is None:
        return mse.mean(), mse
    w = w.to(mse.dtype)
    return (torch.exp(w) * mse - w).mean(), mse


def _time_and_noise(
    loss: DiffusionLoss | SCMLoss,
    x0: torch.Tensor,
    t: torch.Tensor | None,
    z: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """t from the time proposal (Algorithm 1) and z ~ N(0, sigma_d^2 I), unless given."""
    if t is None or z is None:
        drawn = _draw_time_and_noise(loss, x0.shape[0], tuple(x0.shape[1:]), generator, x0.device, x0.dtype)
        t = drawn["t"] if t is None else t
        z = drawn["z"] if z is None else z
    return t.to(x0.dtype), z.to(x0.dtype)


def _draw_time_and_noise(
    loss: DiffusionLoss | SCMLoss,
    batch: int,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Draws:
    kw = {"P_mean": loss.P_mean, "P_std": loss.P_std, "sigma_d": loss.sigma_d}
    t = sample_time(batch, **kw, generator=generator, device=device).to(dtype)
    z = torch.randn((batch, *shape), generator=generator, device=device, dtype=dtype) * loss.sigma_d
    return {"t": t, "z": z}


def check_same_sigma_d(sigma_d: float, **models: torch.nn.Module | None) -> None:
    """Refuse models whose sigma_d differs from the loss's: the same t is another noise level in their frame."""
    found = {name: getattr(unwrap(m), "sigma_d", None) for name, m in models.items() if m is not None}
    differ = {name: s for name, s in found.items() if s is not None and not math.isclose(s, sigma_d)}
    if differ:
        listed = ", ".join(f"{name} {s}" for name, s in differ.items())
        raise ValueError(f"sigma_d differs between the loss ({sigma_d}) and the {listed}")


def log_weight(model: torch.nn.Module, t: torch.Tensor) -> torch.Tensor | None:
    """w(t) from the model's adaptive-weight head (`TrigFlowPrecond.logvar`), or None without one."""
    head = getattr(unwrap(model), "logvar", None)
    return head(t) if head is not None else None


def drop_labels(
    labels: torch.Tensor | None,
    p: float,
    generator: torch.Generator | None,
    mask: torch.Tensor | None = None,  # (B,) bool: which labels to drop, if drawn already
) -> torch.Tensor | None:
    """Replace labels by -1 (no label) with probability p, so one network learns both CFG branches."""
    if labels is None or p <= 0:
        return labels
    if mask is None:
        mask = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(mask, torch.full_like(labels, -1), labels)


class DiffusionLoss:
    """The TrigFlow diffusion loss for teachers: ||sigma_d F - v_t||^2 with v_t = cos t z - sin t x0 (Eq. 4).

    Written in F units, (e^w / D) ||F - v_t / sigma_d||^2 - w, with EDM2's learned uncertainty
    weight w(t) when the model has a `logvar` head.
    """

    def __init__(
        self,
        sigma_d: float = 0.5,           # data standard deviation
        P_mean: float = -0.8,           # time proposal: log(sigma_d tan t) ~ N(P_mean, P_std^2)
        P_std: float = 1.6,             #   (the paper's ImageNet-64 teacher, T5)
        label_dropout: float = 0.0,     # probability of training a sample unconditionally (for CFG)
        loss_dtype: torch.dtype = torch.float32,  # fp32; fp64 for references
    ) -> None:
        self.sigma_d = check_sigma_d(sigma_d)
        self.P_mean, self.P_std = P_mean, P_std
        self.label_dropout = label_dropout
        self.loss_dtype = loss_dtype

    def draw(
        self,
        batch: int,
        shape: tuple[int, ...],         # one sample's shape (C, *dims)
        *,
        labelled: bool,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Draws:
        """The random inputs of `batch` samples (t, z, label_drop), as keywords for `__call__`.

        Rows belong to samples, so a slice of the draws fits a slice of the batch: the training loop
        draws once per global batch and gives each rank its rows, which makes a run independent of
        the number of ranks and of gradient accumulation.
        """
        draws = _draw_time_and_noise(self, batch, shape, generator, device, dtype)
        if labelled and self.label_dropout > 0:
            draws["label_drop"] = torch.rand(batch, generator=generator, device=device) < self.label_dropout
        return draws

    def __call__(
        self,
        model: TrigFlowModel,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,  # the time of each sample; None: drawn from the proposal
        z: torch.Tensor | None = None,  # the noise; None: drawn
        label_drop: torch.Tensor | None = None,  # which labels to drop; None: drawn
    ) -> tuple[torch.Tensor, Stats]:
        check_same_sigma_d(self.sigma_d, model=model)
        x0, labels, draws, dropped = drop_nonfinite(x0, labels, {"t": t, "z": z, "label_drop": label_drop})
        t, z = _time_and_noise(self, x0, draws.get("t"), draws.get("z"), generator)
        labels = drop_labels(labels, self.label_dropout, generator, draws.get("label_drop"))
        x_t = add_noise(x0, z, t)
        F = model(x_t, t, labels=labels).to(self.loss_dtype)
        tb = expand_time(t, x_t).to(self.loss_dtype)
        v_t = (torch.cos(tb) * z - torch.sin(tb) * x0).to(self.loss_dtype)
        loss, mse = weighted_loss(F - v_t / self.sigma_d, log_weight(model, t))
        return loss, {"loss": loss.detach(), "mse": mse.mean().detach(), "nonfinite_samples": dropped}


class SCMLoss:
    """The continuous-time consistency loss of Algorithm 1: sCT without a teacher, sCD with one.

        g = -cos^2 t (sigma_d F- - dxt_dt) - r cos t sin t (x_t + sigma_d dF-/dt)       (Eq. 6, warmup r)
        g <- g / (||g|| + c)   (or clip(g, -1, 1), Fig. 5a)
        L = (e^w / D) ||F - F- - g||^2 - w                                              (Eq. 8)

    dxt_dt is cos t z - sin t x0 in sCT and sigma_d F_teacher (with the teacher's CFG) in sCD. The JVP
    of F- is taken at (x_t, t) with the rearranged tangent (cos t sin t dxt_dt, cos t sin t) (§5.1), which
    yields cos t sin t dF-/dt directly and keeps intermediates bounded near t = 0 and t = pi/2. It runs
    under no_grad on the unwrapped student; the gradient forward then replays the same random state,
    so F and F- see the same dropout masks.

    `tangent_norm="rms"` divides by the root mean square ||g|| / sqrt(D) instead of the L2 norm: with
    c = 0.1 fixed, the L2 form makes the constant c negligible for large D while the RMS form keeps
    its meaning across resolutions (the choice SANA-Sprint makes). Both are available.
    """

    def __init__(
        self,
        sigma_d: float = 0.5,           # data standard deviation
        P_mean: float = -1.0,           # time proposal: log(sigma_d tan t) ~ N(P_mean, P_std^2)
        P_std: float = 1.4,             #   (CIFAR-10 values, T4)
        tangent_norm: Literal["rms", "l2", "clip", "none"] = "rms",  # how g is bounded
        tangent_c: float = 0.1,         # c in g / (||g|| + c)
        warmup_iters: int = 10_000,     # H: r = min(1, step / H) (App. G.2); 0 disables warmup
        guidance_range: tuple[float, float] | None = (1.0, 2.0),  # sCD: s ~ U[lo, hi] for labelled batches
        tangent_method: Literal["jvp", "func_jvp", "cuda_graph_jvp", "finite_difference"] = "jvp",  # scm_mm.jvp's
        #   dual tensors, its torch.func.jvp, or the dual JVP replayed from CUDA graphs (CUDAGraphJVP: a GPU,
        #   no dropout); finite differences are a debug switch
        fd_step: float = 1e-3,          # step of the central difference, in units of the rearranged tangent
        loss_dtype: torch.dtype = torch.float32,  # fp32; fp64 for references
    ) -> None:
        if tangent_norm not in ("rms", "l2", "clip", "none"):
            raise ValueError(f"tangent_norm must be 'rms', 'l2', 'clip' or 'none', got {tangent_norm!r}")
        if tangent_method not in ("jvp", "func_jvp", "cuda_graph_jvp", "finite_difference"):
            raise ValueError(
                "tangent_method must be 'jvp', 'func_jvp', 'cuda_graph_jvp' or 'finite_difference', "
                f"got {tangent_method!r}"
            )
        self.sigma_d = check_sigma_d(sigma_d)
        self.P_mean, self.P_std = P_mean, P_std
        self.tangent_norm, self.tangent_c = tangent_norm, tangent_c
        self.warmup_iters = warmup_iters
        self.guidance_range = guidance_range
        self.tangent_method = tangent_method
        self.graphed_jvp = CUDAGraphJVP() if tangent_method == "cuda_graph_jvp" else None
        self.fd_step = fd_step
        self.loss_dtype = loss_dtype

    def draw(
        self,
        batch: int,
        shape: tuple[int, ...],         # one sample's shape (C, *dims)
        *,
        labelled: bool,
        distil: bool,                   # sCD: also the guidance scale of each sample
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Draws:
        """The random inputs of `batch` samples (t, z, guidance) as keywords; see DiffusionLoss.draw."""
        draws = _draw_time_and_noise(self, batch, shape, generator, device, dtype)
        if distil and labelled and self.guidance_range is not None:
            lo, hi = self.guidance_range
            draws["guidance"] = lo + (hi - lo) * torch.rand(batch, generator=generator, device=device, dtype=dtype)
        return draws

    def warmup(self, step: int) -> float:
        """r = min(1, step / H), the tangent warmup of Algorithm 1."""
        return 1.0 if self.warmup_iters <= 0 else min(1.0, step / self.warmup_iters)

    def tangent(
        self,
        student: TrigFlowModel,
        x_t: torch.Tensor,
        t: torch.Tensor,
        dxt_dt: torch.Tensor,
        r: float,
        **cond: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F-, g) before normalisation. g equals cos(t) df-/dt along dxt_dt when r = 1.

        Calls the student under no_grad; the caller replays the random state for the grad forward.
        """
        cs = torch.cos(t) * torch.sin(t)                                      # (B,)
        dx = (expand_time(cs, x_t) * dxt_dt).to(x_t.dtype)  # a tangent has its primal's dtype
        F_minus, cs_dF_dt = self.student_jvp(student, (x_t, t), (dx, cs), cond)
        F_minus, cs_dF_dt = F_minus.to(self.loss_dtype), cs_dF_dt.to(self.loss_dtype)
        tb = expand_time(t, x_t).to(self.loss_dtype)
        x_t, dxt_dt = x_t.to(self.loss_dtype), dxt_dt.to(self.loss_dtype)
        g = -torch.cos(tb) ** 2 * (self.sigma_d * F_minus - dxt_dt) - r * (
            torch.cos(tb) * torch.sin(tb) * x_t + self.sigma_d * cs_dF_dt
        )
        return F_minus, g

    def student_jvp(
        self,
        student: TrigFlowModel,
        primals: tuple[torch.Tensor, torch.Tensor],  # (x, t)
        tangents: tuple[torch.Tensor, torch.Tensor],
        cond: dict[str, torch.Tensor | None],  # the student's keyword inputs (labels, guidance)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, its derivative along the tangents) of the unwrapped student, no_grad, by `tangent_method`."""
        model = unwrap(student)
        if self.graphed_jvp is not None:
            return self.graphed_jvp(model, primals, tangents, cond)

        def F_of(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return model(x, tt, **cond)

        if self.tangent_method in ("jvp", "func_jvp"):
            return jvp(F_of, primals, tangents, mode="dual" if self.tangent_method == "jvp" else "func")
        return finite_difference_jvp(F_of, primals, tangents, self.fd_step)

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Bound the tangent (§4.2): g / (||g|| + c), or clipping to [-1, 1]."""
        if self.tangent_norm == "clip":
            return g.clamp(-1, 1)
        if self.tangent_norm == "none":
            return g
        norm = per_sample_sq_norm(g).sqrt()
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(math.prod(g.shape[1:]))
        return g / (expand_time(norm, g) + self.tangent_c)

    def terms(
        self,
        student: TrigFlowModel,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        teacher: TrigFlowModel | None = None,  # None: sCT; a teacher: sCD
        step: int = 0,                  # training iteration, for the tangent warmup
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,  # the time of each sample; None: drawn from the proposal
        z: torch.Tensor | None = None,  # the noise; None: drawn
        guidance: torch.Tensor | None = None,  # sCD: the guidance scale of each sample (B,); None: drawn
    ) -> SCMTerms:
        """F (with grad), F- and the normalised g for one batch; `__call__` turns them into the loss."""
        check_same_sigma_d(self.sigma_d, student=student, teacher=teacher)
        x0, labels, draws, dropped = drop_nonfinite(x0, labels, {"t": t, "z": z, "guidance": guidance})
        guidance = draws.get("guidance")
        B, device = x0.shape[0], x0.device
        t, z = _time_and_noise(self, x0, draws.get("t"), draws.get("z"), generator)
        x_t = add_noise(x0, z, t)
        tb = expand_time(t, x0)

        if teacher is None:  # sCT: the tangent of the forward process itself
            dxt_dt = torch.cos(tb) * z - torch.sin(tb) * x0
        else:  # sCD: the teacher's PF-ODE, with CFG at a scale the student also sees (App. G.2)
            if guidance is None and labels is not None and self.guidance_range is not None:
                lo, hi = self.guidance_range
                guidance = lo + (hi - lo) * torch.rand(B, generator=generator, device=device, dtype=x0.dtype)
            with torch.no_grad():
                dxt_dt = ClassifierFreeGuidance(teacher).velocity(x_t, t, labels=labels, guidance=guidance)

        cond = {"labels": labels, "guidance": guidance}
        with replay_rng(device) as replay:
            F_minus, g = self.tangent(student, x_t, t, dxt_dt, self.warmup(step), **cond)
            replay()
            F = student(x_t, t, **cond).to(self.loss_dtype)
        return SCMTerms(F=F, F_minus=F_minus, g=self.normalize(g), t=t, nonfinite_samples=dropped)

    def __call__(
        self,
        student: TrigFlowModel,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Stats]:
        """The loss of Eq. 8 and detached statistics; keywords as in `terms`."""
        F, F_minus, g, t, dropped = self.terms(student, x0, labels, **kwargs)
        loss, mse = weighted_loss(F - F_minus - g, log_weight(student, t))
        stats: Stats = {
            "loss": loss.detach(),
            "mse": mse.mean().detach(),
            "g_rms": (per_sample_sq_norm(g).mean() / math.prod(g.shape[1:])).sqrt().detach(),
            "nonfinite_samples": dropped,
        }
        return loss, stats
