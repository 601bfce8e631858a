"""The training loop: one function for teachers (diffusion), sCT and sCD, on one process or many.

Read top to bottom: set up (devices, seeds, optimiser, EMA, resume), then per iteration: draw the
micro-batches, forward and backward under autocast, clip and step, update the EMA, then log, preview,
evaluate and checkpoint. Progress is counted in iterations (optimiser steps) and samples seen.

Randomness and the world size: data order comes from DistributedSampler (fixed seed, set per epoch),
and the loss's random inputs (times, noise, label dropout, guidance scales) are drawn once per
iteration for the whole global batch from a generator seeded by (seed, iteration); each rank takes
the rows of its samples. So a run gives the same updates on 1 or N processes, with or without
gradient accumulation (tests/test_training.py checks 2 gloo processes against 1). Dropout masks come
from each rank's own RNG, saved per rank in every checkpoint with the optimiser and the averages, so
on the CPU a run killed and resumed repeats the losses of an uninterrupted run exactly. A run may resume
with another accum_steps or world size (the data position converts, `resume_position`); batch_size, the
seed and the EMA must stay as saved (RESUME_FIXED).
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..jvp import unwrap
from ..losses import DiffusionLoss, SCMLoss
from ..nn.embeddings import ConditionEmbedding
from ..precond import TrigFlowModel
from .checkpoint import (
    TRAIN_FILES,
    load_state,
    load_weights,
    read_meta,
    resume_source,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from .distributed import DistInfo, Strategy, barrier, from_main, per_rank_batch, wrap_model
from .ema import EMA, PowerEMA
from .step import apply_gradients

Hook = Callable[[nn.Module, int], Any]  # (EMA model, iteration) -> result


@dataclass
class TrainOptions:
    """Everything about how to train; the model, objective and data come separately."""

    iters: int = 1000                    # optimiser steps in total
    batch_size: int = 64                 # global batch: constant across world sizes and accumulation
    accum_steps: int = 1                 # micro-batches per optimiser step on each rank
    optimizer: Literal["adam", "radam"] = "adam"
    lr: float = 1e-4                     # reference learning rate
    lr_ref_iters: int = 0                # EDM2 decay lr / sqrt(max(it / t_ref, 1)); 0 = constant (App. G)
    lr_rampup_iters: int = 0             # linear warmup of the learning rate
    lr_cooldown_iters: int = 0           # linear decay to zero over the last iterations of `iters`
    betas: tuple[float, float] = (0.9, 0.99)  # App. G: Adam beta = (0.9, 0.99)
    eps: float = 1e-11                   # App. G: Adam eps 1e-11 (RAdam on CIFAR-10: 1e-8)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None   # clip the global gradient norm
    ema: Literal["power", "classic", "none"] = "power"
    ema_sigma_rels: tuple[float, ...] = (0.05,)  # power EMA; the paper samples with sigma_rel = 0.05
    ema_halflife_samples: float = 500_000  # classic EMA half-life (CIFAR-10: 0.5 Mimg)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of the backbone
    strategy: Strategy = "ddp"           # with several processes: DDP, or FSDP2 for large models
    seed: int = 0
    num_workers: int = 0                 # DataLoader workers per rank
    log_every: int = 10                  # iterations between progress/TensorBoard scalars; 0 = at the end only
    ckpt_every: int = 500                # iterations between checkpoints (and one at the end); 0 = at the end only
    keep_last: int = 3                   # checkpoints kept
    sample_every: int = 0                # iterations between sample grids; 0 = never
    eval_every: int = 0                  # iterations between evaluations; 0 = `evaluate` only at the end (the
                                         # app gives no `evaluate` at 0: train.eval_every=0 evaluates never)
    resume: str = "auto"                 # "auto": latest checkpoint of run_dir if any; "never"; or a path
    progress: bool = True                # the tqdm bar (rank 0)

    def __post_init__(self) -> None:  # at config time, not at the first step that divides by a count
        counts = ("iters", "lr_ref_iters", "lr_rampup_iters", "lr_cooldown_iters", "num_workers", "log_every",
                  "ckpt_every", "keep_last", "sample_every", "eval_every")  # fmt: skip
        bad = [f"{name}={getattr(self, name)} (must be >= 0)" for name in counts if getattr(self, name) < 0]
        bad += [f"{name}={getattr(self, name)} (must be >= 1)" for name in ("batch_size", "accum_steps")
                if getattr(self, name) < 1]  # fmt: skip
        if bad:
            raise ValueError("invalid training options: " + ", ".join(bad))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # per iteration of this call (rank mean)
    iteration: int = 0
    skipped_steps: int = 0
    checkpoint: Path | None = None
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)


def learning_rate(options: TrainOptions, it: int) -> float:
    """EDM2's schedule: inverse square-root decay after t_ref, with an optional linear ramp-up, and an
    optional linear cool-down that ends at zero after the last iteration."""
    lr = options.lr
    if options.lr_ref_iters > 0:
        lr /= math.sqrt(max(it / options.lr_ref_iters, 1.0))
    if options.lr_rampup_iters > 0:
        lr *= min(it / options.lr_rampup_iters, 1.0)
    if options.lr_cooldown_iters > 0:
        lr *= min((options.iters - it) / options.lr_cooldown_iters, 1.0)
    return lr


def make_optimizer(params: Any, options: TrainOptions) -> torch.optim.Optimizer:
    lr, betas, eps, decay = options.lr, tuple(options.betas), options.eps, options.weight_decay
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)  # type: ignore[arg-type]
    if options.optimizer == "radam":
        return torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=decay)  # type: ignore[arg-type]
    raise ValueError(f"optimizer must be 'adam' or 'radam', got {options.optimizer!r}")


def make_ema(model: nn.Module, options: TrainOptions) -> EMA | PowerEMA | None:
    if options.ema == "power":
        return PowerEMA(model, sigma_rels=options.ema_sigma_rels)
    if options.ema == "classic":
        return EMA(model, halflife_samples=options.ema_halflife_samples)
    if options.ema == "none":
        return None
    raise ValueError(f"ema must be 'power', 'classic' or 'none', got {options.ema!r}")


def sampling_model(model: nn.Module, ema: EMA | PowerEMA | None) -> nn.Module:
    """The weights to sample with: the first EMA average, or the model itself without one."""
    return next(iter(ema.named_averages().values())) if ema is not None else unwrap(model)


@contextmanager
def _sampling(model: nn.Module, ema: EMA | PowerEMA | None, device: torch.device) -> Iterator[nn.Module]:
    """The sampling model in eval mode (no dropout, also without an EMA, when it is the trained model itself),
    with its mode and the random state restored afterwards: a preview or an evaluation changes neither the
    training's mode nor its dropout stream, so a run's losses do not depend on its hooks."""
    sampler = sampling_model(model, ema)
    was_training = sampler.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        sampler.eval()
        try:
            yield sampler
        finally:
            sampler.train(was_training)


def network_classes(model: nn.Module) -> int | None:
    """The classes the network was built for (0: unconditional), or None for a net that does not say
    (one without scm-mm's ConditionEmbedding)."""
    return next((m.num_classes for m in model.modules() if isinstance(m, ConditionEmbedding)), None)


def use_labels(model: nn.Module, dataset: Dataset) -> bool:
    """Whether the loop conditions on the dataset's labels: the network decides, not the dataset.

    An unconditional net on a labelled dataset (the paper's CIFAR-10 runs, App. G) trains without
    the labels; a net built for fewer classes than the dataset has is refused before the first step.
    """
    data_classes = int(getattr(dataset, "num_classes", 0))
    net_classes = network_classes(model)
    if net_classes is None:
        return data_classes > 0
    if net_classes == 0:
        if data_classes:
            warnings.warn(
                f"the network is unconditional (num_classes=0): training without the dataset's "
                f"{data_classes} class labels",
                stacklevel=3,
            )
        return False
    if data_classes > net_classes:
        raise ValueError(
            f"the dataset has {data_classes} classes but the network was built for {net_classes}: set the "
            f"data config's num_classes to {data_classes} (or 0 for an unconditional model)"
        )
    return data_classes > 0


def _batches(
    dataset: Dataset, micro: int, info: DistInfo, options: TrainOptions, epoch: int, start: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this rank's micro-batches, from micro-batch `start` on (for resuming mid-epoch)."""
    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=options.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)[start * micro :]
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=micro,
        sampler=indices,  # type: ignore[arg-type]
        drop_last=True,
        num_workers=options.num_workers,
        generator=torch.Generator().manual_seed(options.seed * 100_003 + epoch * 1009 + info.rank),
        persistent_workers=False,
    )
    yield from loader


