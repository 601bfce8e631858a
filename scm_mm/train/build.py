"""Models from JSON specs and checkpoints: build, load for sampling, and start a student from its teacher.

A model spec is `{"net": {"_target_": ..., **kwargs}, "precond": {"sigma_d": ..., "time_scale": ...,
"logvar_channels": ...}}`; every checkpoint stores it in meta.json as "model".
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..modality import state_differences, without_location
from ..precond import TrigFlowPrecond
from .checkpoint import (
    build_from_spec,
    canonical_spec,
    ema_names,
    load_into,
    load_weights,
    read_meta,
    resolve_checkpoint,
)

# Net settings a student may change relative to its teacher: the CFG-scale input of sCD (App. G.2)
# and the dropout rate (App. G: sCT uses more dropout than the teacher).
STUDENT_MAY_DIFFER = ("guidance_embed", "dropout")
# The preconditioning a teacher and its student must share, with TrigFlowPrecond's defaults.
PRECOND_DEFAULTS = {
    name: inspect.signature(TrigFlowPrecond).parameters[name].default
    for name in ("sigma_d", "time_scale", "logvar_channels")
}


def build_model(spec: Mapping[str, Any]) -> TrigFlowPrecond:
    return TrigFlowPrecond(build_from_spec(spec["net"]), **spec.get("precond", {}))


def default_weights(checkpoint: str | Path) -> str:
    """The first EMA average (the one training previews use), or the raw weights without EMA."""
    names = ema_names(checkpoint)
    return names[0] if names else "model"


def load_model(checkpoint: str | Path, which: str | None = None) -> tuple[TrigFlowPrecond, dict[str, Any]]:
    """(model in eval mode, meta) from a run or checkpoint directory; `which`: "model" or an EMA name."""
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    if "model" not in meta:
        raise ValueError(f"{ckpt}/meta.json has no 'model' spec; was it written by scm-mm's trainer?")
    model = build_model(meta["model"])
    which = which or default_weights(ckpt)
    load_into(model, load_weights(ckpt, which), f"weights {which!r} of {ckpt}")
    return model.eval().requires_grad_(False), meta


def teacher_mismatch(student_spec: Mapping[str, Any], teacher_spec: Mapping[str, Any]) -> list[str]:
    """Differences in architecture or parameterization that forbid starting the student from the teacher.

    Nets are compared as what they build (`canonical_spec`), so a preset's name and its written-out
    keywords agree; a preconditioning field left out means its default.
    """

    def net(spec: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in canonical_spec(spec["net"]).items() if k not in STUDENT_MAY_DIFFER}

    def precond(spec: Mapping[str, Any]) -> dict[str, Any]:
        return {k: spec.get("precond", {}).get(k, default) for k, default in PRECOND_DEFAULTS.items()}

    lines = [f"  net.{line.strip()}" for line in state_differences(net(student_spec), net(teacher_spec))]
    lines += [f"  precond.{line.strip()}" for line in state_differences(precond(student_spec), precond(teacher_spec))]
    return lines


def load_teacher(
    checkpoint: str | Path,
    student_spec: Mapping[str, Any],
    codec_state: Mapping[str, Any] | None = None,  # the student's codec; must match the teacher's
    distilling: bool = True,            # an sCD teacher, which must be a diffusion model; False: sCT's start
) -> tuple[TrigFlowPrecond, TrigFlowPrecond]:
    """(teacher, student initialised from the teacher's EMA weights), as the paper does (App. G.2).

    Refuses a teacher whose architecture, parameterization (sigma_d, time scale) or codec differs,
    with every differing field in the message; where the codec's files lie (its VAE's path) may differ.
    An sCD teacher trained as a consistency model (sCT, sCD) is refused: its F is no PF-ODE velocity.
    A student-only guidance embedding starts at zero, so the student initially computes exactly the
    teacher's F.
    """
    ckpt = resolve_checkpoint(checkpoint)
    teacher, meta = load_model(ckpt)
    if distilling and meta.get("method", "diffusion") != "diffusion":
        raise ValueError(f"the teacher at {ckpt} was trained with method {meta['method']!r}: sCD distills a diffusion "
                         "model's probability-flow ODE (method=diffusion); to start from a consistency model, use "
                         "method.init_from")  # fmt: skip
    lines = teacher_mismatch(student_spec, meta["model"])
    if codec_state is not None and "codec" in meta:  # the same VAE at another path is the same codec
        codec_lines = state_differences(without_location(codec_state), without_location(meta["codec"]))
        lines += [f"  codec.{line.strip()}" for line in codec_lines]
    if lines:
        raise ValueError(
            f"the teacher at {ckpt} does not match the student (student != teacher):\n" + "\n".join(lines)
        )
    student = build_model(student_spec)
    load_into(student, teacher.state_dict(), f"teacher weights from {ckpt}", allow_missing=("guidance",))
    return teacher, student
