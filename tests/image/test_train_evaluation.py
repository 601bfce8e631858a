"""Periodic evaluation during training: scm-mm-train scores the EMA model every train.eval_every iterations."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import config, free_port

from scm_mm.app import train
from scm_mm.train.distributed import DistInfo
from scm_mm_image.data import MNIST
from scm_mm_image.metrics import train_classifier


def test_the_train_app_evaluates_every_eval_every_iterations(tmp_path):
    classifier = tmp_path / "classifier"
    train_classifier(MNIST(resolution=16), max_steps=10).save(classifier)
    result = train.run(config("train", [
        "experiment=mnist_teacher", f"run_dir={tmp_path / 'run'}", "train.iters=4", "train.eval_every=2",
        "train.batch_size=8", "train.progress=false", "device=cpu", "evaluation.n=16",
        f"evaluation.classifier_path={classifier}", "sampler.steps=2",
    ]))  # fmt: skip
    assert sorted(result.evaluations) == [2, 4]
    assert all(scores["fid"] > 0 and 0 <= scores["precision"] <= 1 for scores in result.evaluations.values())
    events = "".join(p.read_bytes().decode("latin-1") for p in (tmp_path / "run" / "tensorboard").iterdir())
    assert "eval/fid" in events
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["iteration"] == 4


def test_under_torchrun_every_rank_scores_a_share_of_the_evaluation(tmp_path):
    """2 gloo processes through torchrun train on halves of the global batch and sample halves of the
    evaluation's batches (of 4: 8 images on each); the first reports the scores of all 16, which are one
    process's (the two runs' weights agree to float rounding)."""
    classifier = tmp_path / "classifier"
    train_classifier(MNIST(resolution=16), max_steps=10).save(classifier)
    overrides = ["experiment=mnist_teacher", "train.iters=2", "train.eval_every=2", "train.batch_size=8",
                 "train.progress=false", "train.ckpt_every=0", "train.sample_every=0", "device=cpu", "evaluation.n=16",
                 "evaluation.batch_size=4", f"evaluation.classifier_path={classifier}", "sampler.steps=2"]  # fmt: skip
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launch, "-m", "scm_mm.app.train", f"run_dir={tmp_path / 'two'}", *overrides],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reported = re.findall(r"iteration 2: (.*)", done.stdout + done.stderr)
    assert len(reported) == 1  # by the first process
    two = {key: float(value) for key, value in (item.split(" ") for item in reported[0].split(", "))}
    one = train.run(config("train", [f"run_dir={tmp_path / 'one'}", *overrides])).evaluations[2]
    for key in ("fid", "precision", "recall", "is_mean"):
        assert two[key] == pytest.approx(one[key], rel=2e-3, abs=1e-3), key  # printed to 4 significant digits


def test_an_evaluation_that_leaves_a_rank_without_a_batch_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "init_distributed", lambda *args, **kwargs: DistInfo(rank=0, world_size=2))
    with pytest.raises(ValueError, match="without a batch"):
        train.run(config("train", ["experiment=mnist_teacher", f"run_dir={tmp_path}", "train.eval_every=2",
                                   "evaluation.n=16", "evaluation.batch_size=16", "device=cpu"]))  # fmt: skip
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_no_evaluation_unless_asked_for(tmp_path):
    result = train.run(config("train", ["experiment=mnist_teacher", f"run_dir={tmp_path}", "train.iters=1",
                                        "train.batch_size=8", "train.progress=false", "device=cpu"]))  # fmt: skip
    assert result.evaluations == {}
