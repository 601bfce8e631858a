"""The fused Triton attention+tangent kernel against float64 torch.func.jvp of naive attention.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), so
these tests check it in every CPU run; with CUDA they check the compiled kernel.
"""

import functools
import math

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from scm_mm.nn.attention import attention, attention_backend, naive_attention

triton_attention = pytest.importorskip("scm_mm.nn.triton_attention", reason="triton is not installed")
if not (torch.cuda.is_available() or triton_attention.interpreting()):
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
# Error bound of each input dtype against float64 math on the same (rounded) inputs. Half dtypes
# round P and P tS to the input dtype before their matmuls, as flash attention does.
ATOL = {F64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# The dtype of the exactness tests: float64 in the interpreter; the compiled kernel refuses float64
# (Triton 3.6 fails to compile its fp64 matmuls on sm90), so float32 there.
EXACT = F64 if triton_attention.interpreting() else torch.float32
EXACT_ATOL = 1e-12 if EXACT == F64 else 1e-4


def _inputs(b, h, nq, nk, d, dtype, seed=0) -> list[Tensor]:
    """q, k, v, tq, tk, tv, rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, n, d) for n in (nq, nk, nk)] * 2
    return [torch.randn(s, generator=g).to(dtype).to(DEVICE) for s in shapes]


def _key_mask(kind: str, b: int, nk: int) -> Tensor | None:
    """None; keys padded at the end; or that with batch 1 seeing no key at all."""
    if kind == "none":
        return None
    mask = (torch.arange(nk) < nk - 5).repeat(b, 1)
    if kind == "empty":
        mask[1] = False
    return mask.to(DEVICE)


def _reference(q, k, v, tq, tk, tv, key_mask, causal, scale=None) -> tuple[Tensor, Tensor]:
    """(O, tO) of naive attention in float64, by torch.func.jvp."""
    nq, nk = q.shape[-2], k.shape[-2]
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if causal:
        tril = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        mask = tril if mask is None else mask & tril
    primals, tangents = (tuple(x.to(F64) for x in xs) for xs in ((q, k, v), (tq, tk, tv)))
    return torch.func.jvp(lambda *p: naive_attention(*p, mask=mask, scale=scale), primals, tangents)


CASES = [  # (nq, nk, d, key mask, causal): ragged blocks, head dims 16 to 128 (24 padded to 32)
    (37, 37, 24, "none", False),
    (16, 50, 32, "padding", False),
    (21, 43, 64, "empty", False),
    (40, 40, 16, "none", True),
    (9, 35, 128, "padding", True),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nq,nk,d,mask_kind,causal", CASES)
def test_fused_kernel_matches_float64_reference(dtype, nq, nk, d, mask_kind, causal):
    q, k, v, tq, tk, tv = _inputs(2, 2, nq, nk, d, dtype)
    key_mask = _key_mask(mask_kind, 2, nk)
    if dtype != EXACT and dtype == F64:
        assert "interpreter only" in triton_attention.triton_unsupported(q, k, v)
        pytest.skip("the compiled kernel takes no float64")
    out, t_out, lse = triton_attention.attention_jvp_fused(q, k, v, tq, tk, tv, key_mask, causal)
    ref, t_ref = _reference(q, k, v, tq, tk, tv, key_mask, causal)
    assert out.dtype == t_out.dtype == dtype and out.shape == t_out.shape == q.shape
    torch.testing.assert_close(out.to(F64), ref, rtol=0, atol=ATOL[dtype])
    torch.testing.assert_close(t_out.to(F64), t_ref, rtol=0, atol=ATOL[dtype] * t_ref.abs().max().item())
    if mask_kind == "empty":  # a row with no visible key: O = tO = 0, lse = +inf
        assert not out[1].any() and not t_out[1].any() and lse[1].isinf().all()
        lse = lse[:1]
    # lse, in the accumulator dtype, is the log-sum-exp of the visible scaled scores.
    s = q.to(F64) @ k.to(F64).transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], -math.inf)
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    torch.testing.assert_close(lse.to(F64), s.logsumexp(-1)[: len(lse)], rtol=0, atol=ATOL[dtype] / 100 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_shared_key_tangent_cancels_before_rounding(dtype):
    """tk = noise + 100 u with u shared by all keys: q u is constant along each row of tS and cancels
    against -mu O. Rounding P tS to bf16 before its matmul made the error 2^-9 |mu O| (0.3 of |tO| ~ 1,
    review finding 2); centring tS on its row mean first leaves half-precision rounding of what varies."""
    q, k, v, tq, tk, tv = _inputs(1, 2, 32, 64, 16, dtype, seed=4)
    tk = (tk.double() + 100 * torch.randn(1, 2, 1, 16, dtype=F64, device=DEVICE)).to(dtype)
    _, t_out, _ = triton_attention.attention_jvp_fused(q, k, v, tq, tk, tv)
    _, t_ref = _reference(q, k, v, tq, tk, tv, None, False)
    torch.testing.assert_close(t_out.to(F64), t_ref, rtol=0, atol=ATOL[dtype] * t_ref.abs().max().item())


@pytest.mark.parametrize("which", ["q", "k", "v", "qk"])
def test_missing_tangents_are_zero(which):
    q, k, v, tq, tk, tv = _inputs(1, 2, 19, 23, 32, EXACT)
    tangents = {name: t if name in which else None for name, t in zip("qkv", (tq, tk, tv), strict=True)}
    out, t_out, _ = triton_attention.attention_jvp_fused(q, k, v, *tangents.values(), scale=0.3)
    zeros = {name: torch.zeros_like(t) if tangents[name] is None else t for name, t in zip("qkv", (tq, tk, tv))}
    ref, t_ref = _reference(q, k, v, *zeros.values(), None, False, scale=0.3)
    torch.testing.assert_close(t_out, t_ref, rtol=0, atol=EXACT_ATOL, check_dtype=False)
    plain, none, _ = triton_attention.attention_jvp_fused(q, k, v, scale=0.3)  # flash forward alone
    assert none is None
    torch.testing.assert_close(plain, ref, rtol=0, atol=EXACT_ATOL, check_dtype=False)


def test_strided_inputs():
    """q, k, v as transposed views of (B, N, H, D) projections, as attention layers make them."""
    x = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in _inputs(2, 3, 17, 17, 16, EXACT)]
    assert not x[0].is_contiguous()
    out, t_out, _ = triton_attention.attention_jvp_fused(*x)
    ref, t_ref = _reference(*x, None, False)
    torch.testing.assert_close((out, t_out), (ref, t_ref), rtol=0, atol=EXACT_ATOL, check_dtype=False)


def test_dispatcher_under_func_jvp_and_forward_ad():
    q, k, v, tq, tk, tv = _inputs(2, 2, 20, 20, 32, EXACT)
    mask = _key_mask("padding", 2, 20)[:, None, None, :]

    def f(q, k, v):
        return attention(q.sin(), k, v * 2, mask, scale=0.2).cos()

    def f_ref(q, k, v):
        return naive_attention(q.sin(), k, v * 2, mask, scale=0.2).cos()

    with attention_backend("triton"), torch.no_grad():
        out, t_out = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    ref, t_ref = torch.func.jvp(f_ref, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close((out, t_out), (ref, t_ref), rtol=0, atol=EXACT_ATOL)
    with attention_backend("triton"), torch.no_grad(), forward_ad.dual_level():
        dual = f(forward_ad.make_dual(q, tq), k, v)
        _, t_out = forward_ad.unpack_dual(dual)
    _, t_ref = torch.func.jvp(lambda q: f_ref(q, k, v), (q,), (tq,))
    torch.testing.assert_close(t_out, t_ref, rtol=0, atol=EXACT_ATOL)


def test_dit_jvp_through_the_kernel_equals_the_blockwise_op():
    from scm_mm.nn.dit import DiT

    torch.manual_seed(0)
    net = DiT(2, patch_size=(1, 2, 2), hidden=32, depth=2, heads=2, noise_channels=16, num_classes=3)
    for p in net.parameters():  # the zero-initialised gates would make attention irrelevant
        nn.init.normal_(p, std=0.2)
    net = net.to(DEVICE, EXACT).eval()
    x = torch.randn(2, 2, 3, 4, 4, dtype=EXACT, device=DEVICE)
    c = torch.rand(2, dtype=EXACT, device=DEVICE) * 1000
    tangents = (torch.randn_like(x), torch.randn_like(c))

    def f(x, c):
        return net(x, c, torch.tensor([0, 2], device=DEVICE))

    results = {}
    for backend in ("triton", "jvp"):
        with attention_backend(backend), torch.no_grad():
            results[backend] = torch.func.jvp(f, (x, c), tangents)
    torch.testing.assert_close(results["triton"], results["jvp"], rtol=0, atol=EXACT_ATOL * 100)


@pytest.mark.parametrize("mask_kind,causal", [("none", False), ("padding", True), ("empty", False)])
def test_backward_of_the_primal_matches_naive(mask_kind, causal):
    """A with-grad forward through the kernel (no tangent) has naive attention's gradients."""
    q, k, v, _, _, _ = _inputs(2, 2, 13, 13, 16, EXACT)
    key_mask = _key_mask(mask_kind, 2, 13)
    d_out = torch.randn_like(q)
    grads = []
    for fused in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if fused:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            out = triton_attention.triton_attention(*leaves, mask, causal=causal)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            if causal:
                tril = torch.ones(13, 13, dtype=torch.bool, device=DEVICE).tril()
                mask = tril if mask is None else mask & tril
            out = naive_attention(*leaves, mask)
        grads.append(torch.autograd.grad(out, leaves, d_out))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=EXACT_ATOL)


