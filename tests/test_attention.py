"""JVPAttention and the `attention` dispatcher against naive attention (the source of truth)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from scm_mm.nn.attention import (
    JVPAttention,
    attention,
    attention_backend,
    auto_backends,
    jvp_attention,
    naive_attention,
    tangent_is_live,
)

F64 = torch.float64


def _qkv(b=2, h=3, nq=7, nk=11, d=5, dv=None, dtype=F64, seed=0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (nq, nk))
    return q, k, torch.randn(b, h, nk, dv or d, generator=g, dtype=dtype)


def _mask(kind: str, b: int, nq: int, nk: int) -> Tensor | None:
    """None, a (Nq, Nk) random mask, a (B, 1, 1, Nk) key padding mask, or one with an empty row."""
    g = torch.Generator().manual_seed(1)
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(nq, nk, generator=g) > 0.3
    if kind == "padding":
        return (torch.arange(nk) < nk - 3).expand(b, 1, 1, nk)
    mask = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    mask[0, 0, nq // 2] = False  # this query of batch 0 sees no key
    return mask


def _jvp(fn, q, k, v, which: str, mask, **kw) -> tuple[Tensor, Tensor]:
    """(output, tangent) of fn by torch.func.jvp, with random tangents on the inputs in `which`."""
    qkv, names, g = {"q": q, "k": k, "v": v}, list(which), torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(qkv[n].shape, generator=g, dtype=q.dtype) for n in names)

    def f(*xs: Tensor) -> Tensor:
        return fn(**{**qkv, **dict(zip(names, xs, strict=True))}, mask=mask, **kw)

    return torch.func.jvp(f, tuple(qkv[n] for n in names), tangents)


SHAPES = [  # (nq, nk, d, dv, block_size): one block, many blocks with a ragged last one, Dv != D
    (7, 11, 5, 5, 512),
    (7, 11, 5, 5, 4),
    (9, 4, 3, 6, 3),
    (1, 17, 4, 4, 1),
]


@pytest.mark.parametrize("nq,nk,d,dv,block_size", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "padding", "empty_row"])
@pytest.mark.parametrize("which", ["qkv", "q", "k", "v", "qv"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # no_grad: one block reuses P
def test_jvp_matches_naive_float64(nq, nk, d, dv, block_size, mask_kind, which, grad):
    q, k, v = _qkv(nq=nq, nk=nk, d=d, dv=dv)
    mask = _mask(mask_kind, 2, nq, nk)
    with torch.set_grad_enabled(grad):
        out, t_out = _jvp(jvp_attention, q, k, v, which, mask, block_size=block_size)
    ref, t_ref = _jvp(naive_attention, q, k, v, which, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(t_out, t_ref, rtol=0, atol=1e-10)
    if mask_kind == "empty_row":
        assert not out[0, :, nq // 2].any() and not t_out[0, :, nq // 2].any()


def test_forward_without_tangent_matches_naive_and_keeps_scale():
    q, k, v = _qkv(nq=6, nk=13)
    mask = _mask("random", 2, 6, 13)
    ref = naive_attention(q, k, v, mask, scale=0.3)
    out = jvp_attention(q, k, v, mask, 0.3, block_size=4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_dual_tensors_forward_ad():
    q, k, v = _qkv(nk=10)
    tq, tk, tv = _qkv(nk=10, seed=3)
    results = []
    for fn in (lambda *x: jvp_attention(*x, block_size=3), naive_attention):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))]
            results.append(forward_ad.unpack_dual(fn(*duals)))
    torch.testing.assert_close(results[0].primal, results[1].primal, rtol=0, atol=1e-10)
    torch.testing.assert_close(results[0].tangent, results[1].tangent, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grad,score_blocks", [(False, 1), (True, 2)])
def test_one_key_block_without_grad_computes_scores_once(monkeypatch, grad, score_blocks):
    """Without autograd the forward hands P to the tangent; with it, the tangent recomputes P (as backward)."""
    from scm_mm.nn import attention as attention_module

    calls, scores = [], attention_module._scores
    monkeypatch.setattr(attention_module, "_scores", lambda *a: calls.append(1) or scores(*a))
    q, k, v = _qkv(nk=10)
    with torch.set_grad_enabled(grad), forward_ad.dual_level():
        duals = [forward_ad.make_dual(x, torch.ones_like(x)) for x in (q, k, v)]
        jvp_attention(*duals, block_size=16)
    assert len(calls) == score_blocks


@pytest.mark.parametrize("mask_kind", ["none", "empty_row"])
def test_gradcheck_backward_and_forward_ad(mask_kind):
    q, k, v = (x.requires_grad_() for x in _qkv(b=1, h=2, nq=4, nk=5, d=3))
    mask = _mask(mask_kind, 1, 4, 5)
    assert torch.autograd.gradcheck(
        lambda q, k, v: jvp_attention(q, k, v, mask, block_size=2), (q, k, v), check_forward_ad=True
    )


@pytest.mark.parametrize("mask_kind", ["none", "random", "empty_row"])
def test_grads_match_naive_autograd(mask_kind):
    q, k, v = _qkv(nq=8, nk=9, dv=4)
    mask = _mask(mask_kind, 2, 8, 9)
    d_out = torch.randn(2, 3, 8, 4, dtype=F64)
    grads = []
    for fn in (lambda *x: jvp_attention(*x, block_size=4), naive_attention):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        grads.append(torch.autograd.grad(fn(*inputs, mask), inputs, d_out))
    for g, ref in zip(*grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-10)


# bf16: the output is rounded to 8 significant bits (half an ulp at |O| ~ 1.5 is 4e-3).
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_low_precision_close_to_float64(dtype, atol):
    mask = _mask("empty_row", 2, 16, 40)
    # Round the inputs and tangents to `dtype` first: the reference then sees the same numbers.
    low = [x.to(dtype) for x in (*_qkv(nq=16, nk=40, d=8), *_qkv(nq=16, nk=40, d=8, seed=3))]
    high = [x.double() for x in low]
    out, t_out = torch.func.jvp(
        lambda q, k, v: jvp_attention(q, k, v, mask, block_size=16), tuple(low[:3]), tuple(low[3:])
    )
    ref, t_ref = torch.func.jvp(
        lambda q, k, v: naive_attention(q, k, v, mask), tuple(high[:3]), tuple(high[3:])
    )
    assert out.dtype == t_out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=atol)
    torch.testing.assert_close(t_out.double(), t_ref, rtol=0, atol=atol)


def _shared_key_tangent(nq: int, nk: int, d: int, common: float, dtype: torch.dtype) -> list[Tensor]:
    """q, k, v, tq, tk, tv rounded to `dtype`, with tk = noise + common u: u is one vector shared by all
    keys, so q u is constant along each row of tS and cancels in tO (softmax is shift invariant)."""
    g = torch.Generator().manual_seed(4)
    q, k, v, tq, tk, tv = (torch.randn(1, 2, n, d, generator=g, dtype=F64) for n in (nq, nk, nk) * 2)
    tk = tk + common * torch.randn(1, 2, 1, d, generator=g, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, tq, tk, tv)]


@pytest.mark.parametrize("block_size", [64, 16], ids=["one_block", "blocks"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])  # no_grad: the forward's fp32 O
def test_bf16_tangent_keeps_a_shared_key_tangent_exact(block_size, grad):
    """-mu O cancels the row-constant part of (P * tS) V: with O rounded to bf16 there, the error was
    2^-9 |mu O| (43 % of |tO| at common = 100, review finding 2); with O in fp32 it is bf16's rounding of
    tO itself."""
    low = _shared_key_tangent(32, 64, 16, 100.0, torch.bfloat16)
    with torch.set_grad_enabled(grad):
        _, t_out = torch.func.jvp(lambda *x: jvp_attention(*x, block_size=block_size), tuple(low[:3]), tuple(low[3:]))
    _, t_ref = torch.func.jvp(naive_attention, *(tuple(x.double() for x in xs) for xs in (low[:3], low[3:])))
    torch.testing.assert_close(t_out.double(), t_ref, rtol=0, atol=1e-2 * t_ref.abs().max().item())


def test_autocast_does_not_lower_the_accumulation_precision():
    q, k, v = (x.bfloat16().requires_grad_() for x in _qkv(nq=16, nk=40, d=8))
    tangents = tuple(x.bfloat16() for x in _qkv(nq=16, nk=40, d=8, seed=3))
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            fn = lambda q, k, v: jvp_attention(q, k, v, block_size=16)  # noqa: E731
            out, t_out = torch.func.jvp(fn, (q, k, v), tangents)
            grads = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))
        results.append((out, t_out, *grads))
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _assert_live(y: Tensor, x: Tensor) -> Tensor:
    assert tangent_is_live(x, y) and not tangent_is_live(x)
    return y


def test_tangent_is_live():
    x = torch.randn(3)
    assert not tangent_is_live(x, x)
    torch.func.jvp(lambda y: _assert_live(y, x), (x,), (x,))
    with forward_ad.dual_level():
        _assert_live(forward_ad.make_dual(x, x), x)


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts calls of JVPAttention's forward and jvp rule, and of F.scaled_dot_product_attention.

    (Not JVPAttention.apply: under torch.func, functorch calls `apply` again one level down.)
    """
    count = {"forward": 0, "jvp": 0, "sdpa": 0}
    forward, jvp, sdpa = JVPAttention.forward, JVPAttention.jvp, F.scaled_dot_product_attention

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            count[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(JVPAttention, "forward", staticmethod(counted("forward", forward)))
    monkeypatch.setattr(JVPAttention, "jvp", staticmethod(counted("jvp", jvp)))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted("sdpa", sdpa))
    return count


