"""Attention and its tangent in one Triton pass over the key blocks (App. F of the paper).

Flash attention keeps, per query row, the running max m, the running sum l of exp(S - m) and the
running sum of exp(S - m) V. The tangent of O = softmax(S) V along (tQ, tK, tV), with P = softmax(S),
tS = scale (tQ K^T + Q tK^T) and mu = rowsum(P * tS), is

    tO = (P * tS) V - mu O + P tV,

and every term is again a P-weighted row sum, so two more accumulators (sum exp(S - m) tS V + exp(S - m)
tV, and sum exp(S - m) tS) ride along with the same rescaling when m grows. Nothing of size (Nq, Nk) is
stored; the extra memory is O(N D).

`triton_attention` is what the dispatcher calls: it unpacks the forward-mode duals of q, k, v itself
(`torch.func.jvp` and `forward_ad` both use them), runs the fused kernel once, and returns a dual
(O, tO), so the output is not computed twice as an `autograd.Function.jvp` rule would. The primal keeps
a backward (recomputed through `F.scaled_dot_product_attention`), so a with-grad forward can use the op
too; the tangent output is not differentiable, which is all sCM needs (the tangent is taken under
no-grad, Algorithm 1), so with a tangent it runs under `torch.no_grad()` only (`triton_unsupported`).

Inputs are fp16, bf16 (fp32 accumulators, the P operands of the second matmuls rounded to the input
dtype as in flash attention; P tS after centring tS on its row mean, so that the part of tS that cancels
against mu O is never rounded), fp32 (IEEE matmuls, no TF32) or fp64 (interpreter only); head dims up to
256 (padded to a power of two); an optional key padding mask; non-causal or causal (query i sees keys
j <= i, the top-left alignment of SDPA's `is_causal`). On a machine without CUDA the kernel runs in
Triton's interpreter when `TRITON_INTERPRET=1` is set before this module is imported; that is how the
CPU tests check it.
"""

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd import forward_ad

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
MAX_GRID = (2**31 - 1, 65535)  # CUDA's gridDim.x and gridDim.y


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _load_tile(base, rows, cols, stride_row, stride_col, n_rows, n_cols):
    """A (len(rows), len(cols)) tile; rows >= n_rows or cols >= n_cols read as 0. Offsets in int64: a view
    (v in a fused qkv) spans several times its element count."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col
    return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


# fmt: off
@triton.jit
def _attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, KEY_MASK,  # inputs; tangents and mask are ignored when flagged off
    O, TO, LSE,  # outputs, contiguous: (B, H, Nq, D), (B, H, Nq, D), (B, H, Nq)
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    stq_b, stq_h, stq_n, stq_d,
    stk_b, stk_h, stk_n, stk_d,
    stv_b, stv_h, stv_n, stv_d,
    smask_b, smask_n,
    n_heads, n_q, n_k,
    SCALES,  # (scale, scale log2(e), ln 2) in ACC_DTYPE: Triton passes float arguments as fp32
    HEAD_DIM: tl.constexpr,  # D
    D_PAD: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    HAS_TANGENT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # matmul operand dtype: the input's, or fp32 for bf16 in the interpreter
    ACC_DTYPE: tl.constexpr,  # fp32, or fp64 for fp64 inputs
    PRECISION: tl.constexpr,  # "ieee" for fp32/fp64 inputs, so fp32 means fp32 (no TF32)
):
    # fmt: on
    pid_bh, pid_m = tl.program_id(0).to(tl.int64), tl.program_id(1)  # see `_grid`; int64 offsets below
    b, h = pid_bh // n_heads, pid_bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    q = _load_tile(Q + b * sq_b + h * sq_h, rows, dims, sq_n, sq_d, n_q, HEAD_DIM)
    in_dtype = q.dtype
    q = q.to(DOT_DTYPE)
    # Scores in base 2 (exp2 is the native instruction); lse is converted back at the end.
    scale, log2_scale, ln2 = tl.load(SCALES), tl.load(SCALES + 1), tl.load(SCALES + 2)

    m = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)  # running row max of S, base-2 units
    l = tl.zeros([BLOCK_M], ACC_DTYPE)  # running sum of exp2(S - m)
    acc = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)  # running sum of exp2(S - m) V
    if HAS_TANGENT:
        tq = _load_tile(TQ + b * stq_b + h * stq_h, rows, dims, stq_n, stq_d, n_q, HEAD_DIM)
        tq = tq.to(DOT_DTYPE)
        mu = tl.zeros([BLOCK_M], ACC_DTYPE)  # running sum of exp2(S - m) tS
        acc_t = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)  # ... of exp2(S - m) (tS V + tV)

    end = n_k
    if CAUSAL:  # key blocks right of this query block's last row are all hidden
        end = tl.minimum(n_k, (pid_m + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * sk_b + h * sk_h, cols, dims, sk_n, sk_d, n_k, HEAD_DIM).to(DOT_DTYPE)
        v = _load_tile(V + b * sv_b + h * sv_h, cols, dims, sv_n, sv_d, n_k, HEAD_DIM).to(DOT_DTYPE)
        kt = tl.trans(k)
        s = tl.dot(q, kt, out_dtype=ACC_DTYPE, input_precision=PRECISION) * log2_scale
        visible = cols[None, :] < n_k
        if HAS_MASK:
            key_ok = tl.load(KEY_MASK + b * smask_b + cols * smask_n, mask=cols < n_k, other=0)
            visible = visible & (key_ok[None, :] != 0)
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1))
        # A row that has seen only hidden keys has m_new = -inf; shift by 0 to avoid inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(m - shift)
        p_sum = tl.sum(p, 1)
        l = l * rescale + p_sum
        p_dot = p.to(in_dtype).to(DOT_DTYPE)  # flash attention's rounding of P for the matmul
        pv = tl.dot(p_dot, v, out_dtype=ACC_DTYPE, input_precision=PRECISION)
        acc = acc * rescale[:, None] + pv
        if HAS_TANGENT:
            tk = _load_tile(TK + b * stk_b + h * stk_h, cols, dims, stk_n, stk_d, n_k, HEAD_DIM)
            tv = _load_tile(TV + b * stv_b + h * stv_h, cols, dims, stv_n, stv_d, n_k, HEAD_DIM)
            ts = tl.dot(tq, kt, out_dtype=ACC_DTYPE, input_precision=PRECISION)
            ts += tl.dot(q, tl.trans(tk.to(DOT_DTYPE)), out_dtype=ACC_DTYPE, input_precision=PRECISION)
            ts = ts * scale
            pts_sum = tl.sum(p * ts, 1)  # hidden keys have p = 0
            mu = mu * rescale + pts_sum
            # (P * tS) V = (P * (tS - c)) V + c P V, c = the row's P-weighted mean of tS over this block.
            # A part of tS constant along the row cancels against -mu O; rounding only what is left of
            # tS after centring (c P V reuses the fp32 product of the O update) keeps that cancellation
            # in fp32 (review finding 2): the error is 2^-9 |P (tS - c)| |V|, not 2^-9 |mu O|.
            c = tl.where(p_sum > 0, pts_sum / tl.where(p_sum > 0, p_sum, 1.0), 0.0)
            p_ts = (p * (ts - c[:, None])).to(in_dtype).to(DOT_DTYPE)
            acc_t = acc_t * rescale[:, None] + c[:, None] * pv
            acc_t += tl.dot(p_ts, v, out_dtype=ACC_DTYPE, input_precision=PRECISION)
            acc_t += tl.dot(p_dot, tv.to(DOT_DTYPE), out_dtype=ACC_DTYPE, input_precision=PRECISION)
        m = m_new

    # l >= 1 on rows with a visible key (the max term is exp2(0)); rows with none get O = tO = 0 and
    # lse = +inf, as `JVPAttention` does.
    seen = l > 0
    l = tl.where(seen, l, 1.0)
    out = acc / l[:, None]
    row_ok = rows < n_q
    tile = (pid_bh * n_q + rows[:, None]) * HEAD_DIM + dims[None, :]
    tile_ok = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    tl.store(O + tile, out.to(O.dtype.element_ty), mask=tile_ok)
    lse = tl.where(seen, (m + tl.log2(l)) * ln2, float("inf"))
    tl.store(LSE + pid_bh * n_q + rows, lse.to(LSE.dtype.element_ty), mask=row_ok)
    if HAS_TANGENT:
        t_out = acc_t / l[:, None] - (mu / l)[:, None] * out
        tl.store(TO + tile, t_out.to(TO.dtype.element_ty), mask=tile_ok)


def triton_unsupported(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, tangent: bool = False
) -> str | None:
    """Why `triton_attention` cannot take these inputs, or None if it can."""
    if not (q.is_cuda or interpreting()):
        return "its inputs are not on a CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    problem = _layout_problem(q, k, v)
    if problem is not None:
        return problem
    if q.dtype == torch.float64 and q.is_cuda and not interpreting():
        # Triton 3.6 fails to compile its fp64 matmuls on sm90 with a key mask ("fp64 don't support
        # largeK MMA"), seen on an H200; fp64 is for exactness checks, which the interpreter runs.
        return "float64 runs in the interpreter only; on CUDA the blockwise op takes it"
    if mask is not None:
        if mask.dtype != torch.bool or mask.device != q.device:
            # A float mask is SDPA's additive one: read as "nonzero = attend" it would hide every key.
            return f"the mask must be bool (True = attend) on q's device, got {mask.dtype} on {mask.device}"
        if key_padding(mask, q.shape[0], k.shape[-2]) is None:
            return "only a key padding mask, broadcastable to (B, 1, 1, Nk), is fused"
    if tangent and torch.is_grad_enabled():
        # Inside torch.func.jvp, requires_grad of the outer tensors is not visible: grad mode is.
        return "its tangent output is not differentiable; take the JVP under torch.no_grad()"
    return None


def _layout_problem(q: Tensor, k: Tensor, v: Tensor, block_m: int | None = None) -> str | None:
    """Why the kernel cannot index q, k, v or launch over them with `block_m` query rows per program
    (default: `_block_sizes`'), or None. It reads K and V at q's (batch, head), so k and v must have
    q's batch and heads, or 1 there (broadcast: read through a stride-0 view)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be (B, H, N, D)"
    if not q.device == k.device == v.device:
        return "q, k, v must be on one device"
    if q.dtype not in DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"q, k, v must share one dtype of {DTYPES}"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] or q.shape[-1] > MAX_HEAD_DIM:
        return f"q, k, v must share one head dim of at most {MAX_HEAD_DIM}"
    if k.shape[-2] != v.shape[-2] or any(x.shape[i] not in (1, q.shape[i]) for x in (k, v) for i in (0, 1)):
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        return f"k and v must share their length and have q's batch and heads (or 1), got {shapes}"
    # B H goes on grid axis x (up to 2^31 - 1); the query blocks on axis y can exceed 65535.
    block_m = block_m or _block_sizes(q.shape[-1], q.dtype, q.device)[0]
    grid = _grid(q.shape[0] * q.shape[1], q.shape[2], block_m)
    if any(n > limit for n, limit in zip(grid, MAX_GRID, strict=True)):
        return f"its launch grid {grid} exceeds CUDA's {MAX_GRID}: Nq is too long for {block_m}-row blocks"
    return None


