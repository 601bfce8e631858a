"""scm_mm.jvp.CUDAGraphJVP, the dual JVP replayed from CUDA graphs (issue 6).

What it refuses and which graphs it keeps run in the default test run (the capture faked on the CPU); that
it equals the eager JVP while the weights train needs CUDA (marked gpu: `bench/gpu_checks.sh tests`).
"""

import gc
import weakref

import pytest
import torch
from helpers import TinyNet

import scm_mm.jvp
from scm_mm import SCMLoss, TrigFlowPrecond
from scm_mm.jvp import CUDAGraphJVP, jvp
from scm_mm.nn.attention import attention_backend
from scm_mm.nn.dit import DiT
from scm_mm.nn.unet import UNet

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NETS = {  # class- and guidance-conditional, with the attention, norms and RoPE the presets use
    "dit": lambda: DiT(4, patch_size=(2, 2), hidden=64, depth=2, heads=2, pos_embed="rope", num_classes=10,
                       guidance_embed=True),  # fmt: skip
    "unet": lambda: UNet(4, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,), num_classes=10,
                         guidance_embed=True),  # fmt: skip
}


def test_refuses_cpu_tensors_and_dropout() -> None:
    student = TrigFlowPrecond(TinyNet(channels=3, dropout=0.1))
    x0 = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dropout"):
        SCMLoss(tangent_method="cuda_graph_jvp")(student, x0)
    student.eval()  # no dropout drawn: what is left to refuse is the device
    with pytest.raises(ValueError, match="needs CUDA tensors, got \\['cpu'\\]"):
        SCMLoss(tangent_method="cuda_graph_jvp")(student, x0)
    with pytest.raises(ValueError, match="'cuda_graph_jvp'"):
        SCMLoss(tangent_method="cuda_graphs")


class _FakeGraph:
    """torch.cuda.CUDAGraph's replay on the CPU: the eager JVP, written into the captured output buffers."""

    def __init__(self, replay):
        self.replay = replay


def test_keeps_the_most_recently_used_graphs_per_backend(monkeypatch) -> None:
    """A new layout evicts the least recently used graph beyond `max_graphs` (each holds a memory pool);
    the attention backend is part of the layout (a graph captured with one replays that one)."""
    captures, graphs = [], []

    def fake_capture(model, names, inputs, dtype, addresses):
        static = [a.clone() for a in inputs]
        x, t, tx, tt, *rest = static
        cond = dict(zip(names, rest, strict=True))
        out, tangent = (y.clone() for y in jvp(lambda a, b: model(a, b, **cond), (x, t), (tx, tt)))

        def replay():
            for buffer, value in zip((out, tangent), jvp(lambda a, b: model(a, b, **cond), (x, t), (tx, tt))):
                buffer.copy_(value)

        graph = _FakeGraph(replay)
        captures.append(len(x))
        graphs.append(weakref.ref(graph))
        return scm_mm.jvp._Captured(graph, static, out, tangent, addresses)

    monkeypatch.setattr(scm_mm.jvp, "_check_graphable", lambda model, inputs: None)
    monkeypatch.setattr(scm_mm.jvp, "_capture", fake_capture)
    model = TrigFlowPrecond(TinyNet(channels=3)).eval()
    graphed = CUDAGraphJVP()  # max_graphs=2

    def call(batch: int) -> None:
        primals = (torch.randn(batch, 3), torch.rand(batch) + 0.1)
        tangents = (torch.randn(batch, 3), torch.ones(batch))
        torch.testing.assert_close(graphed(model, primals, tangents, {"labels": None}), jvp(model, primals, tangents))

    for batch in (4, 2, 4, 3):  # capture 4, capture 2, replay 4 (now the most recent), capture 3: 2 goes
        call(batch)
    assert captures == [4, 2, 3]
    assert [key[3][0][0] for key in graphed._graphs[model]] == [4, 3]
    gc.collect()
    assert graphs[1]() is None  # the evicted graph is gone, and its pool with it
    call(2)  # captured again, evicting 4
    assert captures == [4, 2, 3, 2] and [key[3][0][0] for key in graphed._graphs[model]] == [3, 2]
    with attention_backend("math"):  # same shapes, another backend: its own graph
        call(2)
    assert captures == [4, 2, 3, 2, 2]
    assert [key[2] for key in graphed._graphs[model]] == ["auto", "math"]
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphJVP(max_graphs=0)


def _randomized(net: torch.nn.Module) -> TrigFlowPrecond:
    """The net away from its zero-initialised gates and output layers, so that every weight shows in F."""
    model = TrigFlowPrecond(net).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(batch: int) -> tuple[tuple, tuple, dict]:
    x = torch.randn(batch, 4, 8, 8, device="cuda")
    t = torch.rand(batch, device="cuda") * 1.4 + 0.1
    cond = {"labels": torch.randint(0, 10, (batch,), device="cuda"), "guidance": torch.rand(batch, device="cuda") + 1}
    return (x, t), (torch.randn_like(x), torch.ones_like(t)), cond


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_graphed_jvp_equals_the_eager_jvp_as_the_weights_change(net: str, precision: torch.dtype | None) -> None:
    """Replays read the parameters as an optimizer leaves them (in place); a new batch size and a model moved
    to new memory are captured again."""
    torch.manual_seed(0)
    model = _randomized(NETS[net]())
    graphed = CUDAGraphJVP()

    def check(batch: int) -> None:
        primals, tangents, cond = _inputs(batch)
        with torch.autocast("cuda", dtype=precision or torch.float16, enabled=precision is not None):
            ours = graphed(model, primals, tangents, cond)
            ref = jvp(lambda a, b: model(a, b, **cond), primals, tangents)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * float(b.abs().max()))

    for batch in (4, 4, 2):  # a capture, a replay, a second capture
        check(batch)
        with torch.no_grad():  # what an optimizer step does, large enough to show in F
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        check(batch)
    assert len(graphed._graphs[model]) == 2
    model.cpu().cuda()  # every parameter at a new address
    check(4)


@pytest.mark.gpu
@CUDA
def test_scd_terms_with_the_graphed_jvp() -> None:
    """SCMLoss(tangent_method="cuda_graph_jvp") gives the sCD terms of "jvp", gradient included."""
    torch.manual_seed(1)
    student, teacher = _randomized(NETS["dit"]()), _randomized(NETS["dit"]())
    x0 = torch.randn(4, 4, 8, 8, device="cuda")
    labels = torch.randint(0, 10, (4,), device="cuda")
    draws = SCMLoss().draw(4, (4, 8, 8), labelled=True, distil=True, device="cuda")
    results = []
    for method in ("jvp", "cuda_graph_jvp"):
        student.zero_grad()
        loss, _ = SCMLoss(tangent_method=method, warmup_iters=0)(student, x0, labels, teacher=teacher, **draws)
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in student.parameters() if p.grad is not None)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
