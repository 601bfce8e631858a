"""Training-step time of sCT and sCD against a teacher (diffusion) step, on the same network and batch.

    python bench/step_time.py                 # U-Net and DiT, CPU, a few minutes
    python bench/step_time.py --nets dit --batch 8 --repeats 10
    python bench/step_time.py --nets dit unet --cfg        # class-conditional, sCD distilling with CFG
    python bench/step_time.py --nets imagenet64-S video-dit-s --precision bf16 --batch 8   # GPU (issue 6)
    python bench/step_time.py --nets video-dit-s --batch 1 --shape 16 5 8 8 --tangent-method jvp func_jvp
    python bench/step_time.py --nets video-dit-s --precision bf16 --tangent-method jvp cuda_graph_jvp   # GPU
    python bench/step_time.py --nets video-dit-s --batch 1 --shape 16 5 8 8 --count-kernels   # no timing

Each step is forward + backward + Adam. The sCT step adds the JVP (scm_mm.jvp of the student under
no_grad; --tangent-method: dual tensors, torch.func.jvp, the dual JVP replayed from CUDA graphs
(scm_mm.jvp.CUDAGraphJVP, a GPU only), one row each) and its second forward
(with grad); the sCD step adds the teacher's forward too. The no-grad forward and JVP alone are timed as
well, to show where the time goes: the two-pass design costs at least (teacher step + JVP + forward) /
teacher step. --cfg makes every net class-conditional, trained on random labels: the sCD student takes
the CFG scale as an input and its teacher's velocity is the guided one, cond + uncond (App. G.2), as in the
paper's class-conditional distillation runs; the teacher step is then the labelled diffusion step with
label dropout. All kinds of step are timed in rounds (teacher, forward, sCT, sCD, JVP, teacher, ...) so
that machine noise hits all of them alike; the table gives medians and the ratios of medians.
Targets (issue 2): sCT <= 1.6x, sCD <= 2.0x a teacher step. The paper's presets: the EDM2 ImageNet-64 S
U-Net (280M) on 64x64x3 pixels, and the video DiT-S on the latent of 17 frames at 256x256 through a
16-channel 4x8x8 autoencoder (16x5x32x32, 1,280 tokens); --precision bf16 runs each under autocast, as the
training loop does. On CUDA every step ends with a
synchronisation, so the wall clock counts the GPU's work, and the peak memory of each kind of step is
printed too (issue 5 asks for the video preset's, with xformers as the forward attention).

--count-kernels counts, instead of timing, the kernels one no-grad forward and one JVP launch (aten ops that
write memory: not views, not metadata queries), the same on any device. A GPU launches each one, and there
the JVP was bound by issuing work (docs/benchmarks.md 9b); on the CPU the count did not predict the time
(docs/benchmarks.md 2).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from scm_mm import DiffusionLoss, SCMLoss, TrigFlowPrecond
from scm_mm.nn.attention import auto_backends
from scm_mm.nn.dit import DiT
from scm_mm.nn.unet import UNet
from scm_mm_image.presets import build_unet
from scm_mm_video.presets import build_video_net

NETS = {  # name: (build(**options), one sample's (C, *dims), classes under --cfg)
    # A CIFAR-like pixel U-Net and a latent DiT, sized so one step takes about a second on 2 cores.
    "unet": (lambda **kw: UNet(3, model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_levels=(1,), **kw),
             (3, 32, 32), 10),  # fmt: skip
    "dit": (lambda **kw: DiT(4, patch_size=(2, 2), hidden=256, depth=6, heads=4, **kw), (4, 32, 32), 10),
    # The MNIST bench's net (bench/image_mnist.py; trained at batch 128 there).
    "mnist-tiny": (lambda **kw: build_unet("mnist-tiny", **kw), (1, 16, 16), 10),
    # The paper-scale presets, for a GPU.
    "imagenet64-S": (lambda **kw: build_unet("imagenet64-S", **kw), (3, 64, 64), 1000),
    "imagenet512-XXL": (lambda **kw: build_unet("imagenet512-XXL", **kw), (4, 64, 64), 1000),  # 1.5B, SD-VAE latents
    "video-dit-s": (lambda **kw: build_video_net("video-dit-s", 16, **kw), (16, 5, 32, 32), 101),  # UCF-101
}


def timed(fn, *args) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the clock starts with no earlier work (a warm-up's) still queued
    start = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class KernelCount(TorchDispatchMode):
    """Counts the aten ops that launch work: in-place ones and those that return fresh memory."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {_address(a) for a in pytree.tree_leaves((args, kwargs))}
        fresh = [o for o in map(_address, pytree.tree_leaves(out)) if o is not None and o not in inputs]
        self.count += bool(func._schema.is_mutable or fresh)
        return out


def _address(x: object) -> int | None:
    """A tensor's memory (None for a ZeroTensor, which has none, and for non-tensors)."""
    if not torch.is_tensor(x) or x._is_zerotensor():
        return None
    return x.untyped_storage().data_ptr()


def kernels(fn: Callable[..., None], *args: str) -> int:
    with KernelCount() as counter:
        fn(*args)
    return counter.count


