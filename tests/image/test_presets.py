"""Image U-Net presets: parameter counts against the paper, JSON specs, the CPU preset, and the UNet
options the presets added (resampling ResBlocks, per-level dropout).

The big presets are built on the meta device (shapes only, no memory, no init cost).
"""

import functools
import json
import math

import pytest
import torch
from torch.func import jvp

from scm_mm.nn.unet import AttentionBlock, ResBlock, UNet
from scm_mm.train.checkpoint import build_from_spec, canonical_spec
from scm_mm_image.presets import PRESETS, build_unet, unet_kwargs, unet_spec

# Model capacity in Mparams, sCM T4 (ImageNet 64x64) and T5 (ImageNet 512x512), = EDM2's counts.
PAPER_MPARAMS = {"S": 280.2, "M": 497.8, "L": 777.6, "XL": 1119.4, "XXL": 1523.4}
IMAGENET = [name for name in PRESETS if name.startswith("imagenet")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@functools.cache
def meta_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return shapes(build_unet(name))


def num_params(name: str) -> int:
    return sum(math.prod(s) for s in meta_shapes(name).values())


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_param_count_within_5_percent_of_paper(name: str) -> None:
    paper = PAPER_MPARAMS[name.rsplit("-", 1)[1]] * 1e6
    count = num_params(name)  # class table included, no guidance embedding (as the paper's)
    assert abs(count / paper - 1) < 0.05, f"{name}: {count / 1e6:.1f}M vs paper {paper / 1e6:.1f}M"


def test_other_param_counts() -> None:
    # CIFAR-10: the ~56M DDPM++ class (EDM's DDPM++ is 55.7M); MNIST: small enough for a CPU.
    assert 50e6 < num_params("cifar10") < 65e6
    assert 0.5e6 < num_params("mnist-tiny") < 2e6


def test_imagenet_block_graph_is_edm2s() -> None:
    # EDM2's U-Net (networks_edm2.py) with 4 levels and 3 blocks: 12 encoder + 3 down + 2 bottleneck
    # + 3 up + 16 decoder blocks; attention in the 6 + 8 blocks at 16x16 and 8x8 and the first
    # bottleneck block.
    with torch.device("meta"):
        net = build_unet("imagenet64-S")
    assert sum(isinstance(m, ResBlock) for m in net.modules()) == 36
    assert sum(isinstance(m, AttentionBlock) for m in net.modules()) == 15
    assert net.embed.label_embed is not None and net.embed.label_embed.num_embeddings == 1000 + 1  # + null


@pytest.mark.parametrize("name", list(PRESETS))
def test_spec_round_trips_through_json(name: str) -> None:
    spec = json.loads(json.dumps(unet_spec(name)))
    assert spec["_target_"] == "scm_mm.nn.unet.UNet"
    with torch.device("meta"):
        net = build_from_spec(spec)
    assert isinstance(net, UNet)
    assert shapes(net) == meta_shapes(name)
    # the app's form of the same net (configs/net/) is the same net when a student meets its teacher
    assert canonical_spec({"_target_": "scm_mm_image.presets.build_unet", "name": name}) == canonical_spec(spec)


def test_overrides_reach_spec_and_net() -> None:
    # An sCD student of a class-conditional teacher: takes the CFG scale (App. G.2), with dropout.
    over = dict(dropout=0.1, guidance_embed=True, num_classes=5, dropout_levels=None)
    spec = unet_spec("mnist-tiny", **over)
    assert {k: spec[k] for k in over} == over
    assert spec["channel_mult"] == [1, 2, 4]  # tuples become lists
    torch.manual_seed(0)
    a = build_unet("mnist-tiny", **over)
    torch.manual_seed(0)
    b = build_from_spec(json.loads(json.dumps(spec)))
    assert a.embed.guidance_linear is not None and a.embed.label_embed.num_embeddings == 5 + 1
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert {m.dropout.p for m in a.modules() if isinstance(m, ResBlock)} == {0.1}
    # The registry itself is never modified.
    assert PRESETS["mnist-tiny"]["dropout"] == 0.0 and unet_kwargs("mnist-tiny")["guidance_embed"] is False


def test_unknown_name_or_argument() -> None:
    with pytest.raises(KeyError, match=r"unknown U-Net preset 'imagenet64-XXL'.*'imagenet64-XL'.*'mnist-tiny'"):
        build_unet("imagenet64-XXL")
    with pytest.raises(KeyError, match="the presets are"):
        unet_spec("cifar")
    with pytest.raises(TypeError, match=r"no argument\(s\) \['drop_out'\]"):
        unet_spec("cifar10", drop_out=0.1)


@torch.no_grad()
def randomize(net: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers random values, or outputs and tangents are all zero."""
    for p in net.parameters():
        if p.abs().max() == 0:
            p.normal_(0.0, 0.2)
    return net


def test_mnist_tiny_forward_and_jvp_on_cpu() -> None:
    torch.manual_seed(0)
    net = randomize(build_unet("mnist-tiny", guidance_embed=True)).eval()
    x = torch.randn(2, 1, 28, 28)
    c_noise = torch.tensor([100.0, 1400.0])  # 1000·t
    labels, s = torch.tensor([3, -1]), torch.tensor([1.0, 2.0])
    y = net(x, c_noise, labels, s)
    assert y.shape == (2, 1, 28, 28) and torch.isfinite(y).all()

    # The sCM JVP (§5.1): tangent (cos t sin t dx_t/dt, cos t sin t) through the whole net.
    y2, ty = jvp(lambda x, c: net(x, c, labels, s), (x, c_noise), (torch.randn_like(x), torch.ones(2)))
    torch.testing.assert_close(y2, y)
    assert ty.shape == y.shape and torch.isfinite(ty).all() and ty.abs().max() > 0


# ---- The UNet options the presets use: ResBlock resampling and per-level dropout. ----------------


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_resample_blocks_jvp_matches_central_difference(dims: int) -> None:
    torch.manual_seed(1)
    kw = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, head_channels=8, num_classes=3)
    net = randomize(UNet(2, dims=dims, resample_blocks=True, **kw)).double().eval()
    assert sum(isinstance(m, ResBlock) and m.resample != "none" for m in net.modules()) == 2
    x = torch.randn(2, 2, *{1: (8,), 2: (8, 8), 3: (4, 4, 4)}[dims], dtype=torch.float64)
    c = torch.tensor([300.0, 1200.0], dtype=torch.float64)
    tx, tc = torch.randn_like(x), torch.randn_like(c)

    def f(x, c):
        return net(x, c, torch.tensor([2, -1]))

    y, ty = jvp(f, (x, c), (tx, tc))
    assert y.shape == x.shape
    h = 1e-6
    fd = (f(x + h * tx, c + h * tc) - f(x - h * tx, c - h * tc)) / (2 * h)
    assert ty.abs().max() > 1e-3
    torch.testing.assert_close(ty, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


def test_resample_blocks_keep_unresampled_axes() -> None:
    kw = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1)
    net = UNet(2, dims=3, resample_axes=(1, 2), resample_blocks=True, **kw)
    x = torch.randn(2, 2, 3, 8, 8)  # 3 frames: not divisible by 2, and not resampled
    assert net(x, torch.rand(2)).shape == x.shape


def test_dropout_only_at_resolution_16_and_below() -> None:
    # imagenet64-S's layout at a CPU width: record each ResBlock's output resolution and dropout.
    net = build_unet(
        "imagenet64-S", model_channels=8, emb_dim=32, noise_channels=8, head_channels=8, num_classes=3, dropout=0.45
    ).eval()
    seen: list[tuple[int, float]] = []
    for m in net.modules():
        if isinstance(m, ResBlock):
            m.register_forward_hook(lambda mod, args, out: seen.append((out.shape[-1], mod.dropout.p)))
    net(torch.randn(1, 3, 64, 64), torch.tensor([500.0]), torch.tensor([1]))
    assert len(seen) == 36
    assert {res for res, _ in seen} == {64, 32, 16, 8}
    assert all(p == (0.45 if res <= 16 else 0.0) for res, p in seen), sorted(set(seen))
    with pytest.raises(ValueError, match="dropout_levels"):
        UNet(2, channel_mult=(1, 2), dropout_levels=(2,))
