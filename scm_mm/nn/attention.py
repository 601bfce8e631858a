"""Attention with a forward-mode derivative, and one dispatcher for all backbones.

sCM needs the JVP dF/dt of the whole network (Eq. 6), taken with `torch.func.jvp` over the model.
PyTorch's fused SDPA kernels, xformers and flash-attn have no forward-mode AD, so `attention` routes
calls that carry a tangent to an op with a hand-written JVP (App. F of the paper): on CUDA the fused
Triton kernel of `triton_attention` (output and tangent in one pass), elsewhere or for masks it does
not fuse `JVPAttention`, a blockwise (flash-style) op in PyTorch; everything else goes to the fast
kernels.

Layout everywhere is (B, H, N, D) as in `F.scaled_dot_product_attention`; `mask` is boolean,
broadcastable to (B, H, Nq, Nk), True = attend. A query row with no visible key gives 0 (and a
zero tangent) in the "jvp" and "math" backends; what SDPA gives there depends on its kernel.
"""

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

BACKENDS = ("auto", "sdpa", "xformers", "triton", "jvp", "math")
_backend: contextvars.ContextVar[str] = contextvars.ContextVar("attention_backend", default="auto")


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """softmax(scale q k^T) v in plain PyTorch ops: slow, O(Nq Nk) memory, the source of truth.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv).
    """
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        return s.softmax(-1) @ v
    # A row with every key masked is all -inf and softmaxes to NaN; zero it to match JVPAttention.
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).masked_fill(~mask, 0.0)
    return p @ v


