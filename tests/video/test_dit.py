"""VideoDiT: JVP against finite differences and naive attention, backends, RoPE, factorized attention,
conditioning, shapes and errors, and the presets' parameter counts.

Sources of truth: float64 central differences; torch.func.jvp through naive attention ("math");
the core DiT (a sincos/full VideoDiT is the same function); full attention under a block mask (for
the factorized groups); Wan's complex-number RoPE; a closed-form parameter count.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch.func import jvp

from scm_mm.nn.attention import attention_backend, naive_attention
from scm_mm.nn.dit import DiT, SelfAttention
from scm_mm.nn.embeddings import apply_rope, rope_angles, rope_axis_dims, rope_rotation
from scm_mm.train.checkpoint import build_from_spec, canonical_spec
from scm_mm_video.dit import VideoDiT
from scm_mm_video.presets import (
    PARAM_COUNTS,
    VIDEO_NET_PRESETS,
    build_video_net,
    token_count,
    video_net_spec,
)

B = 2
SHAPE = (B, 2, 3, 4, 4)  # (B, C, T, H, W): a 3 x 2 x 2 token grid with (1, 2, 2) patches
MODES = [(a, p) for a in ("full", "factorized") for p in ("rope", "sincos")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; OpenMP spin-waits on shared cores cost 10x
    yield
    torch.set_num_threads(threads)


def make(attention: str = "full", pos_embed: str = "rope", **kw) -> VideoDiT:
    """A tiny VideoDiT: head_dim 12, so RoPE gives 4/4/4 channels to t/h/w."""
    kw = {"hidden": 24, "depth": 2, "heads": 2, "noise_channels": 16, **kw}
    return VideoDiT(2, attention=attention, pos_embed=pos_embed, **kw)


@torch.no_grad()
def randomize(net: torch.nn.Module, skip: str | None = None) -> torch.nn.Module:
    """Give the zero-initialised layers (gates, output, guidance) random values."""
    for name, p in net.named_parameters():
        if (skip is None or skip not in name) and p.abs().max() == 0:
            p.normal_(0.0, 0.2)
    return net


def inputs(shape=SHAPE, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(shape, dtype=dtype)
    return x, 1000 * torch.rand(shape[0], dtype=dtype) * math.pi / 2  # c_noise = 1000 t


# ------------------------------------------------------------------------------------------------ JVP


@pytest.mark.parametrize("attention,pos_embed", MODES)
def test_jvp_matches_central_difference_and_naive_attention(attention: str, pos_embed: str) -> None:
    torch.manual_seed(0)
    net = randomize(make(attention, pos_embed, num_classes=3, guidance_embed=True)).double().eval()
    x, c = inputs(dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    labels, s = torch.tensor([2, -1]), torch.tensor([1.5, 1.0], dtype=torch.float64)

    def f(x, c):
        return net(x, c, labels, s)

    y, ty = jvp(f, (x, c), (tx, tc))  # "auto": the JVP-capable blockwise op
    torch.testing.assert_close(y, f(x, c), rtol=1e-12, atol=1e-12)
    h = 1e-6
    fd = (f(x + h * tx, c + h * tc) - f(x - h * tx, c - h * tc)) / (2 * h)
    assert ty.abs().max() > 1e-2  # a non-trivial tangent
    torch.testing.assert_close(ty, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())
    for backend in ("jvp", "math"):  # forced blockwise op; naive softmax(q k^T) v, the reference
        with attention_backend(backend):
            y_ref, ty_ref = jvp(f, (x, c), (tx, tc))
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ty, ty_ref, rtol=1e-10, atol=1e-12)


def test_jvp_under_bf16_autocast_is_finite() -> None:
    torch.manual_seed(1)
    net = randomize(make("factorized", "rope", num_classes=3)).eval()
    x, c = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ty = jvp(lambda x, c: net(x, c, torch.tensor([1, -1])), (x, c), (torch.randn_like(x), torch.ones_like(c)))
    assert y.shape == ty.shape == x.shape and torch.isfinite(ty).all()


def test_dropout_masks_replay_under_jvp() -> None:
    torch.manual_seed(2)
    net = randomize(make(dropout=0.3)).train()
    x, c = inputs()

    def run(seed: int, tangent: bool = False) -> torch.Tensor:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if tangent:  # sCM's JVP pass must see the masks of the plain pass
                return jvp(net, (x, c), (torch.ones_like(x), torch.ones_like(c)))[0]
            return net(x, c)

    y = run(0)
    torch.testing.assert_close(run(0, tangent=True), y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(1), y)  # dropout is active


# ------------------------------------------------------------------------------------------- backends


def _backend_outputs(attention: str, pos_embed: str, backends: list[str], device: str) -> None:
    """The same weights through each backend give naive attention's output (float32 tolerances)."""
    torch.manual_seed(3)
    net = randomize(make(attention, pos_embed, num_classes=3)).eval().to(device)
    x, c = (a.to(device) for a in inputs())
    labels = torch.tensor([0, 2], device=device)
    with torch.no_grad(), attention_backend("math"):
        ref = net(x, c, labels)
    for backend in backends:
        with torch.no_grad(), attention_backend(backend):
            torch.testing.assert_close(net(x, c, labels), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("attention,pos_embed", MODES)
def test_backends_agree(attention: str, pos_embed: str) -> None:
    _backend_outputs(attention, pos_embed, ["sdpa", "jvp", "auto"], "cpu")


@pytest.mark.parametrize("attention,pos_embed", MODES)
def test_xformers_agrees_on_cuda(attention: str, pos_embed: str) -> None:
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        pytest.skip("xformers and CUDA are needed")
    _backend_outputs(attention, pos_embed, ["xformers", "sdpa", "jvp"], "cuda")


def test_sincos_full_is_the_core_dit() -> None:
    """Same parameter names and the same function as scm_mm.nn.dit.DiT with (1, 2, 2) patches."""
    torch.manual_seed(4)
    kw = {"hidden": 24, "depth": 2, "heads": 2, "noise_channels": 16, "num_classes": 3, "guidance_embed": True}
    core = randomize(DiT(2, patch_size=(1, 2, 2), **kw)).eval()
    net = VideoDiT(2, pos_embed="sincos", attention="full", **kw).eval()
    net.load_state_dict(core.state_dict())  # strict: same keys and shapes
    x, c = inputs()
    args = (torch.tensor([1, -1]), torch.tensor([1.0, 1.7]))
    torch.testing.assert_close(net(x, c, *args), core(x, c, *args), rtol=0, atol=0)


@pytest.mark.parametrize("group", ["spatial", "temporal"])
def test_factorized_groups_equal_masked_full_attention(group: str) -> None:
    """Spatial attention = full attention where only same-frame tokens see each other; temporal = only
    same-position tokens. Checks the regrouping against a mask over the (t h w) token order."""
    torch.manual_seed(5)
    grid = (3, 2, 4)
    attn = randomize(SelfAttention(24, 2)).double()
    x = torch.randn(B, math.prod(grid), 24, dtype=torch.float64)
    angles = rope_angles(grid, 12)
    cos, sin = angles.cos(), angles.sin()
    t, hw = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1] * grid[2]), indexing="ij")
    key = (t if group == "spatial" else hw).reshape(-1)  # tokens with equal key attend to each other
    mask = key[:, None] == key[None, :]  # (N, N)

    q, k, v = attn.qkv(x).unflatten(-1, (3, 2, 12)).permute(2, 0, 3, 1, 4)  # (B, heads, N, head_dim) each
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    ref = attn.proj(naive_attention(q, k, v, mask).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, rope_rotation(cos, sin), group, grid), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------- RoPE


