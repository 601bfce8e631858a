"""Backbones: shapes, conditioning, JVP vs finite differences, dropout replay, zero-init guidance.

Tiny configs so the whole file runs in seconds on 2 CPU cores.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.func import jvp

from scm_mm.nn.attention import attention_backend
from scm_mm.nn.dit import GRID_AXES, PATCHIFY, UNPATCHIFY, DiT
from scm_mm.nn.embeddings import ConditionEmbedding, PositionalEmbedding, rope_axis_dims, sincos_grid_embedding
from scm_mm.nn.mlp import MLP
from scm_mm.nn.norm import AdaptiveDoubleNorm, pixel_norm
from scm_mm.nn.unet import UNet

B = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on shared cores OpenMP's spin-waits made
    # this file 10-20x slower (80 s vs 5 s on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = ["mlp", "unet1d", "unet2d", "unet3d", "dit1d", "dit2d", "dit3d", "dit1d-rope", "dit2d-factorized"]
DIT_VARIANTS = {"": {}, "rope": {"pos_embed": "rope"}, "factorized": {"pos_embed": "rope", "attention": "factorized"}}
ATTENTION_CASES = [c for c in CASES if c != "mlp"]


def make(case: str, **kw) -> tuple[torch.nn.Module, tuple[int, ...]]:
    """A tiny net of the given family and the shape of its input x."""
    if case == "mlp":
        return MLP(2, hidden=32, depth=2, noise_channels=16, **kw), (B, 2)
    if case.startswith("unet"):
        dims = int(case[4])
        net = UNet(
            2,
            dims=dims,
            model_channels=8,
            channel_mult=(1, 2),
            num_blocks=1,
            head_channels=8,
            **kw,
        )
        return net, (B, 2, *{1: (8,), 2: (8, 8), 3: (4, 4, 4)}[dims])
    dims = int(case[3])
    patch = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[dims]
    variant = DIT_VARIANTS[case[6:]]  # "dit2d-factorized" -> "factorized"
    net = DiT(2, patch_size=patch, hidden=24, depth=2, heads=2, noise_channels=16, **variant, **kw)
    return net, (B, 2, *{1: (8,), 2: (4, 4), 3: (2, 4, 4)}[dims])


@torch.no_grad()
def randomize(net: torch.nn.Module, skip: str | None = None) -> torch.nn.Module:
    """Give the zero-initialised layers random values, or most tests would compare zeros."""
    for name, p in net.named_parameters():
        if (skip is None or skip not in name) and p.abs().max() == 0:
            p.normal_(0.0, 0.2)
    return net


def inputs(shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    x = torch.randn(shape, dtype=dtype)
    c_noise = 1000 * torch.rand(shape[0], dtype=dtype) * math.pi / 2  # 1000·t, t in [0, π/2]
    return x, c_noise


@pytest.mark.parametrize("case", CASES)
def test_shapes_and_conditioning(case: str) -> None:
    torch.manual_seed(0)
    net, shape = make(case, out_channels=3, num_classes=5, guidance_embed=True)
    net = randomize(net).eval()
    x, c = inputs(shape)
    labels = torch.tensor([0, 4])
    y = net(x, c, labels, torch.tensor([1.0, 2.0]))
    assert y.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(y).all()
    # None means "all null"; -1 is the null label; real labels change the output.
    y_none = net(x, c)
    torch.testing.assert_close(net(x, c, torch.full((B,), -1)), y_none, rtol=0, atol=0)
    assert not torch.allclose(net(x, c, labels), y_none)


@pytest.mark.parametrize("case", CASES)
def test_unconditional_rejects_labels_and_guidance(case: str) -> None:
    net, shape = make(case)
    x, c = inputs(shape)
    assert net(x, c).shape == shape
    with pytest.raises(ValueError, match="num_classes=0"):
        net(x, c, torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance_embed=False"):
        net(x, c, guidance=torch.ones(B))


@pytest.mark.parametrize("case", CASES)
def test_jvp_matches_central_difference(case: str) -> None:
    """torch.func.jvp through every net against central differences, and scm_mm.jvp's dual tensors
    (the same forward-mode rules) against torch.func.jvp, in float64."""
    from scm_mm.jvp import jvp as scm_jvp

    torch.manual_seed(1)
    net, shape = make(case, num_classes=5, guidance_embed=True)
    net = randomize(net).double().eval()
    x, c = inputs(shape, torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    labels, s = torch.tensor([3, -1]), torch.tensor([1.5, 1.0], dtype=torch.float64)

    def f(x, c):
        return net(x, c, labels, s)

    y, ty = jvp(f, (x, c), (tx, tc))
    torch.testing.assert_close(y, f(x, c), rtol=1e-12, atol=1e-12)  # rounding only
    h = 1e-6
    fd = (f(x + h * tx, c + h * tc) - f(x - h * tx, c - h * tc)) / (2 * h)
    assert ty.abs().max() > 1e-3  # a non-trivial tangent
    torch.testing.assert_close(ty, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())
    y_dual, ty_dual = scm_jvp(f, (x, c), (tx, tc), mode="dual")
    assert not ty_dual.requires_grad
    torch.testing.assert_close(y_dual, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(ty_dual, ty, rtol=1e-10, atol=1e-10 * ty.abs().max().item())


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_jvp_default_attention_equals_math(case: str) -> None:
    torch.manual_seed(2)
    net, shape = make(case, num_classes=5)
    net = randomize(net).eval()
    x, c = inputs(shape)
    tx, tc = torch.randn_like(x), torch.randn_like(c)

    def f(x, c):
        return net(x, c, torch.tensor([1, -1]))

    y, ty = jvp(f, (x, c), (tx, tc))
    with attention_backend("math"):
        y_ref, ty_ref = jvp(f, (x, c), (tx, tc))
    # float32: the default op may accumulate blockwise, so compare at fp32 precision.
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5 * y_ref.abs().max().item())
    torch.testing.assert_close(ty, ty_ref, rtol=1e-4, atol=1e-5 * ty_ref.abs().max().item())


@pytest.mark.parametrize("case", CASES)
def test_jvp_under_bf16_autocast(case: str) -> None:
    # Catches dtype mismatches between primal and tangent (nn.GroupNorm's affine JVP has one).
    torch.manual_seed(6)
    net, shape = make(case, num_classes=5, guidance_embed=True)
    net = randomize(net).eval()
    x, c = inputs(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = jvp(lambda x, c: net(x, c, torch.tensor([1, -1])), (x, c), (torch.randn_like(x), torch.ones_like(c)))
    assert y.shape == ty.shape == shape
    assert torch.isfinite(ty).all()


def _condition_path(net: torch.nn.Module) -> list[str]:
    """The modules that compute from the condition embedding alone: the embedding itself and the scale,
    shift (AdaptiveDoubleNorm.affine) and gate (DiTBlock.gates) projections of it."""
    return [name for name, _ in net.named_modules() if name == "embed" or name.endswith((".affine", ".gates"))]


@pytest.mark.parametrize("case", ["mlp", "unet2d", "dit2d", "dit1d-rope"])
def test_condition_path_in_fp32_under_bf16_autocast(case: str) -> None:
    """Under bf16 autocast the embedding, the modulation projections and their tangents along the sCM
    direction (cos t sin t (dx_t/dt, 1), c_noise = 1000 t) come out of fp32 computation, equal to an fp32
    run without autocast (bf16 was off by ~0.4%: rCM and Wan keep time embedding and modulation in fp32),
    and the whole net's output and tangent stay close to the fp32 run's."""
    from torch.autograd import forward_ad

    from scm_mm.jvp import jvp as scm_jvp

    torch.manual_seed(14)
    net, shape = make(case, num_classes=5, guidance_embed=True)
    net = randomize(net).eval()
    x = torch.randn(shape)
    t = torch.tensor([0.2, 1.3])
    cs = (t.cos() * t.sin())[:, None]
    tx = cs.reshape(B, *[1] * (x.ndim - 1)) * torch.randn_like(x)
    labels, s = torch.tensor([1, -1]), torch.tensor([1.5, 1.0])

    def run() -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name: str):  # type: ignore[no-untyped-def]
            def record(module, args, out):  # type: ignore[no-untyped-def]
                dual = forward_ad.unpack_dual(out)
                assert dual.tangent is not None, name
                seen[f"{name}#{len(seen)}"] = (dual.primal.clone(), dual.tangent.clone())

            return record

        modules = dict(net.named_modules())
        handles = [modules[name].register_forward_hook(hook(name)) for name in _condition_path(net)]
        try:
            y, ty = scm_jvp(lambda x, c: net(x, c, labels, s), (x, 1000 * t), (tx, 1000 * cs[:, 0]))
        finally:
            for handle in handles:
                handle.remove()
        return y, ty, seen

    y_ref, ty_ref, ref = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty, out = run()
    assert len(ref) >= 2 and any(k.startswith("embed#") for k in ref)
    assert out.keys() == ref.keys()
    for key, (primal, tangent) in out.items():
        assert primal.dtype == tangent.dtype == torch.float32, key
        for a, b in zip((primal, tangent), ref[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()), msg=key)
    # The backbone runs in bf16, so the whole net is only close: 0.04-0.7% relative here.
    for a, b in ((y, y_ref), (ty, ty_ref)):
        assert torch.isfinite(a).all()
        assert float((a.float() - b).norm() / b.norm()) < 0.02


@pytest.mark.parametrize("case", CASES)
def test_dropout_replays_under_fixed_rng(case: str) -> None:
    torch.manual_seed(3)
    net, shape = make(case, dropout=0.3)
    net = randomize(net).train()
    x, c = inputs(shape)

    def run(seed: int, tangent: bool = False) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if tangent:  # the sCM loss's JVP pass must see the masks of the plain pass
                return jvp(net, (x, c), (torch.ones_like(x), torch.ones_like(c)))[0]
            return net(x, c)

    y = run(0)
    torch.testing.assert_close(run(0), y, rtol=0, atol=0)
    # Same masks; the dual-tensor kernels may round differently, hence fp32 tolerances (a few ulps of
    # outputs up to about 3; a different mask would differ by order 1).
    torch.testing.assert_close(run(0, tangent=True), y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(1), y)  # dropout is active


@pytest.mark.parametrize("case", CASES)
def test_guidance_linear_starts_at_zero(case: str) -> None:
    torch.manual_seed(4)
    net, shape = make(case, guidance_embed=True)
    net = randomize(net, skip="guidance").eval()
    x, c = inputs(shape)
    y1 = net(x, c, guidance=torch.full((B,), 1.0))
    torch.testing.assert_close(net(x, c, guidance=torch.full((B,), 2.0)), y1, rtol=0, atol=0)
    torch.testing.assert_close(net(x, c), y1, rtol=0, atol=0)  # None = s of 1
    randomize(net)  # now the guidance input is wired to something
    assert not torch.allclose(net(x, c, guidance=torch.full((B,), 2.0)), net(x, c))


BAD_SHAPES = [
    ("mlp", (B, 2, 1), r"expects x of shape \(B, 2\)"),
    ("mlp", (B, 3), r"expects x of shape \(B, 2\)"),
    ("unet2d", (B, 2, 8), r"expects x of 4 dims"),
    ("unet2d", (B, 3, 8, 8), r"expects 2 channels"),
    ("unet2d", (B, 2, 8, 7), r"size 7, not divisible by 2"),
    ("unet3d", (B, 2, 3, 4, 4), r"axis t has size 3, not divisible by 2"),
    ("dit2d", (B, 2, 4, 4, 4), r"expects x of 4 dims"),
    ("dit1d", (B, 5, 8), r"expects 2 channels"),
    ("dit3d", (B, 2, 2, 4, 5), r"not divisible by patch_size \(1, 2, 2\)"),
]


@pytest.mark.parametrize("case,shape,message", BAD_SHAPES)
def test_bad_shapes_raise(case: str, shape: tuple[int, ...], message: str) -> None:
    net, _ = make(case)
    x, c = inputs(shape)
    with pytest.raises(ValueError, match=message):
        net(x, c)


@pytest.mark.parametrize("case", ["mlp", "unet1d", "dit2d"])
def test_bad_condition_shapes_raise(case: str) -> None:
    net, shape = make(case, num_classes=5, guidance_embed=True)
    x, c = inputs(shape)
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        net(x, c[:1])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        net(x, c, torch.ones(B))
    with pytest.raises(ValueError, match=r"guidance must have shape \(2,\)"):
        net(x, c, guidance=torch.ones(B, 1))


def test_unet_resample_axes_keep_frames() -> None:
    net = UNet(2, dims=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, resample_axes=(1, 2))
    x, c = inputs((1, 2, 3, 4, 4))  # 3 frames: only h and w are halved
    assert net(x, c).shape == x.shape


def test_dit_variable_length_and_cubic_patches() -> None:
    net, _ = make("dit1d")
    for frames in (4, 10):
        x, c = inputs((B, 2, frames))
        assert net(x, c).shape == x.shape
    net = DiT(2, patch_size=(2, 2, 2), hidden=24, depth=1, heads=2, noise_channels=16)
    x, c = inputs((1, 2, 4, 2, 6))
    assert net(x, c).shape == x.shape


def test_rope_split_and_attention_layouts_by_dims() -> None:
    assert rope_axis_dims(64, 1) == (64,)
    assert rope_axis_dims(64, 2) == (32, 32)
    assert rope_axis_dims(66, 2) == (34, 32)  # the first axis takes the remainder, as Wan's time axis
    with pytest.raises(ValueError, match="2-D RoPE needs an even head_dim >= 4"):
        DiT(2, hidden=6, heads=2, pos_embed="rope")  # head_dim 3
    with pytest.raises(ValueError, match="needs 2-D or 3-D patches"):
        DiT(2, patch_size=(2,), attention="factorized")
    net, shape = make("dit2d-factorized")
    assert [block.group for block in net.blocks] == ["spatial", "temporal"]
    assert net(*inputs(shape)).shape == shape


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_patchify_roundtrip(ndim: int) -> None:
    patch = {f"p{i + 1}": p for i, p in enumerate((2, 3, 1)[:ndim])}
    x = torch.randn(2, 3, *(4, 6, 5)[:ndim])
    grid = dict(zip(GRID_AXES[ndim], (2, 2, 5)[:ndim]))
    tokens = rearrange(x, PATCHIFY[ndim], **patch)
    assert tokens.shape == (2, math.prod((2, 2, 5)[:ndim]), 3 * math.prod(patch.values()))
    torch.testing.assert_close(rearrange(tokens, UNPATCHIFY[ndim], **patch, **grid), x, rtol=0, atol=0)


# ---- the pieces ----


def test_positional_embedding_float32_under_autocast() -> None:
    pos = PositionalEmbedding(8)
    t = torch.tensor([0.0, 1570.8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = pos(t)
    assert e.dtype == torch.float32 and e.shape == (2, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert pos(t.double()).dtype == torch.float64


@pytest.mark.parametrize("mode", ["dual", "func"])
def test_condition_embedding_and_tangent_in_fp32_under_autocast(mode: str) -> None:
    """The time MLP, label rows and guidance linear run in fp32 under bf16 autocast: emb and d emb/dt (the
    library's jvp, along c_noise = 1000 t) equal an fp32 run without autocast to fp32 precision; in bf16
    they were 0.43% and 0.45% off (review of scm_mm/nn, finding 4)."""
    from scm_mm.jvp import jvp as scm_jvp

    torch.manual_seed(13)
    emb = randomize(ConditionEmbedding(64, noise_channels=32, num_classes=5, guidance_embed=True))
    t = torch.rand(8) * 1.5 + 0.05
    labels, s = torch.tensor([0, 1, 2, 3, 4, -1, -1, 2]), 1 + torch.rand(8)

    def f(c: torch.Tensor) -> torch.Tensor:
        return emb(c, labels, s)

    ref = scm_jvp(f, (1000 * t,), (1000 * t.cos() * t.sin(),), mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scm_jvp(f, (1000 * t,), (1000 * t.cos() * t.sin(),), mode=mode)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_adaptive_double_norm_modulation_in_fp32_under_autocast(norm: str) -> None:
    """Scale and shift come from an fp32 projection of the embedding under bf16 autocast: with fp32 x and
    emb, the output and its tangent equal the fp32 run's (a bf16 projection was ~0.3% off)."""
    from scm_mm.jvp import jvp as scm_jvp

    torch.manual_seed(15)
    ours = AdaptiveDoubleNorm(32, 48, norm=norm, groups=4, channels_last=True)
    x, emb = torch.randn(3, 5, 32), torch.randn(3, 48)
    tangents = (torch.randn_like(x), torch.randn_like(emb))
    ref = scm_jvp(ours, (x, emb), tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scm_jvp(ours, (x, emb), tangents)
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_condition_embedding_null_row_and_rejects_bad_labels() -> None:
    emb = ConditionEmbedding(16, noise_channels=8, num_classes=3)
    c = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(emb(c), emb(c, torch.tensor([-1, -1])))
    with pytest.raises(IndexError):
        emb(c, torch.tensor([3, 0]))  # 3 would silently alias the null row if it were allowed


def test_sincos_grid_embedding_factorized() -> None:
    e = sincos_grid_embedding((2, 3), 10)  # 2 axes x 4 channels, 2 zero-padded
    assert e.shape == (6, 10)
    assert (e[:, 8:] == 0).all()
    # Row-major tokens: axis-0 code constant along a row, axis-1 code constant down a column.
    assert torch.equal(e[0, :4], e[2, :4]) and torch.equal(e[1, 4:8], e[4, 4:8])
    # The code of position i does not depend on the grid length (variable frame counts).
    torch.testing.assert_close(sincos_grid_embedding((5,), 8)[:3], sincos_grid_embedding((3,), 8))


def test_pixel_norm_unit_rms() -> None:
    x = torch.randn(4, 7, 3) * 5
    torch.testing.assert_close(pixel_norm(x, dim=1).square().mean(1), torch.ones(4, 3))


def test_adaptive_double_norm_layouts_agree() -> None:
    torch.manual_seed(5)
    emb = torch.randn(2, 6)
    for norm in ("group", "layer"):
        first = AdaptiveDoubleNorm(8, 6, norm=norm, groups=2)
        last = AdaptiveDoubleNorm(8, 6, norm=norm, groups=2, channels_last=True)
        last.load_state_dict(first.state_dict())
        x = torch.randn(2, 8, 5)  # (B, C, N)
        y = first(x, emb)
        torch.testing.assert_close(last(x.transpose(1, 2), emb), y.transpose(1, 2))
    with pytest.raises(ValueError, match="expects 8 channels"):
        first(torch.randn(2, 7, 5), emb)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_jvp_and_backward_match_stock_convolution(dims: int) -> None:
    """scm_mm.nn.layers's forward-mode rule and backward equal PyTorch's, in float64."""
    from scm_mm.nn.layers import CONV

    torch.manual_seed(3)
    ours = CONV[dims](3, 4, 3, stride=2, padding=1).double()
    stock = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims](3, 4, 3, stride=2, padding=1).double()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, *([6] * dims), dtype=torch.float64, requires_grad=True)
    tx = torch.randn_like(x)
    y, ty = jvp(ours, (x,), (tx,))
    y_ref, ty_ref = jvp(stock, (x,), (tx,))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ty, ty_ref)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, t_all = jvp(lambda p, a: torch.func.functional_call(ours, p, (a,)), (params, x), (tangents, tx))
    _, t_all_ref = jvp(lambda p, a: torch.func.functional_call(stock, p, (a,)), (params, x), (tangents, tx))
    torch.testing.assert_close(t_all, t_all_ref)
    from scm_mm.nn.layers import _ConvJVP

    assert torch.autograd.gradcheck(
        lambda a, w, b: _ConvJVP.apply(a, w, b, ours.stride, ours.padding, ours.dilation, 1, (True, True)),
        (x, ours.weight.detach().clone().requires_grad_(), ours.bias.detach().clone().requires_grad_()),
        check_forward_ad=True,
    )