class JVPAttention(torch.autograd.Function):
    """Blockwise attention with a forward-mode rule (App. F) and the flash-attention backward.

    `apply(q, k, v, mask, scale, block_size, keep)` returns (O, L, P, O_acc): O (B, H, Nq, Dv) in the
    input dtype, the row log-sum-exp L (B, H, Nq, 1) and, when `keep` (no autograd graph will hold
    them), the probabilities P (B, H, Nq, Nk) if the keys fit in one block and O in the accumulator
    dtype if that is not the input's, for `jvp` to reuse (else empty tensors); L, P and O_acc are
    non-differentiable. Keys and values are visited `block_size` at a time with an online softmax, so
    the extra memory is (B, H, Nq, block_size) rather than (B, H, Nq, Nk). Accumulators are fp32 for
    fp16/bf16 inputs. k, v may have 1 for q's B or H (broadcast). Use `jvp_attention` for the output alone.
    """

    @staticmethod
    def forward(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, block_size: int, keep: bool
    ) -> tuple[Tensor, ...]:
        acc = _acc_dtype(q)
        qs = q.to(acc) * scale  # scaling q (N, D) once is cheaper than each (N, block) of S
        if k.shape[-2] <= block_size:  # one block: a plain softmax, no running statistics
            s = _scores(qs, k, mask, 0, block_size)
            # Rows that see no key: L = +inf, so P = exp(-inf) = 0 and O = 0 (as below).
            lse = torch.logsumexp(s, -1, keepdim=True)
            lse = lse.masked_fill(lse == float("-inf"), float("inf"))
            p = s.sub_(lse).exp_()
            out_acc = p @ v.to(acc)
            return _outputs(q, out_acc, lse, p if keep else p.new_empty(0), keep)
        m = q.new_full((*q.shape[:-1], 1), float("-inf"), dtype=acc)  # running row max
        l = q.new_zeros(m.shape, dtype=acc)  # running sum of exp(S - m)
        o = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc)  # running sum of exp(S - m) V
        for j in range(0, k.shape[-2], block_size):
            s = _scores(qs, k, mask, j, block_size)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # While a row has seen only masked keys, m_new = -inf; shift by 0 to avoid inf - inf.
            shift = m_new.masked_fill(m_new == float("-inf"), 0.0)
            p = torch.exp(s - shift)
            rescale = torch.exp(m - shift)
            l = rescale * l + p.sum(-1, keepdim=True)
            o = rescale * o + p @ v[..., j : j + block_size, :].to(acc)
            m = m_new
        # l >= 1 on rows with a visible key (the max term is exp(0)); l = 0 rows get O = 0 and
        # L = +inf, so that exp(S - L) = 0 when P is recomputed in `jvp` and `backward`.
        seen = l > 0
        out_acc = o / torch.where(seen, l, 1.0)
        lse = torch.where(seen, m + torch.log(l), float("inf"))
        return _outputs(q, out_acc, lse, o.new_empty(0), keep)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        q, k, v, mask, scale, block_size, _ = inputs
        out, lse, probs, out_acc = output
        ctx.mark_non_differentiable(lse, probs, out_acc)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.save_for_forward(q, k, v, out, lse, mask, probs, out_acc)
        ctx.scale, ctx.block_size = scale, block_size

    @staticmethod
    def jvp(
        ctx: Any, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, *_: None
    ) -> tuple[Tensor, None, None, None]:
        # App. F: with P = softmax(S), tS = scale (tq k^T + q tk^T) and mu = rowsum(P * tS),
        #   tO = (P * tS) V - mu O + P tV.
        # The paper fuses this into the forward pass; an autograd.Function runs `jvp` after
        # `forward`, so P is the forward's when it kept it (one key block, no autograd graph)
        # and is otherwise recomputed per key block from the saved L, as in `backward`.
        # A part of tS constant along a row cancels between the first two terms (softmax is shift
        # invariant), so O must not be rounded to fp16/bf16 there: that would leave 2^-9 |mu O| of
        # error instead of 2^-9 |tO| (review finding 2). O in fp32 is the forward's when it kept it,
        # else summed again here.
        q, k, v, out, lse, mask, probs, out_acc = ctx.saved_tensors
        acc, bs = _acc_dtype(q), ctx.block_size
        o, o_sum = out if out.dtype == acc else out_acc, None
        if not o.numel():  # not kept: sum_j P_ij V_j again
            o = o_sum = torch.zeros_like(out, dtype=acc)
        qs = q.to(acc) * ctx.scale
        # tS = [tq, q] scale @ [k, tk]^T: both terms in one matmul over the concatenated head dims.
        tqs = None if tq is None else tq.to(acc) * ctx.scale
        right: Tensor | None
        if tqs is not None and tk is not None:
            left, right = torch.cat([tqs, qs], -1), torch.cat([k, tk], -1)
        elif tqs is not None:
            left, right = tqs, k
        else:
            left, right = qs, tk  # right is None when neither q nor k carries a tangent
        a = torch.zeros_like(out, dtype=acc)  # sum_j P_ij (tS_ij V_j + tV_j)
        mu = torch.zeros_like(lse)  # sum_j P_ij tS_ij
        for j in range(0, k.shape[-2], bs):
            p = probs if probs.numel() else torch.exp(_scores(qs, k, mask, j, bs) - lse)  # masked: exp(-inf) = 0
            v_j = v[..., j : j + bs, :].to(acc)
            if right is not None:
                pts = (left @ right[..., j : j + bs, :].to(acc).transpose(-1, -2)).mul_(p)
                a += pts @ v_j
                mu += pts.sum(-1, keepdim=True)
            if tv is not None:
                a += p @ tv[..., j : j + bs, :].to(acc)
            if o_sum is not None:
                o_sum += p @ v_j
        return (a - mu * o).to(q.dtype), None, None, None

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, *_: Tensor | None) -> tuple:
        # Flash-attention backward: dS = P * (dP - Delta) with Delta = rowsum(dO * O), which
        # equals rowsum(P * dP), so no (Nq, Nk) matrix is ever held.
        q, k, v, out, lse, mask = ctx.saved_tensors
        acc, bs = _acc_dtype(q), ctx.block_size
        qs, do = q.to(acc) * ctx.scale, d_out.to(acc)
        delta = (do * out.to(acc)).sum(-1, keepdim=True)
        dq = torch.zeros_like(qs)  # scale dS K, with the scale applied once at the end
        dk_blocks, dv_blocks = [], []
        with torch.autocast(q.device.type, enabled=False):  # as in `jvp_attention`
            for j in range(0, k.shape[-2], bs):
                p = torch.exp(_scores(qs, k, mask, j, bs) - lse)
                dv_blocks.append(p.transpose(-1, -2) @ do)
                ds = p * (do @ v[..., j : j + bs, :].to(acc).transpose(-1, -2) - delta)
                dq = dq + ds @ k[..., j : j + bs, :].to(acc)
                dk_blocks.append(ds.transpose(-1, -2) @ qs)
        dk, dv = torch.cat(dk_blocks, -2).to(k.dtype), torch.cat(dv_blocks, -2).to(v.dtype)
        return (dq * ctx.scale).to(q.dtype), dk, dv, None, None, None, None


