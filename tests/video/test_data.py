"""Video datasets. MovingDigits: deterministic in any order, disjoint splits, balanced labels, digits that move,
stay inside and bounce, checked against a step-by-step reflection and by finding the real digits in the
frames. VideoFolder: the UCF-101 layout on tiny videos written here, bad files reported by path, labels,
resampling, resizing, grey and RGB, alpha sources, split files."""

import warnings
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from scm_mm.data import UnreadableItem, encode_all, training_set
from scm_mm_video.data import (
    BadVideoWarning,
    MovingDigits,
    VideoFolder,
    bounce,
    build_dataset,
    resize_and_crop,
    to_grey,
)
from scm_mm_video.io import write_mp4

# ------------------------------------------------------------------------------------------ MovingDigits


def test_moving_digits_are_deterministic_in_any_order():
    a, b = MovingDigits(size=20), MovingDigits(size=20)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    assert all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(forward, backward, strict=True))
    assert torch.equal(a[7][0], a[7][0]) and a.fingerprint == b.fingerprint
    clip, label = a[7]
    assert clip.shape == (1, 9, 32, 32) and clip.dtype == torch.uint8 and label == 7
    other = MovingDigits(size=20, seed=1)
    assert not torch.equal(other[7][0], clip) and other.fingerprint != a.fingerprint
    rgb = MovingDigits(size=4, channels=3)[0][0]
    assert rgb.shape == (3, 9, 32, 32) and torch.equal(rgb[1], a[0][0][0]) and torch.equal(rgb[2], a[0][0][0])
    assert MovingDigits(size=30)[7][0].equal(clip)  # the size does not change the clips
    with pytest.raises(IndexError):
        a[20]


def test_splits_use_disjoint_digits_and_labels_are_balanced():
    train, test = MovingDigits(split="train"), MovingDigits(split="test")
    for c in range(10):
        assert len(np.intersect1d(train.pool[c], test.pool[c])) == 0
        assert (train.labels[train.pool[c]] == c).all() and (test.labels[test.pool[c]] == c).all()
        assert len(train.pool[c]) + len(test.pool[c]) == (train.labels == c).sum()
        assert len(test.pool[c]) > 0 and len(train.pool[c]) == pytest.approx(9 * len(test.pool[c]), abs=9)
    assert train.fingerprint != test.fingerprint and not torch.equal(train[0][0], test[0][0])
    labels = [train[i][1] for i in range(100)]
    assert labels == [i % 10 for i in range(100)] and train.num_classes == 10 and train.classes[3] == "3"
    mixed = MovingDigits(size=10, classes="mixed")
    assert {mixed[i][1] for i in range(10)} == {-1} and mixed.num_classes == 0


def test_bounce_matches_a_step_by_step_reflection():
    rng = np.random.default_rng(0)
    start, velocity, room = rng.uniform(0, 10, (50, 2)), rng.uniform(-7, 7, (50, 2)), 10.0
    position, v, expected = start.copy(), velocity.copy(), [start.copy()]
    for _ in range(29):  # move, then reflect position and velocity at each wall until inside
        position = position + v
        while ((position < 0) | (position > room)).any():
            low, high = position < 0, position > room
            position = np.where(low, -position, np.where(high, 2 * room - position, position))
            v = np.where(low | high, -v, v)
        expected.append(position.copy())
    assert np.allclose(bounce(start, velocity, 30, room), np.stack(expected, 1))


def test_digits_move_stay_inside_and_bounce():
    data = MovingDigits(size=100, frames=20, speed=(2.0, 3.0))
    room = data.resolution - data.digit_size
    reversals = 0
    for i in range(100):
        path = data.trajectory(i)  # (digits, frames, 2)
        assert path.shape == (2, 20, 2) and path.min() >= 0 and path.max() <= room
        steps = np.diff(path, axis=1)  # (digits, frames - 1, 2)
        assert (np.linalg.norm(steps, axis=-1) > 0).all()  # always moving
        speed = np.abs(steps).max(1, keepdims=True)  # per digit and axis; a step through a wall is shorter
        assert (np.abs(steps) <= speed + 1e-9).all()
        # Between two steps of opposite sign along an axis the digit touched a wall: within one step of it.
        flips = np.sign(steps[:, 1:]) * np.sign(steps[:, :-1]) < 0  # (digits, frames - 2, 2)
        at = path[:, 1:-1][flips]
        near_wall = np.minimum(at, room - at) <= np.broadcast_to(speed, flips.shape)[flips] + 1e-9
        assert near_wall.all()
        reversals += int(flips.sum())
    assert reversals > 100  # ~ 20 frames x 2.5 px over a room of 16 px: several bounces per clip