def test_auto_uses_jvp_attention_under_jvp_and_sdpa_otherwise(calls):
    q, k, v = _qkv(dtype=torch.float32)
    out, t_out = _jvp(attention, q, k, v, "qkv", None)
    assert calls == {"forward": 1, "jvp": 1, "sdpa": 0}
    ref, t_ref = _jvp(naive_attention, q, k, v, "qkv", None)
    torch.testing.assert_close(t_out, t_ref)
    torch.testing.assert_close(attention(q, k, v), ref)
    assert calls == {"forward": 1, "jvp": 1, "sdpa": 1}
    with forward_ad.dual_level():
        out = attention(forward_ad.make_dual(q, q), k, v)
        t_out = forward_ad.unpack_dual(out).tangent
    _, t_ref = torch.func.jvp(lambda q: naive_attention(q, k, v), (q,), (q,))
    torch.testing.assert_close(t_out, t_ref)
    assert calls == {"forward": 2, "jvp": 2, "sdpa": 1}
    assert auto_backends("cpu") == ("sdpa", "jvp")  # what it reports is what it used


def test_forced_backends(calls):
    q, k, v = _qkv()
    mask = _mask("random", 2, 7, 11)
    ref = naive_attention(q, k, v, mask)
    for name in ("jvp", "math", "sdpa"):
        with attention_backend(name):
            torch.testing.assert_close(attention(q, k, v, mask), ref)
    assert calls == {"forward": 1, "jvp": 0, "sdpa": 1}
    with attention_backend("sdpa"), pytest.raises(RuntimeError, match="no forward-mode AD"):
        _jvp(attention, q, k, v, "q", None)
    with pytest.raises(ValueError, match="unknown attention backend"), attention_backend("flash"):
        pass


