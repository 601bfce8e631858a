"""The training loop: exact resume, atomic checkpoints, mixed precision, hooks and logs, and 1 vs 2 processes
(DDP and FSDP2, gloo)."""

import json
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

from scm_mm import DiffusionLoss, SCMLoss, TrigFlowPrecond
from scm_mm.data import TensorPairs
from scm_mm.nn.unet import UNet
from scm_mm.train.build import teacher_mismatch
from scm_mm.train.checkpoint import (
    build_from_spec,
    canonical_spec,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_weights,
    read_meta,
    weights_digest,
)
from scm_mm.train.distributed import DistInfo, per_rank_batch
from scm_mm.train.loop import TrainOptions, learning_rate, train

NET = {
    "_target_": "scm_mm.nn.unet.UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2],
    "num_blocks": 1, "num_classes": 3, "groups": 4,
}  # fmt: skip


def make_model(dropout: float = 0.0, guidance: bool = False) -> TrigFlowPrecond:
    torch.manual_seed(0)
    net = build_from_spec({**NET, "dropout": dropout, "guidance_embed": guidance})
    model = TrigFlowPrecond(net, sigma_d=0.5, logvar_channels=8)
    with torch.no_grad():  # a non-zero output layer, so every parameter gets a gradient from step one
        net.conv_out.weight.normal_(std=0.05)
    return model


def dataset(n: int = 48) -> TensorPairs:
    g = torch.Generator().manual_seed(3)
    return TensorPairs(torch.randn(n, 1, 8, 8, generator=g) * 0.5, torch.randint(0, 3, (n,), generator=g), 3)


def options(**kw) -> TrainOptions:
    base = dict(iters=6, batch_size=8, accum_steps=2, lr=1e-3, ckpt_every=2, keep_last=2, log_every=1, progress=False)
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize("method", ["diffusion", "sct", "scd"])
def test_killed_and_resumed_run_repeats_the_losses(tmp_path, method):
    teacher = make_model() if method == "scd" else None
    objective = DiffusionLoss(label_dropout=0.2) if method == "diffusion" else SCMLoss(warmup_iters=4)
    data = dataset()

    def run(run_dir, **kw):
        student = make_model(dropout=0.2, guidance=method == "scd")
        return train(student, objective, data, options(), run_dir, teacher=teacher, meta={"net": NET}, **kw)

    full = run(tmp_path / "full")
    first = run(tmp_path / "killed", stop_at=5)  # dies at iteration 5; the last checkpoint is at 4
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["iter-000000002", "iter-000000004"]
    resumed = run(tmp_path / "killed")  # resume="auto"
    assert len(full.losses) == 6 and all(torch.isfinite(torch.tensor(full.losses)))
    assert first.losses == full.losses[:5]
    assert resumed.losses == full.losses[4:]  # exactly, step for step
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # iteration 5 of the killed call is dropped, logged again once
    final = load_weights(tmp_path / "full")
    for key, value in load_weights(tmp_path / "killed").items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_scd_trains_and_resumes(tmp_path, precision):
    """sCD under CPU autocast (the JVP too): bf16, and fp16 with a grad scaler whose state the checkpoint
    keeps. Losses finite, every weight moves, and a killed run resumes to the same losses."""
    teacher = make_model()

    def run(run_dir, **kw):
        student = make_model(guidance=True)
        return train(student, SCMLoss(warmup_iters=4), dataset(), options(precision=precision), run_dir,
                     teacher=teacher, meta={"net": NET}, **kw)  # fmt: skip

    full = run(tmp_path / "full")
    run(tmp_path / "killed", stop_at=5)
    resumed = run(tmp_path / "killed")
    assert all(torch.isfinite(torch.tensor(full.losses))) and resumed.losses == full.losses[4:]
    start, final = make_model(guidance=True).state_dict(), load_weights(tmp_path / "full")
    assert all(not torch.equal(start[k], final[k]) for k in final)
    scaler = load_state(latest_checkpoint(tmp_path / "full"))["scaler"]
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}


