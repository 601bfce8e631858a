"""Periodic evaluation during training: scm-mm-train scores the EMA model every train.eval_every iterations."""

import json

from helpers import config

from scm_mm.app import train
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


def test_no_evaluation_unless_asked_for(tmp_path):
    result = train.run(config("train", ["experiment=mnist_teacher", f"run_dir={tmp_path}", "train.iters=1",
                                        "train.batch_size=8", "train.progress=false", "device=cpu"]))  # fmt: skip
    assert result.evaluations == {}