def bench_net(
    name: str,
    shape: Sequence[int] | None,  # one sample's (C, *dims); None: the net's own
    batch: int,
    repeats: int,
    device: str,
    precision: str,
    tangent_methods: Sequence[str] = ("jvp",),
    profile: bool = False,
    count_kernels: bool = False,
    cfg: bool = False,  # class labels: the sCD teacher runs with CFG, the student takes the scale (App. G.2)
) -> dict[str, float]:
    """Median seconds of each kind of step; one table row per tangent method, all timed in the same rounds.
    With count_kernels, the kernels of one forward and one JVP per method, untimed."""
    build, default_shape, num_classes = NETS[name]
    shape = tuple(shape or default_shape)
    classes = {"num_classes": num_classes} if cfg else {}
    torch.manual_seed(0)
    teacher = TrigFlowPrecond(build(**classes)).to(device).eval().requires_grad_(False)
    student = TrigFlowPrecond(build(**classes, guidance_embed=cfg)).to(device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("guidance" in key for key in missing)  # zero-initialised, as sCD starts
    params = sum(p.numel() for p in student.net.parameters())
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    x0 = torch.randn(batch, *shape, device=device) * 0.5
    diffusion = DiffusionLoss()
    scm = {method: SCMLoss(tangent_method=method) for method in tangent_methods}

    t = torch.rand(batch, device=device) * 1.4 + 0.1
    x_t, v = torch.randn_like(x0), torch.randn_like(x0)
    labels = torch.randint(num_classes, (batch,), device=device) if cfg else None
    cond = {"labels": labels, "guidance": torch.full_like(t, 1.5) if cfg else None}  # the student's inputs

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def step(kind: str, method: str = "") -> None:
        if kind == "forward":  # the pieces, to show where an sCM step spends its time
            with torch.no_grad(), autocast:
                student(x_t, t, **cond)
            return
        if kind == "JVP":
            with autocast:
                scm[method].student_jvp(student, (x_t, t), (v, torch.ones_like(t)), cond)
            return
        with autocast:  # the forward passes; backward outside, as in the training loop
            if kind == "teacher":
                loss, _ = diffusion(student, x0, labels)
            else:
                distil = teacher if kind == "sCD" else None
                loss, _ = scm[method](student, x0, labels, teacher=distil, step=10**6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if count_kernels:  # each counted after one uncounted call
        step("forward")
        forward = kernels(step, "forward")
        for method in tangent_methods:
            step("JVP", method)
            n = kernels(step, "JVP", method)
            print(f"{name} ({method}, {precision}): forward {forward} kernels, JVP {n} ({n / forward:.2f}x)")
        return {}
    kinds = [("teacher", ""), ("forward", "")]
    kinds += [(kind, method) for method in tangent_methods for kind in ("sCT", "sCD", "JVP")]
    for kind in kinds:  # warm-up
        step(*kind)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in kinds}
    peak_gib: dict[str, float] = {}
    for _ in range(repeats):
        for kind in kinds:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times[kind].append(timed(step, *kind))
            if device.startswith("cuda"):
                peak_gib[" ".join(kind).strip()] = torch.cuda.max_memory_allocated() / 2**30
    med = {" ".join(k).strip(): statistics.median(v) for k, v in times.items()}
    if profile:  # where one JVP spends its time: the top operators by device (else CPU) time
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step("JVP", tangent_methods[0])
        sort = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), flush=True)
    if peak_gib:
        print(f"  {name} peak GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in peak_gib.items()), flush=True)
    teacher_s = med["teacher"]
    for method in tangent_methods:
        label = name if len(tangent_methods) == 1 else f"{name}, {method}"
        sct, scd, jvp_s = (med[f"{kind} {method}"] for kind in ("sCT", "sCD", "JVP"))
        print(
            f"| {label} | {params / 1e6:.2f}M | {batch}x{'x'.join(map(str, shape))} | {teacher_s * 1e3:.0f} "
            f"| {sct * 1e3:.0f} | {scd * 1e3:.0f} | {sct / teacher_s:.2f} | {scd / teacher_s:.2f} "
            f"| {med['forward'] * 1e3:.0f} | {jvp_s * 1e3:.0f} |",
            flush=True,
        )
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["unet", "dit"], choices=list(NETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs="+", help="one sample's (C, *dims) for every net, e.g. 16 5 8 8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="backbone autocast")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one JVP per net")
    parser.add_argument("--count-kernels", action="store_true", help="kernels of a forward and a JVP, untimed")
    parser.add_argument("--cfg", action="store_true",
                        help="class-conditional nets on random labels; sCD's teacher with CFG (see above)")  # fmt: skip
    parser.add_argument("--tangent-method", nargs="+", default=["jvp"], choices=("jvp", "func_jvp", "cuda_graph_jvp"),
                        help="SCMLoss's forward-mode front ends, one row each (see above)")  # fmt: skip
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.precision}")
    if args.device == "cuda":  # what the attention dispatcher picks with and without a tangent
        forward, tangent = auto_backends(args.device)
        print(f"attention: {forward} without a tangent, {tangent} with one")
    if not args.count_kernels:
        print(
            "| net | params | batch | teacher ms | sCT ms | sCD ms | sCT / teacher | sCD / teacher "
            "| forward ms (no grad) | JVP ms (no grad) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.nets:
        bench_net(name, args.shape, args.batch, args.repeats, args.device, args.precision, args.tangent_method,
                  args.profile, args.count_kernels, args.cfg)  # fmt: skip


if __name__ == "__main__":
    main()