def test_previews_evaluations_and_logs(tmp_path):
    """The hooks run at their intervals and at the end, on the sampling model; TensorBoard gets the
    training scalars, the evaluations and the sample grids, log.jsonl one line per logged iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls: dict[str, list[int]] = {"preview": [], "evaluate": []}

    def preview(model, it):
        calls["preview"].append(it)
        assert not model.training
        return torch.full((3, 8, 8), 128, dtype=torch.uint8)

    def evaluate(model, it):
        calls["evaluate"].append(it)
        return {"score": float(it)}

    opts = options(iters=5, sample_every=2, eval_every=3)
    result = train(make_model(), DiffusionLoss(), dataset(), opts, tmp_path, preview=preview, evaluate=evaluate)
    assert calls == {"preview": [2, 4, 5], "evaluate": [3, 5]}
    assert result.evaluations == {3: {"score": 3.0}, 5: {"score": 5.0}}

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/score"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in events.Images("samples")] == [2, 4, 5]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5]


def test_the_network_decides_whether_the_labels_are_used(tmp_path):
    """An unconditional net trains on a labelled dataset without its labels (the paper's CIFAR-10); a net
    built for fewer classes than the dataset has is refused before the first step."""
    unconditional = TrigFlowPrecond(build_from_spec({**NET, "num_classes": 0}), sigma_d=0.5, logvar_channels=8)
    with pytest.warns(UserWarning, match="without the dataset's 3 class labels"):
        result = train(unconditional, DiffusionLoss(label_dropout=0.1), dataset(), options(iters=1), tmp_path / "a")
    assert len(result.losses) == 1
    five = TensorPairs(dataset().x0, dataset().labels, num_classes=5)
    with pytest.raises(ValueError, match="5 classes but the network was built for 3"):
        train(make_model(), DiffusionLoss(), five, options(iters=1), tmp_path / "b")


def test_periodic_counts_of_zero_mean_at_the_end_and_negative_ones_are_refused(tmp_path):
    result = train(make_model(), DiffusionLoss(), dataset(), options(iters=3, log_every=0, ckpt_every=0), tmp_path)
    assert len(result.losses) == 3 and [p.name for p in list_checkpoints(tmp_path)] == ["iter-000000003"]
    assert [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [3]
    with pytest.raises(ValueError, match=r"ckpt_every=-1 \(must be >= 0\), accum_steps=0 \(must be >= 1\)"):
        options(ckpt_every=-1, accum_steps=0)


def test_fsdp_without_an_ema_refuses_hooks_that_would_sample_with_the_sharded_model(tmp_path):
    """Its every forward needs all ranks: a preview on rank 0 alone, or evaluation shares of unequal batch
    counts, would hang. Refused before any collective (the DistInfo here has no process group)."""
    two = DistInfo(rank=0, world_size=2)
    for hook in ({"preview": lambda model, it: None}, {"evaluate": lambda model, it: {}}):
        with pytest.raises(ValueError, match="strategy=fsdp with ema=none"):
            train(make_model(), DiffusionLoss(), dataset(), options(strategy="fsdp", ema="none"), tmp_path, info=two,
                  **hook)  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_hooks_sample_in_eval_mode_and_leave_the_training_alone(tmp_path):
    """Without an EMA the hooks get the trained model itself: in eval mode (no dropout), then back in train
    mode, with the random state they used restored, so the losses equal those of a run without hooks."""
    modes = []

    def evaluate(model, it):
        modes.append(model.training)
        torch.rand(100)  # a hook that draws from the global RNG, as a sampler without a seed does
        return {}

    def run(run_dir, **hooks):
        opts = options(iters=4, ema="none", eval_every=1, sample_every=1)
        return train(make_model(dropout=0.2), DiffusionLoss(), dataset(), opts, run_dir, **hooks).losses

    hooked = run(tmp_path / "a", evaluate=evaluate, preview=lambda m, it: torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert modes == [False] * 4 and hooked == run(tmp_path / "b")


def test_unfinished_checkpoint_is_ignored_and_old_ones_pruned(tmp_path):
    train(make_model(), DiffusionLoss(), dataset(), options(iters=6, keep_last=2), tmp_path, meta={"net": NET})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter-000000004", "iter-000000006"]
    (tmp_path / "checkpoints" / "iter-000000008.tmp-123").mkdir()  # a run killed while saving
    assert latest_checkpoint(tmp_path).name == "iter-000000006"
    meta = read_meta(tmp_path)
    assert meta["iteration"] == 6 and meta["net"] == NET
    # the EMA average named by the power EMA's sigma_rel, loadable into a model built from the spec
    model = make_model()
    model.load_state_dict(load_weights(tmp_path, "ema-0.050"))


def test_resuming_from_an_older_checkpoint_keeps_what_it_writes(tmp_path):
    """Rolled back to iter-2 of a run that went on to iter-6: pruning keeps the checkpoints this run writes,
    the later ones of the abandoned timeline are set aside (not deleted), and resume="auto" follows this run."""
    train(make_model(), DiffusionLoss(), dataset(), options(keep_last=0), tmp_path, meta={"net": NET})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter-000000002", "iter-000000004", "iter-000000006"]
    rollback = options(keep_last=1, resume=str(tmp_path / "checkpoints" / "iter-000000002"))
    result = train(make_model(), DiffusionLoss(), dataset(), rollback, tmp_path, meta={"net": NET}, stop_at=4)
    assert result.checkpoint is not None and result.checkpoint.is_dir()
    assert list_checkpoints(tmp_path) == [result.checkpoint] == [latest_checkpoint(tmp_path)]
    aside = sorted(p.name for p in (tmp_path / "checkpoints").glob("superseded-*/iter-*"))
    assert aside == ["iter-000000004", "iter-000000006"]  # the abandoned timeline, kept for inspection
    again = train(make_model(), DiffusionLoss(), dataset(), options(keep_last=1), tmp_path, meta={"net": NET})
    assert len(again.losses) == 2 and [p.name for p in list_checkpoints(tmp_path)] == ["iter-000000006"]


def test_a_log_line_cut_short_is_dropped_and_a_new_run_keeps_the_old_log_aside(tmp_path):
    first = train(make_model(), DiffusionLoss(), dataset(), options(), tmp_path, meta={"net": NET}, stop_at=5)
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text() + '{"iteration": 6, "loss": 0.')  # a crash mid-line (a full disk)
    resumed = train(make_model(), DiffusionLoss(), dataset(), options(), tmp_path, meta={"net": NET})
    assert len(first.losses) == 5 and len(resumed.losses) == 2
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    train(make_model(), DiffusionLoss(), dataset(), options(iters=2, resume="never"), tmp_path, meta={"net": NET})
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2]
    (before,) = tmp_path.glob("log-before-*.jsonl")  # the earlier run's log, as its checkpoints, set aside
    assert len(before.read_text().splitlines()) == 6


def digest(model: torch.nn.Module) -> str:
    return weights_digest(model.state_dict())


def test_a_resumed_scd_run_refuses_a_teacher_that_changed(tmp_path):
    """method.teacher names a run, whose newest checkpoint may change while a student trains: a resumed run
    refuses another teacher (its weights' digest differs from the one it recorded) and names the one it had."""
    def meta(teacher, name):
        return {"net": NET, "teacher": {"checkpoint": str(tmp_path / name), "weights_digest": digest(teacher)}}

    teacher, objective = make_model(), SCMLoss(warmup_iters=4)
    scd = tmp_path / "scd"
    train(make_model(guidance=True), objective, dataset(), options(), scd, teacher=teacher,
          meta=meta(teacher, "teacher-a"), stop_at=3)  # fmt: skip
    (tmp_path / "teacher-a").mkdir()
    trained_on = make_model()
    with torch.no_grad():
        trained_on.net.conv_out.weight.add_(0.01)
    with pytest.raises(ValueError, match=r"distills the teacher at .*teacher-a .*method.teacher=.*teacher-a"):
        train(make_model(guidance=True), objective, dataset(), options(), scd, teacher=trained_on,
              meta=meta(trained_on, "teacher-b"))  # fmt: skip
    again = train(make_model(guidance=True), objective, dataset(), options(), scd, teacher=teacher,
                  meta=meta(teacher, "teacher-a"))  # fmt: skip
    assert again.iteration == 6


def test_resume_auto_falls_back_past_a_checkpoint_cut_short(tmp_path):
    """A crash cut the newest checkpoint's weights short: resume="auto" warns, naming it and why, resumes from
    the one before and repeats the uninterrupted run's losses; the broken one is set aside, not deleted."""
    data = dataset()

    def run(run_dir, **kw):
        return train(make_model(dropout=0.2), DiffusionLoss(label_dropout=0.2), data, options(), run_dir,
                     meta={"net": NET}, **kw)  # fmt: skip

    full = run(tmp_path / "full")
    run(tmp_path / "killed", stop_at=5)  # checkpoints at 2 and 4
    weights = tmp_path / "killed" / "checkpoints" / "iter-000000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    cut = weights.stat().st_size
    with pytest.warns(UserWarning, match=r"skipping checkpoint \S*iter-000000004: model.safetensors is cut short"):
        resumed = run(tmp_path / "killed")
    assert resumed.losses == full.losses[2:]  # from iteration 2, step for step
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["iter-000000004", "iter-000000006"]
    final = load_weights(tmp_path / "full")
    for key, value in load_weights(tmp_path / "killed").items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0)
    (aside,) = (tmp_path / "killed" / "checkpoints").glob("superseded-*/iter-000000004")
    assert (aside / "model.safetensors").stat().st_size == cut  # the broken one, kept for inspection


def test_resume_refuses_when_no_checkpoint_can_be_read(tmp_path):
    """Every checkpoint unreadable: a clear error that lists each and why, before any step; and a checkpoint
    named explicitly is not replaced by another one."""
    train(make_model(), DiffusionLoss(), dataset(), options(iters=4), tmp_path, meta={"net": NET})
    (tmp_path / "checkpoints" / "iter-000000004" / "state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "iter-000000002" / "meta.json").write_text('{"net": ')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=(
        r"no checkpoint of \S+ can be read(.|\n)*iter-000000004: state.pt is empty\n"
        r"  iter-000000002: meta.json is cut short or corrupt"
    )):  # fmt: skip
        train(make_model(), DiffusionLoss(), dataset(), options(iters=6), tmp_path, meta={"net": NET})
    named = tmp_path / "checkpoints" / "iter-000000004"
    with pytest.raises(ValueError, match=r"cannot resume from \S*iter-000000004: state.pt is empty"):
        train(make_model(), DiffusionLoss(), dataset(), options(iters=6, resume=str(named)), tmp_path / "other")