def test_float_mask_is_refused_by_every_backend():
    """SDPA reads a float mask as additive, the JVP ops and the kernel cannot: F (SDPA) and F- (a JVP
    op) would see different masks, so `attention` takes bool masks only."""
    q, k, v = _qkv()
    additive = torch.zeros(11, dtype=F64).masked_fill(torch.arange(11) >= 9, -torch.inf)
    for name in ("auto", "sdpa", "jvp", "math", "triton"):
        with attention_backend(name), pytest.raises(TypeError, match="mask must be bool"):
            attention(q, k, v, additive)
    with pytest.raises(TypeError, match="mask must be bool"):
        _jvp(attention, q, k, v, "q", additive)


def test_broadcast_kv_heads_match_naive():
    """k, v with one head (and one batch) for all of q's: every backend broadcasts them alike."""
    q, _, _ = _qkv()
    _, k, v = _qkv(b=1, h=1, seed=1)
    ref, t_ref = _jvp(naive_attention, q, k, v, "qkv", None)
    for name in ("auto", "jvp", "sdpa"):
        with attention_backend(name):
            torch.testing.assert_close(attention(q, k, v), ref, rtol=0, atol=1e-12)
    out, t_out = _jvp(attention, q, k, v, "qkv", None)
    torch.testing.assert_close((out, t_out), (ref, t_ref), rtol=0, atol=1e-12)


def test_forced_xformers_without_xformers_is_a_clear_error():
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed")
    q, k, v = _qkv()
    with attention_backend("xformers"), pytest.raises(RuntimeError, match="not installed"):
        attention(q, k, v)


class _FakeXformers:
    """xformers.ops' memory_efficient_attention on the CPU: (B, N, H, D), one dtype, or a failure (for one
    head dim, or all)."""

    def __init__(self, error: Exception | None = None, failing_head_dim: int | None = None):
        self.error, self.failing_head_dim, self.dtypes = error, failing_head_dim, []

    def memory_efficient_attention(self, q, k, v, scale=None):
        if self.error is not None and self.failing_head_dim in (None, q.shape[-1]):
            raise self.error
        assert q.dtype == k.dtype == v.dtype, "xformers takes one dtype"
        self.dtypes.append(q.dtype)
        return naive_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale).transpose(1, 2)