# Options a resumed run must share with its checkpoint: the global batch (the data position, the EMA's and
# the schedule's sample counts), the seed (the data order and the loss's random inputs) and the averages kept.
# accum_steps and the world size may change: the position is converted (`resume_position`).
RESUME_FIXED = ("batch_size", "seed", "ema", "ema_sigma_rels")


def _saved_world_size(state: dict[str, Any], source: Path) -> int:
    """The number of processes that wrote a checkpoint (older checkpoints: one random state per rank)."""
    return int(state.get("world_size") or len(list(source.glob("rng-rank*.pt"))) or 1)


def resume_position(
    state: dict[str, Any], options: TrainOptions, dataset: Dataset, micro: int, info: DistInfo, source: Path
) -> int:
    """This rank's micro-batches into the saved epoch under the current accum_steps and world size.

    Refuses a change of the RESUME_FIXED options, naming each. The ranks' micro-batches interleave into one
    order (rank r's k-th micro-batch holds positions (k * micro + j) * world_size + r of the epoch's
    permutation, which depends only on the seed and the epoch), so the saved position is a number of samples
    into the epoch whatever the accumulation and world size; it converts exactly when it is a whole number
    of the new micro-batches (always, unless an epoch ended inside the saved iteration).
    """
    saved = json.loads(state.get("options", "{}"))
    current = json.loads(json.dumps(asdict(options)))  # tuples as JSON lists, as saved
    changed = [f"  {k}: {saved[k]!r} in the checkpoint, {current[k]!r} now" for k in RESUME_FIXED
               if k in saved and saved[k] != current[k]]  # fmt: skip
    if changed:
        raise ValueError(
            f"cannot resume {source} with these options changed:\n" + "\n".join(changed) + "\nThey fix the data "
            "order, the averages or what an iteration means. Resume with the checkpoint's values, or start a new run "
            "(another run_dir, or train.resume=never; a student can start from this run's weights instead)."
        )
    saved_world = _saved_world_size(state, source)
    samples = state.get("epoch_samples")
    if samples is None:  # checkpoints written before epoch_samples was stored
        samples = state["micro"] * per_rank_batch(saved["batch_size"], saved["accum_steps"], saved_world) * saved_world
    step = micro * info.world_size  # samples per micro-batch on all ranks
    in_epoch = len(dataset) // info.world_size // micro  # type: ignore[arg-type]  # micro-batches per rank
    if samples >= in_epoch * step:
        return in_epoch  # the epoch is over for the new micro-batch: the loop moves on to the next
    if samples % step:
        raise ValueError(
            f"{source} stopped {samples} samples into epoch {state['epoch']}, not a whole number of micro-batches "
            f"of {micro} on each of {info.world_size} process(es) (accum_steps={options.accum_steps}; the checkpoint "
            f"used accum_steps={saved.get('accum_steps')} on {saved_world}). Resume with the checkpoint's settings "
            "until the next checkpoint, or with a micro-batch that divides the position."
        )
    return samples // step