def test_a_resume_may_change_the_accumulation_but_not_the_batch(tmp_path):
    """accum_steps 2 -> 1 on resume continues the same data (the position is counted in samples); a change
    of batch_size or seed is refused with the difference named, and so is a position inside a new micro-batch."""
    full = train(make_model(), DiffusionLoss(), dataset(), options(accum_steps=1), tmp_path / "full")
    train(make_model(), DiffusionLoss(), dataset(), options(accum_steps=2), tmp_path / "run", stop_at=3)
    resumed = train(make_model(), DiffusionLoss(), dataset(), options(accum_steps=1), tmp_path / "run")
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-5)  # was off by up to 0.14: skipped data

    changed = r"batch_size: 8 in the checkpoint, 16 now\n  seed: 0 in the checkpoint, 1 now"
    with pytest.raises(ValueError, match=changed):
        train(make_model(), DiffusionLoss(), dataset(), options(batch_size=16, seed=1), tmp_path / "run")
    # 20 items in micro-batches of 4: iteration 3 ends 4 samples into epoch 1, half a micro-batch of 8
    train(make_model(), DiffusionLoss(), dataset(20), options(ckpt_every=3), tmp_path / "edge", stop_at=3)
    with pytest.raises(ValueError, match="stopped 4 samples into epoch 1"):
        train(make_model(), DiffusionLoss(), dataset(20), options(accum_steps=1), tmp_path / "edge")