@pytest.fixture
def fake_cuda_xformers(monkeypatch):
    """"auto" on a CUDA machine with xformers installed, simulated on the CPU."""
    from scm_mm.nn import attention as dispatch

    def install(ops: _FakeXformers) -> _FakeXformers:
        monkeypatch.setattr(dispatch, "_xformers_ops", lambda: ops)
        monkeypatch.setattr(dispatch, "_xformers_failure", {})
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        return ops

    return install


def test_auto_takes_xformers_in_the_autocast_dtype(fake_cuda_xformers):
    ops = fake_cuda_xformers(_FakeXformers())
    q, k, v = _qkv(dtype=torch.float32)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # q, k from an fp32 norm, v from a bf16 linear
        out = attention(q, k, v.bfloat16())
    torch.testing.assert_close(out.float(), naive_attention(q, k, v), rtol=0.05, atol=0.05)
    assert ops.dtypes == [torch.float32, torch.bfloat16]


def test_jvp_path_follows_the_autocast_dtype():
    """Under bf16 autocast with q, k in fp32 and v in bf16, SDPA (no tangent, F) attends in bf16; the JVP
    path (F-) must too, not in fp32 (review finding 5), with its tangent in bf16 beside it."""
    q, k, v = _qkv(nq=16, nk=40, d=8, dtype=torch.float32)
    tq, tk, tv = _qkv(nq=16, nk=40, d=8, dtype=torch.float32, seed=3)
    v, tv = v.bfloat16(), tv.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = attention(q, k, v)
        out, t_out = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
        with attention_backend("jvp"):
            forced = attention(q, k, v)
    assert ref.dtype == out.dtype == t_out.dtype == forced.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(forced, out, rtol=0, atol=0)  # F and F- through one op: bit-identical
    # The tangent against float64 on the bf16-rounded inputs and tangents: bf16 rounding of tO only.
    low = tuple(x.bfloat16().double() for x in (q, k, v, tq, tk, tv))
    _, t_ref = torch.func.jvp(naive_attention, low[:3], low[3:])
    torch.testing.assert_close(t_out.double(), t_ref, rtol=0, atol=1e-2 * t_ref.abs().max().item())


def test_auto_falls_back_to_sdpa_once_when_xformers_fails(fake_cuda_xformers):
    from scm_mm.nn import attention as dispatch

    fake_cuda_xformers(_FakeXformers(NotImplementedError("no operator found for this device")))
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="no operator found"):
        torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v))
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v))  # no second try, no warning
    assert len(dispatch._xformers_failure) == 1
    assert auto_backends("cuda")[0] == "sdpa"


def test_an_xformers_failure_leaves_only_its_configuration_on_sdpa(fake_cuda_xformers):
    ops = fake_cuda_xformers(_FakeXformers(NotImplementedError("no kernel for head dim 8"), failing_head_dim=8))
    q, k, v = _qkv(d=8)
    with pytest.warns(RuntimeWarning, match="head dim 8"):
        attention(q, k, v)
    wide = _qkv(d=16)
    torch.testing.assert_close(attention(*wide), naive_attention(*wide))
    assert ops.dtypes == [F64]  # head dim 16 still ran on xformers


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_fact_sdpa_under_jvp(mask_kind):
    """Documents a fact: torch 2.14.1 raises NotImplementedError for F.scaled_dot_product_attention
    under torch.func.jvp on CPU, even in float64 and with a mask: it dispatches to
    _scaled_dot_product_flash_attention_for_cpu, which has no forward AD. If a later torch supports
    it, the tangent must then be right."""
    q, k, v = _qkv()
    mask = _mask(mask_kind, 2, 7, 11)
    try:
        _, t_sdpa = _jvp(_sdpa, q, k, v, "qkv", mask)
    except NotImplementedError as e:
        assert "forward AD" in str(e)
    else:
        torch.testing.assert_close(t_sdpa, _jvp(naive_attention, q, k, v, "qkv", mask)[1])


class TinyBlock(nn.Module):
    """qkv Linear -> attention -> Linear, (B, N, C) -> (B, N, C)."""

    def __init__(self, channels: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(attention(q, k, v, mask).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_module_jvp_matches_finite_difference(mask_kind):
    torch.manual_seed(0)
    block = TinyBlock().double()
    x, dx = torch.randn(2, 2, 6, 8, dtype=F64).unbind(0)
    mask = _mask(mask_kind, 2, 6, 6)
    _, t_out = torch.func.jvp(lambda x: block(x, mask), (x,), (dx,))
    eps = 1e-6  # the difference quotient runs without a tangent, so on SDPA: a cross-check too
    with torch.no_grad():
        fd = (block(x + eps * dx, mask) - block(x - eps * dx, mask)) / (2 * eps)
    torch.testing.assert_close(t_out, fd, rtol=0, atol=1e-8)