@pytest.mark.parametrize("nq,nk", [(9, 13), (13, 9)])
def test_causal_backward_uses_is_causal(monkeypatch, nq, nk):
    """Causal without a key mask: the backward's SDPA gets is_causal (top-left, as the kernel), not a
    dense (Nq, Nk) mask (1 GiB at N = 32k, and no flash backward), with naive attention's gradients."""
    from torch.nn import functional as F

    sdpa, seen = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v, _, _, _ = _inputs(2, 2, nq, nk, 16, EXACT)
    d_out = torch.randn_like(q)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(triton_attention.triton_attention(*leaves, causal=True), leaves, d_out)
    assert seen == [(None, True)]
    tril = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    refs = torch.autograd.grad(naive_attention(*leaves, tril), leaves, d_out)
    torch.testing.assert_close(grads, refs, rtol=0, atol=EXACT_ATOL)


@pytest.mark.parametrize("kv_batch,kv_heads", [(1, 1), (2, 1), (1, 3)])
def test_broadcast_kv_batch_and_heads(kv_batch, kv_heads):
    """k, v (and their tangents) with one batch or one head for all of q's: read through stride-0
    views, not past the end of k and v. Gradients of the primal sum back to k's and v's shapes."""
    q, _, _, tq, _, _ = _inputs(2, 3, 9, 11, 16, EXACT)
    k, v, _, tk, tv, _ = _inputs(kv_batch, kv_heads, 11, 11, 16, EXACT, seed=1)
    ref, t_ref = _reference(q, k, v, tq, tk, tv, None, False)
    out, t_out, _ = triton_attention.attention_jvp_fused(q, k, v, tq, tk, tv)
    torch.testing.assert_close((out, t_out), (ref, t_ref), rtol=0, atol=EXACT_ATOL, check_dtype=False)
    with attention_backend("triton"), torch.no_grad():
        out, t_out = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    torch.testing.assert_close((out, t_out), (ref, t_ref), rtol=0, atol=EXACT_ATOL, check_dtype=False)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(triton_attention.triton_attention(*leaves), leaves, t_ref.to(EXACT))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    refs = torch.autograd.grad(naive_attention(*leaves), leaves, t_ref.to(EXACT))
    torch.testing.assert_close(grads, refs, rtol=0, atol=EXACT_ATOL)


