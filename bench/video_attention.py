"""Attention at the sequence lengths of the video presets: SDPA forward vs the JVP op vs the naive math JVP.

    OMP_NUM_THREADS=1 .venv/bin/python bench/video_attention.py                    # CPU, about a minute
    .venv/bin/python bench/video_attention.py --device cuda --batch 4 --heads 12 --dtype bfloat16

One row per attention layer of a preset's layout, per clip (scm_mm_video.presets):

    digits-dit   9 frames 32x32, latent (4, 5, 8, 8), full over 5*4*4 = 80 tokens
    video-dit-*  17 / 33 / 65 frames at 256x256 through a 4x8x8 VAE: 5 / 9 / 17 latent frames of 16x16 tokens;
                 full over T'*256 tokens (1280 / 2304 / 4352), or factorized (Latte): spatial = T' sequences of
                 256 tokens, temporal = 256 sequences of T' tokens

so a factorized row runs `batch * sequences` sequences of its length, and the times of full and factorized
rows of one clip compare directly (a factorized net alternates: half its blocks spatial, half temporal).
Methods: "sdpa" F.scaled_dot_product_attention forward (what a plain pass runs); "jvp op"
torch.func.jvp of scm_mm.nn.attention.jvp_attention (blockwise, App. F: forward + tangent); "math jvp"
torch.func.jvp of naive_attention (softmax(q k^T) v, O(N^2) memory); on CUDA also "fused jvp", the Triton
kernel (scm_mm.nn.triton_attention: output and tangent in one pass). Tangents on q, k and v. Time is the
best of --repeats calls after one warm-up; on CUDA also the peak of torch.cuda.max_memory_allocated during
one call, minus what was allocated before it (inputs and tangents excluded).

Measured on the 2-core dev box (OMP_NUM_THREADS=1, defaults: batch 1, 2 heads of 64, float32): the JVP op
costs 4.5-6.4x an SDPA forward at every video length (it computes the forward and the tangent, in plain
PyTorch ops); against the naive math JVP it is 1.4x faster at 1280 tokens and 1.8x at 4352, and 1.1-1.4x
slower on short sequences (80 tokens, factorized groups of 5-256), where the blockwise loop has nothing
to save. At 17 frames a full layer's JVP took 67 ms against 15 + 3.6 ms for a spatial + temporal pair.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from scm_mm.nn.attention import jvp_attention, naive_attention

METHODS = ("sdpa", "jvp op", "math jvp")
CUDA_METHODS = (*METHODS, "fused jvp")  # + the Triton kernel of scm_mm.nn.triton_attention

# (preset/clip, layout, sequences per clip, tokens per sequence)
ROWS: list[tuple[str, str, int, int]] = [("digits-dit 9f 32x32", "full", 1, 80)]
for _frames, _latent_frames in ((17, 5), (33, 9), (65, 17)):
    ROWS += [
        (f"video-dit {_frames}f 256x256", "full", 1, _latent_frames * 256),
        (f"video-dit {_frames}f 256x256", "spatial", _latent_frames, 256),
        (f"video-dit {_frames}f 256x256", "temporal", 256, _latent_frames),
    ]


def make_call(method: str, shape: tuple[int, ...], device: str, dtype: torch.dtype, block: int) -> Callable:
    """A closure running `method` once on fresh random (B, H, N, D) inputs."""
    q, k, v, tq, tk, tv = (torch.randn(shape, device=device, dtype=dtype) for _ in range(6))
    if method == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if method == "fused jvp":
        from scm_mm.nn.triton_attention import triton_attention

        return torch.no_grad()(lambda: torch.func.jvp(triton_attention, (q, k, v), (tq, tk, tv)))
    fn = functools.partial(jvp_attention, block_size=block) if method == "jvp op" else naive_attention
    return torch.no_grad()(lambda: torch.func.jvp(fn, (q, k, v), (tq, tk, tv)))  # as training takes them


def measure(call: Callable, device: str, repeats: int) -> tuple[float, float | None]:
    """(best time in ms, peak extra MiB on CUDA else None)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()  # warm-up: kernels, lazy modules, allocator
    sync()
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=1, help="clips per call")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (presets: 4 to 16)")
    parser.add_argument("--head-dim", type=int, default=64, help="channels per head (presets: 48 or 64)")
    parser.add_argument("--block-size", type=int, default=512, help="keys per step of the JVP op")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave as is)")
    parser.add_argument("--max-tokens", type=int, default=10**9, help="skip rows with longer sequences")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    cuda = args.device == "cuda"
    methods = CUDA_METHODS if cuda else METHODS
    head = "| clip | layout | seqs x tokens | " + " | ".join(f"{m} ms" for m in methods) + " | jvp op / sdpa |"
    if cuda:
        head += " fused jvp / sdpa | " + " | ".join(f"{m} MiB" for m in methods) + " |"
    print(
        f"device {args.device}, {args.dtype}, batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
        f"JVP block {args.block_size}, threads {torch.get_num_threads()}, best of {args.repeats}\n"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for clip, layout, seqs, tokens in ROWS:
        if tokens > args.max_tokens:
            continue
        shape = (args.batch * seqs, args.heads, tokens, args.head_dim)
        results = [measure(make_call(m, shape, args.device, dtype, args.block_size), args.device, args.repeats)
                   for m in methods]  # fmt: skip
        row = f"| {clip} | {layout} | {seqs} x {tokens} | " + " | ".join(f"{ms:.2f}" for ms, _ in results)
        row += f" | {results[1][0] / results[0][0]:.1f}x |"
        if cuda:
            row += f" {results[3][0] / results[0][0]:.1f}x | " + " | ".join(f"{mib:.0f}" for _, mib in results) + " |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
