"""Video files through PyAV: H.264 .mp4 out, any FFmpeg-readable file in, plus .gif and frame strips.

Writing (`write_mp4`): H.264 (libx264), yuv420p (what every player decodes), at exactly the stated
frame rate, held as a Fraction: 8 stays 8/1 and the NTSC rates are snapped to their exact values
(29.97 -> 30000/1001, 23.976 -> 24000/1001, 59.94 -> 60000/1001). The encoder's time base is 1 / rate,
so frame k has pts k (the mp4 muxer then rescales to its own time scale, e.g. 1/16384 for 8 fps, which
keeps frame k at exactly k / fps seconds). yuv420p subsamples chroma 2x2, so libx264 refuses an odd
width or height: such frames are padded by one row or column at the bottom or right, never rescaled
(imageio silently rescales to multiples of 16; see reference/video.md). The index ("moov") goes at the
front (`movflags=faststart`): players can start before the download ends, and a cut-off file still has
its index, so the frames before the cut decode. Files are written to a temporary sibling and renamed,
so a killed writer leaves no half file.

Reading (`read_video`): every frame as RGB (grey expanded, alpha dropped). Times are presentation
timestamps relative to the stream's start. With `fps`, frames are resampled by timestamp: output frame
k is the last frame whose time is <= start + k / fps, which also handles variable-frame-rate files;
the last frame is shown until the stream's stated end. Errors, always a `VideoError` naming the file:
a missing file, one FFmpeg cannot open (corrupt, not a video), no video stream, no decodable frame.
A truncated file (decoding fails part way, or the frames stop well before the stated duration) keeps
the frames decoded before the damage, with a warning naming the file; if none decoded, `VideoError`.
Decoding goes packet by packet and the decoder is flushed at the damage, so the frames still held in
H.264's reorder buffer (B-frames) are kept too.
An mp4 cut before its index (written without faststart) cannot be opened at all: `VideoError`.

`probe` reads the headers only (no decoding): frame count (estimated from duration x rate when the
container stores none, e.g. Matroska/WebM; `frames_exact` says which), rate, size, codec, duration.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image


class VideoError(ValueError):
    """A video file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int              # frame count (see frames_exact)
    frames_exact: bool       # False: estimated as round(duration x fps), the container stores no count
    fps: float               # the stream's average frame rate (0.0 if the file states none)
    width: int
    height: int
    codec: str               # decoder name, e.g. "h264"
    pix_fmt: str | None      # e.g. "yuv420p"
    duration: float          # seconds (0.0 if the file states none)


# ------------------------------------------------------------------------------------------------ writing


def _frames_array(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, C) with C in {1, 3} -> uint8 RGB (T, H, W, 3), checked."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, C), got dtype {array.dtype}; convert with "
                         "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")  # fmt: skip
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be (T, H, W, C) with C = 1 or 3, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("no frames to write (T = 0)")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"frames have an empty side: shape {array.shape}")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _pad_to_even(frames: np.ndarray, pad: str) -> np.ndarray:
    """(T, H, W, C) -> (T, H + H % 2, W + W % 2, C): one row/column at the bottom/right, "edge" repeating
    the last one or "black" filling zeros."""
    if pad not in ("edge", "black"):
        raise ValueError(f"pad must be 'edge' or 'black', got {pad!r}")
    widths = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    return np.pad(frames, widths, mode="edge" if pad == "edge" else "constant")


def frame_rate(fps: float | Fraction) -> Fraction:
    """fps as an exact Fraction: integers stay integers, the NTSC rates N * 1000/1001 are snapped to that
    value (29.97 -> 30000/1001), anything else is the nearest fraction with a denominator <= 1001. Any real
    number is taken (numpy scalars, one-element tensors)."""
    if not isinstance(fps, Fraction):
        try:
            fps = float(fps)  # np.float32 and tensors are no Rational: Fraction() would refuse them
        except (TypeError, ValueError) as e:
            raise ValueError(f"fps must be a number, got {fps!r}") from e
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    if isinstance(fps, Fraction):
        return fps
    ntsc = Fraction(round(fps * 1.001) * 1000, 1001)
    if abs(fps - round(fps)) > 1e-9 and abs(fps - ntsc) < 5e-3:  # 29.97, 23.976, 59.94 as written by hand
        return ntsc
    return Fraction(fps).limit_denominator(1001)


