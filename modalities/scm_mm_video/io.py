"""Video files through PyAV: H.264 .mp4 out, any FFmpeg-readable file in, plus .gif and frame strips.

Writing: H.264 (libx264), yuv420p (what every player decodes), at exactly the stated frame rate (a
Fraction, so 29.97 is stored as 30000/1001 and 8 as 8), frame k at pts k. yuv420p subsamples chroma
2x2, so libx264 refuses an odd width or height: such frames are padded by one row or column at the
bottom or right, never rescaled (imageio silently rescales to multiples of 16; see reference/video.md).
Files are written to a temporary sibling and renamed, so a killed writer leaves no half file.

Reading: every frame as RGB (grey expanded, alpha dropped). With `fps`, frames are resampled by their
presentation timestamps: output frame k is the last frame shown at time k / fps, which also handles
variable-frame-rate files. A file that cannot be opened, has no video stream or no decodable frame
raises `VideoError` naming it; a truncated file keeps the frames decoded before the damage, with a
warning naming it.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


class VideoError(ValueError):
    """A video file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int              # frame count (see frames_exact)
    frames_exact: bool       # False: estimated from duration x fps (the container stores no count)
    fps: float               # the stream's average frame rate
    width: int
    height: int
    codec: str
    pix_fmt: str | None
    duration: float          # seconds


def _frames_array(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, C) with C in {1, 3} -> uint8 RGB (T, H, W, 3), checked."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 frames (T, H, W, C) with C in (1, 3), got {array.dtype} {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("no frames to write")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def pad_to_even(frames: np.ndarray, pad: str = "edge") -> np.ndarray:
    """(T, H, W, C) -> (T, H + H % 2, W + W % 2, C): one row/column at the bottom/right, `edge` repeating
    the last one or `black` filling zeros."""
    if pad not in ("edge", "black"):
        raise ValueError(f"pad must be 'edge' or 'black', got {pad!r}")
    widths = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    return np.pad(frames, widths, mode="edge" if pad == "edge" else "constant")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_mp4(
    frames: torch.Tensor | np.ndarray,  # uint8 (T, H, W, C), C = 1 (grey) or 3 (RGB)
    path: str | Path,
    fps: float,
    crf: int = 18,                      # libx264 quality: 0 lossless .. 51; 18 is visually lossless
    preset: str = "medium",             # libx264 speed/size trade-off
    pad: str = "edge",                  # odd sizes: "edge" or "black" (see pad_to_even)
) -> Path:
    """An H.264 yuv420p .mp4 at exactly `fps`; odd sizes padded to even. Returns the path."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    array = pad_to_even(_frames_array(frames), pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    tmp = _temporary(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
            stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
            stream.codec_context.time_base = 1 / rate
            for k, image in enumerate(array):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = k
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: cannot be opened as a video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container


def probe(path: str | Path) -> VideoInfo:
    """Frame count, rate, size and codec from the container headers (no decoding)."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        exact = bool(stream.frames)
        frames = int(stream.frames) if exact else int(round(duration * fps))
        ctx = stream.codec_context
        return VideoInfo(frames, exact, fps, ctx.width, ctx.height, ctx.name, ctx.format.name if ctx.format else None,
                         duration)  # fmt: skip


def read_video(
    path: str | Path,
    fps: float | None = None,        # resample to this rate by timestamps; None: every frame at the file's rate
    max_frames: int | None = None,   # stop after this many output frames
    start: float = 0.0,              # seconds: the first output frame is the one shown at this time
) -> tuple[torch.Tensor, float]:
    """(frames uint8 (T, H, W, 3), fps) of a video file; see the module docstring for errors and resampling."""
    path = Path(path)
    times: list[float] = []
    images: list[np.ndarray] = []
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        file_fps = float(rate) if rate else None
        out_fps = fps or file_fps
        if out_fps is None:
            raise VideoError(f"{path}: the stream states no frame rate; pass fps=")
        stop = None if max_frames is None else start + max_frames / out_fps  # no later frame is needed
        if start > 0 and stream.time_base is not None:
            container.seek(int(start / stream.time_base), stream=stream, backward=True)
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else len(times) / (file_fps or out_fps)
                if stop is not None and t >= stop - 1e-9 and times:
                    break
                times.append(float(t))
                images.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:
            if not images:
                raise VideoError(f"{path}: no frame could be decoded ({e})") from e
            warnings.warn(f"{path}: decoding stopped early ({e}); kept the {len(images)} frames before the damage",
                          stacklevel=2)  # fmt: skip
        # The last frame is shown until the stream ends (one frame period when the container does not say).
        end = _end_time(stream) or times[-1] + 1 / (file_fps or out_fps) if times else 0.0
    if not images:
        raise VideoError(f"{path}: no decodable frames")
    if fps is None:
        chosen = [i for i, t in enumerate(times) if t >= start - 1e-9] or [len(times) - 1]
    else:
        count = max(1, math.ceil((max(end, times[-1] + 1e-6) - start) * fps - 1e-6))
        if max_frames is not None:
            count = min(count, max_frames)
        # Output frame k is the last frame whose time is <= start + k / fps (the first frame before any).
        chosen = [max(int(np.searchsorted(times, start + k / fps + 1e-9, side="right")) - 1, 0) for k in range(count)]
    chosen = chosen[:max_frames] if max_frames is not None else chosen
    return torch.from_numpy(np.stack([images[i] for i in chosen])), float(out_fps)


def _end_time(stream: av.video.stream.VideoStream) -> float:
    """When the stream ends, in seconds, or 0 when the container does not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(((stream.start_time or 0) + stream.duration) * stream.time_base)
    return 0.0


def _pil_frames(frames: torch.Tensor | np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(image) for image in _frames_array(frames)]


def write_gif(frames: torch.Tensor | np.ndarray, path: str | Path, fps: float) -> Path:
    """An animated .gif (looping) of uint8 frames (T, H, W, C); GIF stores delays in 10 ms units."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = _pil_frames(frames)
    tmp = _temporary(path)
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(20, round(1000 / fps / 10) * 10))  # fmt: skip
    os.replace(tmp, path)
    return path


def write_frame_strip(frames: torch.Tensor | np.ndarray, path: str | Path, gap: int = 2) -> Path:
    """A .png of the frames side by side, `gap` white pixels apart: (T, H, W, C) gives one row,
    (N, T, H, W, C) one row per clip."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    clips = array[None] if array.ndim == 4 else array
    if clips.ndim != 5:
        raise ValueError(f"expected frames (T, H, W, C) or clips (N, T, H, W, C), got shape {array.shape}")
    rgb = [_frames_array(clip) for clip in clips]
    n, t, h, w = len(rgb), *rgb[0].shape[:3]
    canvas = np.full((n * (h + gap) - gap, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, clip in enumerate(rgb):
        for j, image in enumerate(clip):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def frames_needed(seconds: float, fps: float) -> int:
    """Frames that cover `seconds` at `fps` (rounded up)."""
    return math.ceil(seconds * fps - 1e-9)
