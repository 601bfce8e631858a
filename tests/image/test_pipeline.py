"""The whole image pipeline through the Hydra apps on a tiny config: teacher, sCD, sample, eval.

Also the refusals: a config typo, a teacher of another architecture or parameterization.
"""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import check_example_samplers, config, free_port
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from PIL import Image

from scm_mm.app import evaluate, sample, train
from scm_mm.nn.dit import SelfAttention
from scm_mm.train.build import load_model, load_teacher
from scm_mm.train.checkpoint import build_from_spec, list_checkpoints, read_meta, resolve_checkpoint
from scm_mm_image import ImageSCM
from scm_mm_image.data import MNIST
from scm_mm_image.metrics import train_classifier
from scm_mm_image.presets import PRESETS, unet_spec

TINY = [
    "train.batch_size=8", "train.progress=false",
    "train.log_every=1", "device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    teacher = root / "teacher"
    train.run(config("train", ["experiment=mnist_teacher", f"run_dir={teacher}", "train.iters=3",
                               "train.sample_every=3", *TINY]))  # fmt: skip
    student = root / "scd"
    cfg_distilled = ["method.guidance_input=true", "method.loss.guidance_range=[1.0,2.0]"]  # the CFG-scale input
    train.run(config("train", ["experiment=mnist_scd", f"run_dir={student}", f"method.teacher={teacher}",
                               "train.iters=2", *cfg_distilled, *TINY]))  # fmt: skip
    return root


def test_teacher_and_scd_runs_write_checkpoints_and_logs(runs):
    for name, iters in (("teacher", 3), ("scd", 2)):
        assert [p.name for p in list_checkpoints(runs / name)] == [f"iter-{iters:09d}"]
        assert (runs / name / "log.jsonl").read_text().count("\n") == iters
        assert any((runs / name / "tensorboard").iterdir())


def test_sample_app_writes_a_png_grid(runs, tmp_path):
    out = tmp_path / "grid.png"
    sample.run(config("sample", [f"checkpoint={runs / 'scd'}", "n=4", f"out={out}", "guidance=1.5", "device=cpu"]))
    with Image.open(out) as image:
        assert image.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 grid of 16x16 with 2-pixel padding


def test_sample_refuses_to_run_under_torchrun(runs, tmp_path, monkeypatch):
    """Each process would sample the same seed and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="without torchrun"):
        sample.run(config("sample", [f"checkpoint={runs / 'scd'}", f"out={tmp_path / 'g.png'}", "device=cpu"]))
    assert not (tmp_path / "g.png").exists()


def test_eval_under_torchrun_scores_the_samples_of_one_process(runs, tmp_path):
    """scm-mm-eval on 2 gloo processes through torchrun: each samples and featurises its share of the batches
    (of 4, 4 and 2 images: 6 on rank 0, 4 on rank 1) and the first prints the scores of all 10, which are one
    process's with the same seed and batch size. The classifier is trained once, on rank 0, and cached."""
    overrides = [f"checkpoint={runs / 'scd'}", "n=10", "batch_size=4", f"cache_dir={tmp_path / 'cache'}", "device=cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    out = tmp_path / "two.json"
    done = subprocess.run([*launch, "-m", "scm_mm.app.evaluate", *overrides, f"out={out}"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"fid"') == 1  # printed by the first process only
    two, one = json.loads(out.read_text()), evaluate.run(config("eval", overrides))
    assert (two["processes"], one["processes"]) == (2, 1)
    for key in ("fid", "precision", "recall", "is_mean", "is_std"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_the_apps_sample_a_teacher_with_its_solver_unless_told(runs, tmp_path, capsys):
    for name, told, expected in (("teacher", [], "(heun, 32 steps)"), ("scd", [], "(consistency, 2 steps)"),
                                 ("teacher", ["solver=euler", "steps=3"], "(euler, 3 steps)")):  # fmt: skip
        sample.run(config("sample", [f"checkpoint={runs / name}", "n=1", f"out={tmp_path / 'g.png'}", "device=cpu",
                                     *told]))  # fmt: skip
        assert expected in capsys.readouterr().out


def test_eval_app_scores_samples(runs, tmp_path):
    clf = train_classifier(MNIST(resolution=16), max_steps=10)
    clf.save(tmp_path / "clf")
    result = evaluate.run(config("eval", [f"checkpoint={runs / 'teacher'}", "n=20", "solver=heun", "steps=4",
                                          "churn=5", f"classifier_path={tmp_path / 'clf'}", "device=cpu"]))  # fmt: skip
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and result["is_mean"] >= 1


def test_a_checkpoint_naming_a_function_to_call_is_refused(runs, tmp_path):
    """A checkpoint's meta.json is data: a dataset or net `_target_` that names a function (which would be
    called with the checkpoint's arguments) or another package's class is refused before anything runs."""
    victim = tmp_path / "victim.txt"
    victim.write_text("kept")
    run = tmp_path / "run"
    shutil.copytree(runs / "teacher", run)
    meta_path = resolve_checkpoint(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    prune = {"_target_": "scm_mm.train.checkpoint.prune_checkpoints", "run_dir": str(runs / "teacher"), "keep_last": 0}
    opens = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    nested = {"_target_": "scm_mm_image.data.MNIST", "resolution": {"_target_": "shutil.rmtree", "path": str(tmp_path)}}
    registry = {"_target_": "scm_mm_image.data.build_dataset", "name": "shutil"}
    for dataset, message in ((opens, "only"), (prune, "not a Dataset class"), (nested, "builds more"),
                             (registry, "names 'shutil', which .* does not build")):  # fmt: skip
        meta_path.write_text(json.dumps({**meta, "config": {**meta["config"], "data": {"dataset": dataset}}}))
        with pytest.raises(ValueError, match=message):
            evaluate.run(config("eval", [f"checkpoint={run}", "n=4", "device=cpu"]))
    built = {"_target_": "scm_mm_image.data.build_dataset", "name": "mnist", "resolution": 16}  # the registry
    assert isinstance(evaluate.reference_dataset(run, {"config": {"data": {"dataset": built}}}), MNIST)
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "net": prune}}))
    with pytest.raises(ValueError, match="not a Module class"):
        load_model(run)
    assert victim.read_text() == "kept" and list_checkpoints(runs / "teacher")


def test_eval_app_scores_the_samples_a_batch_at_a_time(runs, tmp_path, monkeypatch):
    """scm-mm-eval hands the modality an iterator of decoded batches (FID-50k at 512x512 keeps features, not 39 GB
    of pixels) and scores them as one tensor of the same samples would be; its time leaves the metrics out."""
    from scm_mm_image import ImageModality

    clf = train_classifier(MNIST(resolution=16), max_steps=10)
    clf.save(tmp_path / "clf")
    seen, score = [], ImageModality.evaluate

    def recording(self, images, *args, **kwargs):
        def batches():
            for batch in images:
                seen.append(batch.shape[0])
                yield batch
                time.sleep(1.0)  # scoring that takes a while: not sampling time

        assert not isinstance(images, torch.Tensor)
        return score(self, batches(), *args, **kwargs)

    monkeypatch.setattr(ImageModality, "evaluate", recording)
    overrides = [f"checkpoint={runs / 'scd'}", "n=20", "batch_size=8", f"classifier_path={tmp_path / 'clf'}"]
    result = evaluate.run(config("eval", [*overrides, "device=cpu"]))
    assert seen == [8, 8, 4] and 0 < result["sampling_seconds"] < 3  # the scoring took 3 s
    model = ImageSCM.load(runs / "scd")
    images = model.generate(20, labels=model.labels_for(20, None), seed=1, batch_size=8)
    whole = score(ImageModality(), images, MNIST(resolution=16), classifier_path=str(tmp_path / "clf"))
    for key in ("fid", "precision", "recall", "is_mean"):
        assert result[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6)


def test_decoded_batches_are_the_samples_of_sample_latents_decoded_batch_by_batch(runs, monkeypatch):
    model = ImageSCM.load(runs / "scd")
    decoded = []
    monkeypatch.setattr(model.codec, "decode", lambda x0: decoded.append(len(x0)) or (x0 * 0).to(torch.uint8))
    assert [len(b) for b in model.decoded_batches(10, seed=3, batch_size=4)] == decoded == [4, 4, 2]
    with pytest.raises(ValueError, match="labels must be in"):  # checked at the call, not at the first batch
        model.latent_batches(2, labels=[10, 1])
    batches = list(model.latent_batches(10, seed=3, batch_size=4))
    torch.testing.assert_close(torch.cat(batches), model.sample_latents(10, seed=3, batch_size=4), rtol=0, atol=0)


def test_each_batch_has_a_seed_of_its_own_so_shards_draw_the_samples_of_one_process(runs):
    model = ImageSCM.load(runs / "scd")
    whole = list(model.latent_batches(10, seed=3, batch_size=4))
    first, second = (list(model.latent_batches(10, seed=3, batch_size=4, shard=(r, 2))) for r in (0, 1))
    assert [len(b) for b in first] == [4, 2] and [len(b) for b in second] == [4]
    torch.testing.assert_close(torch.cat([first[0], second[0], first[1]]), torch.cat(whole), rtol=0, atol=0)
    torch.testing.assert_close(model.sample_latents(4, seed=3, batch_size=4), whole[0], rtol=0, atol=0)  # any n
    assert not torch.equal(whole[0], whole[1][:4])  # the batches' seeds differ
    state = torch.random.get_rng_state()
    fresh = [model.sample_latents(2, batch_size=2) for _ in range(2)]
    assert not torch.equal(*fresh) and torch.equal(state, torch.random.get_rng_state())  # seed=None: new, untouched
    with pytest.raises(ValueError, match="0 <= rank < world size"):
        model.latent_batches(10, shard=(2, 2))


def _fake_cifar10(root: Path) -> Path:
    """The CIFAR-10 python archive's layout (cifar-10-batches-py/) with 8 random images per batch, labels 0-9."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for seed, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        rng = np.random.default_rng(seed)
        batch = {b"labels": rng.integers(0, 10, 8).tolist(), b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar10_experiments_train_unconditionally_on_the_labelled_archive(tmp_path):
    """The paper's CIFAR-10 runs are unconditional (data.num_classes 0, so the net has no label input) on a
    dataset that has 10 classes: the loop trains without the labels instead of passing them to the net."""
    data = _fake_cifar10(tmp_path / "cifar")
    small = ["net=mnist_tiny", "+net.in_channels=3", f"data.dataset.root={data}", "train.iters=1",
             "train.precision=fp32", *TINY]  # fmt: skip
    teacher = tmp_path / "teacher"
    runs = [["experiment=cifar10_teacher", f"run_dir={teacher}"]]  # the teacher, then the two paper experiments
    runs += [[f"experiment={name}", f"{source}={teacher}", f"run_dir={tmp_path / name}"]
             for name, source in (("cifar10_sct", "method.init_from"), ("cifar10_scd", "method.teacher"))]
    for overrides in runs:
        cfg = config("train", [*overrides, *small])
        assert cfg.data.num_classes == 0 and cfg.net.num_classes == 0
        with pytest.warns(UserWarning, match="without the dataset's 10 class labels"):
            result = train.run(cfg)
        assert result.iteration == 1 and math.isfinite(result.losses[0])


def test_image_api_is_seeded(runs, tmp_path):
    model = ImageSCM.load(runs / "scd")
    a = model.generate(4, steps=2, labels=[1, 2, 3, 4], guidance=1.2, seed=7)
    b = model.generate(4, steps=2, labels=[1, 2, 3, 4], guidance=1.2, seed=7)
    assert a.dtype == torch.uint8 and a.shape == (4, 1, 16, 16) and torch.equal(a, b)
    assert model.save_grid(tmp_path / "g.png").exists()
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(1, labels=[10])
    one = model.generate(3, labels=3, guidance=1.2, seed=7)  # one label for all, of any integer type
    for label in (np.int64(3), torch.tensor(3), [3, 3, 3]):
        assert torch.equal(model.generate(3, labels=label, guidance=1.2, seed=7), one)
    with pytest.raises(ValueError, match="labels must be integers"):
        model.generate(2, labels=[1.7, 2.0])


def test_generate_samples_a_teacher_with_its_solver_unless_told(runs):
    """A diffusion teacher's checkpoint samples with heun 32 (as the apps do), a student with 2 steps."""
    teacher, student = ImageSCM.load(runs / "teacher"), ImageSCM.load(runs / "scd")
    assert teacher.sampler_for() == ("heun", 32) and student.sampler_for() == ("consistency", 2)
    for model, told in ((teacher, {"method": "heun", "steps": 32}), (student, {"method": "consistency", "steps": 2})):
        assert torch.equal(model.sample_latents(2, seed=1), model.sample_latents(2, seed=1, **told))


def test_an_unseeded_generate_leaves_the_global_rng_alone(runs):
    model = ImageSCM.load(runs / "scd")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    a = model.generate(2, steps=1, labels=[1, 2])
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(a, model.generate(2, steps=1, labels=[1, 2]))  # a fresh seed each call


def test_a_teacher_of_another_architecture_or_parameterization_is_refused(runs, tmp_path):
    base = ["experiment=mnist_scd", f"run_dir={tmp_path}", f"method.teacher={runs / 'teacher'}", *TINY]
    with pytest.raises(ValueError, match=r"net\.model_channels: 32 != 16"):
        train.run(config("train", [*base, "+net.model_channels=32"]))
    with pytest.raises(ValueError, match=r"precond\.sigma_d: 1\.0 != 0\.5"):
        train.run(config("train", [*base, "precond.sigma_d=1.0"]))
    with pytest.raises(ValueError, match=r"trained with method 'scd': sCD distills a diffusion model"):
        train.run(config("train", [*base, f"method.teacher={runs / 'scd'}"]))  # a consistency model
    student_spec = read_meta(resolve_checkpoint(runs / "scd"))["model"]
    assert load_teacher(runs / "scd", student_spec, distilling=False)  # method.init_from may (fine-tuning)


def test_a_teacher_with_its_preset_written_out_starts_a_student(runs, tmp_path):
    """A checkpoint whose spec spells the preset out (as bench/image_mnist.py writes it) is the same teacher."""
    teacher = tmp_path / "teacher"
    shutil.copytree(runs / "teacher", teacher)
    (ckpt,) = list_checkpoints(teacher)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"] = {"net": unet_spec("mnist-tiny", num_classes=10), "precond": {"sigma_d": 0.5}}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    student = tmp_path / "sct"
    train.run(config("train", ["experiment=mnist_sct", f"run_dir={student}", f"method.init_from={teacher}",
                               "train.iters=1", *TINY]))  # fmt: skip
    assert [p.name for p in list_checkpoints(student)] == ["iter-000000001"]


def test_a_checkpoint_keeps_its_net_when_a_preset_changes(runs, monkeypatch):
    meta = read_meta(runs / "teacher")
    assert meta["model"]["net"]["_target_"] == "scm_mm.nn.unet.UNet" and meta["model"]["net"]["head_channels"] == 32
    assert meta["config"]["net"]["name"] == "mnist-tiny"
    monkeypatch.setitem(PRESETS, "mnist-tiny", {**PRESETS["mnist-tiny"], "head_channels": 16})  # same weights
    model, _ = load_model(runs / "teacher")
    assert {m.heads for m in model.modules() if isinstance(m, SelfAttention)} == {64 // 32}


def test_config_typos_get_hydras_error():
    with pytest.raises(ConfigCompositionException, match="itres"):
        config("train", ["train.itres=3"])
    with pytest.raises(ConfigCompositionException, match="mnist_teacher"):  # the message lists the options
        config("train", ["experiment=mnist_teachr"])


def test_required_values_are_asked_for_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "instantiate", lambda *a, **k: pytest.fail("the run started"))
    asked = {"mnist_sct": "method.init_from", "mnist_scd": "method.teacher",
             "imagenet512_scd_s": "modality.codec.path, data.dataset.root, method.teacher",
             "ucf101_teacher": "modality.codec.vae, data.dataset.root", "ucf101_vae": "data.dataset.root"}  # fmt: skip
    for experiment, keys in asked.items():
        with pytest.raises(ValueError, match=f"needs a value for {keys} "):
            train.run(config("train", [f"experiment={experiment}", f"run_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="method.init_from=null trains sCT from scratch"):
        train.run(config("train", ["experiment=mnist_sct", f"run_dir={tmp_path}"]))


def test_apps_find_their_configs_from_any_directory(tmp_path):
    app = [sys.executable, "-m", "scm_mm.app.train", "--cfg", "job", "--resolve"]
    cmd = [*app, "experiment=mnist_scd", "method.teacher=x"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "name: mnist_scd" in out and "guidance_embed: false" in out


EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[2] / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_net(name):
    cfg = config("train", [f"experiment={name}"])
    assert cfg.name == name
    trainer = cfg.method.get("trainer")
    if trainer and "vocoder" in trainer:  # a vocoder, with its own trainer: built for the modality's mel spec
        assert instantiate(trainer.vocoder).spec == instantiate(cfg.modality.codec).spec
        return
    if trainer:  # a video autoencoder, built for the data's channels
        with torch.device("meta"):
            assert instantiate(trainer.vae).in_channels == cfg.data.dataset.get("channels", 1)
        return
    with torch.device("meta"):
        net = build_from_spec(train.plain(cfg.net))
        stored = build_from_spec(train.model_spec(cfg)["net"])  # the net written out, as checkpoints hold it
    assert net.in_channels == cfg.data.shape[0]
    assert {k: v.shape for k, v in stored.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert cfg.train.batch_size % 8 == 0 and cfg.method.loss.sigma_d == cfg.modality.sigma_d


EXAMPLE = Path(__file__).parents[2] / "examples" / "generate_image.py"


def test_generate_image_example_samples_teacher_and_student_checkpoints(runs, tmp_path, monkeypatch, capsys):
    assert check_example_samplers(EXAMPLE, runs, tmp_path, ".png", monkeypatch, capsys, "--n", 1).is_file()


def test_sample_app_names_its_output_after_the_modality(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config("sample", [f"checkpoint={runs / 'scd'}", "n=4", "device=cpu"])
    assert cfg.out is None  # the modality names the file (was samples/samples.png for every modality)
    paths = sample.run(cfg)
    assert paths == [Path("samples/samples.png")] and Image.open(tmp_path / paths[0]).format == "PNG"


def test_generate_image_example_trains_caches_and_reuses(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "d.png"),
           "--n", "4", "--teacher-iters", "2", "--student-iters", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert (tmp_path / "d.png").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "cache" / "mnist_scd")] == ["iter-000000001"]
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)  # reuses: no new iterations
    assert "resumed from" in again.stdout + again.stderr