def _temporary(path: Path) -> Path:
    """A sibling of `path` for writing before the atomic rename (same folder, so os.replace is atomic)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_mp4(
    frames: torch.Tensor | np.ndarray,  # uint8 (T, H, W, C), C = 1 (grey, replicated) or 3 (RGB)
    path: str | Path,
    fps: float | Fraction,              # exact: see frame_rate
    crf: int = 18,                      # libx264 quality: 0 lossless (in YUV) .. 51; 18 is visually lossless
    preset: str = "medium",             # libx264 speed/size trade-off ("ultrafast" .. "veryslow")
    pad: str = "edge",                  # odd sizes: "edge" (repeat the last row/column) or "black"
) -> Path:
    """Write an H.264 yuv420p .mp4 at exactly `fps` (frame k at k / fps s); an odd height or width is padded
    by one row/column at the bottom/right. Parent folders are created; the write is atomic. Returns the path."""
    rate = frame_rate(fps)
    array = _pad_to_even(_frames_array(frames), pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
            stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
            stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], "yuv420p"
            stream.codec_context.time_base = 1 / rate  # frame k has pts k
            for k, image in enumerate(array):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = k
                container.mux(stream.encode(frame))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ reading


def _open(path: Path) -> av.container.InputContainer:
    """An open container with at least one video stream, or VideoError naming the file."""
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: cannot be opened as a video (corrupt or not a video file: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container


def _rate(stream: av.video.stream.VideoStream) -> float:
    """The stream's average frame rate, or 0.0 if it states none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _origin(stream: av.video.stream.VideoStream) -> float:
    """The stream's start time in seconds: timestamps are measured from it."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """The stated length of the video stream in seconds, or 0.0 when unknown. The container's duration
    stands in only when the video is its one stream: an audio track may outlast the video."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return 0.0