def _outputs(q: Tensor, out_acc: Tensor, lse: Tensor, probs: Tensor, keep: bool) -> tuple[Tensor, ...]:
    """`JVPAttention.forward`'s (O, L, P, O_acc): O_acc (O before rounding to q's dtype) is kept only for
    a `jvp` in the same call (`keep`) and when it differs from O."""
    out = out_acc.to(q.dtype)
    return out, lse, probs, out_acc if keep and out is not out_acc else out_acc.new_empty(0)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """fp32 accumulators for half inputs, as flash attention keeps; otherwise the input dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _scores(qs: Tensor, k: Tensor, mask: Tensor | None, j: int, block_size: int) -> Tensor:
    """Scores S[..., j : j + block_size] = (scale q) k^T of one key block, masked to -inf."""
    s = qs @ k[..., j : j + block_size, :].to(qs.dtype).transpose(-1, -2)
    if mask is None:
        return s
    return s.masked_fill(~mask[..., j : j + block_size], float("-inf"))


def jvp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 512,
) -> Tensor:
    """The output of `JVPAttention`.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv); `block_size` keys
    per step bounds the extra memory at (B, H, Nq, block_size). Without autograd, a single key block
    hands its P from the forward to the tangent (alive only inside the call) instead of recomputing it.
    """
    if mask is not None:
        # Expand (a view) so that slicing a key block also works for a broadcast key dimension.
        mask = mask.expand(*q.shape[:-1], k.shape[-2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Autocast would run the fp32 accumulations in half precision; `jvp` runs inside `apply` too.
    with torch.autocast(q.device.type, enabled=False):
        return JVPAttention.apply(q, k, v, mask, scale, block_size, not torch.is_grad_enabled())[0]


def tangent_is_live(*tensors: Tensor) -> bool:
    """True if any tensor carries a forward-mode tangent, from `torch.func.jvp` or `forward_ad`."""
    return any(forward_ad.unpack_dual(x).tangent is not None for x in tensors)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Force the backend of `attention` inside the block: one of `BACKENDS`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def current_backend() -> str:
    """The backend `attention` takes here: "auto", or the one `attention_backend` forces."""
    return _backend.get()


@functools.cache
def _xformers_ops() -> ModuleType | None:
    """xformers.ops if installed and importable; imported on first use only (an optional dependency).
    A build that does not load against this torch is reported once and treated as absent."""
    try:
        import xformers.ops
    except ImportError:
        return None
    except Exception as error:  # e.g. its compiled extension built for another torch
        warnings.warn(f"xformers is installed but does not import ({error!r}); using SDPA", RuntimeWarning,
                      stacklevel=2)  # fmt: skip
        return None
    return xformers.ops


_xformers_failure: dict[tuple, str] = {}  # why xformers' kernel failed to run, per `_xformers_config`


def _xformers_config(q: Tensor) -> tuple:
    """What a failure of xformers' kernel depends on: the device, the dtype it runs in, the head dim."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    return q.device, dtype, q.shape[-1]


