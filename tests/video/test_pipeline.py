"""The whole video pipeline through the Hydra apps on a tiny config: autoencoder, teacher, sCD, sample (.mp4), eval.

Also: the student inherits its teacher's codec, VideoSCM's frame counts and seeds, a checkpoint decoded only by
its own autoencoder, and the example script end to end.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import check_example_samplers, config

from scm_mm.app import evaluate, sample, train
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.checkpoint import list_checkpoints, read_meta, resolve_checkpoint
from scm_mm_video import VideoSCM
from scm_mm_video.autoencoder import save_video_vae, vae_preset
from scm_mm_video.data import MovingDigits
from scm_mm_video.io import probe, read_video
from scm_mm_video.metrics import train_frame_classifier, train_video_classifier

DATA = ["data.dataset.size=24", "data.dataset.frames=5", "data.dataset.resolution=16", "data.dataset.digit_size=8",
        "data.shape=[4,3,4,4]"]  # fmt: skip
NET = ["+net.hidden=32", "+net.depth=1", "+net.heads=2"]
TINY = [*DATA, *NET, "train.batch_size=4", "train.progress=false", "train.log_every=1", "device=cpu"]
VAE = ["method.trainer.options.iters=3", "method.trainer.options.batch_size=2", "method.trainer.options.progress=false",
       "+method.trainer.vae.base_channels=8", "+method.trainer.vae.groups=4"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-runs")
    train.run(config("train", ["experiment=digits_vae", f"run_dir={root / 'vae'}", *DATA, *VAE]))
    vae = f"modality.codec.vae={root / 'vae'}"
    train.run(config("train", ["experiment=digits_teacher", f"run_dir={root / 'teacher'}", vae, "train.iters=3",
                               "train.sample_every=3", *TINY]))  # fmt: skip
    train.run(config("train", ["experiment=digits_scd", f"run_dir={root / 'scd'}", vae,
                               f"method.teacher={root / 'teacher'}", "train.iters=2", *TINY]))  # fmt: skip
    return root


def test_runs_write_checkpoints_and_the_student_keeps_the_teachers_codec(runs):
    assert (runs / "vae" / "vae" / "model.safetensors").exists()
    for name, iters in (("teacher", 3), ("scd", 2)):
        assert [p.name for p in list_checkpoints(runs / name)] == [f"iter-{iters:09d}"]
    teacher, student = (read_meta(resolve_checkpoint(runs / n)) for n in ("teacher", "scd"))
    assert teacher["codec"]["kind"] == "video-vae" and len(teacher["codec"]["mean"]) == 4
    assert student["codec"] == teacher["codec"] and teacher["fps"] == 8.0
    assert teacher["sample_shape"] == [4, 3, 4, 4]


def test_video_scm_generates_seeded_clips_of_any_length_and_writes_mp4(runs, tmp_path):
    model = VideoSCM.load(runs / "scd")
    a = model.generate(3, steps=2, labels=[0, 4, 7], guidance=1.5, seed=3)
    b = model.generate(3, steps=2, labels=[0, 4, 7], guidance=1.5, seed=3)
    assert a.shape == (3, 5, 16, 16, 1) and a.dtype == torch.uint8 and torch.equal(a, b)
    longer = model.generate(1, frames=8, seed=0)  # 8 frames round up to 9 = 1 + 2 * 4
    assert longer.shape == (1, 9, 16, 16, 1)
    paths = model.save_mp4(tmp_path / "clip.mp4", fps=10)
    info = probe(paths[0])
    assert [p.name for p in paths] == ["clip.mp4"] and (info.frames, info.fps, info.width) == (9, 10.0, 16)
    frames, _ = read_video(paths[0])
    assert (frames[..., 0].float() - longer[0, ..., 0].float()).abs().mean() < 4  # H.264 at crf 18
    assert type(SCMPipeline.load(runs / "scd")) is VideoSCM  # the core loader returns the modality's API


def test_the_autoencoder_runs_where_the_model_runs(runs):
    pipe = SCMPipeline.load(runs / "scd", device="meta")  # meta: a device on any machine
    assert next(pipe.codec.vae.parameters()).device.type == "meta"


def test_a_checkpoint_refuses_another_autoencoder(runs, tmp_path):
    save_video_vae(vae_preset("digits", base_channels=8, groups=4), tmp_path / "other")
    with pytest.raises(ValueError, match="weights_digest"):
        VideoSCM.load(runs / "scd", vae=tmp_path / "other")


def test_sample_and_eval_apps(runs, tmp_path):
    out = tmp_path / "s" / "digits.mp4"
    with pytest.raises(ValueError, match="modality=audio was asked for"):
        sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "modality=audio", f"out={out}", "device=cpu"]))
    paths = sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "modality=video", "n=2", f"out={out}",
                                         "guidance=1.2", "frames=7", "device=cpu"]))  # fmt: skip
    assert [p.name for p in paths] == ["digits-000.mp4", "digits-001.mp4"] and probe(paths[0]).frames == 7
    reference = MovingDigits(size=24, frames=5, resolution=16, digit_size=8)
    classifiers = tmp_path / "classifiers"
    train_video_classifier(reference, 10, steps=2, batch_size=4, width=8).save(classifiers / "video")
    train_frame_classifier(reference, 10, steps=2, batch_size=4, width=8).save(classifiers / "frame")
    result = evaluate.run(config("eval", [f"checkpoint={runs / 'teacher'}", "n=8", "solver=euler", "steps=2",
                                          "device=cpu", f"classifier_path={classifiers}"]))  # fmt: skip
    assert result["fvd"] >= 0 and result["frame_fd"] >= 0


EXAMPLE = Path(__file__).parents[2] / "examples" / "generate_video.py"


def test_generate_video_example_samples_teacher_and_student_checkpoints(runs, tmp_path, monkeypatch, capsys):
    assert probe(check_example_samplers(EXAMPLE, runs, tmp_path, ".mp4", monkeypatch, capsys, "--n", 1)).frames == 5


def test_sample_app_names_its_output_after_the_modality(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "n=2", "device=cpu"]))
    assert paths == [Path("samples/samples-000.mp4"), Path("samples/samples-001.mp4")]  # were .png frame strips
    assert probe(tmp_path / paths[0]).frames == 5


def test_generate_video_example_trains_caches_and_reuses(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "d.mp4"),
           "--n", "2", "--vae-iters", "1", "--teacher-iters", "1", "--student-iters", "1", "--clips", "64",
           "--strip"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert sorted(p.name for p in tmp_path.glob("d*")) == ["d-000.mp4", "d-001.mp4", "d-strip.png"]
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)  # reuses: no new iterations
    assert "resumed from" in again.stdout + again.stderr
