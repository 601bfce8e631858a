"""bench/image_mnist.py end to end at a few iterations, so the benchmark of issue 3 cannot rot."""

import json
import subprocess
import sys
from pathlib import Path


def test_mnist_bench_runs_and_reports_both_targets(tmp_path):
    """With 1,000 digits held out, and bench/mnist_reference.py on its teacher."""
    script = Path(__file__).parents[2] / "bench" / "image_mnist.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--threads", "1", "--n", "40", "--holdout", "1000"]
    cmd += ["--teacher-iters", "3", "--student-iters", "3", "--batch", "8", "--student-batch", "8"]
    cmd += ["--teacher-steps", "2", "--dpmpp-steps", "2", "4", "--seeds", "4", "--select-seeds", "1"]
    cmd += ["--ema", "0.1", "0.2", "--speed-rounds", "2"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)

    results = json.loads((tmp_path / "results.json").read_text())
    teacher = sorted((r["sampler"], r["steps"]) for r in results["rows"] if r["model"] == "teacher")
    assert teacher == [("dpmpp_2m", 2), ("dpmpp_2m", 4), ("heun", 2)]  # DPM-Solver++ at 2 steps once
    for name in ("scd", "sct"):
        rows = [r for r in results["rows"] if r["model"] == name]
        assert {(r["steps"], r["ema"]) for r in rows} == {(s, e) for s in (1, 2) for e in ("ema-0.100", "ema-0.200")}
        assert sum(r["chosen"] for r in rows) == 2  # one average: its 1- and 2-step rows
        assert (tmp_path / f"{name}_consistency_2.png").exists()
    summary = results["summary"]
    assert summary["teacher_best"]["fid"] == min(r["fid"] for r in results["rows"] if r["model"] == "teacher")
    assert summary["scd2_fid_over_teacher"] > 0
    assert len(summary["teacher_plateau_time_over_scd2_side_by_side"]["rounds"]) == 2

    reference = [sys.executable, str(script.with_name("mnist_reference.py")), "--out", str(tmp_path), "--n", "20"]
    lines = subprocess.run([*reference, "--seeds", "4", "--threads", "1"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in lines.stdout.splitlines() if line.startswith("{")]
    assert [r["sampler"] for r in rows] == ["heun", "dpmpp_2m"] and all(r["held-out"]["mean"] > 0 for r in rows)


def test_holdout_trains_on_other_digits_than_the_fid_reference(tmp_path):
    """--holdout N: N seeded digits are the FID reference and nothing trains on them; the folder keeps its split."""
    import argparse
    import importlib.util

    import pytest
    import torch

    spec = importlib.util.spec_from_file_location("image_mnist", Path(__file__).parents[2] / "bench" / "image_mnist.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data, real = bench.split_digits(argparse.Namespace(resolution=16, holdout=1000), tmp_path)
    assert len(data) == 4000 and real.shape == (1000, 1, 16, 16) and data.num_classes == 10
    trained = {tuple(data[i][0].flatten().tolist()) for i in range(len(data))}
    assert not trained & {tuple(image.flatten().tolist()) for image in real}
    with pytest.raises(SystemExit, match="holdout"):  # runs trained on these 4,000 digits are in tmp_path
        bench.split_digits(argparse.Namespace(resolution=16, holdout=0), tmp_path)
    everything, real = bench.split_digits(argparse.Namespace(resolution=16, holdout=0), tmp_path / "all")
    assert len(everything) == 5000 and torch.equal(real[7], everything[7][0])
    (tmp_path / "old" / "teacher").mkdir(parents=True)  # runs from before the record: trained on all 5,000
    with pytest.raises(SystemExit, match="'holdout': 0"):
        bench.split_digits(argparse.Namespace(resolution=16, holdout=1000), tmp_path / "old")
    with pytest.raises(SystemExit, match="must be in"):
        bench.split_digits(argparse.Namespace(resolution=16, holdout=5000), tmp_path / "new")