def _grid(batch_heads: int, n_q: int, block_m: int) -> tuple[int, int]:
    """The kernel's launch grid: (B H, query blocks). B H goes on axis x (up to 2^31 - 1), as in flash
    attention: a factorized video DiT's temporal attention has B H' W' H of them, past axis y's 65535."""
    return batch_heads, triton.cdiv(n_q, block_m)


def key_padding(mask: Tensor, batch: int, n_k: int) -> Tensor | None:
    """A bool mask broadcastable to (B, H, Nq, Nk) as a (B, Nk) key mask, or None if it varies
    over heads or queries (or does not broadcast to B and Nk)."""
    if mask.dim() > 4:
        return None
    mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask4.shape[1] != 1 or mask4.shape[2] != 1 or mask4.shape[0] not in (1, batch) or mask4.shape[3] not in (1, n_k):
        return None
    return mask4.expand(batch, 1, 1, n_k)[:, 0, 0]


def _block_sizes(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). For 2-byte inputs on CUDA, the fastest of
    `bench/attention_triton.py --tune` for output + tangent at N = 8192, bf16, on an H200
    (docs/benchmarks.md 9b). 4-byte inputs double the tiles in shared memory: at D = 128 the bf16
    choice needs 289 KiB of the H200's 227, so they take the smaller blocks that compiled there; D > 128
    in fp32 is a guess. 16 (the least tl.dot takes) in the interpreter, where small blocks are fastest
    and exercise the multi-block paths."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    half = dtype in (torch.float16, torch.bfloat16)
    if head_dim <= 64:
        return 64, 64, 4, 3
    if head_dim <= 128:
        return (128, 64, 8, 2) if half else (64, 32, 4, 2)
    return (64, 32, 4, 2) if half else (32, 32, 4, 1)