def probe(path: str | Path) -> VideoInfo:
    """Frame count, rate, size, codec and duration of the first video stream, from the headers (cheap: no
    decoding). Raises VideoError for a missing file, one that cannot be opened or has no video stream."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps, duration = _rate(stream), _duration(container, stream)
        if not duration and container.duration is not None:  # better an audio track's length than none
            duration = container.duration / av.time_base
        exact = bool(stream.frames)
        frames = int(stream.frames) if exact else round(duration * fps)
        ctx = stream.codec_context
        pix_fmt = ctx.format.name if ctx.format is not None else None
        return VideoInfo(frames, exact, fps, ctx.width, ctx.height, ctx.name, pix_fmt, duration)


def read_video(
    path: str | Path,
    fps: float | None = None,        # resample to this rate by timestamps; None: every frame, the file's rate
    max_frames: int | None = None,   # at most this many output frames (decoding stops after them)
    start: float = 0.0,              # seconds from the stream's start: output frame 0 is the one shown then
) -> tuple[torch.Tensor, float]:
    """(frames uint8 (T, H, W, 3) RGB, fps of those frames) of the first video stream of a file.

    With `start` > 0 the decoder seeks to the key frame before it instead of decoding from the beginning.
    Errors and truncated files: see the module docstring."""
    path = Path(path)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    with _open(path) as container:
        stream = container.streams.video[0]
        file_fps = _rate(stream)
        out_fps = float(fps) if fps is not None else file_fps
        if not out_fps:
            raise VideoError(f"{path}: the stream states no frame rate; pass fps= to resample")
        origin, stated_end = _origin(stream), _duration(container, stream)
        period = 1 / (file_fps or out_fps)  # nominal spacing of the file's frames
        # Timestamps are rounded to the time base (1 ms in Matroska): frame 2 of a 30 fps .mkv is at 67 ms,
        # after 2/30 s. Half a tick of tolerance keeps resampling at the file's own rate the identity.
        tol = float(stream.time_base or 0) / 2 + 1e-9
        if start > 0 and stream.time_base is not None:
            container.seek(int((origin + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
        # Resampling needs frames up to time start + (max_frames - 1) / fps; a frame at or after `stop` is not.
        stop = math.inf if max_frames is None or fps is None else start + max_frames / out_fps
        times: list[float] = []   # seconds from the stream's start, increasing
        images: list[np.ndarray] = []
        errors: list[str] = []
        for frame in _decode(container, stream, errors):
            t = float(frame.time) - origin if frame.time is not None else len(times) * period
            if t >= stop - tol and times:
                break
            if times and times[-1] <= start + tol and t <= start + tol:  # before the clip: keep only
                times.pop()                                                 # the frame shown at `start`
                images.pop()
            times.append(t)
            images.append(frame.to_ndarray(format="rgb24"))
            if fps is None and max_frames is not None and _shown_at(times, start, tol) + max_frames <= len(times):
                break
        else:  # decoded to the end: did the frames stop well before the stated end?
            if not errors and times and stated_end and times[-1] + 1.5 * period < stated_end:
                errors.append(f"the frames stop at {times[-1]:.3f} s but the file states {stated_end:.3f} s")
        damage = errors[0] if errors else None
    if not images:
        raise VideoError(f"{path}: no decodable frame" + (f": {damage}" if damage else ""))
    if damage is not None:
        warnings.warn(f"{path}: truncated or damaged, {damage}; kept the {len(images)} frames decoded before it",
                      stacklevel=2)  # fmt: skip
    if fps is None:
        first = _shown_at(times, start, tol)
        chosen = list(range(first, len(times) if max_frames is None else min(len(times), first + max_frames)))
    else:
        # The last frame lasts until the stated end (one frame period if unknown or the file is damaged).
        end = stated_end if stated_end > times[-1] and damage is None else times[-1] + period
        count = max(1, math.ceil((end - start) * out_fps - 1e-6))
        count = count if max_frames is None else min(count, max_frames)
        chosen = [_shown_at(times, start + k / out_fps, tol) for k in range(count)]
    return torch.from_numpy(np.stack([images[i] for i in chosen])), out_fps


def _decode(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    errors: list[str],                     # the error that ended decoding is appended here
) -> Iterator[av.VideoFrame]:
    """The stream's frames in presentation order, decoded packet by packet. At the first packet that cannot be
    read or decoded (a truncated or damaged file), the decoder is flushed before stopping: H.264 with B-frames
    holds decoded pictures in its reorder buffer, which for a 9-17 frame clip can be all of them."""
    try:
        for packet in container.demux(stream):
            yield from packet.decode()  # the demuxer's last, empty packet flushes the decoder at a clean end
        return
    except av.error.FFmpegError as e:
        errors.append(f"decoding failed ({e})")
    try:
        flushed = stream.decode(None)
    except av.error.FFmpegError:  # nothing left to flush
        return
    for frame in flushed:
        if frame.time_base is None:  # a flush has no packet to take the time base from
            frame.time_base = stream.time_base
        yield frame


def _shown_at(times: list[float], t: float, tol: float) -> int:
    """Index of the frame on screen at time t: the last one with time <= t + tol (the first one before any)."""
    return max(int(np.searchsorted(times, t + tol, side="right")) - 1, 0)


# ------------------------------------------------------------------------------------------- previews


def _save_atomic(image: Image.Image, path: str | Path, **options: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        image.save(tmp, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_gif(frames: torch.Tensor | np.ndarray, path: str | Path, fps: float) -> Path:
    """An animated .gif (looping forever) of uint8 frames (T, H, W, C), C = 1 or 3. GIF stores delays in
    10 ms units and browsers slow delays under 20 ms down, so the delay is rounded to 10 ms, at least 20."""
    rate = frame_rate(fps)  # checked and a plain number
    images = [Image.fromarray(image) for image in _frames_array(frames)]
    delay = max(20, round(100 / rate) * 10)
    return _save_atomic(images[0], path, format="GIF", save_all=True, append_images=images[1:], loop=0,
                        duration=delay)  # fmt: skip


def write_frame_strip(frames: torch.Tensor | np.ndarray, path: str | Path, gap: int = 2) -> Path:
    """A .png of the frames side by side, `gap` white pixels apart: uint8 (T, H, W, C) gives one row,
    (N, T, H, W, C) one row per clip."""
    array = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if array.ndim not in (4, 5):
        raise ValueError(f"expected frames (T, H, W, C) or clips (N, T, H, W, C), got shape {array.shape}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    clips = [_frames_array(clip) for clip in (array[None] if array.ndim == 4 else array)]
    n, (t, h, w) = len(clips), clips[0].shape[:3]
    canvas = np.full((n * (h + gap) - gap, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, clip in enumerate(clips):
        for j, image in enumerate(clip):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    return _save_atomic(Image.fromarray(canvas), path, format="PNG")
