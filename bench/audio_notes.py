"""The embedded notes on a CPU: Frechet audio distance, pitch accuracy and real-time factor of the teacher
at its best NFE and of sCD and sCT at 1 and 2 steps, plus the vocoder's copy-synthesis against Griffin-Lim.

    python bench/audio_notes.py --out bench_out/notes     # trains the recipe once; reruns reuse the runs

The runs are the library's recipe through the same code path as `scm-mm-train` (configs/experiment/
notes_{vocoder,teacher,scd,sct}.yaml): 2,400 synthesised notes (twelve pitches C4-B4 x five timbres,
0.496 s at 16 kHz), 64-bin log-mels normalised per bin, the notes-dit transformer over frames, a
Vocos-style vocoder trained on the same clips. sCD and sCT start from the teacher's EMA.

Scores, for every model with the same number of class-balanced clips (unguided, s = 1), decoded by the
trained vocoder:
- FAD: Frechet distance in the features of a pitch classifier trained on the training split (the SC09
  recipe), against the held-out "test" split of real notes. "real + vocoder" is the floor set by the
  vocoder (real test mels -> vocoder);
- pitch accuracy: pYIN's median f0 of each clip rounded to the nearest semitone equals its label;
- RTF: wall clock of sampling plus vocoding all clips (batches of 100) over the seconds of audio made.

Targets (issue 4): 2-step sCD FAD within 1.15x of the teacher's best; pitch accuracy >= 90% and within
5 points of the teacher; 2-step generation plus neural vocoder RTF <= 0.05 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from scm_mm.app import train
from scm_mm_audio import AudioSCM
from scm_mm_audio.codec import GriffinLim
from scm_mm_audio.data import SynthNotes
from scm_mm_audio.mel import log_mel
from scm_mm_audio.metrics import (
    AudioClassifier,
    classifier_features,
    evaluate_audio,
    pitch_accuracy,
    train_audio_classifier,
)
from scm_mm_audio.vocoder_train import copy_synthesis
from scm_mm_audio.vocoders import load_vocoder

SECONDS = 0.496  # configs/data/notes.yaml


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/notes")
    p.add_argument("--n", type=int, default=600, help="clips per score (a multiple of 12 keeps classes balanced)")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--teacher-iters", type=int, default=None, help="default: the recipe's")
    p.add_argument("--student-iters", type=int, default=None)
    p.add_argument("--vocoder-iters", type=int, default=None)
    return p.parse_args()


def train_runs(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The recipe's four runs (each resumes or is skipped when already complete); returns train seconds."""
    runs = [
        ("notes_vocoder", [], "method.trainer.options.iters", args.vocoder_iters),
        ("notes_teacher", [], "train.iters", args.teacher_iters),
        ("notes_scd", [f"method.teacher={out / 'notes_teacher'}"], "train.iters", args.student_iters),
        ("notes_sct", [f"method.init_from={out / 'notes_teacher'}"], "train.iters", args.student_iters),
    ]
    seconds = {}
    for experiment, extra, iters_key, iters in runs:
        overrides = [f"experiment={experiment}", f"run_dir={out / experiment}", "device=cpu", *extra]
        if iters is not None:
            overrides.append(f"{iters_key}={iters}")
        with initialize_config_module("scm_mm_configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        t0 = time.perf_counter()
        train.run(cfg)
        seconds[experiment] = time.perf_counter() - t0
    return seconds


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    train_seconds = train_runs(out, args)

    train_notes = SynthNotes(seconds=SECONDS)
    test_notes = SynthNotes(size=args.n, seconds=SECONDS, split="test")
    real = torch.stack([test_notes[i][0] for i in range(len(test_notes))])  # (n, 1, samples)
    real_midi = torch.tensor([test_notes.midi_of_label(test_notes[i][1]) for i in range(len(test_notes))])
    clf_dir = out / "classifier"
    if (clf_dir / "model.safetensors").exists():
        classifier = AudioClassifier.load(clf_dir)
    else:
        classifier = train_audio_classifier(train_notes, num_classes=train_notes.num_classes, seed=0)
        classifier.save(clf_dir)
    real_features, real_logits = classifier_features(classifier, real)
    held_out_accuracy = float((real_logits.argmax(1) == torch.tensor([y for _, y in test_notes])).float().mean())

    vocoder = load_vocoder(out / "notes_vocoder")
    spec = vocoder.spec
    rows = []

    def score(name: str, waves: torch.Tensor, midi: torch.Tensor, seconds: float | None, **info: object) -> None:
        scores = evaluate_audio(waves, real_features, classifier)
        pitch = pitch_accuracy(waves, spec.sample_rate, midi)
        audio_seconds = waves.shape[0] * waves.shape[-1] / spec.sample_rate
        row = {"model": name, **info, "fad": scores["fad"], "is": scores["is_mean"], "precision": scores["precision"],
               "recall": scores["recall"], "pitch_accuracy": pitch["accuracy"], "voiced": pitch["voiced_fraction"],
               "cents_error": pitch["mean_abs_cents_error"], "seconds": seconds,
               "rtf": None if seconds is None else seconds / audio_seconds}  # fmt: skip
        print(json.dumps(row))
        rows.append(row)

    # The vocoders alone: copy synthesis of the real held-out notes.
    copies = {}
    mels = log_mel(real[:, 0], spec)
    for name, voc in (("vocoder", vocoder), ("griffin-lim", GriffinLim(spec))):
        copies[name] = copy_synthesis(voc, real[:, 0], spec)
        with torch.no_grad():  # the vocoding alone, timed apart from the scoring
            t0 = time.perf_counter()
            voc(mels)
            copies[name]["seconds_per_audio_second"] = (time.perf_counter() - t0) / (real.shape[0] * SECONDS)
        print(name, json.dumps(copies[name]))
    with torch.no_grad():
        score("real + vocoder", vocoder(log_mel(real[:, 0], spec))[:, None].clamp(-1, 1), real_midi, None)
    score("real", real, real_midi, None)

    labels = torch.arange(args.n) % 12
    label_midi = torch.tensor([train_notes.midi_of_label(int(y)) for y in labels])

    def generate(run: str, method: str, steps: int, guidance: float | None) -> tuple[torch.Tensor, float]:
        model = AudioSCM.load(out / run, vocoder=vocoder)
        model.generate(12, steps=steps, method=method, labels=labels[:12], guidance=guidance, seed=0)  # warm-up
        t0 = time.perf_counter()
        waves, _ = model.generate(args.n, steps=steps, method=method, labels=labels, guidance=guidance, seed=1,
                                  batch_size=100)  # fmt: skip
        return waves, time.perf_counter() - t0

    for steps in args.teacher_steps:
        for method, nfe in (("heun", 2 * steps - 1), ("dpmpp_2m", steps)):
            waves, seconds = generate("notes_teacher", method, steps, None)
            score("teacher", waves, label_midi, seconds, sampler=method, steps=steps, nfe=nfe)
    for run, name, guidance in (("notes_scd", "scd", 1.0), ("notes_sct", "sct", None)):
        for steps in (1, 2):
            waves, seconds = generate(run, "consistency", steps, guidance)
            score(name, waves, label_midi, seconds, sampler="consistency", steps=steps, nfe=steps)

    teacher_rows = [r for r in rows if r["model"] == "teacher"]
    best = min(teacher_rows, key=lambda r: r["fad"])
    scd2 = next(r for r in rows if r["model"] == "scd" and r["steps"] == 2)
    summary = {
        "teacher_best": best,
        "scd2_fad_over_teacher": scd2["fad"] / best["fad"],
        "scd2_pitch_minus_teacher": scd2["pitch_accuracy"] - best["pitch_accuracy"],
        "scd2_rtf": scd2["rtf"],
        "classifier_held_out_accuracy": held_out_accuracy,
        "copy_synthesis": copies,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t_start,
        "args": vars(args), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print("\n| model | sampler | steps | NFE | FAD | IS | precision | recall | pitch acc. | voiced | RTF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rtf = "-" if r["rtf"] is None else f"{r['rtf']:.4f}"
        print(f"| {r['model']} | {r.get('sampler', '-')} | {r.get('steps', '-')} | {r.get('nfe', '-')} | "
              f"{r['fad']:.3f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['pitch_accuracy']:.3f} | {r['voiced']:.3f} | {rtf} |")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
