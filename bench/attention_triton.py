"""Time and peak memory of attention output + tangent: the fused Triton kernel against PyTorch's flash
SDPA forward alone, the blockwise PyTorch JVP op and torch.func.jvp of math attention (issue 6).

    python bench/attention_triton.py                       # CUDA: lengths 1k-32k, head dims 64 and 128
    python bench/attention_triton.py --lengths 4096 --head-dims 64 --causal
    python bench/attention_triton.py --tune --lengths 8192 # the kernel's block sizes, warps and stages
    TRITON_INTERPRET=1 python bench/attention_triton.py --device cpu --lengths 64 --head-dims 32 \\
        --heads 1 --repeats 1                              # a smoke run of the script itself

Every method computes the same shapes, (B, H, N, D) q, k, v with tangents for the JVP methods, under
no_grad. On CUDA, times are medians of --repeats calls with CUDA events after two warm-ups, all
methods of one (length, head dim) timed round by round so that clock changes hit them alike; memory
is the peak allocated during one call minus what was allocated before it (inputs excluded, outputs
included). A method that runs out of memory is reported as OOM. The target: "fused" (output and
tangent) at most 2.5x "flash forward", memory linear in N. "fused vs blockwise" is the largest
|tO_fused - tO_blockwise| relative to max |tO_blockwise|, a check that the compiled kernel is right.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from scm_mm.nn.attention import jvp_attention, naive_attention
from scm_mm.nn.triton_attention import attention_jvp_fused

METHODS = ("flash forward", "fused forward", "fused", "blockwise", "math")


def make_call(method: str, q, k, v, tq, tk, tv, causal: bool) -> Callable[[], object]:
    if method == "flash forward":  # flash takes fp16/bf16 only: fp32 gets the memory-efficient kernel
        half = q.dtype in (torch.float16, torch.bfloat16)
        backends = [SDPBackend.FLASH_ATTENTION if half else SDPBackend.EFFICIENT_ATTENTION]
        backends = backends if q.is_cuda else [SDPBackend.MATH]
        return lambda: _sdpa(q, k, v, causal, backends)
    if method == "fused forward":  # the kernel without a tangent: flash attention's own work
        return lambda: attention_jvp_fused(q, k, v, causal=causal)
    if method == "fused":
        return lambda: attention_jvp_fused(q, k, v, tq, tk, tv, causal=causal)
    mask = None
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    fn = jvp_attention if method == "blockwise" else naive_attention
    return lambda: torch.func.jvp(lambda *x: fn(*x, mask=mask), (q, k, v), (tq, tk, tv))


def _sdpa(q, k, v, causal: bool, backends: list[SDPBackend]):
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def measure(call: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak MiB or None on the CPU) of one call."""
    if device.type != "cuda":
        start = time.perf_counter()
        call()
        return time.perf_counter() - start, None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = call()
    end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return start.elapsed_time(end) / 1e3, peak


def bench_shape(args: argparse.Namespace, n: int, head_dim: int) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device).manual_seed(0)
    shape = (args.batch, args.heads, n, head_dim)
    q, k, v, tq, tk, tv = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(6))
    row: dict = {"length": n, "head_dim": head_dim, "ms": {}, "mib": {}}
    alive = list(args.methods)
    times: dict[str, list[float]] = {m: [] for m in alive}
    with torch.no_grad():
        for round_ in range(args.repeats + 2):  # two warm-up rounds
            for method in list(alive):
                try:
                    seconds, mib = measure(make_call(method, q, k, v, tq, tk, tv, args.causal), device)
                except torch.OutOfMemoryError:
                    alive.remove(method)
                    row["ms"][method], row["mib"][method] = "OOM", "OOM"
                    torch.cuda.empty_cache()
                    continue
                if round_ >= 2 or args.repeats == 1:
                    times[method].append(seconds)
                    row["mib"][method] = mib
        for method in alive:
            row["ms"][method] = statistics.median(times[method]) * 1e3
        if "fused" in alive and "blockwise" in alive:
            _, t_fused, _ = attention_jvp_fused(q, k, v, tq, tk, tv, causal=args.causal)
            _, t_ref = make_call("blockwise", q, k, v, tq, tk, tv, args.causal)()
            error = (t_fused.float() - t_ref.float()).abs().max() / t_ref.float().abs().max()
            row["fused vs blockwise"] = error.item()
    return row


# (BLOCK_M, BLOCK_N, num_warps, num_stages) that --tune tries; the defaults are `_block_sizes`.
TUNE_CONFIGS = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2), (64, 128, 8, 2),
                (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]  # fmt: skip


def tune(args: argparse.Namespace) -> list[dict]:
    """Median ms of output + tangent for each of TUNE_CONFIGS at the first --lengths, per head dim,
    against the flash forward: what to put into `_block_sizes`."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    n, rows = args.lengths[0], []
    print("| D | BLOCK_M | BLOCK_N | warps | stages | fused ms | fused / flash forward |")
    print("|---|---|---|---|---|---|---|")

    def median_ms(call: Callable[[], object]) -> float:
        for _ in range(2):  # warm-ups: compilation
            call()
        return statistics.median(measure(call, device)[0] for _ in range(args.repeats)) * 1e3

    for head_dim in args.head_dims:
        g = torch.Generator(device).manual_seed(0)
        shape = (args.batch, args.heads, n, head_dim)
        q, k, v, tq, tk, tv = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(6))
        with torch.no_grad():
            flash_ms = median_ms(make_call("flash forward", q, k, v, tq, tk, tv, args.causal))
            for bm, bn, warps, stages in TUNE_CONFIGS:
                call = functools.partial(attention_jvp_fused, q, k, v, tq, tk, tv, causal=args.causal, block_m=bm,
                                         block_n=bn, num_warps=warps, num_stages=stages)  # fmt: skip
                try:
                    ms = median_ms(call)
                except Exception as error:  # a config that does not fit (shared memory, registers)
                    print(f"| {head_dim} | {bm} | {bn} | {warps} | {stages} | {type(error).__name__} | - |")
                    continue
                rows.append({"head_dim": head_dim, "config": [bm, bn, warps, stages], "ms": ms, "flash ms": flash_ms})
                print(f"| {head_dim} | {bm} | {bn} | {warps} | {stages} | {ms:.3g} | {ms / flash_ms:.2f} |", flush=True)
    return rows


def _cell(x) -> str:
    return x if isinstance(x, str) else "-" if x is None else f"{x:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tune", action="store_true", help="time the kernel's block sizes at the first length")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, B={args.batch}, H={args.heads}, causal={args.causal}")
    if args.tune:
        rows = tune(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)
        return
    methods = args.methods
    print("| N | D | " + " | ".join(f"{m} ms" for m in methods) + " | fused / flash forward | "
          + " | ".join(f"{m} MiB" for m in methods) + " | fused vs blockwise |")  # fmt: skip
    print("|---" * (2 * len(methods) + 4) + "|")
    rows = []
    for head_dim in args.head_dims:
        for n in args.lengths:
            row = bench_shape(args, n, head_dim)
            rows.append(row)
            ms, mib = row["ms"], row["mib"]
            ratio = "-"
            if isinstance(ms.get("fused"), float) and isinstance(ms.get("flash forward"), float):
                ratio = f"{ms['fused'] / ms['flash forward']:.2f}"
            cells = [_cell(ms.get(m)) for m in methods] + [ratio] + [_cell(mib.get(m)) for m in methods]
            cells.append(_cell(row.get("fused vs blockwise")))
            print(f"| {n} | {head_dim} | " + " | ".join(cells) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
