"""The whole audio pipeline through the Hydra apps on a tiny config: vocoder, teacher, sCD, sample, eval.

Also: the student inherits its teacher's mel statistics, AudioSCM's durations and seeds, .wav output,
a vocoder of another mel spec refused, and the example script end to end.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from helpers import check_example_samplers, config, free_port
from safetensors.torch import load_file

from scm_mm.app import evaluate, sample, train
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.checkpoint import list_checkpoints, load_weights, read_meta, resolve_checkpoint
from scm_mm_audio import AudioSCM
from scm_mm_audio.codec import GriffinLim
from scm_mm_audio.data import SynthNotes
from scm_mm_audio.mel import mel_spec
from scm_mm_audio.metrics import AudioClassifier, classifier_spec, train_audio_classifier
from scm_mm_audio.vocos import Vocos

EXAMPLE = Path(__file__).parents[2] / "examples" / "generate_audio.py"
TINY = [
    "data.dataset.size=48", "train.batch_size=8", "train.progress=false", "train.log_every=1", "device=cpu",
    "+net.hidden=32", "+net.depth=1", "+net.heads=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-runs")
    train.run(config("train", ["experiment=notes_teacher", f"run_dir={root / 'teacher'}", "train.iters=3",
                               "train.sample_every=3", *TINY]))  # fmt: skip
    train.run(config("train", ["experiment=notes_scd", f"run_dir={root / 'scd'}", f"method.teacher={root / 'teacher'}",
                               "train.iters=2", *TINY]))  # fmt: skip
    vocoder = ["method.trainer.options.iters=3", "method.trainer.options.batch_size=4",
               "method.trainer.options.progress=false", "+method.trainer.vocoder.dim=32",
               "+method.trainer.vocoder.intermediate_dim=64", "+method.trainer.vocoder.num_layers=1"]  # fmt: skip
    train.run(config("train", ["experiment=notes_vocoder", f"run_dir={root / 'vocoder'}", "data.dataset.size=48",
                               *vocoder]))  # fmt: skip
    return root


def test_a_vocoder_run_refuses_settings_of_an_scm_run(tmp_path):
    """train.iters on a vocoder run (whose iterations are method.trainer.options.iters) used to be ignored."""
    overrides = ["experiment=notes_vocoder", f"run_dir={tmp_path}", "train.iters=2", "+net.hidden=32"]
    with pytest.raises(ValueError, match=r"does not read train.iters, net.hidden; .* method.trainer.options"):
        train.run(config("train", overrides), overrides)
    assert not any(tmp_path.iterdir())  # refused before anything was read or written
    fine = ["experiment=notes_vocoder", "method.trainer.options.iters=2", "data.dataset.size=4", "device=cpu",
            "hydra.job.chdir=false", "modality=audio_22k"]
    train.refuse_unread_overrides(config("train", fine), fine)


def test_runs_write_checkpoints_and_the_student_keeps_the_teachers_mel_statistics(runs):
    for name, iters in (("teacher", 3), ("scd", 2)):
        assert [p.name for p in list_checkpoints(runs / name)] == [f"iter-{iters:09d}"]
        assert (runs / name / "log.jsonl").read_text().count("\n") == iters
    teacher, student = (read_meta(resolve_checkpoint(runs / n)) for n in ("teacher", "scd"))
    assert teacher["codec"]["type"] == "mel" and len(teacher["codec"]["mean"]) == 64
    assert student["codec"] == teacher["codec"]
    assert (runs / "vocoder" / "vocoder" / "config.json").exists()


def test_audio_scm_generates_seeded_clips_of_any_length_and_writes_wavs(runs, tmp_path):
    model = AudioSCM.load(runs / "scd", vocoder=runs / "vocoder")
    a, rate = model.generate(3, steps=2, labels=[0, 4, 7], guidance=1.5, seed=3)
    b, _ = model.generate(3, steps=2, labels=[0, 4, 7], guidance=1.5, seed=3)
    assert rate == 16000 and a.shape == (3, 1, 31 * 256) and torch.equal(a, b)  # 32 centred frames
    assert a.abs().max() <= 1
    long, _ = model.generate(1, seconds=1.3, seed=0)  # 20,800 samples: 84 frames (83 rounded up to the patch)
    assert long.shape == (1, 1, round(1.3 * 16000))
    paths = model.save(tmp_path / "notes.wav")
    assert [p.name for p in paths] == ["notes.wav"]
    info = sf.info(paths[0])
    assert (info.samplerate, info.frames, info.subtype) == (16000, round(1.3 * 16000), "PCM_16")
    flac = model.save(tmp_path / "flacs", format="flac", normalize="loudness")
    assert [p.name for p in flac] == ["000000.flac"] and sf.info(flac[0]).format == "FLAC"
    assert type(SCMPipeline.load(runs / "scd")) is AudioSCM  # the core loader returns the modality's API
    griffin, _ = AudioSCM.load(runs / "scd").generate(1, seed=0)  # no vocoder: Griffin-Lim
    assert griffin.shape == (1, 1, 31 * 256)


def test_the_vocoder_runs_where_the_model_runs(runs):
    pipe = SCMPipeline.load(runs / "scd", device="meta", vocoder=runs / "vocoder")  # meta: a device on any machine
    assert next(pipe.codec.vocoder.parameters()).device.type == "meta"


def test_a_vocoder_of_another_mel_spec_is_refused_naming_the_fields(runs):
    other = Vocos(mel_spec("small_16k", n_mels=80, fmax=7600.0), dim=16, intermediate_dim=32, num_layers=1)
    with pytest.raises(ValueError, match=r"(?s)fmax: 8000.0 != 7600.0.*n_mels: 64 != 80"):
        AudioSCM.load(runs / "scd", vocoder=other)
    assert isinstance(AudioSCM.load(runs / "scd").codec.vocoder, GriffinLim)


def test_sample_and_eval_apps(runs, tmp_path):
    out = tmp_path / "s" / "clip.wav"
    with pytest.raises(ValueError, match="modality=image was asked for"):
        sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "modality=image", f"out={out}", "device=cpu"]))
    paths = sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "modality=audio", "n=2", f"out={out}",
                                         "guidance=1.2", f"vocoder={runs / 'vocoder'}", "seconds=0.7",
                                         "device=cpu"]))  # fmt: skip
    assert [p.name for p in paths] == ["clip-000.wav", "clip-001.wav"]
    assert sf.info(paths[0]).frames == 11_200  # 0.7 s, cut from 46 mel frames (45 rounded up to the patch)
    classifier = train_audio_classifier(SynthNotes(size=48, seconds=0.496), num_classes=12, batch_size=8, max_steps=3)
    classifier.save(tmp_path / "classifier")
    result = evaluate.run(config("eval", [f"checkpoint={runs / 'teacher'}", "n=12", "solver=euler", "steps=2",
                                          "device=cpu", f"classifier_path={tmp_path / 'classifier'}"]))  # fmt: skip
    assert result["fad"] >= 0 and 0 <= result["pitch_accuracy"] <= 1


def test_eval_app_at_22k_trains_its_classifier_at_the_runs_rate(tmp_path):
    """A run at 22.05 kHz (HiFi-GAN mels) evaluates with the default classifier, trained on its data at its
    rate and cached; a classifier given at 16 kHz gets the clips resampled to its rate."""
    run = tmp_path / "teacher22k"
    train.run(config("train", ["experiment=notes_teacher", "modality=audio_22k", "data.dataset.sample_rate=22050",
                               "data.dataset.seconds=0.37152", "data.shape=[80,32]", f"run_dir={run}",
                               "train.iters=2", *TINY, "data.dataset.size=64"]))  # fmt: skip
    eval_args = [f"checkpoint={run}", "n=12", "solver=euler", "steps=2", "device=cpu", f"cache_dir={tmp_path / 'c'}"]
    result = evaluate.run(config("eval", eval_args))
    assert result["fad"] >= 0 and 0 <= result["pitch_accuracy"] <= 1
    (folder,) = (tmp_path / "c").glob("audio-classifier-*")
    assert AudioClassifier.load(folder).spec == classifier_spec(22050)
    classifier = train_audio_classifier(SynthNotes(size=48, seconds=0.496), num_classes=12, batch_size=8, max_steps=3)
    classifier.save(tmp_path / "classifier16k")
    given = evaluate.run(config("eval", [*eval_args, f"classifier_path={tmp_path / 'classifier16k'}"]))
    assert given["fad"] >= 0 and given["fad"] != result["fad"]


def test_generate_audio_example_vocodes_a_checkpoint_with_the_recipes_vocoder_beside_it(runs, tmp_path):
    spec = importlib.util.spec_from_file_location("generate_audio", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    shutil.copytree(runs / "scd", tmp_path / "notes_scd")
    assert example.recipe_vocoder(tmp_path / "notes_scd") is None  # Griffin-Lim, and the example says so
    shutil.copytree(runs / "vocoder", tmp_path / "notes_vocoder")
    assert example.recipe_vocoder(tmp_path / "notes_scd") == tmp_path / "notes_vocoder"
    checkpoint = resolve_checkpoint(tmp_path / "notes_scd")  # a checkpoint inside the run: the same
    assert example.recipe_vocoder(checkpoint) == tmp_path / "notes_vocoder"
    assert "played by five\ntimbres" in EXAMPLE.read_text()  # as SynthNotes and configs/data/notes.yaml


def test_generate_audio_example_samples_teacher_and_student_checkpoints(runs, tmp_path, monkeypatch, capsys):
    one = ["--n", 1, "--vocoder", runs / "vocoder"]
    teacher = check_example_samplers(EXAMPLE, runs, tmp_path, ".wav", monkeypatch, capsys, *one)
    assert sf.info(teacher).frames == 31 * 256  # no guidance input given: the teacher has none


def test_sample_app_names_its_output_after_the_modality(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "n=2", "device=cpu"]))
    assert paths == [Path("samples/samples-000.wav"), Path("samples/samples-001.wav")]  # was a folder samples.png/
    assert sf.info(tmp_path / paths[0]).samplerate == 16000


def test_generate_audio_example_trains_caches_and_reuses(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "n.wav"),
           "--n", "2", "--teacher-iters", "1", "--student-iters", "1", "--vocoder-iters", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert sorted(p.name for p in tmp_path.glob("n-*.wav")) == ["n-000.wav", "n-001.wav"]
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)  # reuses: no new iterations
    assert "resumed from" in again.stdout + again.stderr


def test_scm_mm_train_under_torchrun_equals_one_process(tmp_path):
    """scm-mm-train on 2 gloo processes through torchrun: the ranks encode their halves of the mel cache, train
    with the global batch split between them, and end with the weights of one process on the whole batch."""
    overrides = ["experiment=notes_teacher", "train.iters=2", "train.ckpt_every=0", "train.sample_every=0", *TINY]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    two = [f"run_dir={tmp_path / 'two'}", f"cache_dir={tmp_path / 'cache-two'}"]
    done = subprocess.run([*launch, "-m", "scm_mm.app.train", *two, *overrides], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    train.run(config("train", [f"run_dir={tmp_path / 'one'}", f"cache_dir={tmp_path / 'cache-one'}", *overrides]))
    (shared,), (alone,) = ((tmp_path / name).iterdir() for name in ("cache-two", "cache-one"))  # joined: no parts
    assert shared.name == alone.name and load_file(str(shared)).keys() == {"x0", "labels"}
    assert all(torch.equal(v, load_file(str(alone))[k]) for k, v in load_file(str(shared)).items())
    two, one = (load_weights(resolve_checkpoint(tmp_path / name), "model") for name in ("two", "one"))
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)