def test_linear_jvp_and_backward_match_stock_linear() -> None:
    from scm_mm.nn.layers import Linear, _LinearJVP

    torch.manual_seed(4)
    ours = Linear(5, 3).double()
    stock = torch.nn.Linear(5, 3).double()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    tx = torch.randn_like(x)
    torch.testing.assert_close(jvp(ours, (x,), (tx,)), jvp(stock, (x,), (tx,)))
    params = {k: v.detach() for k, v in ours.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, t_all = jvp(lambda p, a: torch.func.functional_call(ours, p, (a,)), (params, x), (tangents, tx))
    _, t_all_ref = jvp(lambda p, a: torch.func.functional_call(stock, p, (a,)), (params, x), (tangents, tx))
    torch.testing.assert_close(t_all, t_all_ref)
    assert torch.autograd.gradcheck(
        lambda a, w, b: _LinearJVP.apply(a, w, b, (True, True)),
        (x, ours.weight.detach().clone().requires_grad_(), ours.bias.detach().clone().requires_grad_()),
        check_forward_ad=True,
    )


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["dual", "func"])
def test_no_grad_jvp_makes_no_zero_tangents_for_the_weights(layer: str, mode: str) -> None:
    """Under no_grad the weights ride outside autograd's view: the same tangent as the stock layer's,
    with no zeros_like of a weight or bias per call."""
    from scm_mm.jvp import jvp as scm_jvp
    from scm_mm.nn.layers import Conv2d, Linear

    torch.manual_seed(4)
    if layer == "linear":
        ours, stock, x = Linear(6, 5).double(), torch.nn.Linear(6, 5).double(), torch.randn(3, 6, dtype=torch.float64)
    else:
        ours, stock = Conv2d(3, 4, 3, padding=1).double(), torch.nn.Conv2d(3, 4, 3, padding=1).double()
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    stock.load_state_dict(ours.state_dict())
    tx = torch.randn_like(x)
    with torch.profiler.profile() as prof:
        y, ty = scm_jvp(ours, (x,), (tx,), mode=mode)
    assert not [e for e in prof.events() if e.name == "aten::zeros_like"]
    y_ref, ty_ref = scm_jvp(stock, (x,), (tx,), mode=mode)
    torch.testing.assert_close((y, ty), (y_ref, ty_ref), rtol=1e-12, atol=1e-12)