def attention_jvp_fused(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None = None,
    tk: Tensor | None = None,
    tv: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One launch of the kernel, no autograd: (O, tO or None, lse).

    q: (B, H, Nq, D), k, v: (B, H, Nk, D), where k and v may have 1 for B or H (broadcast); tangents
    of their primals' shapes (a missing one is zero; with none, tO is None and the kernel is plain flash
    attention); key_mask: bool (B, Nk) or (1, Nk), True = attend. Block sizes, warps and stages default
    to `_block_sizes`. O and tO (B, H, Nq, D) in the input dtype, lse (B, H, Nq) = logsumexp of the
    scaled scores in the accumulator dtype (+inf on rows with no visible key). Inputs the kernel cannot
    index raise a ValueError (it would read out of bounds).
    """
    default_m, default_n, default_warps, default_stages = _block_sizes(q.shape[-1], q.dtype, q.device)
    block_m, block_n = block_m or default_m, block_n or default_n
    num_warps, num_stages = num_warps or default_warps, num_stages or default_stages
    problem = _layout_problem(q, k, v, block_m)
    if problem is None and any(t is not None and t.shape != x.shape for x, t in zip((q, k, v), (tq, tk, tv))):
        problem = "each tangent must have its primal's shape"
    if problem is None and key_mask is not None:
        if key_mask.dtype != torch.bool or key_mask.device != q.device:
            problem = f"key_mask must be bool on q's device, got {key_mask.dtype} on {key_mask.device}"
        elif key_mask.dim() != 2 or key_mask.shape[0] not in (1, q.shape[0]) or key_mask.shape[1] != k.shape[-2]:
            problem = f"key_mask must be (B, Nk) or (1, Nk), got {tuple(key_mask.shape)}"
    if problem is not None:
        raise ValueError(f"triton attention cannot run here: {problem}")
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[-2]
    # Broadcast k, v heads or batch: stride-0 views, which the kernel reads through its strides.
    k, v = (x.expand(batch, heads, n_k, head_dim) for x in (k, v))
    tk, tv = (None if t is None else t.expand(k.shape) for t in (tk, tv))
    scale = head_dim**-0.5 if scale is None else scale
    has_tangent = any(t is not None for t in (tq, tk, tv))
    zero = q.new_zeros(()).expand(q.shape)  # a missing tangent: one element, stride 0
    zero_k = q.new_zeros(()).expand(k.shape)
    tq = zero if tq is None else tq
    tk, tv = (zero_k if t is None else t for t in (tk, tv))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    t_out = torch.empty_like(out) if has_tangent else out  # `out` stands in: never written
    lse = torch.empty((batch, heads, n_q), dtype=acc_dtype, device=q.device)
    if key_mask is None:
        mask_arg = q.new_ones((1, 1), dtype=torch.uint8)
    else:
        mask_arg = key_mask.expand(batch, n_k).to(torch.uint8)

    dot_dtype = _TL_DTYPES[q.dtype]
    if q.dtype == torch.bfloat16 and interpreting():  # the interpreter's bf16 tl.dot is wrong
        dot_dtype = tl.float32
    grid = _grid(batch * heads, n_q, block_m)
    _attention_jvp_kernel[grid](
        q, k, v, tq, tk, tv, mask_arg, out, t_out, lse,
        *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
        mask_arg.stride(0) if key_mask is not None else 0,
        mask_arg.stride(1),
        heads, n_q, n_k, _scales(scale, acc_dtype, q.device),
        HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_TANGENT=has_tangent,
        HAS_MASK=key_mask is not None,
        CAUSAL=causal,
        DOT_DTYPE=dot_dtype,
        ACC_DTYPE=_TL_DTYPES[acc_dtype],
        PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out, (t_out if has_tangent else None), lse


@functools.lru_cache(maxsize=64)
def _scales(scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The kernel's SCALES, made once per (scale, dtype, device): no copy per call, and a CUDA
    graph can capture the launch."""
    return torch.tensor([scale, scale * math.log2(math.e), math.log(2)], dtype=dtype, device=device)


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