def test_checkpoint_spec_refuses_foreign_targets():
    with pytest.raises(ValueError, match="refusing"):
        build_from_spec({"_target_": "os.system", "command": "true"})
    with pytest.raises(ValueError, match="refusing"):
        canonical_spec({"_target_": "os.system", "command": "true"})
    assert isinstance(build_from_spec(NET), UNet)


def test_canonical_spec_writes_out_the_class_defaults():
    canonical = canonical_spec({**NET, "channel_mult": (1, 2)})
    assert canonical == canonical_spec({**NET, "dropout": 0.0, "qk_norm": True})  # both UNet defaults
    assert canonical["channel_mult"] == [1, 2] and canonical["dropout"] == 0.0 and canonical["emb_dim"] is None
    assert json.loads(json.dumps(canonical)) == canonical


def test_teacher_mismatch_names_real_differences_only():
    spec = {"net": NET, "precond": {"sigma_d": 0.5}}
    defaults = {"net": {**NET, "qk_norm": True}, "precond": {"sigma_d": 0.5, "time_scale": 1000.0}}
    assert teacher_mismatch(spec, defaults) == []
    student = {"net": {**NET, "dropout": 0.2, "guidance_embed": True}, "precond": spec["precond"]}
    assert teacher_mismatch(student, spec) == []  # what a student may change
    other = {"net": {**NET, "head_channels": 16}, "precond": {"sigma_d": 0.5, "logvar_channels": 0}}
    assert teacher_mismatch(other, spec) == ["  net.head_channels: 16 != 64", "  precond.logvar_channels: 0 != 128"]