def _due(it: int, every: int) -> bool:
    """Whether a periodic action falls on iteration `it`; every = 0 means never (the loop adds the end)."""
    return every > 0 and it % every == 0


def _check_same_teacher(saved: dict[str, Any], meta: dict[str, Any], source: Path) -> None:
    """A resumed sCD run goes on with the teacher it started from: `method.teacher` names a run, whose newest
    checkpoint may have changed since (the teacher trained on, or pruned the one the student started from)."""
    before, now = saved.get("teacher"), meta.get("teacher")
    if before is None or now is None or before["weights_digest"] == now["weights_digest"]:
        return
    where = before["checkpoint"]
    hint = f"resume with method.teacher={where}" if Path(where).is_dir() else f"{where} is gone: restore it"
    raise ValueError(f"{source} distills the teacher at {where} (weights {before['weights_digest']}), but "
                     f"method.teacher now gives {now['checkpoint']} (weights {now['weights_digest']}): {hint}, "
                     "or start a new run_dir")  # fmt: skip


def _log_iteration(line: str) -> int | None:
    """The iteration of a log.jsonl line; None for a line a crash cut short (or an empty one)."""
    try:
        return int(json.loads(line).get("iteration", 0))
    except ValueError:
        return None


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log.jsonl lines after `iteration` (logged by a run killed after its last checkpoint) and lines a
    crash cut short, atomically."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if (logged := _log_iteration(line)) is not None and logged <= iteration]  # fmt: skip
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)


