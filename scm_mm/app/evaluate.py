"""scm-mm-eval: sample from a checkpoint and score the samples against the run's own data.

    scm-mm-eval checkpoint=runs/mnist_scd n=1000 steps=2
    scm-mm-eval checkpoint=runs/mnist_teacher solver=heun steps=16 out=runs/mnist_teacher/eval.json

The reference data is the dataset recorded in the checkpoint's config; the modality computes the
metrics (for images: FID, IS, precision and recall in Inception or offline-classifier features). The
samples reach it a batch at a time (`SCMPipeline.decoded_batches`) and on the model's device: images are
scored as they come, so FID-50k at 512x512 keeps features, not 39 GB of pixels. Under torchrun each process
samples and featurises a share of the batches (`Shards`) and the first prints the scores of them all, which
equal a single process's for the same seed and batch size:

    torchrun --nproc_per_node 8 -m scm_mm.app.evaluate checkpoint=runs/imagenet512_scd_xxl n=50000 \
        features=inception inception_path=/data/pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from scm_mm.modality import sharded_evaluation
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.checkpoint import CHECKPOINT_DIR, import_target, resolve_checkpoint, spec_class, spec_target
from scm_mm.train.distributed import DistInfo, Shards, from_main, init_distributed, leave_distributed, slowest

from .sample import check_modality, codec_overrides, pick_device
from .train import CONFIG_PATH


class Timed(Iterator[torch.Tensor]):
    """The batches of `batches`, with `seconds`: the time spent producing them (sampling and decoding, which
    the move to the CPU waits for), not the time the caller spends on each (the metrics)."""

    def __init__(self, batches: Iterator[torch.Tensor]) -> None:
        self.batches, self.seconds = batches, 0.0

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - start


def check_features(cfg: DictConfig) -> None:
    """Refuse features=inception without its local weight file before sampling, not after (an untrained
    Inception would give numbers that mean nothing; the modality refuses it too)."""
    path = cfg.get("inception_path")
    if cfg.get("features") == "inception" and (path is None or not Path(path).is_file()):
        given = "inception_path is not set" if path is None else f"inception_path '{path}' is not a file"
        raise FileNotFoundError(
            f"features=inception needs the FID Inception weights from a local file, but {given}. Fetch "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (scm-mm never downloads), put it on this machine, "
            "e.g. in ~/.cache/scm-mm/, and pass inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth; "
            "or use features=classifier (the offline FID, no download)"
        )


def _builds(value: Any) -> bool:
    """Whether a spec's value holds a `_target_` at any depth."""
    if isinstance(value, Mapping):
        return "_target_" in value or any(_builds(v) for v in value.values())
    return isinstance(value, list | tuple) and any(_builds(v) for v in value)


def reference_dataset(ckpt: Path, meta: dict[str, Any]) -> Any:
    """The training data a checkpoint records, to score against. Its spec comes from the checkpoint's
    meta.json, so it may name one of scm-mm's Dataset classes and nothing else (`spec_class`)."""
    spec = meta.get("config", {}).get("data", {}).get("dataset")
    if spec is None:
        raise ValueError(f"{ckpt}: the checkpoint records no dataset to compare against")
    target = spec.get("_target_")
    if isinstance(target, str) and target.endswith(".build_dataset"):  # a modality's DATASETS[name](**kwargs)
        registry = import_target(target.removesuffix("build_dataset") + "DATASETS")
        if spec.get("name") not in registry:
            raise ValueError(f"{ckpt}: the dataset spec names {spec.get('name')!r}, which {target} does not build")
        target = spec_target(registry[spec["name"]])
    spec_class(target, torch.utils.data.Dataset)
    nested = [key for key, value in spec.items() if key != "_target_" and _builds(value)]
    if nested:
        raise ValueError(f"{ckpt}: refusing to build the dataset: its spec builds more objects ({', '.join(nested)})")
    return instantiate(spec)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_features(cfg)
    info = distributed_info(cfg)
    ckpt = from_main(lambda: resolve_checkpoint(cfg.checkpoint), info)  # one checkpoint, if a run writes another
    pipe = SCMPipeline.load(ckpt, which=cfg.weights, device=info.device, **codec_overrides(cfg))
    check_modality(cfg, pipe)
    solver, steps = pipe.sampler_for(cfg.solver, cfg.steps)  # a teacher's ODE solver unless told otherwise
    reference = reference_dataset(ckpt, pipe.meta)
    shards = Shards(cfg.n, cfg.batch_size, info)
    sharded = sharded_evaluation(pipe.modality, shards)
    labels = pipe.labels_for(cfg.n, None)  # a class-conditional model cycles through its classes
    media = Timed(pipe.decoded_batches(
        cfg.n, steps=steps, method=solver, t_mid=cfg.t_mid, churn=cfg.churn, labels=labels,
        guidance=cfg.guidance, seed=cfg.seed, batch_size=cfg.batch_size, shard=shards.shard,
    ))  # fmt: skip
    run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt  # <run>/checkpoints/iter-N, or a folder
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.parent / ".cache"  # beside the run, as scm-mm-train's
    metrics = pipe.modality.evaluate(  # type: ignore[attr-defined]
        media, reference, labels=labels, features=cfg.features, inception_path=cfg.inception_path,
        classifier_path=cfg.classifier_path, cache_dir=cache_dir, device=pipe.device, **pipe.media_options(),
        **sharded,
    )  # fmt: skip
    result = {"checkpoint": str(ckpt), "solver": solver, "steps": steps, "n": cfg.n, "processes": info.world_size,
              "sampling_seconds": slowest(media.seconds, info), **metrics}  # fmt: skip
    if info.is_main:
        print(json.dumps(result, indent=2))
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(json.dumps(result, indent=2))
    return result


def distributed_info(cfg: DictConfig) -> DistInfo:
    """Under torchrun, the process group (each process samples and featurises its share of the n samples,
    `Shards`); else one process on cfg.device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo(device=torch.device(pick_device(cfg.device)))
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"under torchrun, device must be auto, cuda or cpu (each process takes its LOCAL_RANK's "
                         f"GPU), got {cfg.device!r}")  # fmt: skip
    hours = cfg.get("host_wait_hours")
    return init_distributed(cfg.device, wait_timeout=timedelta(hours=hours) if hours else None)


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    finally:
        leave_distributed()


if __name__ == "__main__":
    main()
