"""Tangents of a network: forward-mode AD, or central finite differences.

The sCM tangent needs dF/dt along a direction (dx_t/dt, 1). It is a stop-gradient target (Algorithm 1),
so it is computed under no_grad, and on the unwrapped module: torch.func.jvp does not go through
DDP's or FSDP's hooks (pytorch #102197, #182641).

Forward-mode AD runs the same rules (aten's, and the `jvp` of scm_mm's Functions) in either of two
front ends: dual tensors of `torch.autograd.forward_ad` ("dual", the default) or `torch.func.jvp`
("func"), whose functorch layer also wraps and unwraps every op. Where the JVP is bound by dispatch
rather than arithmetic (on a GPU at training sizes one video DiT-S JVP issued 49 ms of GPU work in
310 ms of host time), that layer is what "dual" saves: 1.43x on the CPU at a dispatch-bound size
(docs/benchmarks.md 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, cast

import torch
from torch import nn
from torch.autograd import forward_ad

Tensors = Sequence[torch.Tensor]


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers, whose forward has no hooks."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = cast(nn.Module, module.module)
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = cast(nn.Module, module._orig_mod)
        else:
            return module


def jvp(
    fn: Callable[..., torch.Tensor],
    primals: Tensors,
    tangents: Tensors,
    mode: Literal["dual", "func"] = "dual",  # forward_ad dual tensors, or torch.func.jvp (see the module doc)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), d/de fn(primals + e tangents) at e = 0) by forward-mode AD, without autograd graph.

    fn returns one tensor; tensors it closes over (the module's parameters) are constants.
    """
    if mode not in ("dual", "func"):
        raise ValueError(f"mode must be 'dual' or 'func', got {mode!r}")
    with torch.no_grad():
        if mode == "func":
            result = torch.func.jvp(fn, tuple(primals), tuple(tangents))
            return result[0], result[1]
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(fn(*map(forward_ad.make_dual, primals, tangents)))
            out, tangent = dual.primal, dual.tangent
    return out, torch.zeros_like(out) if tangent is None else tangent  # None: fn ignores its inputs


def finite_difference_jvp(
    fn: Callable[..., torch.Tensor],
    primals: Tensors,
    tangents: Tensors,
    step: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same pair from central differences: a debugging switch, and for ops without a JVP rule.

    All three calls replay the same random state, so dropout masks agree (as FastGen does).
    Truncation error is O(step^2); round-off grows like eps_machine / step.
    """
    device = primals[0].device
    with torch.no_grad(), replay_rng(device) as replay:
        out = fn(*primals)
        replay()
        plus = fn(*(p + step * v for p, v in zip(primals, tangents)))
        replay()
        minus = fn(*(p - step * v for p, v in zip(primals, tangents)))
    return out, (plus - minus) / (2 * step)


@contextmanager
def replay_rng(device: torch.device | str) -> Iterator[Callable[[], None]]:
    """Yield a function that resets the CPU (and the device's) random state to its value on entry.

    Used so that F_theta- (inside the JVP) and F_theta (with grad) see the same dropout masks.
    On exit the random state is left where the last consumer left it.
    """
    device = torch.device(device)
    cpu_state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.random.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    yield replay