def _rank_rng(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rank_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _draw(
    objective: DiffusionLoss | SCMLoss,
    batch: int,
    x0: torch.Tensor,  # a micro-batch, for the sample shape and dtype
    labelled: bool,
    teacher: TrigFlowModel | None,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    shape = tuple(x0.shape[1:])
    kw: dict[str, Any] = {"labelled": labelled, "generator": generator, "device": x0.device, "dtype": x0.dtype}
    if isinstance(objective, SCMLoss):
        return objective.draw(batch, shape, distil=teacher is not None, **kw)
    return objective.draw(batch, shape, **kw)


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def _no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch (DDP no_sync; FSDP2's switch)."""
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        switch = cast(Callable[[bool], None], model.set_requires_gradient_sync)
        switch(False)
        try:
            yield
        finally:
            switch(True)
    else:
        yield


def train(
    model: TrigFlowModel,                # the network to train, initialised (a student from its teacher)
    objective: DiffusionLoss | SCMLoss,  # teacher loss, or sCT/sCD
    dataset: Dataset,                    # items (x0 (C, *dims) float, label long scalar)
    options: TrainOptions,
    run_dir: str | Path,
    *,
    teacher: TrigFlowModel | None = None,  # sCD: the frozen teacher
    meta: dict[str, Any] | None = None,  # stored in every checkpoint (model spec, codec, config)
    preview: Hook | None = None,         # (model, it) -> uint8 image (3, H, W) for TensorBoard
    evaluate: Hook | None = None,        # (model, it) -> {metric: value}, on every rank; the main rank's logged
    info: DistInfo | None = None,
    stop_at: int | None = None,          # end this call after that iteration (tests, time limits)
) -> TrainResult:
    info = info or DistInfo()
    device, run_dir = info.device, Path(run_dir)
    if isinstance(objective, DiffusionLoss) and teacher is not None:
        raise ValueError("a diffusion (teacher) objective takes no teacher")
    micro = per_rank_batch(options.batch_size, options.accum_steps, info.world_size)
    if len(dataset) < micro * info.world_size:  # type: ignore[arg-type]
        n = len(dataset)  # type: ignore[arg-type]
        raise ValueError(f"the dataset has {n} items, fewer than one micro-batch on each of {info.world_size} rank(s)")

    torch.manual_seed(options.seed * 7919 + info.rank)  # dropout masks differ per rank
    labelled = use_labels(model, dataset)

    model.to(device).train()
    ema = make_ema(model, options)  # full-weight averages on every rank (see ema._full)
    if info.enabled and options.strategy == "fsdp" and ema is None and (preview or evaluate):
        raise ValueError(
            "strategy=fsdp with ema=none samples with the sharded model, whose every forward needs all ranks: "
            "a preview (rank 0 alone) or an evaluation (shares of unequal batch counts) would hang. Keep an EMA "
            "(full weights on every rank), or set train.sample_every=0 and train.eval_every=0"
        )
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    wrapped = wrap_model(model, info, options.strategy)
    student = cast(TrigFlowModel, wrapped)  # DDP forwards to the TrigFlowModel it wraps
    optimizer = make_optimizer(wrapped.parameters(), options)
    scaler = torch.amp.GradScaler(device.type) if options.precision == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    # Resume: weights, optimiser, averages, scaler, data position and each rank's random state.
    # The main rank cleans up after killed writers and picks the checkpoint (the newest readable one, for
    # "auto"), so that every rank resumes from the same one.
    it, epoch, micro_in_epoch, skipped = 0, 0, 0, 0
    source = from_main(lambda: resume_source(options.resume, run_dir, required=TRAIN_FILES), info)
    if source is not None:
        _check_same_teacher(read_meta(source), meta or {}, source)
        state = load_state(source)
        micro_in_epoch = resume_position(state, options, dataset, micro, info, source)  # checks the options first
        weights: dict[str, Any] = dict(load_weights(source))
        set_model_state_dict(wrapped, weights, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(
            wrapped, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        if ema is not None:
            for name, avg in ema.named_averages().items():
                avg.load_state_dict(load_weights(source, name))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        it, epoch, skipped = state["iteration"], state["epoch"], state["skipped"]
        saved_world = _saved_world_size(state, source)
        if info.rank < saved_world:
            _set_rank_rng(load_state(source, rank=info.rank), device)
        else:  # a rank the saved run did not have
            torch.manual_seed((options.seed * 7919 + info.rank) * 1_000_003 + it)
        if info.is_main:
            if saved_world != info.world_size:
                warnings.warn(
                    f"resuming a checkpoint of {saved_world} process(es) on {info.world_size}: the data position "
                    "carries over exactly, but each rank's dropout masks come from its own random state, so the "
                    f"run is not bit-identical to one that stayed on {saved_world}",
                    stacklevel=2,
                )
            tqdm.write(f"resumed from {source} at iteration {it}")

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (TensorBoard loads slowly)

        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=it)  # hides later (or earlier runs') events
        log = run_dir / "log.jsonl"
        if it > 0:  # as purge_step does for TensorBoard
            _truncate_log(log, it)
        elif log.exists():  # a new run in an old run's folder (resume=never): its log kept aside
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = (run_dir / f"log-before-{stamp}-{k}.jsonl" for k in itertools.count())
            log.rename(next(name for name in names if not name.exists()))  # two new runs in a second: both kept
    bar = tqdm(total=options.iters, initial=it, disable=not (info.is_main and options.progress), desc="train")
    result = TrainResult(iteration=it, skipped_steps=skipped)
    pending: list[torch.Tensor] = []  # per-iteration losses not yet synced to the host
    stats_sum: dict[str, Any] = {}
    last_log = time.perf_counter()
    last_log_it = it
    batches = _batches(dataset, micro, info, options, epoch, micro_in_epoch)
    autocast = torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)

    start, first_save = it, True  # where this call's timeline leaves the run's checkpoints

    def save() -> Path | None:
        nonlocal first_save
        model_sd = cast(dict[str, torch.Tensor], get_model_state_dict(wrapped, options=full))
        optim_sd = get_optimizer_state_dict(wrapped, optimizer, options=full)
        rank_states = _gather_objects(_rank_rng(device), info)
        path = None
        if info.is_main:
            # Checkpoints of the run later than where this call started belong to a timeline it abandoned
            # (an explicit older `resume`, or resume="never"): set them aside at the first save, before one
            # of them is replaced, so that resume="auto" and pruning follow this run from now on.
            aside = set_aside_later_checkpoints(run_dir, start) if first_save else []
            first_save = False
            if aside:
                tqdm.write(f"set aside {len(aside)} checkpoint(s) later than iteration {start}, from a timeline "
                           f"this run replaces: {aside[0].parent}")  # fmt: skip
            state = {
                "iteration": it, "epoch": epoch, "micro": micro_in_epoch, "skipped": skipped,
                "epoch_samples": micro_in_epoch * micro * info.world_size, "world_size": info.world_size,
                "seen": it * options.batch_size, "optimizer": optim_sd,
                "scaler": scaler.state_dict() if scaler is not None else {},
                "options": json.dumps(asdict(options)),
            }  # fmt: skip
            averages = {n: a.state_dict() for n, a in ema.named_averages().items()} if ema is not None else {}
            path = save_checkpoint(
                run_dir, it, model=model_sd, ema=averages, state=state, meta=meta or {},
                rank_states=dict(enumerate(rank_states)), keep_last=options.keep_last,
            )  # fmt: skip
        barrier(info)
        return path

    while it < options.iters and (stop_at is None or it < stop_at):
        # One optimiser step: accum_steps micro-batches on each rank.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(options, it)
        step_loss = torch.zeros((), device=device)
        step_rng = torch.Generator(device).manual_seed(options.seed * 1_000_003 + it)
        draws: dict[str, torch.Tensor] = {}
        for k in range(options.accum_steps):
            try:
                x0, labels = next(batches)
            except StopIteration:
                epoch, micro_in_epoch = epoch + 1, 0
                batches = _batches(dataset, micro, info, options, epoch, 0)
                x0, labels = next(batches)
            micro_in_epoch += 1
            x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if not draws:  # the whole global batch's random inputs, drawn identically on every rank
                draws = _draw(objective, options.batch_size, x0, labelled, teacher, step_rng)
            rows = (k * micro + torch.arange(micro, device=device)) * info.world_size + info.rank  # this rank's
            mine: dict[str, Any] = {key: value[rows] for key, value in draws.items()}
            cond_labels = labels if labelled else None
            with _no_sync(wrapped, sync=k == options.accum_steps - 1):
                with autocast:
                    if isinstance(objective, SCMLoss):
                        loss, stats = objective(student, x0, cond_labels, teacher=teacher, step=it, **mine)
                    else:
                        loss, stats = objective(student, x0, cond_labels, **mine)
                scaled = loss / options.accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += loss.detach() / options.accum_steps
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0) + torch.as_tensor(value, device=device).float()
        applied, grad_norm = apply_gradients(optimizer, wrapped.parameters(), options.max_grad_norm, scaler)
        skipped += int(not applied)
        it += 1
        if ema is not None and applied:
            ema.update(unwrap(wrapped), seen=it * options.batch_size, batch=options.batch_size)
        pending.append(step_loss)
        stats_sum["grad_norm"] = stats_sum.get("grad_norm", 0) + grad_norm.float()

        # Logging: losses and stats reach the host once per log interval. (The step itself waits on the
        # device once per micro-batch, to drop non-finite inputs, and once to skip a non-finite gradient.)
        if _due(it, options.log_every) or it == options.iters or it == stop_at:
            losses = torch.stack(pending)
            if info.enabled:  # the mean over ranks (gloo has no ReduceOp.AVG)
                dist.all_reduce(losses)
                losses /= info.world_size
            values = losses.tolist()
            result.losses.extend(values)
            n = len(values)
            now = time.perf_counter()
            rate = (it - last_log_it) * options.batch_size / max(now - last_log, 1e-9)
            per_step = {k: float(v) / n for k, v in stats_sum.items()}  # loss stats: summed over micro-batches
            scalars = {f"train/{k}": v if k == "grad_norm" else v / options.accum_steps for k, v in per_step.items()}
            scalars.update({"train/loss": sum(values) / n, "train/lr": learning_rate(options, it - 1),
                            "train/samples_per_s": rate, "train/skipped_steps": skipped})  # fmt: skip
            if writer is not None:
                for key, scalar in scalars.items():
                    writer.add_scalar(key, scalar, it)
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps({"iteration": it, **scalars}) + "\n")
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", samples_s=f"{rate:.1f}", refresh=False)
            bar.update(it - last_log_it)
            pending, stats_sum, last_log, last_log_it = [], {}, now, it

        done = it == options.iters
        if preview is not None and options.sample_every and (_due(it, options.sample_every) or done):
            if info.is_main and writer is not None:
                with _sampling(wrapped, ema, device) as sampler:
                    writer.add_image("samples", preview(sampler, it), it)
        if evaluate is not None and (_due(it, options.eval_every) or done):
            with _sampling(wrapped, ema, device) as sampler:  # on every rank: each may score a share (Shards)
                metrics = evaluate(sampler, it)
            if info.is_main:
                result.evaluations[it] = metrics
                for key, value in metrics.items():
                    if writer is not None:
                        writer.add_scalar(f"eval/{key}", value, it)
                tqdm.write(f"iteration {it}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            barrier(info)
        if _due(it, options.ckpt_every) or done:
            result.checkpoint = save()

    bar.close()
    if writer is not None:
        writer.close()
    result.iteration, result.skipped_steps = it, skipped
    return result