def find_digit(patch: np.ndarray, digits: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Candidates whose digit image lies under the patch (a per-pixel max composite is >= each part)."""
    return [int(d) for d in candidates if (patch >= digits[d]).all() and digits[d].max() > 0]


def test_a_frame_shows_the_digits_of_the_label_at_their_positions():
    one = MovingDigits(size=10, num_digits=1, frames=5)
    for i in (3, 8):
        clip, label = one[i]
        (path,) = one.trajectory(i).round().astype(int)
        s = one.digit_size
        for t, (y, x) in enumerate(path):  # the frame is exactly one test-split digit of class `label` on black
            frame = clip[0, t].numpy()
            patch = frame[y : y + s, x : x + s]
            assert any(np.array_equal(patch, one.digits[d]) for d in one.pool[label])
            rest = frame.copy()
            rest[y : y + s, x : x + s] = 0
            assert rest.max() == 0
    two = MovingDigits(size=10)
    clip, label = two[4]
    frame = clip[0, 0].numpy()
    corners = two.trajectory(4)[:, 0].round().astype(int)
    s = two.digit_size
    found = [find_digit(frame[y : y + s, x : x + s], two.digits, two.pool[label]) for y, x in corners]
    assert all(found)  # both digits of class 4 are there, composited with a per-pixel max

    def composite(a: int, b: int) -> np.ndarray:
        canvas = np.zeros_like(frame)
        for (y, x), d in zip(corners, (a, b), strict=True):
            np.maximum(canvas[y : y + s, x : x + s], two.digits[d], out=canvas[y : y + s, x : x + s])
        return canvas

    assert any(np.array_equal(composite(a, b), frame) for a in found[0] for b in found[1])


def test_mixed_single_digits_are_labelled_by_their_class():
    data = MovingDigits(size=30, num_digits=1, classes="mixed")
    assert data.num_classes == 10
    labels = []
    for i in range(30):
        clip, label = data[i]
        y, x = data.trajectory(i)[0, 0].round().astype(int)
        patch = clip[0, 0, y : y + data.digit_size, x : x + data.digit_size].numpy()
        match = data.pool_all[(data.digits[data.pool_all] == patch).all((1, 2))]
        assert match and {int(data.labels[d]) for d in match} == {label}
        labels.append(label)
    assert len(set(labels)) > 5  # independent classes, not i % 10
    assert labels != [i % 10 for i in range(30)]


def test_build_dataset_by_name():
    data = build_dataset("moving_digits", size=3, frames=5, resolution=16, digit_size=8)
    assert isinstance(data, MovingDigits) and data[0][0].shape == (1, 5, 16, 16) and data.fps == 8
    with pytest.raises(ValueError, match="unknown video dataset"):
        build_dataset("kinetics")


# ------------------------------------------------------------------------------------------- VideoFolder


def numbered(t: int, h: int = 24, w: int = 40, offset: int = 0) -> np.ndarray:
    """Frame k has brightness 20 + 10 k (+ offset): the index survives H.264 and resizing."""
    values = 20 + 10 * np.arange(t) + offset
    return np.broadcast_to(values[:, None, None, None], (t, h, w, 3)).astype(np.uint8).copy()


def index_of(clip: torch.Tensor, offset: int = 0) -> list[int]:
    """Frame indices of a clip (C, T, H, W) made from numbered()."""
    return [round((float(clip[:, t].float().mean()) - 20 - offset) / 10) for t in range(clip.shape[1])]


def make_folder(root):
    """cats/ and dogs/ with two 2-second 8 fps videos each, plus a too-short, an empty and a corrupt file."""
    for c, cls in enumerate(("cats", "dogs")):
        for k in range(2):
            write_mp4(numbered(16, offset=2 * k + c), root / cls / f"v_{cls}_{k}.mp4", 8)
    write_mp4(numbered(2), root / "dogs" / "short.mp4", 8)
    (root / "cats" / "empty.mp4").write_bytes(b"")
    (root / "cats" / "corrupt.AVI").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, np.uint8).tobytes())
    (root / "cats" / "notes.txt").write_text("not a video, ignored")
    return root


def build(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadVideoWarning)
        return VideoFolder(*args, **kwargs)


def test_video_folder_reads_classes_and_skips_bad_files_by_path(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(BadVideoWarning) as caught:
        data = VideoFolder(tmp_path, frames=8, fps=8, resolution=16, channels=1)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadVideoWarning)]
    bad = {tmp_path / "dogs" / "short.mp4": "too short", tmp_path / "cats" / "empty.mp4": "empty",
           tmp_path / "cats" / "corrupt.AVI": "cannot be opened"}  # fmt: skip
    assert len(messages) == 3
    for path, reason in bad.items():
        assert any(str(path) in m and reason in m for m in messages), (path, messages)
    assert dict(data.skipped).keys() == bad.keys()
    assert data.classes == ["cats", "dogs"] and data.num_classes == 2 and len(data) == 4 and data.fps == 8
    assert [label for *_, label in data.items] == [0, 0, 1, 1]
    clip, label = data[3]  # dogs/v_dogs_1.mp4, offset 3
    assert clip.shape == (1, 8, 16, 16) and clip.dtype == torch.uint8 and label == 1
    assert index_of(clip, offset=3) == list(range(8))


def test_video_folder_resamples_and_cuts_clips(tmp_path):
    make_folder(tmp_path)
    slow = build(tmp_path, frames=4, fps=4, resolution=(8, 12), clips_per_video="all")
    assert slow.fps == 4 and slow[0][0].shape == (3, 4, 8, 12) and len(slow) == 4 * 2  # 2 s at 4 fps: two clips
    assert index_of(slow[0][0]) == [0, 2, 4, 6] and index_of(slow[1][0]) == [8, 10, 12, 14]
    fast = build(tmp_path, frames=6, fps=12, resolution=8)  # 12 fps from 8: frames repeat by timestamp
    assert index_of(fast[0][0]) == [int(k * 8 / 12) for k in range(6)]
    spaced = build(tmp_path, frames=4, fps=None, resolution=8, clips_per_video=3)  # the files' own rate
    assert spaced.fps == 8 and len(spaced) == 4 * 3
    assert [index_of(spaced[i][0]) for i in range(3)] == [[0, 1, 2, 3], [6, 7, 8, 9], [12, 13, 14, 15]]
    first = build(tmp_path, frames=4, resolution=8, clips_per_video="first")
    assert len(first) == 4 and first.fingerprint == build(tmp_path, frames=4, resolution=8).fingerprint


def test_resize_covers_the_target_and_crops_the_centre():
    image = np.zeros((24, 40, 3), np.uint8)
    image[:, 20:] = 255  # left half black, right half white
    image[:, :, 1] = np.arange(24)[:, None] * 10  # a vertical ramp in green
    out = resize_and_crop(torch.from_numpy(image)[None], (16, 16))[0].numpy().astype(float)
    # Source of truth: PIL's antialiased bicubic to the covering size (27 x 16), then the central 16 columns.
    pil = np.asarray(Image.fromarray(image).resize((27, 16), Image.Resampling.BICUBIC), float)[:, 5:21]
    assert out.shape == (16, 16, 3) and np.abs(out - pil).mean() < 2
    tall = resize_and_crop(torch.from_numpy(image)[None], (8, 4))  # height decides: 8 x 13, crop 4 columns
    assert tall.shape == (1, 8, 4, 3)
    assert torch.equal(resize_and_crop(torch.from_numpy(image)[None], (24, 40))[0], torch.from_numpy(image))


def test_grey_is_bt601_luma():
    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    pil = np.stack([np.asarray(Image.fromarray(f).convert("L")) for f in rgb.numpy()])  # ITU-R 601-2 luma
    grey = to_grey(rgb)[..., 0].numpy()
    assert grey.shape == (2, 8, 8) and np.abs(grey.astype(int) - pil).max() <= 1
    exact = (rgb.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)).sum(-1).round()
    assert torch.equal(torch.from_numpy(grey).double(), exact)


def test_grey_and_rgb_clips_agree(tmp_path):
    rng = np.random.default_rng(0)
    colour = np.repeat(rng.integers(0, 256, (12, 3, 5, 3), dtype=np.uint8), 8, axis=1).repeat(8, axis=2)
    write_mp4(colour, tmp_path / "a" / "c.mp4", 8)
    rgb, grey = build(tmp_path, frames=8, resolution=16), build(tmp_path, frames=8, resolution=16, channels=1)
    assert rgb[0][0].shape == (3, 8, 16, 16) and grey[0][0].shape == (1, 8, 16, 16)
    assert torch.equal(grey[0][0], to_grey(rgb[0][0].permute(1, 2, 3, 0)).permute(3, 0, 1, 2))
    assert rgb.fingerprint != grey.fingerprint


def test_an_rgba_source_gives_rgb_clips(tmp_path):
    if "qtrle" not in av.codecs_available:  # a lossless codec with alpha; FFmpeg builds without it skip this
        pytest.skip("this FFmpeg has no qtrle encoder")
    rgba = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 4), dtype=np.uint8)
    (tmp_path / "alpha").mkdir()
    with av.open(str(tmp_path / "alpha" / "a.MOV"), "w", format="mov") as container:
        stream = container.add_stream("qtrle", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 16, 16, "argb"
        for k, image in enumerate(rgba):
            frame = av.VideoFrame.from_ndarray(image, format="rgba")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    clip, label = build(tmp_path, frames=8, resolution=16)[0]
    assert label == 0 and torch.equal(clip, torch.from_numpy(rgba[..., :3]).permute(3, 0, 1, 2))


def test_ucf101_split_file_selects_the_listed_videos(tmp_path):
    make_folder(tmp_path / "UCF")
    split = tmp_path / "testlist01.txt"
    split.write_text("Dogs/v_dogs_0.mp4\r\n\ncats/v_cats_1.mp4 1\n")  # any case, CRLF, optional label
    data = build(tmp_path / "UCF", frames=8, resolution=16, split_file=split)
    assert sorted(p.name for p, *_ in data.items) == ["v_cats_1.mp4", "v_dogs_0.mp4"]
    assert data.classes == ["cats", "dogs"] and sorted(label for *_, label in data.items) == [0, 1]
    only_dogs = tmp_path / "dogs.txt"
    only_dogs.write_text("dogs/v_dogs_1.mp4 2\n")
    dogs = build(tmp_path / "UCF", frames=8, resolution=16, split_file=only_dogs)
    assert dogs.num_classes == 2 and dogs[0][1] == 1  # the label of the class folder among all folders
    missing = tmp_path / "missing.txt"
    missing.write_text("dogs/v_dogs_1.mp4\nhorses/v_horses_0.mp4\n")
    with pytest.warns(UserWarning, match="1 of 2 listed videos"):
        build(tmp_path / "UCF", frames=8, resolution=16, split_file=missing)


def test_flat_layout_and_fingerprint(tmp_path):
    write_mp4(numbered(8), tmp_path / "top.mp4", 8)
    write_mp4(numbered(8), tmp_path / "deep" / "er" / "clip.mkv.mp4", 8)
    flat = build(tmp_path, layout="flat", frames=8, resolution=8)
    assert len(flat) == 2 and flat.num_classes == 0 and {flat[i][1] for i in range(2)} == {-1}
    again = build(tmp_path, layout="flat", frames=8, resolution=8)
    assert again.fingerprint == flat.fingerprint
    write_mp4(numbered(9), tmp_path / "top.mp4", 8)  # a file changed: another fingerprint
    assert build(tmp_path, layout="flat", frames=8, resolution=8).fingerprint != flat.fingerprint
    assert build(tmp_path, layout="flat", frames=8, resolution=16).fingerprint != flat.fingerprint
    assert str(tmp_path.resolve()) in flat.fingerprint


def test_a_file_that_fails_later_names_itself_and_encoding_skips_it(tmp_path):
    """A fault that shows only when a clip is read (here the file was overwritten after the build; a video cut
    short behind an intact index does the same) names the file, and encoding the data skips its clips."""
    make_folder(tmp_path)
    data = build(tmp_path, frames=8, resolution=8)
    victim = tmp_path / "cats" / "v_cats_0.mp4"
    victim.write_bytes(b"overwritten")
    with pytest.raises(UnreadableItem, match="v_cats_0.mp4"):
        data[0]
    lost = sum(Path(path) == victim for path, *_ in data.items)
    codec = SimpleNamespace(encode=lambda media: media.float() / 255, cacheable=True)
    with pytest.warns(UserWarning, match="skipping an unreadable item: .*v_cats_0.mp4"):
        encoded = encode_all(data, codec, batch_size=2)
    assert 0 < lost < len(data) and len(encoded) == len(data) - lost
    with (pytest.warns(UserWarning, match="skipping an unreadable item"),
          pytest.warns(UserWarning, match=f"training on {len(data) - lost} of the {len(data)} items")):  # fmt: skip
        training_set(data, codec)  # what a run says (a cache keeps the skipped items out until deleted)
    victim.unlink()  # a file moved away (or a disk unmounted) is an error, not damage to skip
    with pytest.raises(FileNotFoundError, match="v_cats_0.mp4: the file is gone"):
        data[0]


def test_a_folder_without_usable_videos_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.mp4").write_bytes(b"junk")
    with pytest.warns(BadVideoWarning, match="bad.mp4"), pytest.raises(ValueError, match="no usable video"):
        VideoFolder(tmp_path, frames=4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFolder(tmp_path / "nowhere")
