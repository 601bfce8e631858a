"""Video datasets: Moving-MNIST clips are deterministic, disjoint across splits and really move; a video folder
reads the UCF-101 layout and reports bad files by path."""

import warnings

import numpy as np
import pytest
import torch

from scm_mm_video.data import BadVideoWarning, MovingDigits, VideoFolder
from scm_mm_video.io import write_mp4


def test_moving_digits_are_deterministic_in_any_order():
    a, b = MovingDigits(size=20), MovingDigits(size=20)
    forward = [a[i][0] for i in range(20)]
    backward = [b[i][0] for i in reversed(range(20))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward, strict=True))
    clip, label = a[7]
    assert clip.shape == (1, 9, 32, 32) and clip.dtype == torch.uint8 and label == 7
    assert not torch.equal(MovingDigits(size=20, seed=1)[7][0], clip)
    assert MovingDigits(size=4, channels=3)[0][0].shape == (3, 9, 32, 32)


def test_splits_use_disjoint_digits():
    train, test = MovingDigits(split="train"), MovingDigits(split="test")
    for c in range(10):
        assert len(np.intersect1d(train.pool[c], test.pool[c])) == 0
        assert len(test.pool[c]) > 0 and len(train.pool[c]) > 8 * len(test.pool[c])
    assert train.fingerprint != test.fingerprint


def test_digits_bounce_inside_the_frame_and_the_clip_shows_them():
    data = MovingDigits(size=200, frames=20, speed=(2.0, 3.0))
    room = data.resolution - data.digit_size
    bounced = 0
    for i in range(200):
        path = data.trajectory(i)  # (digits, frames, 2)
        assert path.min() >= 0 and path.max() <= room + 1e-9
        steps = np.diff(path, axis=1)
        assert (np.abs(steps).sum(-1) > 0).all()  # always moving
        # A bounce reverses the velocity along one axis; between bounces each axis moves at a constant speed
        # (a step that hits a wall mid-way is shorter: part of it goes back).
        bounced += int((np.sign(steps[:, 1:]) * np.sign(steps[:, :-1]) < 0).any())
        speed = np.abs(steps).max(1, keepdims=True)
        assert (np.abs(steps) <= speed + 1e-9).all() and np.isclose(np.abs(steps), speed).mean() > 0.7
    assert bounced > 100
    clip, label = data[3]
    digit_max = max(int(data.digits[d].max()) for d in data.pool[label][:1])
    assert int(clip[0, 0].max()) >= min(digit_max, 200)  # a bright digit stroke is in the first frame


def make_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        for k in range(2):
            frames = (rng.random((16, 24, 40, 3)) * 255).astype(np.uint8)
            write_mp4(frames, root / cls / f"v_{cls}_{k}.mp4", 8)
    write_mp4(np.zeros((2, 24, 40, 3), np.uint8), root / "dogs" / "short.mp4", 8)
    (root / "cats" / "empty.mp4").write_bytes(b"")
    (root / "cats" / "corrupt.avi").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())


def test_video_folder_reads_classes_and_skips_bad_files_by_name(tmp_path):
    make_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = VideoFolder(tmp_path, frames=8, fps=8, resolution=16, channels=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    for name in ("short.mp4", "empty.mp4", "corrupt.avi"):
        assert any(name in m for m in messages), name
    assert {p.name for p, _ in data.skipped} == {"short.mp4", "empty.mp4", "corrupt.avi"}
    assert data.classes == ["cats", "dogs"] and len(data) == 4 and data.num_classes == 2
    clip, label = data[3]
    assert clip.shape == (1, 8, 16, 16) and clip.dtype == torch.uint8 and label == 1
    rgb = VideoFolder(tmp_path, frames=4, fps=4, resolution=(8, 12), clips_per_video="all")
    assert rgb[0][0].shape == (3, 4, 8, 12) and len(rgb) == 4 * 2  # 2 s at 4 fps: two clips of 4 frames


def test_ucf101_split_file_selects_the_listed_videos(tmp_path):
    make_folder(tmp_path)
    split = tmp_path / "trainlist01.txt"
    split.write_text("cats/v_cats_1.mp4 1\ndogs/v_dogs_0.mp4 2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadVideoWarning)
        data = VideoFolder(tmp_path, frames=8, resolution=16, split_file=split)
    assert sorted(p.name for p, _, _ in data.items) == ["v_cats_1.mp4", "v_dogs_0.mp4"]


def test_a_folder_without_usable_videos_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.mp4").write_bytes(b"junk")
    with pytest.warns(BadVideoWarning), pytest.raises(ValueError, match="no usable video"):
        VideoFolder(tmp_path, frames=4)
