"""Time and peak memory of attention with a tangent on the CPU: blockwise JVPAttention (App. F)
against torch.func.jvp of naive math attention, with the plain SDPA forward as a baseline.

    .venv/bin/python bench/jvp_attention.py [--lengths 256 512 ...] [--block-size 512]

Memory and time of each (method, length) are measured in two fresh subprocesses, after a warm-up
at a tiny length. Memory is the peak resident set size during one call (VmHWM, reset through
/proc/self/clear_refs just before it; Linux only) minus the resident size before the call, so it
counts the output, the tangent and every intermediate. In that subprocess glibc's malloc maps every
allocation above 64 KiB directly, so freed memory leaves the resident set at once and the peak
tracks live tensors; that slows allocation down, hence the separate subprocess for timing with the
default malloc. Time is the best of --repeats calls (the least disturbed by other processes).
"""

import argparse
import functools
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from scm_mm.nn.attention import jvp_attention, naive_attention

METHODS = ("blockwise", "naive", "sdpa")
NAIVE_NN_BUFFERS = 6  # (N, N) fp32 buffers alive at the naive JVP peak: 5.0 measured, plus margin


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _make_call(method: str, args: argparse.Namespace, n: int):
    """A closure running `method` once at sequence length n, on fresh random inputs."""
    shape = (args.batch, args.heads, n, args.dim)
    q, k, v, tq, tk, tv = (torch.randn(shape) for _ in range(6))
    # JVPs under no_grad, as training takes them (the tangent pass of the sCM loss): the blockwise op then
    # hands its kept probabilities and fp32 output to the tangent.
    if method == "blockwise":
        fn = functools.partial(jvp_attention, block_size=args.block_size)
        return torch.no_grad()(lambda: torch.func.jvp(fn, (q, k, v), (tq, tk, tv)))
    if method == "naive":
        return torch.no_grad()(lambda: torch.func.jvp(naive_attention, (q, k, v), (tq, tk, tv)))
    return lambda: F.scaled_dot_product_attention(q, k, v)


def child(method: str, n: int, what: str, args: argparse.Namespace) -> float:
    """Runs in a subprocess: peak memory of one call in MiB ("mib"), or its best time in ms."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    _make_call(method, args, 64)()  # load kernels and lazy modules outside the measurement
    call = _make_call(method, args, n)
    if what == "mib":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        rss_before = _status_kib("VmRSS")
        call()
        return (_status_kib("VmHWM") - rss_before) / 1024
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def run_in_subprocess(method: str, n: int, what: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if what == "mib" else None
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"{method}:{n}:{what}"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lengths = [256, 512, 1024, 2048, 4096, 8192]
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-naive-gib", type=float, default=12.0)
    threads_help = "torch threads (default: torch's choice; 1 is steadier on shared cores)"
    parser.add_argument("--threads", type=int, help=threads_help)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n, what = args.child.split(":")
        print(child(method, int(n), what, args))
        return

    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, float32, "
          f"B={args.batch} H={args.heads} D={args.dim}, block size {args.block_size}")
    print("memory: peak RSS increase during one call (VmHWM after clear_refs), MiB; "
          f"time: best of {args.repeats} calls, ms\n")
    print("| N | blockwise JVP ms | MiB | naive JVP ms | MiB | SDPA fwd ms | MiB "
          "| naive/blockwise time | memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_token, load = {}, os.getloadavg()[0]  # other processes on the cores slow the timings
    for n in args.lengths:
        naive_gib = NAIVE_NN_BUFFERS * args.batch * args.heads * n * n * 4 / 2**30
        methods = [m for m in METHODS if m != "naive" or naive_gib <= args.max_naive_gib]
        r = {m: {x: run_in_subprocess(m, n, x) for x in ("ms", "mib")} for m in methods}
        per_token[n] = 1024 * r["blockwise"]["mib"] / n
        cells = [f"{r[m]['ms']:.1f} | {r[m]['mib']:.1f}" if m in r else "skipped | –"
                 for m in METHODS]
        ratios = "– | –"
        if "naive" in r:
            ratios = " | ".join(f"{r['naive'][x] / r['blockwise'][x]:.2f}" for x in ("ms", "mib"))
        print(f"| {n} | {' | '.join(cells)} | {ratios} |", flush=True)
    print(f"\nload average (1 min) at start / end: {load:.2f} / {os.getloadavg()[0]:.2f}")
    print("blockwise extra memory per token (KiB): "
          + ", ".join(f"N={n}: {kib:.1f}" for n, kib in per_token.items()))


if __name__ == "__main__":
    main()