@functools.cache
def _triton_attention() -> ModuleType | None:
    """scm_mm.nn.triton_attention if Triton is installed (it comes with torch on Linux)."""
    try:
        from scm_mm.nn import triton_attention
    except ImportError:
        return None
    return triton_attention


_triton_failure: dict[tuple, str] = {}  # why the kernel failed to compile or launch, per `_kernel_config`


def _kernel_config(q: Tensor, mask: Tensor | None) -> tuple:
    """What a compile or launch failure of the kernel in "auto" depends on: the device, the dtype and
    head dim (its block sizes, hence its shared memory) and whether it reads a key mask. Shapes that
    would not launch (its grid) are refused up front (`triton_unsupported`)."""
    return q.device, q.dtype, q.shape[-1], mask is not None


def _triton_fits(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> bool:
    """Whether "auto" takes the fused Triton kernel for a call with a live tangent."""
    ops = _triton_attention()
    if ops is None or not q.is_cuda or _kernel_config(q, mask) in _triton_failure:
        return False
    primals = (forward_ad.unpack_dual(x).primal for x in (q, k, v))
    return ops.triton_unsupported(*primals, mask, tangent=True) is None


def _fused_or_blockwise(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool = False
) -> Tensor:
    """The Triton kernel for "auto". Its first failure to compile or launch for a `_kernel_config` (a GPU
    or Triton version it was never built for, too little shared memory for its blocks) is reported once
    and leaves that configuration on `JVPAttention` for the process; the others keep the kernel."""
    try:
        return _triton_attention().triton_attention(q, k, v, mask, scale, causal)  # type: ignore[union-attr]
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        _triton_failure[_kernel_config(q, mask)] = repr(error)
        config = f"{q.dtype}, head dim {q.shape[-1]}" + (", key mask" if mask is not None else "")
        warnings.warn(f"the fused Triton JVP attention failed ({error!r}); using the blockwise JVP op for "
                      f"{config} from now on", RuntimeWarning, stacklevel=3)  # fmt: skip
        return jvp_attention(q, k, v, _with_causal(mask, q, k) if causal else mask, scale)


def _with_causal(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
    """`mask` and the causal mask (query i sees keys j <= i: the top-left alignment of SDPA's is_causal and
    of the Triton kernel) as one bool mask, for the ops that take no `causal` (a dense (Nq, Nk) mask)."""
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return causal if mask is None else mask & causal


def auto_backends(device: str | torch.device) -> tuple[str, str]:
    """The backends "auto" picks on `device` for an unmasked call: (without a tangent, with one); on CUDA
    "triton" holds for the shapes the kernel takes (`triton_unsupported`), "jvp" for the others (and
    "jvp" is reported once the kernel has failed for any configuration, "sdpa" once xformers has)."""
    cuda = torch.device(device).type == "cuda"
    forward = "xformers" if cuda and _xformers_ops() is not None and not _xformers_failure else "sdpa"
    tangent = "triton" if cuda and _triton_attention() is not None and not _triton_failure else "jvp"
    return forward, tangent


def _autocast_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v as autocast hands them to SDPA: fp32/fp16/bf16 in the autocast dtype, fp64 as is
    (autocast casts no fp64), all unchanged with autocast off. A tangent is cast with its primal, so F
    (SDPA, no tangent) and F- (a JVP op) attend in one precision; the ops still accumulate in fp32."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    q, k, v = (x if x.dtype == torch.float64 else x.to(dtype) for x in (q, k, v))
    return q, k, v


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    xops = _xformers_ops()
    if xops is None:
        raise RuntimeError("attention backend 'xformers' requested but xformers is not installed")
    # xformers takes one dtype and is not autocast-aware (SDPA is): cast as autocast would.
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = functools.reduce(torch.promote_types, (q.dtype, k.dtype, v.dtype))
    # xformers uses (B, N, H, D) and wants broadcast heads (one K/V head) expanded.
    k, v = (x.expand(*q.shape[:2], *x.shape[2:]) for x in (k, v))
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    return xops.memory_efficient_attention(q, k, v, scale=scale).transpose(1, 2)


def _xformers_or_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """xformers for "auto". Its first failure to run for an `_xformers_config` (no kernel for this GPU,
    dtype or head dim) is reported once and leaves that configuration on SDPA for the process."""
    try:
        return _xformers_attention(q, k, v, scale)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        config = _xformers_config(q)
        _xformers_failure[config] = repr(error)
        _, dtype, head_dim = config
        warnings.warn(f"xformers attention failed ({error!r}); using SDPA for {dtype}, head dim {head_dim} from now "
                      "on", RuntimeWarning, stacklevel=3)  # fmt: skip
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None, causal: bool = False
) -> Tensor:
    """Attention that `torch.func.jvp` can go through: the one entry point for all backbones.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv); mask: bool,
    broadcastable to (B, H, Nq, Nk), True = attend (an additive float mask is refused, TypeError);
    scale defaults to D**-0.5; k, v have q's B and H, or 1 there (broadcast). causal: query i sees keys
    j <= i besides the mask (top-left, as SDPA's is_causal); the Triton kernel and SDPA take it as such,
    the blockwise op and the math backend as a dense (Nq, Nk) mask.
    Backend "auto" (see `attention_backend`): when a tangent is live, the fused Triton kernel on
    CUDA where it fits (`triton_unsupported`) and `JVPAttention` otherwise; else xformers on CUDA
    when installed and there is no mask; else `F.scaled_dot_product_attention`. Under autocast
    every backend attends in the autocast dtype (fp64 excepted), so F and F- have one precision.
    """
    if mask is not None and mask.dtype != torch.bool:
        # SDPA would read a float mask as additive, the JVP ops cannot: F and F- must see one mask.
        raise TypeError(f"attention's mask must be bool (True = attend), got {mask.dtype}")
    backend, live = _backend.get(), tangent_is_live(q, k, v)
    if live or backend in ("jvp", "triton"):
        # The JVP ops compute in q's dtype with autocast off: give them what SDPA sees (review finding 5).
        q, k, v = _autocast_inputs(q, k, v)
    if backend == "auto" and live and _triton_fits(q, k, v, mask):
        return _fused_or_blockwise(q, k, v, mask, scale, causal)
    if backend == "auto":
        plain = mask is None and not causal
        if live:
            backend = "jvp"
        elif q.is_cuda and plain and _xformers_config(q) not in _xformers_failure and _xformers_ops():
            return _xformers_or_sdpa(q, k, v, scale)
        else:
            backend = "sdpa"
    if live and backend in ("sdpa", "xformers"):
        raise RuntimeError(
            f"attention backend {backend!r} cannot take a forward-mode tangent: its fused kernels "
            "have no forward-mode AD (pytorch #128971). Use attention_backend('auto') or 'jvp'."
        )
    if backend == "triton":
        ops = _triton_attention()
        if ops is None:
            raise RuntimeError("attention backend 'triton' requested but triton is not installed")
        return ops.triton_attention(q, k, v, mask, scale, causal)
    if backend == "xformers":
        if mask is not None or causal:
            raise ValueError("attention backend 'xformers' is used here without a mask (or causal) only")
        return _xformers_attention(q, k, v, scale)
    if backend == "sdpa" and mask is None:  # SDPA takes is_causal or a mask, not both
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)
    mask = _with_causal(mask, q, k) if causal else mask
    if backend == "jvp":
        return jvp_attention(q, k, v, mask, scale)
    if backend == "math":
        return naive_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
