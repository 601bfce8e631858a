"""Checkpoints that survive kills and crashes: what killed writers leave is cleaned up, files and folders are
fsynced around the rename, resume="auto" falls back past a checkpoint a crash cut short (in the training loop:
tests/test_training.py; here the helpers and the codec trainers), and pruning keeps a readable checkpoint."""

import errno
import os
import shutil
import stat
from dataclasses import replace

import numpy as np
import pytest
import torch

from scm_mm.train import checkpoint as ckpt  # attributes looked up per test, so each fails for its own reason


def save(run_dir, iteration, keep_last=3):
    """A small checkpoint as the training loop writes one."""
    model = {"w": torch.full((4, 4), float(iteration))}
    return ckpt.save_checkpoint(
        run_dir, iteration, model=model, ema={"ema": model}, state={"iteration": iteration, "m": torch.ones(8)},
        meta={"net": {}}, rank_states={0: {"torch": torch.get_rng_state()}}, keep_last=keep_last,
    )  # fmt: skip


def names(run_dir):
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def cut(path, n=20):
    path.write_bytes(path.read_bytes()[:-n])


BREAKS = {
    "model.safetensors": (cut, "model.safetensors is cut short or corrupt"),
    "ema.safetensors": (os.remove, "ema.safetensors is missing"),
    "state.pt": (lambda p: p.write_bytes(b""), "state.pt is empty"),
    "rng-rank0.pt": (cut, "rng-rank0.pt is cut short or corrupt"),
    "meta.json": (lambda p: p.write_text('{"net": {'), "meta.json is cut short or corrupt"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_resume_auto_skips_an_unreadable_checkpoint_naming_why(tmp_path, name):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    assert ckpt.resume_source("auto", tmp_path, required=ckpt.TRAIN_FILES) == newest
    damage, why = BREAKS[name]
    damage(newest / name)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}: {why}"):
        chosen = ckpt.resume_source("auto", tmp_path, required=ckpt.TRAIN_FILES)
    assert chosen.name == "iter-000000001"
    assert ckpt.resume_source("auto", tmp_path / "new", required=ckpt.TRAIN_FILES) is None  # a new run


def test_loading_a_run_skips_an_unreadable_newest_checkpoint(tmp_path):
    """Sampling, evaluation and a student's teacher read a run through resolve_checkpoint: past a crash's
    cut-short checkpoint as resume does, and a checkpoint named explicitly stays that one."""
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    assert ckpt.resolve_checkpoint(tmp_path) == newest
    cut(newest / "model.safetensors")
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}: model.safetensors is cut short"):
        assert ckpt.resolve_checkpoint(tmp_path).name == "iter-000000001"
    assert ckpt.resolve_checkpoint(newest) == newest
    cut(tmp_path / "checkpoints" / "iter-000000001" / "ema.safetensors")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="cannot be loaded"):
        ckpt.resolve_checkpoint(tmp_path)


def test_orphans_of_killed_writers_are_removed_at_the_start_but_not_a_live_writers(tmp_path, capsys):
    save(tmp_path, 1)
    save(tmp_path, 2)
    folder = tmp_path / "checkpoints"
    shutil.copytree(folder / "iter-000000002", folder / "iter-000000003.tmp-4242")  # killed while writing
    shutil.copytree(folder / "iter-000000002", folder / "iter-000000002.old-4242")  # killed after its rename
    os.replace(folder / "iter-000000001", folder / "iter-000000001.old-77")  # killed between the two renames
    (tmp_path / "vocoder.tmp-4242").mkdir()  # a final export killed midway
    with ckpt.writing_directory(folder / "iter-000000005") as live:  # this process is filling this one
        (live / "part").write_text("half")
        assert ckpt.resume_source("auto", tmp_path, required=ckpt.TRAIN_FILES).name == "iter-000000002"
        assert (live / "part").is_file()
    report = capsys.readouterr().out.strip().splitlines()
    assert report == [
        f"cleaned up after killed writers in {tmp_path}: removed vocoder.tmp-4242, "
        "checkpoints/iter-000000002.old-4242, checkpoints/iter-000000003.tmp-4242; "
        "restored checkpoints/iter-000000001.old-77 -> iter-000000001"
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["iter-000000001", "iter-000000002", "iter-000000005"]
    assert ckpt.checkpoint_problem(folder / "iter-000000001", ckpt.TRAIN_FILES) is None
    ckpt.resume_source("never", tmp_path)
    assert capsys.readouterr().out == ""  # nothing left to report


def test_files_and_folders_are_fsynced_around_the_rename_before_pruning(tmp_path, monkeypatch):
    events = []
    fsync, rename, rmtree = os.fsync, os.replace, shutil.rmtree

    def record_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))  # the inode survives the rename
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        rename(src, dst)

    def record_rmtree(path, *a, **kw):
        events.append(("rmtree", os.fspath(path)))
        rmtree(path, *a, **kw)

    save(tmp_path, 1, keep_last=1)
    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    monkeypatch.setattr(shutil, "rmtree", record_rmtree)
    final = save(tmp_path, 2, keep_last=1)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == os.fspath(final))
    prune = events.index(("rmtree", os.fspath(tmp_path / "checkpoints" / "iter-000000001")))
    before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = [final, *final.iterdir()]
    assert {p.stat().st_ino for p in written} <= before  # every file, and the folder, before it is published
    after = {e[1] for e in events[publish:prune] if e[0] == "fsync"}
    assert (tmp_path / "checkpoints").stat().st_ino in after  # the rename itself, before anything is deleted
    assert names(tmp_path) == ["iter-000000002"]