def test_learning_rate_schedule_and_batch_split():
    o = TrainOptions(lr=1e-2, lr_ref_iters=100, lr_rampup_iters=10)
    assert learning_rate(o, 5) == pytest.approx(5e-3)
    assert learning_rate(o, 100) == pytest.approx(1e-2)
    assert learning_rate(o, 400) == pytest.approx(5e-3)  # 1 / sqrt(400 / 100)
    cool = TrainOptions(iters=1000, lr=1e-2, lr_ref_iters=100, lr_cooldown_iters=200)
    assert learning_rate(cool, 800) == pytest.approx(1e-2 / 8**0.5)  # the cool-down starts here
    assert learning_rate(cool, 900) == pytest.approx(0.5 * 1e-2 / 9**0.5)
    assert learning_rate(cool, 999) == pytest.approx(1e-2 / 999**0.5 * 10 / 200)  # the last step: 1/200
    assert per_rank_batch(64, 2, 4) == 8
    with pytest.raises(ValueError, match="multiple of 12"):
        per_rank_batch(64, 3, 4)


def test_an_all_nonfinite_batch_is_refused(tmp_path):
    data = dataset()
    data.x0[:] = float("nan")  # every sample bad: the loss refuses the batch
    with pytest.raises(ValueError, match="NaN or inf"):
        train(make_model(), DiffusionLoss(), data, options(iters=1), tmp_path)


# --- 1 process vs 2 (gloo) -------------------------------------------------------------------------



def _worker(rank: int, port: int, run_dir: str, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for strategy in STRATEGIES:  # one pair of processes for both, as starting them is the slow part
        model = make_model().double()
        objective = SCMLoss(warmup_iters=2, loss_dtype=torch.float64)
        data = TensorPairs(dataset().x0.double(), dataset().labels, 3)
        opts = options(iters=3, accum_steps=1, strategy=strategy, ckpt_every=3)
        train(model, objective, data, opts, f"{run_dir}/{strategy}", info=DistInfo(rank, 2, rank, torch.device("cpu")))
        state = torch.distributed.checkpoint.state_dict.get_model_state_dict(model)
        out[strategy, rank] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    # a checkpoint of one process (2 accumulation steps, iteration 2 of 3) resumed on two (1 step each)
    model = make_model().double()
    opts = options(iters=3, accum_steps=1, ckpt_every=3, resume=f"{run_dir}/killed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, objective, data, opts, f"{run_dir}/widened", info=DistInfo(rank, 2, rank, torch.device("cpu")))
    out["widened", rank] = model.state_dict()
    out["warned", rank] = [str(w.message) for w in caught if "checkpoint of 1 process(es) on 2" in str(w.message)]
    torch.distributed.destroy_process_group()


STRATEGIES = ("ddp", "fsdp")


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP and FSDP2 on 2 gloo processes, batch 4 each, against 1 process with 2 accumulation steps of 4; and
    a 1-process checkpoint resumed on 2 processes continues with the same data (no FileNotFoundError for
    rank 1's random state, a warning that the dropout masks differ)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    model = make_model().double()
    data = TensorPairs(dataset().x0.double(), dataset().labels, 3)
    objective = SCMLoss(warmup_iters=2, loss_dtype=torch.float64)
    single_options = options(iters=3, accum_steps=2, ckpt_every=2)
    train(make_model().double(), objective, data, single_options, tmp_path / "killed", stop_at=2)
    train(model, objective, data, single_options, tmp_path / "one")
    single = model.state_dict()

    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(tmp_path), out), nprocs=2, join=True)
    for key, value in single.items():
        torch.testing.assert_close(out["widened", 0][key], value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out["widened", 1][key], value, rtol=1e-9, atol=1e-12)
    assert len(out["warned", 0]) == 1 and out["warned", 1] == []  # said once, by rank 0
    for strategy in STRATEGIES:
        for key, value in single.items():
            torch.testing.assert_close(out[strategy, 0][key], out[strategy, 1][key], rtol=0, atol=0)  # ranks agree
            torch.testing.assert_close(out[strategy, 0][key], value, rtol=1e-9, atol=1e-12)  # and equal 1 process
        saved = load_weights(tmp_path / strategy)  # the checkpoint holds the full (gathered) weights
        torch.testing.assert_close(saved["net.conv_out.weight"], single["net.conv_out.weight"], rtol=1e-9, atol=1e-12)
