"""scm-mm-train: a Hydra app that composes a run from configs/ and hands it to scm_mm.train.loop.train.

    scm-mm-train experiment=mnist_teacher
    scm-mm-train experiment=mnist_scd method.teacher=runs/mnist_teacher train.iters=500
    torchrun --nproc_per_node 8 -m scm_mm.app.train experiment=imagenet64_scd_s method.teacher=...
    scm-mm-train experiment=notes_vocoder          # a method with a `trainer` runs that trainer instead

Everything Hydra-specific stays here: configs become plain objects (datasets, codecs, losses, nets
built from JSON specs) before the loop sees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from scm_mm.data import training_set
from scm_mm.modality import codec_to, get_modality, sharded_evaluation
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.build import build_model, load_teacher
from scm_mm.train.checkpoint import canonical_spec, read_meta, resolve_checkpoint, weights_digest
from scm_mm.train.distributed import Shards, init_distributed, leave_distributed
from scm_mm.train.loop import TrainOptions, train

CONFIG_PATH = "pkg://scm_mm_configs"


def model_spec(cfg: DictConfig) -> dict[str, Any]:
    """The JSON spec of the network and its preconditioning, stored in every checkpoint. The net is written
    out in full (`canonical_spec`), so a checkpoint keeps its meaning when a preset changes; the preset's
    name stays in the stored config."""
    return {"net": canonical_spec(plain(cfg.net)), "precond": plain(cfg.precond)}


def plain(cfg: DictConfig) -> dict[str, Any]:
    """A config node as plain, resolved, JSON-serialisable dicts and lists."""
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def train_options(cfg: DictConfig) -> TrainOptions:
    options = cast(dict[str, Any], OmegaConf.to_container(cfg.train, resolve=True))
    options["betas"] = tuple(options["betas"])
    options["ema_sigma_rels"] = tuple(options["ema_sigma_rels"])
    return TrainOptions(**options)


def missing_values(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """The keys left at ??? under a config node (interpolations are not resolved)."""
    keys: list[Any] = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    found = []
    for key in keys:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(child := node[key]):
            found += missing_values(child, f"{prefix}{key}.")
    return found


def require_values(cfg: DictConfig) -> None:
    """Refuse a config with values left at ??? (a teacher, a data folder, a VAE), before any data is read.
    (`cfg.get` reads ??? as None, so a forgotten `method.init_from` would otherwise mean "from scratch".)
    A method with its own trainer (a vocoder, a video autoencoder) reads only `data` and `method`."""
    used = ("data", "method") if cfg.method.get("trainer") else tuple(str(k) for k in cfg if k != "hydra")
    missing = [key for key in missing_values(cfg) if key.split(".")[0] in used]
    if missing:
        hint = "; method.init_from=null trains sCT from scratch" if "method.init_from" in missing else ""
        raise ValueError(f"this run needs a value for {', '.join(missing)} (scm-mm-train ... {missing[0]}=...{hint})")


# What a method with its own trainer (a vocoder, a video autoencoder) reads of the config: not `train`,
# `net`, `precond`, `sampler`, `preview` or `evaluation`, which describe an sCM run.
TRAINER_READS = ("data", "method", "modality", "name", "run_dir", "device", "host_wait_hours", "experiment", "hydra")


def refuse_unread_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse command-line overrides that a method with its own trainer would ignore (train.iters=2 on a
    vocoder run trained the full 2,000 iterations without a word): its settings are method.trainer.options."""
    if not cfg.method.get("trainer"):
        return
    keys = [override.split("=", 1)[0].lstrip("+~") for override in overrides]
    unread = [key for key in keys if key.split(".")[0] not in TRAINER_READS]
    if unread:
        raise ValueError(f"method {cfg.method.name!r} trains with a loop of its own, which does not read "
                         f"{', '.join(unread)}; its settings are under method.trainer.options "
                         "(e.g. method.trainer.options.iters=...)")  # fmt: skip


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> Any:
    """Train what `cfg` describes; returns the loop's TrainResult (or a modality trainer's result).
    `overrides`: the command line's, checked against what a method with its own trainer reads."""
    require_values(cfg)
    refuse_unread_overrides(cfg, overrides)
    hours = cfg.get("host_wait_hours")
    info = init_distributed(cfg.device, wait_timeout=timedelta(hours=hours) if hours else None)
    run_dir = Path(cfg.run_dir)
    modality = get_modality(cfg.modality.name)
    raw = instantiate(cfg.data.dataset)
    method = cfg.method
    if method.get("trainer"):  # a modality's own model that is not an sCM (a vocoder): its own loop
        if info.enabled:
            raise ValueError(f"method {method.name!r} trains on one process; launch it without torchrun")
        return instantiate(method.trainer)(dataset=raw, run_dir=run_dir, device=info.device)
    codec: Any = codec_to(instantiate(cfg.modality.codec), info.device)  # a VAE encodes, decodes on the model's device
    if not getattr(codec, "fitted", True):  # normalisation measured on the data (mel statistics)
        source = method.get("teacher") or method.get("init_from")
        if source:  # the student keeps its teacher's statistics
            codec = codec_to(modality.codec_from_state(read_meta(resolve_checkpoint(source))["codec"]), info.device)
        else:
            codec = codec.fit(raw)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir.parent / ".cache"
    dataset = training_set(raw, codec, cache_dir, num_workers=cfg.train.num_workers, info=info)  # ranks share encoding
    sample_shape = list(dataset[0][0].shape)
    if list(cfg.data.shape) != sample_shape:
        raise ValueError(f"data.shape is {list(cfg.data.shape)} but the codec gives samples of shape {sample_shape}")

    spec = model_spec(cfg)
    teacher, teacher_id = None, {}
    if method.get("teacher"):  # sCD: the student starts from the teacher's EMA weights (App. G.2)
        teacher_ckpt = resolve_checkpoint(method.teacher)  # a run: its newest checkpoint, now
        teacher, model = load_teacher(teacher_ckpt, spec, codec.state())
        digest = weights_digest(teacher.state_dict())
        teacher_id = {"teacher": {"checkpoint": str(teacher_ckpt), "weights_digest": digest}}
    elif method.get("init_from"):  # sCT (or fine-tuning) from a diffusion model's EMA weights
        _, model = load_teacher(method.init_from, spec, codec.state(), distilling=False)
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_model(spec)
    objective = instantiate(method.loss)
    meta = {
        "model": spec,
        "modality": modality.name,
        "codec": codec.state(),
        "sample_shape": sample_shape,
        "num_classes": int(cfg.data.num_classes),
        "method": method.name,
        "config": plain(cfg),
        **teacher_id,  # a resumed run refuses another teacher (scm_mm.train.loop)
    }
    if getattr(raw, "fps", None):  # the frame rate of video clips, for the writers
        meta["fps"] = float(raw.fps)

    pipeline = getattr(modality, "pipeline", SCMPipeline)  # the modality's API knows its media options
    guidance = 1.0 if cfg.method.guidance_input and cfg.data.num_classes else None

    def generate(
        ema_model: torch.nn.Module, n: int, seed: int, shards: Shards | None = None
    ) -> tuple[SCMPipeline, Iterator[torch.Tensor], Any]:
        """(pipeline, n decoded samples of the run's sampler in batches on the CPU, or this rank's share of
        them, their labels)."""
        pipe = pipeline(ema_model, codec, modality, sample_shape, int(cfg.data.num_classes), meta)  # type: ignore[arg-type]
        labels = pipe.labels_for(n, None)  # a class-conditional model cycles through its classes
        share = {"batch_size": shards.batch_size, "shard": shards.shard} if shards is not None else {}
        batches = pipe.decoded_batches(
            n, steps=cfg.sampler.steps, method=cfg.sampler.method, t_mid=cfg.sampler.t_mid, seed=seed,
            labels=labels, guidance=guidance, **share,
        )  # fmt: skip
        return pipe, batches, labels

    def preview(ema_model: torch.nn.Module, it: int) -> torch.Tensor:
        return modality.preview(torch.cat(list(generate(ema_model, cfg.preview.n, cfg.preview.seed)[1])))

    # scm-mm-eval's metrics against the run's data every train.eval_every iterations, with its samples for the
    # same n, seed and batch_size; under torchrun every rank samples and scores a share (checked here, not
    # at the first evaluation)
    evaluation = cfg.evaluation
    shards = Shards(evaluation.n, evaluation.batch_size, info) if cfg.train.eval_every else None
    sharded = sharded_evaluation(modality, shards) if shards is not None else {}

    def evaluate(ema_model: torch.nn.Module, it: int) -> dict[str, float]:
        pipe, media, labels = generate(ema_model, evaluation.n, evaluation.seed, shards)
        metrics = modality.evaluate(  # type: ignore[attr-defined]
            media, raw, labels=labels, features=evaluation.features, inception_path=evaluation.inception_path,
            classifier_path=evaluation.classifier_path, cache_dir=cache_dir, device=info.device,
            **pipe.media_options(), **sharded,
        )  # fmt: skip
        return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}

    return train(model, objective, dataset, train_options(cfg), run_dir, teacher=teacher, meta=meta,
                 preview=preview, evaluate=evaluate if shards is not None else None, info=info)  # fmt: skip


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().overrides.task)
    finally:
        leave_distributed()


if __name__ == "__main__":
    main()