def _stock_norms() -> dict:
    """Each normalisation of scm_mm.nn.norm beside the stock op it replaces while a tangent is live."""
    from scm_mm.nn.norm import GroupNorm, RMSNorm

    torch.manual_seed(7)
    group, rms = GroupNorm(2, 6, eps=1e-6), RMSNorm(5, eps=1e-6)
    with torch.no_grad():  # gains and a bias away from their (1, 0) init
        group.weight.normal_(1.0, 0.3)
        group.bias.normal_(0.0, 0.3)
        rms.weight.normal_(1.0, 0.3)
    return {
        "group": (group.double(), lambda x: F.group_norm(x, 2, group.weight, group.bias, 1e-6), (3, 6, 4, 2)),
        "rms": (rms.double(), lambda x: F.rms_norm(x, (5,), rms.weight, 1e-6), (3, 4, 5)),
        "pixel": (lambda x: pixel_norm(x, dim=1), lambda x: x * (x.square().mean(1, keepdim=True) + 1e-8).rsqrt(),
                  (3, 7, 2)),  # fmt: skip
    }


@pytest.mark.parametrize("name", ["group", "rms", "pixel"])
@pytest.mark.parametrize("mode", ["dual", "func"])
def test_norm_jvp_rules_match_stock_without_zero_tensors(name: str, mode: str) -> None:
    """The hand-written rules of the normalisations equal the stock ops' forward-mode AD in float64,
    and a JVP builds no ZeroTensor (whose arithmetic costs 130-450 us a call in torch 2.14)."""
    from scm_mm.jvp import jvp as scm_jvp

    ours, stock, shape = _stock_norms()[name]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    tx = torch.randn_like(x)
    with torch.profiler.profile() as prof:
        y, ty = scm_jvp(ours, (x,), (tx,), mode=mode)
    assert not [e for e in prof.events() if e.name == "aten::_efficientzerotensor"]
    y_ref, ty_ref = jvp(stock, (x,), (tx,))
    torch.testing.assert_close((y, ty), (y_ref, ty_ref), rtol=1e-12, atol=1e-12)
    # Under grad (torch.func.jvp with autograd on) the gain takes the stock product; same tangent.
    torch.testing.assert_close(jvp(ours, (x,), (tx,)), (y_ref, ty_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_adaptive_double_norm_jvp_matches_stock(norm: str) -> None:
    from scm_mm.jvp import jvp as scm_jvp

    torch.manual_seed(8)
    ours = AdaptiveDoubleNorm(8, 6, norm=norm, groups=2, channels_last=True).double()
    x, emb = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.randn_like(emb))

    def stock(x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if norm == "group":
            h = F.group_norm(x.transpose(1, 2), 2, eps=ours.eps).transpose(1, 2)
        else:
            h = F.layer_norm(x, (8,), eps=ours.eps)
        scale, shift = (s * (s.square().mean(1, keepdim=True) + 1e-8).rsqrt() for s in ours.affine(emb).chunk(2, 1))
        return h * scale[:, None] + shift[:, None]

    y_ref, ty_ref = jvp(stock, (x, emb), tangents)
    torch.testing.assert_close(scm_jvp(ours, (x, emb), tangents), (y_ref, ty_ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("center", [True, False])
def test_normalize_and_rotate_functions_gradcheck(center: bool) -> None:
    """The Functions' jvp and backward against numerical derivatives (both directions of the Jacobian)."""
    from scm_mm.nn.embeddings import _Rotate, rope_rotation
    from scm_mm.nn.norm import _Normalize

    torch.manual_seed(9)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _Normalize.apply(a, center, 1e-3)[0], (x,), check_forward_ad=True)
    angles = torch.rand(4, 3, dtype=torch.float64) * 6
    assert torch.autograd.gradcheck(
        lambda a: _Rotate.apply(a, rope_rotation(angles.cos(), angles.sin())), (x,), check_forward_ad=True
    )


@pytest.mark.parametrize("center", [True, False])
def test_normalize_tangent_stays_fp32_under_autocast(center: bool) -> None:
    """The norms' statistics and tangent run in fp32 whatever autocast says (STYLE 5): under CPU bf16
    autocast the tangent equals the one without autocast to fp32 rounding, not bf16's 4e-4."""
    from scm_mm.jvp import jvp as scm_jvp
    from scm_mm.nn.norm import _Normalize

    torch.manual_seed(11)
    x, tx = torch.randn(4, 80, 384) * 3 + 1, torch.randn(4, 80, 384)
    ref = scm_jvp(lambda a: _Normalize.apply(a, center, 1e-6)[0], (x,), (tx,))[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scm_jvp(lambda a: _Normalize.apply(a, center, 1e-6)[0], (x,), (tx,))[1]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_linear_backward_with_a_live_tangent_under_autocast() -> None:
    """A with-grad pass that also carries a tangent (one-pass JVP) goes through `_LinearJVP`, whose
    backward, run outside autocast, meets a bf16 output gradient and fp32 inputs: the gradients equal
    the stock layer's."""
    from torch.autograd import forward_ad

    from scm_mm.nn.layers import Linear

    torch.manual_seed(12)
    layer = Linear(16, 8)
    x, tx = torch.randn(4, 16), torch.randn(4, 16)

    def grads(tangent: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), forward_ad.dual_level():
            y = forward_ad.unpack_dual(layer(forward_ad.make_dual(xg, tx) if tangent else xg)).primal
        y.float().square().sum().backward()  # outside autocast, as the training loop does
        assert xg.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None
        return [xg.grad, layer.weight.grad, layer.bias.grad]

    for ours, stock in zip(grads(True), grads(False), strict=True):
        assert ours.dtype == stock.dtype == torch.float32
        torch.testing.assert_close(ours, stock, rtol=1e-2, atol=1e-2)


def test_rope_jvp_is_the_rotated_tangent() -> None:
    from scm_mm.jvp import jvp as scm_jvp
    from scm_mm.nn.embeddings import apply_rope, rope_angles

    torch.manual_seed(10)
    angles = rope_angles((2, 3), 12)  # (6, 6) float64
    cos, sin = angles.cos(), angles.sin()
    q = torch.randn(2, 3, 6, 12, dtype=torch.float64)
    tq = torch.randn_like(q)
    with torch.profiler.profile() as prof:
        y, ty = scm_jvp(lambda a: apply_rope(a, cos, sin), (q,), (tq,))
    assert not [e for e in prof.events() if e.name == "aten::_efficientzerotensor"]
    torch.testing.assert_close((y, ty), (apply_rope(q, cos, sin), apply_rope(tq, cos, sin)), rtol=0, atol=1e-14)
    q.requires_grad_(True)
    (apply_rope(q, cos, sin) * tq).sum().backward()  # without a tangent: the stock ops' backward
    assert q.grad is not None
    torch.testing.assert_close(q.grad, apply_rope(tq, cos, -sin))


def test_jvp_kernel_count_of_the_video_dit() -> None:
    """bench/step_time.py --count-kernels (runs, so it cannot rot), and a guard on what it counts: a JVP of
    the video DiT-S at 80 tokens launches at most 2.72x the kernels of a forward (2.71x with the rules of
    scm_mm.nn now, 1,652 / 610; 2.69x before the attention's forward handed its jvp an fp32 O, or an empty
    placeholder per call in fp32, which the count takes for fresh memory; 2.76x before RoPE, the norms'
    tangent and the residuals took fewer kernels, 2.57x before
    the RoPE rotation was built once per forward, which took as many kernels from the forward as from the
    JVP). Counts, not times: a GPU launches each one (docs/benchmarks.md 2)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "step_time.py"
    cmd = [sys.executable, str(script), "--nets", "video-dit-s", "--batch", "1", "--shape", "16", "5", "8", "8"]
    out = subprocess.run([*cmd, "--count-kernels", "--device", "cpu"], check=True, capture_output=True, text=True)
    forward, jvp_kernels = map(int, re.search(r"forward (\d+) kernels, JVP (\d+)", out.stdout).groups())
    assert jvp_kernels <= 2.72 * forward, out.stdout


def test_step_time_times_class_conditional_distillation_with_cfg() -> None:
    """bench/step_time.py --cfg runs (the sCD student takes the scale, its teacher is guided) and prints its row."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "step_time.py"
    cmd = [sys.executable, str(script), "--nets", "mnist-tiny", "--batch", "2", "--repeats", "1", "--cfg"]
    out = subprocess.run([*cmd, "--device", "cpu"], check=True, capture_output=True, text=True)
    assert "| mnist-tiny | 1.03M | 2x1x16x16 |" in out.stdout, out.stdout
