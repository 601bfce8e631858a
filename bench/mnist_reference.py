"""Does the MNIST bench's FID flatter a model for matching its own training digits? The same samples scored
against digits held out of training and against as many training digits (equal sizes, so equal bias).

    python bench/image_mnist.py --out bench_out/mnist_holdout --holdout 1000    # or only its teacher and classifier
    python bench/mnist_reference.py --out bench_out/mnist_holdout

Reads the teacher and the FID classifier of a `--holdout` run of bench/image_mnist.py (both trained on the
4,000 other digits), samples 1,000 digits per sample seed (`--n`) with the teacher's ODE solvers, and prints the
mean FID against the 1,000 held-out digits and against 1,000 training digits (a seeded subset).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from image_mnist import split_digits

from scm_mm.metrics import subset_indices
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.build import load_model
from scm_mm_image import ImageModality
from scm_mm_image.codecs import PixelCodec
from scm_mm_image.metrics import ClassifierFeatures, evaluate_images, extract_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/mnist_holdout", help="a bench/image_mnist.py --holdout folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6])
    p.add_argument("--n", type=int, default=1000, help="samples per seed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    setting = json.loads((out / "data.json").read_text())
    if not setting["holdout"]:
        raise SystemExit(f"{out} was trained on every digit: run bench/image_mnist.py with --holdout first")
    data, held = split_digits(argparse.Namespace(**setting), out)
    trained = torch.stack([data[i][0] for i in subset_indices(len(data), len(held), seed=1).tolist()])
    classifier = ClassifierFeatures.load(out / "classifier")
    references = {name: extract_features(classifier, images, 500)[0]
                  for name, images in (("held-out", held), ("training", trained))}  # fmt: skip
    teacher, meta = load_model(out / "teacher")
    pipe = SCMPipeline(teacher, PixelCodec(sigma_d=0.5), ImageModality(), meta["sample_shape"], 10, meta)
    for method, steps in (("heun", 32), ("dpmpp_2m", 16)):
        fids: dict[str, list[float]] = {name: [] for name in references}
        for seed in args.seeds:
            images = pipe.generate(args.n, steps=steps, method=method, seed=seed, batch_size=250)
            for name, reference in references.items():
                fids[name].append(evaluate_images(images, reference, classifier, batch_size=500)["fid"])
        scores = {name: {"mean": statistics.mean(v), "per_seed": v} for name, v in fids.items()}
        print(json.dumps({"sampler": method, "steps": steps, **scores}))


if __name__ == "__main__":
    main()