class TritonAttention(torch.autograd.Function):
    """(O, tO, lse) from the fused kernel; O differentiable, tO and lse not.

    The backward recomputes attention through `F.scaled_dot_product_attention` and its fused
    backward (flash or memory-efficient on CUDA), which costs one more forward but keeps the
    kernel's state to the three outputs.
    """

    @staticmethod
    def forward(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        tq: Tensor | None,
        tk: Tensor | None,
        tv: Tensor | None,
        key_mask: Tensor | None,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        return attention_jvp_fused(q, k, v, tq, tk, tv, key_mask, causal, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, _, _, _, key_mask, causal, scale = inputs
        _, t_out, lse = output
        ctx.mark_non_differentiable(*(x for x in (t_out, lse) if x is not None))
        ctx.save_for_backward(q, k, v, key_mask)
        ctx.causal, ctx.scale = causal, scale

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, *_: Tensor | None) -> tuple:
        q, k, v, key_mask = ctx.saved_tensors
        mask = None if key_mask is None else key_mask[:, None, None, :]
        causal = ctx.causal and mask is None  # is_causal is top-left, as the kernel: no (Nq, Nk) mask
        if ctx.causal and mask is not None:  # SDPA takes a mask or is_causal, not both
            mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> Tensor:
    """softmax(scale q k^T) v, with its forward-mode tangent from the same kernel launch.

    q: (B, H, Nq, D), k, v: (B, H, Nk, D) (or 1 for B or H, broadcast) -> (B, H, Nq, D); mask: bool
    broadcastable to (B, 1, 1, Nk), True = attend. If q, k or v carries a tangent (`torch.func.jvp`, `forward_ad`),
    the result carries tO. See `triton_unsupported` for what it takes.
    """
    (q, tq), (k, tk), (v, tv) = (forward_ad.unpack_dual(x) for x in (q, k, v))
    tangent = any(t is not None for t in (tq, tk, tv))
    reason = triton_unsupported(q, k, v, mask, tangent)
    if reason is not None:
        raise ValueError(f"triton attention cannot run here: {reason}")
    key_mask = None if mask is None else key_padding(mask, q.shape[0], k.shape[-2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Broadcast k, v (one head or batch) expand here, so that autograd sums their gradients back.
    k, v = (x.expand(*q.shape[:2], *x.shape[2:]) for x in (k, v))
    tk, tv = (None if t is None else t.expand(k.shape) for t in (tk, tv))
    out, t_out, _ = TritonAttention.apply(q, k, v, tq, tk, tv, key_mask, causal, scale)
    return out if t_out is None else forward_ad.make_dual(out, t_out)
