"""Generate pitched notes with a 2-step sCD model and a neural vocoder, and write .wav files; offline, on a CPU.

    python examples/generate_audio.py                       # train once (9 minutes on 2 cores), then reuse
    python examples/generate_audio.py --checkpoint runs/notes_scd --vocoder runs/notes_vocoder --out notes.wav
    python examples/generate_audio.py --checkpoint runs/notes_teacher --method heun --steps 32   # the teacher

Without --checkpoint, it trains the library's recipe (configs/experiment/notes_teacher.yaml, notes_scd.yaml and
notes_vocoder.yaml) on the embedded notes (synthesised on the fly: twelve pitches from C4 to B4 played by five
timbres): a TrigFlow teacher over log-mels, an sCD student initialised from the teacher's EMA, and a Vocos-style
vocoder trained on the same clips. The runs live in the cache folder ($SCM_MM_CACHE, or ~/.cache/scm-mm) and resume
where they stopped, so a second call only samples. The clips cycle through the pitches (label k = MIDI 60 + k).
With --checkpoint and no --vocoder, it vocodes with the recipe's vocoder run beside the checkpoint's run
(<folder>/notes_vocoder) when there is one, else with Griffin-Lim; it prints which.

--checkpoint takes any audio run or checkpoint: an sCD or sCT student samples in --steps consistency steps, a
diffusion teacher with an ODE solver (--method; by default heun, 32 steps). --guidance is the CFG scale input
of a CFG-distilled sCD student only: teachers, sCT students and students of unlabelled data have none.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from scm_mm.app import train
from scm_mm.data import user_cache
from scm_mm.samplers import ODE_SAMPLERS
from scm_mm.train.checkpoint import CHECKPOINT_DIR, resolve_checkpoint
from scm_mm_audio import AudioSCM


def train_recipe(root: Path, iters: dict[str, int | None]) -> tuple[Path, Path]:
    """Teacher, sCD student and vocoder, through the same code path as `scm-mm-train`; returns (student, vocoder)."""
    runs = [
        ("notes_vocoder", [], "method.trainer.options.iters"),
        ("notes_teacher", [], "train.iters"),
        ("notes_scd", [f"method.teacher={root / 'notes_teacher'}"], "train.iters"),
    ]
    for experiment, extra, iters_key in runs:
        run_dir = root / experiment
        overrides = [f"experiment={experiment}", f"run_dir={run_dir}", "device=cpu", *extra]
        if iters.get(experiment) is not None:
            overrides += [f"{iters_key}={iters[experiment]}"]
        with initialize_config_module("scm_mm_configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        print(f"{experiment}: {run_dir}")
        train.run(cfg)
    return root / "notes_scd", root / "notes_vocoder"


def recipe_vocoder(checkpoint: str | Path) -> Path | None:
    """The recipe's vocoder run beside a checkpoint's run (<folder>/notes_vocoder with its vocoder/), or None."""
    found = resolve_checkpoint(Path(checkpoint).expanduser())
    run = found.parent.parent if found.parent.name == CHECKPOINT_DIR else found
    candidate = run.parent / "notes_vocoder"
    return candidate if (candidate / "vocoder").is_dir() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a run or checkpoint directory; default: train (or reuse) the recipe")
    p.add_argument("--vocoder", help="a vocoder (run, scm-mm vocoder folder or pretrained checkpoint), "
                                     "'griffin-lim', or default: the recipe's vocoder (beside --checkpoint's "
                                     "run: notes_vocoder), else Griffin-Lim")  # fmt: skip
    p.add_argument("--out", default="notes.wav", help="notes.wav -> notes-000.wav, notes-001.wav, ...")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--method", choices=["consistency", *ODE_SAMPLERS], default=None,
                   help="sampler; default: heun for a diffusion teacher, consistency for a student")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="default: 2 (consistency), 32 (an ODE solver)")
    p.add_argument("--t-mid", type=float, default=1.1, help="consistency sampling: t of the intermediate step(s)")
    p.add_argument("--seconds", type=float, default=None, help="clip length; default: as trained")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale input of a CFG-distilled sCD student (default: 1); others have none")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="where the recipe's runs live")
    for name in ("teacher", "student", "vocoder"):  # smoke tests
        p.add_argument(f"--{name}-iters", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    vocoder = args.vocoder
    if args.checkpoint:
        run = args.checkpoint
        vocoder = vocoder or recipe_vocoder(run)
    else:
        iters = {"notes_teacher": args.teacher_iters, "notes_scd": args.student_iters,
                 "notes_vocoder": args.vocoder_iters}  # fmt: skip
        run, trained_vocoder = train_recipe(args.cache or user_cache(), iters)
        vocoder = vocoder or trained_vocoder
    vocoder = None if vocoder == "griffin-lim" else vocoder
    print(f"vocoder: {vocoder or 'Griffin-Lim'}")
    model = AudioSCM.load(run, vocoder=vocoder)
    method, steps = model.sampler_for(args.method, args.steps)
    model.generate(args.n, steps=steps, seconds=args.seconds, guidance=args.guidance, seed=args.seed, method=method,
                   t_mid=args.t_mid)  # fmt: skip
    print(f"{model.meta.get('method', 'model')} checkpoint: {method} sampler, {steps} steps")
    for path in model.save(args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
