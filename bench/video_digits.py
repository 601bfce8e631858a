"""The embedded Moving-MNIST clips on a CPU: Frechet video distance, per-frame Frechet distance and generated
frames per second of the teacher at its best NFE and of sCD and sCT at 1 and 2 steps.

    python bench/video_digits.py --out bench_out/digits     # trains the recipe once; reruns reuse the runs
    python bench/video_digits.py --out bench_out/digits --students scd --tag _nocfg --scd-overrides \
        method.guidance_input=false method.loss.guidance_range=null      # another sCD beside the same teacher
    python bench/video_digits.py --out bench_out/digits --students scd --teacher-steps 32 64 128 256 \
        --teacher-samplers --churn inf       # the teacher with EDM's stochastic sampler only (largest churn)

The runs are the library's recipe through the same code path as `scm-mm-train` (configs/experiment/
digits_{vae,teacher,scd,sct}.yaml): 2,000 clips of two real MNIST digits of one class bouncing in 32x32 frames
(9 frames, 8 fps), a causal 2x4x4 autoencoder with 4 latent channels, the digits-dit transformer over its
(4, 5, 8, 8) latents. sCD and sCT start from the teacher's EMA.

Scores, for every model with the same number of class-balanced clips (unguided, s = 1), against held-out
real clips (the "test" split: other MNIST digits, other trajectories), in the features of two classifiers
trained on the training clips (scm_mm_video.metrics: not I3D): "fvd" (a 3-D CNN that also tells true from
shuffled frame order) and "frame_fd" (a 2-D CNN on single frames). "real + VAE" is the floor set by the
autoencoder (real test clips encoded and decoded). Frames per second count the wall clock of sampling and
decoding all clips (batches of 100), on the threads given (2 by default).

Targets (issue 5): 2-step sCD within 1.15x of the teacher's best Frechet video distance; 2-step generation at
least 15x faster than the teacher at its best NFE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from scm_mm.app import train
from scm_mm_video import VideoSCM
from scm_mm_video.codec import load_autoencoder, to_uint8, to_unit
from scm_mm_video.data import MovingDigits
from scm_mm_video.io import write_frame_strip
from scm_mm_video.metrics import (
    FrameClassifier,
    VideoClassifier,
    reference_features,
    train_frame_classifier,
    train_video_classifier,
    video_scores,
)
from scm_mm_video.vae_train import reconstruction_psnr


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/digits")
    p.add_argument("--n", type=int, default=500, help="clips per score (a multiple of 10 keeps classes balanced)")
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--teacher-samplers", nargs="*", default=["heun", "dpmpp_2m"], choices=["heun", "dpmpp_2m"],
                   help="the teacher's ODE samplers, each at every --teacher-steps")
    p.add_argument("--churn", type=float, nargs="*", default=[],
                   help="also EDM's stochastic Heun at these S_churn values, at every --teacher-steps")  # fmt: skip
    p.add_argument("--vae-iters", type=int, default=None, help="default: the recipe's")
    p.add_argument("--teacher-iters", type=int, default=None)
    p.add_argument("--student-iters", type=int, default=None)
    p.add_argument("--students", nargs="+", default=["scd", "sct"], help="which students to train and score")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-seed", type=int, default=1,
                   help="seed of the scored clips' noise; another seed gives the scores' sampling noise")  # fmt: skip
    p.add_argument("--scd-overrides", nargs="*", default=[],
                   help="extra Hydra overrides of the sCD run, e.g. method.guidance_input=false "
                        "method.loss.guidance_range=null (distil the teacher without CFG)")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the student runs and results: variants beside one teacher")
    return p.parse_args()


def train_runs(out: Path, args: argparse.Namespace) -> dict[str, float]:
    """The recipe's four runs (each resumes or is skipped when already complete); returns train seconds."""
    vae = f"modality.codec.vae={out / 'digits_vae'}"
    runs = [
        ("digits_vae", [], "method.trainer.options.iters", args.vae_iters),
        ("digits_teacher", [vae], "train.iters", args.teacher_iters),
        ("digits_scd", [vae, f"method.teacher={out / 'digits_teacher'}", *args.scd_overrides], "train.iters",
         args.student_iters),
        ("digits_sct", [vae, f"method.init_from={out / 'digits_teacher'}"], "train.iters", args.student_iters),
    ]  # fmt: skip
    seconds = {}
    runs = [run for run in runs if run[0].removeprefix("digits_") in ("vae", "teacher", *args.students)]
    for experiment, extra, iters_key, iters in runs:
        run_dir = out / (experiment if experiment in ("digits_vae", "digits_teacher") else experiment + args.tag)
        overrides = [f"experiment={experiment}", f"run_dir={run_dir}", "device=cpu", *extra]
        if iters is not None:
            overrides.append(f"{iters_key}={iters}")
        with initialize_config_module("scm_mm_configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        t0 = time.perf_counter()
        train.run(cfg)
        seconds[run_dir.name] = time.perf_counter() - t0
    return seconds


def classifiers(out: Path) -> tuple[VideoClassifier, FrameClassifier, dict[str, float]]:
    """The two feature networks, trained once on the training clips; their held-out accuracy."""
    folder, data = out / "classifiers", MovingDigits()
    if not (folder / "video" / "model.safetensors").exists():
        train_video_classifier(data, 10, log_every=100).save(folder / "video")
        train_frame_classifier(data, 10, log_every=100).save(folder / "frame")
    video_net, frame_net = VideoClassifier.load(folder / "video"), FrameClassifier.load(folder / "frame")
    test = MovingDigits(size=500, split="test")
    clips = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        video_acc = float((video_net(clips)[1].argmax(1) == labels).float().mean())
        frames = clips.transpose(1, 2).flatten(0, 1)
        frame_acc = float((frame_net(frames)[1].argmax(1) == labels.repeat_interleave(clips.shape[2])).float().mean())
    return video_net, frame_net, {"video_classifier": video_acc, "frame_classifier": frame_acc}


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train_seconds = train_runs(out, args)
    video_net, frame_net, accuracy = classifiers(out)

    test = MovingDigits(size=args.n, split="test")
    real = reference_features(test, video_net, frame_net, max_reference=args.n)
    real_clips = torch.stack([test[i][0] for i in range(len(test))])
    rows = []

    def score(name: str, clips: torch.Tensor, seconds: float | None, **info: object) -> None:
        scores = video_scores(clips, real, video_net, frame_net)
        frames = clips.shape[0] * clips.shape[2]
        row = {"model": name, **info, **scores, "seconds": seconds,
               "frames_per_s": None if seconds is None else frames / seconds}  # fmt: skip
        print(json.dumps(row))
        rows.append(row)

    vae = load_autoencoder(out / "digits_vae")
    with torch.no_grad():
        recon = to_uint8(vae.decode_raw(vae.encode_raw(to_unit(real_clips))))
    score("real + VAE", recon, None)
    train_clips = MovingDigits(size=args.n, seed=1)
    score("real (train split)", torch.stack([train_clips[i][0] for i in range(args.n)]), None)
    psnr = reconstruction_psnr(vae, test, n=256)

    labels = torch.arange(args.n) % 10

    def generate(
        run: str, method: str, steps: int, guidance: float | None, churn: float = 0.0
    ) -> tuple[torch.Tensor, float]:
        model = VideoSCM.load(out / run)
        if not any(getattr(m, "guidance_embed", False) for m in model.model.modules()):
            guidance = None  # a student distilled without CFG has no guidance input
        kw = dict(steps=steps, method=method, guidance=guidance, churn=churn)
        model.generate(10, labels=labels[:10], seed=0, **kw)  # warm-up
        t0 = time.perf_counter()
        clips = model.generate(args.n, labels=labels, seed=args.sample_seed, batch_size=100, **kw)
        return clips.permute(0, 4, 1, 2, 3), time.perf_counter() - t0  # (n, C, T, H, W)

    teacher_samplers = [(method, 0.0) for method in args.teacher_samplers] + [("heun", c) for c in args.churn]
    for steps in args.teacher_steps:
        for method, churn in teacher_samplers:
            clips, seconds = generate("digits_teacher", method, steps, None, churn)
            stochastic = {"churn": churn} if churn else {}
            nfe = 2 * steps - 1 if method == "heun" else steps
            score("teacher", clips, seconds, sampler=method, **stochastic, steps=steps, nfe=nfe)
            name = f"{method}_churn{churn:g}" if churn else method
            write_frame_strip(clips.permute(0, 2, 3, 4, 1)[:10], out / f"teacher_{name}_{steps}.png")
    for name, guidance in (("scd", 1.0), ("sct", None)):
        if name not in args.students:
            continue
        for steps in (1, 2):
            clips, seconds = generate(f"digits_{name}{args.tag}", "consistency", steps, guidance)
            score(name, clips, seconds, sampler="consistency", steps=steps, nfe=steps)
            strip = out / f"{name}{args.tag}_{steps}step.png"  # one row per class
            write_frame_strip(clips.permute(0, 2, 3, 4, 1)[:10], strip)

    teacher_rows = [r for r in rows if r["model"] == "teacher"]
    best = min(teacher_rows, key=lambda r: r["fvd"])
    scd2 = next((r for r in rows if r["model"] == "scd" and r["steps"] == 2), None)  # None: --students sct
    ratios = {} if scd2 is None else {"scd2_fvd_over_teacher": scd2["fvd"] / best["fvd"],
                                      "teacher_best_time_over_scd2": best["seconds"] / scd2["seconds"]}  # fmt: skip
    summary = {
        "teacher_best": best,
        **ratios,
        "vae_psnr": psnr, "classifier_accuracy": accuracy,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t_start,
        "args": vars(args), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    seed_tag = "" if args.sample_seed == 1 else f"_seed{args.sample_seed}"
    (out / f"results{args.tag}{seed_tag}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print("\n| model | sampler | steps | NFE | FVD (3-D clf.) | frame FD | IS | precision | recall | frames/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fps = "-" if r["frames_per_s"] is None else f"{r['frames_per_s']:.0f}"
        sampler = r.get("sampler", "-") + (f", churn {r['churn']:g}" if "churn" in r else "")
        print(f"| {r['model']} | {sampler} | {r.get('steps', '-')} | {r.get('nfe', '-')} | "
              f"{r['fvd']:.3f} | {r['frame_fd']:.3f} | {r['is_mean']:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {fps} |")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
