"""2-step generation time per sample against the paper's headline (issue 6): the ImageNet-512 XXL preset
(1.5B parameters, random weights are fine for timing) at batch size 1, with and without decoding by a
Stable-Diffusion-shaped VAE (diffusers AutoencoderKL, random weights, 64x64x4 latents -> 512x512 RGB).
The paper reports 0.11 s per sample on one A100.

    python bench/sample_time.py                           # CUDA, bf16 autocast, eager / CUDA graph / compile
    python bench/sample_time.py --modes eager graph --repeats 50
    python bench/sample_time.py --device cpu --preset mnist-tiny --precision fp32 --modes eager --repeats 2

Modes: "eager"; "graph", the whole 2-step sampler (and the decoder) captured once in a CUDA graph and
replayed, which removes the launch overhead that dominates at batch 1; "compile", the backbone under
torch.compile (no JVP here, so its loss of custom JVP rules does not matter; its compile time is
reported separately). Times are medians of --repeats calls after warm-ups, synchronised. The sampler
is `sample_consistency`'s two steps (t_max, t_mid = 1.1, 0) written with preallocated times and noise
so that a CUDA graph can capture it; it is checked against `sample_consistency` itself at start.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from scm_mm import TrigFlowPrecond
from scm_mm.metrics import median_seconds
from scm_mm.samplers import consistency_times, sample_consistency
from scm_mm_image.presets import build_unet

SD_VAE = {  # the Stable Diffusion VAE's configuration (diffusers AutoencoderKL), 8x down, 4 channels
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}


def build(args: argparse.Namespace) -> tuple[TrigFlowPrecond, torch.nn.Module | None, tuple[int, ...]]:
    device = torch.device(args.device)
    net = build_unet(args.preset, num_classes=1000, guidance_embed=True)  # the sCD student's inputs
    model = TrigFlowPrecond(net).to(device).eval().requires_grad_(False)
    shape = (args.batch, net.in_channels, args.resolution, args.resolution)
    vae = None
    if args.vae and net.in_channels == 4:
        try:
            from diffusers import AutoencoderKL
        except ImportError:  # a GPU machine without diffusers still measures the sampling alone
            print("diffusers is not installed: the rows with decoding are skipped", flush=True)
            return model, None, shape
        vae = AutoencoderKL(**SD_VAE).to(device).eval().requires_grad_(False)
    return model, vae, shape


def make_sampler(
    model: TrigFlowPrecond, vae, shape, args, decode: bool, seed: int = 0
) -> tuple[Callable[[], torch.Tensor], dict]:
    """A no-argument function running 2 steps (and decoding) on preallocated inputs, and those inputs."""
    device = torch.device(args.device)
    t_max, t_mid, _ = consistency_times(2, sigma_d=model.sigma_d)
    generator = torch.Generator(device).manual_seed(seed)  # z as sample_consistency draws it
    inputs = {
        "z": torch.randn(shape, device=device, generator=generator) * model.sigma_d,
        "noise": torch.randn(shape, device=device) * model.sigma_d,
        "t_max": torch.full((shape[0],), t_max, device=device),
        "t_mid": torch.full((shape[0],), t_mid, device=device),
        "labels": torch.zeros(shape[0], dtype=torch.long, device=device),
        "guidance": torch.full((shape[0],), 1.4, device=device),
    }
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    cond = {"labels": inputs["labels"], "guidance": inputs["guidance"]}
    inputs["autocast"] = autocast

    @torch.no_grad()
    def run() -> torch.Tensor:
        with autocast:
            x0 = model.denoise(inputs["noise"], inputs["t_max"], **cond)
            x_t = math.cos(t_mid) * x0 + math.sin(t_mid) * inputs["z"]
            x0 = model.denoise(x_t, inputs["t_mid"], **cond)
            if vae is not None and decode:
                return vae.decode(x0 / 0.18215).sample  # SD's latent scale; the statistics do not matter here
            return x0

    return run, inputs


def check(model: TrigFlowPrecond, run: Callable[[], torch.Tensor], inputs: dict, seed: int) -> float:
    """Largest |x0 - sample_consistency's x0| for the same noise and z (run without decoding)."""
    generator = torch.Generator(inputs["noise"].device).manual_seed(seed)  # draws the same z
    with inputs["autocast"]:
        ref = sample_consistency(
            model,
            inputs["noise"],
            consistency_times(2, sigma_d=model.sigma_d),
            generator=generator,
            labels=inputs["labels"],
            guidance=inputs["guidance"],
        )
    return (run().float() - ref.float()).abs().max().item()


def graphed(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`run` captured in a CUDA graph (after warm-up on a side stream, as torch.cuda.graphs asks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="imagenet512-XXL")
    parser.add_argument("--resolution", type=int, default=64, help="latent (or pixel) side")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    modes = ["eager", "graph", "compile"]
    parser.add_argument("--modes", nargs="+", default=modes, choices=modes)
    parser.add_argument("--no-vae", dest="vae", action="store_false", help="skip the decoding rows")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    torch.manual_seed(0)
    model, vae, shape = build(args)
    params = sum(p.numel() for p in model.net.parameters())
    print(f"torch {torch.__version__}, {where}, {args.preset} ({params / 1e9:.3f}B), batch {args.batch}")
    print(f"{args.precision} autocast")
    print("| mode | decode | s per sample | compile s | max abs x0 - eager's |")
    print("|---|---|---|---|---|")
    run, inputs = make_sampler(model, vae, shape, args, decode=False)
    print(f"max |x0 - sample_consistency x0| = {check(model, run, inputs, seed=0):.2e}")
    for decode in [False, True] if vae is not None else [False]:
        run, _ = make_sampler(model, vae, shape, args, decode)
        eager = run().float().clone()  # what a graph or a compiled net must give (x0, or the decoded image)
        for mode in args.modes:
            compile_s = "-"
            if mode == "graph" and device.type != "cuda":
                continue
            fn = run
            if mode == "graph":
                fn = graphed(run)
            elif mode == "compile":
                # The U-Net's blocks share one forward at many channel counts: each is a recompile. At
                # dynamo's default limit (8) the rest ran eager on an H200 (docs/benchmarks.md 9b).
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                original = model.net
                model.net = torch.compile(original)
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s = f"{time.perf_counter() - start:.1f}"
            seconds = median_seconds(fn, args.repeats, warmup=3) / args.batch
            error = (fn().float() - eager).abs().max().item()
            if mode == "compile":
                model.net = original
            print(f"| {mode} | {'VAE' if decode else 'no'} | {seconds:.4f} | {compile_s} | {error:.2e} |", flush=True)


if __name__ == "__main__":
    main()
