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

import functools
import itertools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple, cast

import torch
from torch import nn
from torch.autograd import forward_ad

from .nn.attention import current_backend

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
    _load_forward_ad_decompositions()
    with torch.no_grad():
        if mode == "func":
            result = torch.func.jvp(fn, tuple(primals), tuple(tangents))
            return result[0], result[1]
        with forward_ad.dual_level():
            dual = forward_ad.unpack_dual(fn(*map(forward_ad.make_dual, primals, tangents)))
            out, tangent = dual.primal, dual.tangent
    return out, torch.zeros_like(out) if tangent is None else tangent  # None: fn ignores its inputs


@functools.cache
def _load_forward_ad_decompositions() -> None:
    """Load what torch loads on the first dual tensor, without its warning.

    torch 2.14 registers its forward-AD decompositions through torch.jit.script and so warns, on the first
    JVP of every run, that torch.jit.script is deprecated: nothing a caller of scm-mm can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        getattr(forward_ad, "_maybe_load_decompositions", lambda: None)()


class CUDAGraphJVP:
    """`jvp` of model(x, t, **cond) along (tx, tt), replayed from CUDA graphs.

    On a GPU the dual-tensor JVP is bound by issuing its kernels, not by running them: one video DiT-S JVP
    at batch 16 spent 310 ms of host time on 49 ms of GPU work (docs/benchmarks.md 9b). A CUDA graph
    issues them all at once. One graph is captured per model and input layout (shapes, dtypes, which
    conditions are given, the autocast dtype, the attention backend); each call copies the inputs into the
    graph's buffers, replays it and returns copies of its outputs. Each graph keeps the memory of one JVP
    reserved, so only the `max_graphs` most recently used per model are kept: a batch shrunk by dropped
    non-finite samples is captured again rather than reserving another pool for the rest of the run.

    A graph reads the parameters at the addresses they had at capture. Optimizers and `load_state_dict`
    update them in place; a model whose parameters moved since (`.to()`, a reassigned tensor) is
    captured again. Refused: dropout in training mode (the gradient pass must see the JVP's masks, and a
    graph draws its own), FSDP's sharded parameters (gathered by collectives) and CPU tensors.
    """

    def __init__(
        self,
        max_graphs: int = 2,  # graphs kept per model, the most recently used; each reserves one JVP's memory
    ) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.max_graphs = max_graphs
        # Per model, its graphs by input layout (the key in `__call__`), least recently used first.
        self._graphs: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, _Captured]] = weakref.WeakKeyDictionary()

    def __call__(
        self,
        model: nn.Module,
        primals: tuple[torch.Tensor, torch.Tensor],  # (x, t)
        tangents: tuple[torch.Tensor, torch.Tensor],
        cond: Mapping[str, torch.Tensor | None],  # keyword inputs of the model; None ones are left out
    ) -> tuple[torch.Tensor, torch.Tensor]:
        names = tuple(sorted(k for k, v in cond.items() if v is not None))
        inputs = [*primals, *tangents, *(cast(torch.Tensor, cond[k]) for k in names)]
        _check_graphable(model, inputs)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (names, dtype, current_backend(), *((a.shape, a.dtype, a.device) for a in inputs))
        graphs = self._graphs.setdefault(model, OrderedDict())
        addresses = tuple(a.data_ptr() for a in itertools.chain(model.parameters(), model.buffers()))
        captured = graphs.pop(key, None)
        if captured is None or captured.addresses != addresses:
            captured = None  # a stale graph goes before the capture: its memory pool is released first
            while len(graphs) >= self.max_graphs:
                graphs.popitem(last=False)  # the least recently used graph, and with it its pool
            captured = _capture(model, names, inputs, dtype, addresses)
        graphs[key] = captured  # now the most recently used
        for buffer, value in zip(captured.inputs, inputs, strict=True):
            buffer.copy_(value)
        captured.graph.replay()
        return captured.out.clone(), captured.tangent.clone()


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the buffers the graph reads: x, t, tx, tt, then the conditions
    out: torch.Tensor  # the buffers it writes
    tangent: torch.Tensor
    addresses: tuple[int, ...]  # of the parameters and buffers at capture


def _check_graphable(model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    if model.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        raise ValueError(
            "a CUDA-graphed JVP cannot replay dropout masks for the gradient pass: set dropout to 0 or use "
            "tangent_method='jvp'"
        )
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise ValueError("a CUDA-graphed JVP cannot run FSDP's sharded parameters: use tangent_method='jvp'")
    if not all(a.is_cuda for a in inputs):
        devices = sorted({str(a.device) for a in inputs})
        raise ValueError(f"a CUDA-graphed JVP needs CUDA tensors, got {devices}: use tangent_method='jvp'")


def _capture(
    model: nn.Module,
    names: tuple[str, ...],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype | None,  # autocast's, None: off
    addresses: tuple[int, ...],
) -> _Captured:
    static = [a.clone() for a in inputs]
    x, t, tx, tt, *rest = static
    cond = dict(zip(names, rest, strict=True))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        # Autocast's weight cache stays off in a capture (torch.cuda.graphs): cached casts would outlive it.
        with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None, cache_enabled=False):
            return jvp(lambda a, b: model(a, b, **cond), (x, t), (tx, tt))

    side = torch.cuda.Stream(x.device)  # warm-up (cuBLAS workspaces, Triton compilation) off the capture
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, tangent = run()
    return _Captured(graph, static, out, tangent, addresses)


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
