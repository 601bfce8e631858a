"""scm-mm: simplified continuous-time consistency models (sCM, Lu & Song 2024) for any modality.

The core is modality-agnostic: it sees tensors (B, C, *dims) and optional labels / guidance.
"""

from .analytic import ExactConsistencyModel, GaussianMixture, consistency_function, solve_pf_ode
from .losses import DiffusionLoss, SCMLoss
from .precond import (
    AdaptiveWeight,
    ClassifierFreeGuidance,
    ConvertedTeacher,
    TrigFlowModel,
    TrigFlowPrecond,
    ddpm_timestep,
)
from .samplers import (
    consistency_times,
    sample,
    sample_consistency,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    teacher_times,
)
from .trigflow import add_noise, sample_time, t_max

__all__ = [
    "AdaptiveWeight",
    "ClassifierFreeGuidance",
    "ConvertedTeacher",
    "DiffusionLoss",
    "ExactConsistencyModel",
    "GaussianMixture",
    "SCMLoss",
    "TrigFlowModel",
    "TrigFlowPrecond",
    "add_noise",
    "consistency_function",
    "consistency_times",
    "ddpm_timestep",
    "sample",
    "sample_consistency",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "sample_time",
    "solve_pf_ode",
    "t_max",
    "teacher_times",
]