def test_a_folder_fsync_may_be_refused_a_file_fsync_may_not(tmp_path, monkeypatch):
    fsync = os.fsync
    refuse = {"dir": True, "file": False}

    def picky_fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        if refuse[kind]:
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", picky_fsync)
    save(tmp_path, 1)  # a filesystem that refuses fsync on folders: fine
    refuse["file"] = True  # a failing disk: the save fails and leaves nothing behind
    with pytest.raises(OSError, match="Invalid argument"):
        save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter-000000001"]


def test_pruning_counts_only_up_to_the_checkpoint_just_written(tmp_path):
    """A run that fell back from a checkpoint cut short writes older iterations beside it: pruning keeps what
    it writes (readable, and on disk before pruning) and leaves the later one alone."""
    save(tmp_path, 2)
    cut(save(tmp_path, 4) / "model.safetensors")
    save(tmp_path, 3, keep_last=1)
    assert names(tmp_path) == ["iter-000000003", "iter-000000004"]
    with pytest.warns(UserWarning, match="iter-000000004: model.safetensors"):
        assert ckpt.resume_source("auto", tmp_path, required=ckpt.TRAIN_FILES).name == "iter-000000003"


# --- the codec trainers (resume_source with a marker) ----------------------------------------------------


def test_vocoder_training_falls_back_and_keeps_a_readable_checkpoint(tmp_path):
    from scm_mm_audio.vocoder_train import VocoderOptions, train_vocoder
    from scm_mm_audio.vocos import Vocos

    class Clips:
        sample_rate, num_classes, fingerprint = 16000, 0, "test-clips"

        def __init__(self):
            t = np.arange(8000) / 16000
            self.waves = [torch.from_numpy(0.3 * np.sin(2 * np.pi * f * t)).float()[None] for f in (220, 330, 440)]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return self.waves[i], -1

    def vocoder():
        torch.manual_seed(0)
        return Vocos("small_16k", dim=16, intermediate_dim=32, num_layers=1)

    data, run = Clips(), tmp_path / "killed"
    options = VocoderOptions(iters=6, batch_size=2, segment_frames=6, ckpt_every=2, log_every=1, progress=False)
    full = train_vocoder(vocoder(), data, options, tmp_path / "full")
    train_vocoder(vocoder(), data, options, run, stop_at=5)  # checkpoints at 2 and 4
    cut(run / "checkpoints" / "iter-000000004" / "vocoder" / "model.safetensors")
    every = replace(options, ckpt_every=1, keep_last=1)
    with pytest.warns(UserWarning, match="iter-000000004: vocoder/model.safetensors is cut short"):
        again = train_vocoder(vocoder(), data, every, run, stop_at=3)  # from 2, killed again at 3
    assert again.start_iteration == 2 and again.losses == full.losses[2:3]
    assert names(run) == ["iter-000000003", "iter-000000004"]  # pruning kept the only readable one
    with pytest.warns(UserWarning, match="iter-000000004"):
        resumed = train_vocoder(vocoder(), data, options, run)
    assert resumed.start_iteration == 3 and resumed.losses == full.losses[3:]


def test_video_vae_training_falls_back_past_a_cut_short_checkpoint(tmp_path):
    from scm_mm_video.autoencoder import VideoVAE, VideoVAEConfig
    from scm_mm_video.vae_train import VAEOptions, train_video_vae

    def vae():
        torch.manual_seed(0)
        return VideoVAE(VideoVAEConfig(in_channels=1, latent_channels=2, base_channels=8, channel_mult=(1, 2),
                                       temporal_factor=2, patch_size=2, groups=4))  # fmt: skip

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (1, 5, 16, 16), generator=g, dtype=torch.uint8), 0) for _ in range(4)]
    options = VAEOptions(iters=6, batch_size=2, lr=3e-3, warmup_iters=0, log_every=1, ckpt_every=2, progress=False)
    full = train_video_vae(vae(), options, data, tmp_path / "full")
    train_video_vae(vae(), options, data, tmp_path / "killed", stop_at=5)  # checkpoints at 2 and 4
    (tmp_path / "killed" / "checkpoints" / "iter-000000004" / "state.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="iter-000000004: state.pt is empty"):
        resumed = train_video_vae(vae(), options, data, tmp_path / "killed")
    assert resumed.start_iteration == 2 and resumed.losses == full.losses[2:]