def test_mismatched_inputs_are_refused():
    """What the kernel cannot index or read as a key mask is refused with a reason (a ValueError from
    a direct call), not read out of bounds; "auto" then takes the blockwise op."""
    q, k, v, tq, tk, tv = _inputs(2, 2, 8, 8, 16, EXACT)
    cases = {
        "have q's batch and heads": (q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), None),  # 4 heads for 2
        "share their length": (q, k, v[:, :, :5], None),
        "one head dim": (q, k, v[..., :8], None),
        "mask must be bool": (q, k, v, torch.zeros(2, 1, 1, 8, dtype=EXACT, device=DEVICE)),
        "key padding mask": (q, k, v, torch.ones(2, 1, 1, 5, dtype=torch.bool, device=DEVICE)),  # Nk = 8
    }
    for reason, (q_, k_, v_, mask) in cases.items():
        assert reason in triton_attention.triton_unsupported(q_, k_, v_, mask, tangent=False), reason
        with pytest.raises(ValueError, match=reason):
            triton_attention.triton_attention(q_, k_, v_, mask)
    with pytest.raises(ValueError, match="have q's batch and heads"):
        triton_attention.attention_jvp_fused(q, k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="key_mask must be bool"):
        triton_attention.attention_jvp_fused(q, k, v, key_mask=torch.ones(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="key_mask must be"):
        triton_attention.attention_jvp_fused(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="its primal's shape"):
        triton_attention.attention_jvp_fused(q, k, v, tq, tk[:, :, :5], tv)


def test_refusals_are_clear():
    q, k, v, tq, _, _ = _inputs(1, 2, 8, 8, 16, EXACT)
    per_query = torch.rand(8, 8, device=DEVICE) > 0.5
    with attention_backend("triton"), pytest.raises(ValueError, match="key padding mask"):
        attention(q, k, v, per_query)
    # A tangent under grad mode: the fused tangent output is not differentiable.
    q = q.requires_grad_()
    with attention_backend("triton"), pytest.raises(ValueError, match="torch.no_grad"):
        torch.func.jvp(lambda q: attention(q, k, v), (q,), (tq,))
    # "auto" falls back to the blockwise op there, and on the CPU always.
    out, t_out = torch.func.jvp(lambda q: attention(q, k, v), (q,), (tq,))
    _, t_ref = torch.func.jvp(lambda q: naive_attention(q, k, v), (q.detach(),), (tq,))
    torch.testing.assert_close(t_out.detach(), t_ref, rtol=0, atol=EXACT_ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_takes_the_kernel_on_cuda(monkeypatch):
    calls = []
    fused = triton_attention.triton_attention
    monkeypatch.setattr(triton_attention, "triton_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    q, k, v, tq, tk, tv = _inputs(2, 4, 256, 256, 64, torch.bfloat16)
    with torch.no_grad():
        torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    assert calls == [1]
    attention(q, k, v)  # no tangent: SDPA or xformers
    assert calls == [1]


def test_benchmark_script_runs(tmp_path):
    """bench/attention_triton.py (the GPU measurement) on a tiny CPU shape, so it cannot rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "attention_triton.py"
    cmd = [sys.executable, str(script), "--device", DEVICE, "--lengths", "48", "--head-dims", "32"]
    cmd += ["--heads", "1", "--repeats", "1", "--dtype", "float32", "--out", str(tmp_path / "rows.json")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (row,) = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert set(row["ms"]) == {"flash forward", "fused forward", "fused", "blockwise", "math"}
    assert row["fused vs blockwise"] < 1e-5


def test_auto_falls_back_once_when_the_kernel_fails(monkeypatch):
    """A GPU or Triton version the kernel does not compile for: "auto" warns once, then stays blockwise
    for that dtype and head dim; another head dim (other blocks, other shared memory) still tries it."""
    from scm_mm.nn import attention as dispatch

    tried = []

    def broken(q, *args, **kwargs):
        tried.append(q.shape[-1])
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(triton_attention, "triton_attention", broken)
    monkeypatch.setattr(dispatch, "_triton_failure", {})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # "auto" takes it on CUDA only
    for head_dim in (16, 32):
        q, k, v, tq, tk, tv = _inputs(1, 2, 8, 8, head_dim, F64)
        ref = _reference(q, k, v, tq, tk, tv, None, False)
        with torch.no_grad(), pytest.warns(RuntimeWarning, match=f"no kernel image.*head dim {head_dim} from now"):
            out = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        with torch.no_grad():
            torch.func.jvp(attention, (q, k, v), (tq, tk, tv))  # straight to the blockwise op: no second try
    assert tried == [16, 32] and len(dispatch._triton_failure) == 2


def test_launch_grid_puts_batch_times_heads_on_axis_x(monkeypatch):
    """CUDA's grid axis y holds at most 65535 programs, axis x 2^31 - 1. B H (B H' W' H in a factorized
    video DiT's temporal attention) goes on x; a query length whose blocks overflow y is refused up
    front, so "auto" takes the blockwise op for it instead of failing to launch."""
    grids = []

    class Launcher:  # stands in for `_attention_jvp_kernel`: records the grid, launches nothing
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_attention, "_attention_jvp_kernel", Launcher())
    q = torch.zeros((), dtype=torch.float16, device=DEVICE).expand(35_000, 2, 1, 16)  # a view: no memory
    assert triton_attention.triton_unsupported(q, q, q) is None
    triton_attention.attention_jvp_fused(q, q, q)
    assert grids == [(70_000, 1)]
    block_m = triton_attention._block_sizes(16, torch.float16, q.device)[0]
    fits = torch.zeros((), dtype=torch.float16, device=DEVICE).expand(1, 1, 65_535 * block_m, 16)
    assert triton_attention.triton_unsupported(fits, fits, fits) is None
    long = torch.zeros((), dtype=torch.float16, device=DEVICE).expand(1, 1, 65_535 * block_m + 1, 16)
    assert "exceeds CUDA's" in triton_attention.triton_unsupported(long, long, long)
    with pytest.raises(ValueError, match="exceeds CUDA's"):
        triton_attention.attention_jvp_fused(long, long, long)
    assert len(grids) == 1


@pytest.mark.parametrize("backend", ["sdpa", "math", "jvp", "triton"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_causal_attention_through_the_dispatcher(backend, with_mask):
    """attention(causal=True) is a top-left causal mask (query i sees keys j <= i, as SDPA's is_causal) beside
    any key mask, on every backend, and its tangent through the JVP ops (Nq != Nk both ways; float64 in the
    interpreter, float32 on a GPU)."""
    for nq, nk in ((7, 11), (11, 7)):
        g = torch.Generator().manual_seed(nq)
        q, tq = (torch.randn(2, 3, nq, 16, generator=g, dtype=EXACT).to(DEVICE) for _ in range(2))
        k, v, tk, tv = (torch.randn(2, 3, nk, 16, generator=g, dtype=EXACT).to(DEVICE) for _ in range(4))
        keys = (torch.rand(2, 1, 1, nk, generator=g) > 0.3).to(DEVICE) if with_mask else None
        dense = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril() & (True if keys is None else keys)
        with attention_backend(backend), torch.no_grad():
            out = attention(q, k, v, keys, causal=True)
        ref = naive_attention(q, k, v, dense)
        torch.testing.assert_close(out, ref, rtol=0, atol=EXACT_ATOL)
        if backend in ("jvp", "triton"):
            causal = functools.partial(attention, mask=keys, causal=True)
            with attention_backend(backend), torch.no_grad():
                _, t_out = torch.func.jvp(causal, (q, k, v), (tq, tk, tv))
            _, t_ref = torch.func.jvp(functools.partial(naive_attention, mask=dense), (q, k, v), (tq, tk, tv))
            torch.testing.assert_close(t_out, t_ref, rtol=0, atol=EXACT_ATOL)