def test_rope_split_is_wans() -> None:
    assert rope_axis_dims(128, 3) == (44, 42, 42)  # video.md §4: Wan's 42/42 and the remainder
    assert rope_axis_dims(64, 3) == (24, 20, 20)
    assert rope_axis_dims(12, 3) == (4, 4, 4)
    for bad in (5, 7, 4):
        with pytest.raises(ValueError, match="even head_dim >= 6"):
            rope_axis_dims(bad)


def test_rope_equals_wans_complex_rotation() -> None:
    """Wan's rope_apply: x as complex pairs times exp(i angle), angles per axis from rope_params."""
    grid, d, theta = (3, 4, 5), 24, 500.0
    x = torch.randn(2, 3, math.prod(grid), d, dtype=torch.float64)
    angles = rope_angles(grid, d, theta)
    ours = apply_rope(x, angles.cos(), angles.sin())
    dt, dh, dw = rope_axis_dims(d)
    freqs = [theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n) for n in (dt, dh, dw)]
    t, h, w = (a.reshape(-1) for a in torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"))
    ref_angles = torch.cat([torch.outer(t, freqs[0]), torch.outer(h, freqs[1]), torch.outer(w, freqs[2])], 1)
    rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
        torch.ones_like(ref_angles), ref_angles
    )
    torch.testing.assert_close(ours, torch.view_as_real(rotated).flatten(-2), rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_on_relative_offsets_only() -> None:
    torch.manual_seed(6)
    grid, d = (6, 5, 7), 30
    angles = rope_angles(grid, d, theta=100.0)
    cos, sin = angles.cos(), angles.sin()
    q, k = torch.randn(2, d, dtype=torch.float64)
    n = math.prod(grid)
    rq, rk = apply_rope(q.expand(n, d), cos, sin), apply_rope(k.expand(n, d), cos, sin)  # same q, k everywhere
    scores = (rq @ rk.T).reshape(*grid, *grid)  # score[p, p'] = <R(p) q, R(p') k>

    def at(p, r):
        return scores[p[0], p[1], p[2], r[0], r[1], r[2]]

    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        p, r, shifted_p, shifted_r = ([0] * 3 for _ in range(4))
        for axis, size in enumerate(grid):
            a, b = torch.randint(0, size, (2,), generator=gen).tolist()
            lo, hi = -min(a, b), size - 1 - max(a, b)
            s = int(torch.randint(lo, hi + 1, (1,), generator=gen))
            p[axis], r[axis], shifted_p[axis], shifted_r[axis] = a, b, a + s, b + s
        torch.testing.assert_close(at(p, r), at(shifted_p, shifted_r), rtol=1e-12, atol=1e-12)
    # ... and they do depend on the offset along each axis (the code is not trivial).
    assert not torch.isclose(at((0, 0, 0), (0, 0, 0)), at((0, 0, 0), (1, 0, 0)))
    assert not torch.isclose(at((0, 0, 0), (0, 0, 0)), at((0, 0, 0), (0, 1, 0)))
    assert not torch.isclose(at((0, 0, 0), (0, 0, 0)), at((0, 0, 0), (0, 0, 1)))


# ------------------------------------------------------------------------------- init, shapes, errors


@pytest.mark.parametrize("attention,pos_embed", MODES)
def test_output_and_jvp_are_zero_at_init(attention: str, pos_embed: str) -> None:
    net = make(attention, pos_embed, num_classes=3, guidance_embed=True)
    x, c = inputs()
    y, ty = jvp(net, (x, c), (torch.randn_like(x), torch.ones_like(c)))
    assert (y == 0).all() and (ty == 0).all()


@pytest.mark.parametrize(
    "patch,shape",
    [((1, 2, 2), (1, 2, 1, 4, 4)), ((1, 2, 2), (1, 2, 2, 4, 6)), ((1, 2, 2), (1, 2, 5, 2, 2)),
     ((2, 2, 2), (1, 2, 4, 4, 4)), ((2, 2, 2), (1, 2, 6, 2, 4)), ((1, 1, 1), (1, 2, 2, 3, 3))],  # fmt: skip
)
def test_shapes_for_several_frame_counts(patch: tuple[int, ...], shape: tuple[int, ...]) -> None:
    for attention in ("full", "factorized"):
        net = randomize(make(attention, patch_size=patch, out_channels=3))
        assert net.patch_size == patch
        x, c = inputs(shape)
        y = net(x, c)
        assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()


BAD_INPUTS = [
    ((B, 2, 4, 4), r"expects x of 5 dims \(B, C, T, H, W\)"),
    ((B, 3, 2, 4, 4), r"expects 2 channels"),
    ((B, 2, 3, 4, 4), r"axis T has size 3, not divisible by patch_size \(2, 2, 2\)"),
    ((B, 2, 2, 5, 4), r"axis H has size 5"),
    ((B, 2, 2, 4, 6), None),  # fine
]


@pytest.mark.parametrize("shape,message", BAD_INPUTS)
def test_bad_shapes_raise(shape: tuple[int, ...], message: str | None) -> None:
    net = make(patch_size=(2, 2, 2))
    x, c = inputs(shape)
    if message is None:
        assert net(x, c).shape == shape
        return
    with pytest.raises(ValueError, match=message):
        net(x, c)


def test_bad_arguments_raise() -> None:
    net = make(num_classes=3, guidance_embed=True)
    x, c = inputs()
    with pytest.raises(ValueError, match=r"c_noise must have shape \(2,\)"):
        net(x, c[:1])
    with pytest.raises(ValueError, match=r"guidance must have shape \(2,\)"):
        net(x, c, guidance=torch.ones(B, 1))
    with pytest.raises(ValueError, match="num_classes=0"):
        make()(x, c, torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance_embed=False"):
        make()(x, c, guidance=torch.ones(B))
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        make(pos_embed="learned")
    with pytest.raises(ValueError, match="attention must be one of"):
        make(attention="axial")
    with pytest.raises(ValueError, match="patch_size must be 3 positive ints"):
        make(patch_size=(2, 2))
    with pytest.raises(ValueError, match="even head_dim >= 6"):
        make(hidden=20, heads=4)  # head_dim 5
    make(hidden=20, heads=4, pos_embed="sincos")  # sin-cos positions take any head_dim


def test_class_and_guidance_conditioning() -> None:
    torch.manual_seed(7)
    net = randomize(make("factorized", num_classes=5, guidance_embed=True), skip="guidance").eval()
    x, c = inputs()
    y_none = net(x, c)
    torch.testing.assert_close(net(x, c, torch.full((B,), -1)), y_none, rtol=0, atol=0)  # -1 = null
    assert not torch.allclose(net(x, c, torch.tensor([0, 4])), y_none)
    # The guidance input starts at zero (a student initialised from its teacher, App. G.2) ...
    torch.testing.assert_close(net(x, c, guidance=torch.full((B,), 2.0)), y_none, rtol=0, atol=0)
    randomize(net)  # ... and is wired to the output once its layer is not zero.
    assert not torch.allclose(net(x, c, guidance=torch.full((B,), 2.0)), net(x, c))


# -------------------------------------------------------------------------------------------- presets


def closed_form_count(preset: dict, in_channels: int, noise_channels: int = 256) -> int:
    """Parameters of an unconditional VideoDiT, layer by layer (Linear = in*out + out)."""
    h, depth, heads = preset["hidden"], preset["depth"], preset["heads"]
    voxels = math.prod(preset["patch_size"])
    embed = (noise_channels * h + h) + (h * h + h)  # time MLP
    block = (
        2 * (h * 2 * h + 2 * h)  # two adaptive double norms: (scale, shift) of the embedding
        + (h * 3 * h + 3 * h) + 2 * (h // heads) + (h * h + h)  # qkv, QK-norm gains, proj
        + (h * 4 * h + 4 * h) + (4 * h * h + h)  # MLP
        + (h * 2 * h + 2 * h)  # adaLN-Zero gates
    )  # fmt: skip
    ends = (voxels * in_channels * h + h) + (h * 2 * h + 2 * h) + (h * voxels * in_channels + voxels * in_channels)
    return embed + depth * block + ends


@pytest.mark.parametrize("name", sorted(VIDEO_NET_PRESETS))
def test_preset_parameter_counts_on_meta_device(name: str) -> None:
    in_channels = 4 if name == "digits-dit" else 16
    with torch.device("meta"):
        net = build_video_net(name, in_channels)
        factorized = build_video_net(name, in_channels, attention="factorized", pos_embed="sincos")
        conditional = build_video_net(name, in_channels, num_classes=101, guidance_embed=True)
    count = sum(p.numel() for p in net.parameters())
    assert count == PARAM_COUNTS[name] == closed_form_count(VIDEO_NET_PRESETS[name], in_channels)
    assert sum(p.numel() for p in factorized.parameters()) == count
    h = VIDEO_NET_PRESETS[name]["hidden"]
    assert sum(p.numel() for p in conditional.parameters()) == count + 102 * h + (256 * h + h)
    # the preset written out builds the same net, and compares equal to the preset's name
    spec = video_net_spec(name, in_channels, num_classes=101, guidance_embed=True)
    with torch.device("meta"):
        written_out = build_from_spec(spec)
    assert {k: v.shape for k, v in written_out.state_dict().items()} == {
        k: v.shape for k, v in conditional.state_dict().items()
    }
    by_name = {"_target_": "scm_mm_video.presets.build_video_net", "name": name, "in_channels": in_channels,
               "num_classes": 101, "guidance_embed": True}  # fmt: skip
    assert canonical_spec(by_name) == canonical_spec(spec)


def test_a_spec_that_leaves_defaults_out_is_the_same_net() -> None:
    """VideoDiT passes most keywords on to DiT: their defaults count too."""
    by_hand = {"_target_": "scm_mm_video.dit.VideoDiT", "in_channels": 4, "hidden": 192, "depth": 4, "heads": 4}
    assert canonical_spec(by_hand) == canonical_spec(video_net_spec("digits-dit", 4))
    assert canonical_spec({**by_hand, "heads": 2}) != canonical_spec(video_net_spec("digits-dit", 4))


def test_token_counts_and_builder_errors() -> None:
    assert token_count("digits-dit", (4, 5, 8, 8)) == 80
    assert token_count("video-dit-b", (16, 5, 32, 32)) == 1280
    assert token_count("video-dit-s", (9, 32, 32)) == 2304  # 33 frames through a 4x8x8 VAE
    assert token_count(make(patch_size=(2, 2, 2)), (2, 4, 4, 4)) == 8
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        token_count("digits-dit", (4, 5, 7, 8))
    with pytest.raises(KeyError, match="unknown video network preset"):
        token_count("video-dit-xl", (16, 5, 32, 32))
    with pytest.raises(KeyError, match="unknown video network preset"):
        build_video_net("video-dit-xl", 16)
    with pytest.raises(TypeError, match="no argument"):
        build_video_net("digits-dit", 4, widht=3)
    net = build_video_net("digits-dit", 4, num_classes=10, depth=1, attention="factorized", dropout=0.1)
    assert (net.embed.num_classes, len(net.blocks), net.attention) == (10, 1, "factorized")
