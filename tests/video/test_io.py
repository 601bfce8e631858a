"""Video files: mp4 written and read back (fps, frame count, size, pixels), odd sizes padded, resampling by
timestamps (also for variable frame rates), bad files reported by name, gif and frame strips."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from scm_mm_video.io import VideoError, probe, read_video, write_frame_strip, write_gif, write_mp4


def numbered_frames(t: int, h: int = 32, w: int = 32, channels: int = 3) -> np.ndarray:
    """Frame k has brightness 10 k everywhere plus a smooth gradient: the index survives H.264."""
    base = np.linspace(0, 40, w, dtype=np.float32)[None, None, :, None]
    frames = np.arange(t, dtype=np.float32)[:, None, None, None] * 10 + base
    return np.broadcast_to(frames, (t, h, w, channels)).clip(0, 255).astype(np.uint8).copy()


def frame_index(frames: torch.Tensor) -> list[int]:
    """Recover k from frames made by numbered_frames (mean brightness - 20) / 10."""
    return [round((float(f.float().mean()) - 20) / 10) for f in frames]


@pytest.mark.parametrize("fps", [8, 30000 / 1001])
def test_mp4_round_trip_keeps_fps_frames_size_and_pixels(tmp_path, fps):
    frames = numbered_frames(12)
    path = write_mp4(frames, tmp_path / "a" / "clip.mp4", fps)
    info = probe(path)
    assert (info.frames, info.width, info.height, info.codec, info.pix_fmt) == (12, 32, 32, "h264", "yuv420p")
    assert Fraction(info.fps).limit_denominator(1001) == Fraction(fps).limit_denominator(1001)
    back, rate = read_video(path)
    assert back.shape == (12, 32, 32, 3) and back.dtype == torch.uint8 and rate == pytest.approx(fps)
    assert (back.float() - torch.from_numpy(frames).float()).abs().mean() < 3
    assert frame_index(back) == list(range(12))
    assert not list(tmp_path.glob("a/.*tmp*"))  # the temporary file was renamed


def test_odd_sizes_are_padded_never_rescaled_and_grey_is_replicated(tmp_path):
    grey = numbered_frames(4, h=33, w=35, channels=1)
    path = write_mp4(grey, tmp_path / "odd.mp4", 8, crf=0)
    back, _ = read_video(path)
    assert back.shape == (4, 34, 36, 3)
    inner = back[:, :33, :35].float()
    assert (inner - torch.from_numpy(grey).float()).abs().mean() < 1.5  # content kept in the top-left
    assert (back[:, 33].float() - back[:, 32].float()).abs().mean() < 1.5  # "edge": the last row repeated


def test_bad_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", 0)


def test_reading_at_another_rate_picks_the_frame_shown_at_each_time(tmp_path):
    path = write_mp4(numbered_frames(20), tmp_path / "c.mp4", 10)  # 2 s
    half, rate = read_video(path, fps=5)
    assert rate == 5 and frame_index(half) == list(range(0, 20, 2))
    double, _ = read_video(path, fps=20)
    assert frame_index(double) == [k // 2 for k in range(40)]
    clip, _ = read_video(path, fps=5, max_frames=3, start=1.0)
    assert frame_index(clip) == [10, 12, 14]


def test_variable_frame_rate_files_are_resampled_by_timestamps(tmp_path):
    path = tmp_path / "vfr.mp4"
    times_ms = [0, 100, 150, 400, 500, 900]  # irregular presentation times
    frames = numbered_frames(len(times_ms))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1000)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t, image in zip(times_ms, frames, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    out, _ = read_video(path, fps=10, max_frames=10)
    # At t = 0.0, 0.1, ..., 0.9 s the frame on screen is the last one with pts <= t.
    expected = [max(k for k, t in enumerate(times_ms) if t <= 100 * i) for i in range(10)]
    assert frame_index(out) == expected


def test_bad_files_raise_video_error_naming_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    for path in (corrupt, text, tmp_path / "missing.mp4"):
        with pytest.raises(VideoError, match=path.name):
            read_video(path)
    good = write_mp4(numbered_frames(40, 64, 64), tmp_path / "good.mp4", 10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    try:  # keeps what decodes before the damage, or refuses the file: either names it
        frames, _ = read_video(truncated)
        assert 0 < frames.shape[0] <= 40
    except VideoError as e:
        assert "truncated.mp4" in str(e)


def test_gif_and_frame_strip(tmp_path):
    frames = numbered_frames(5, 16, 20)
    gif = Image.open(write_gif(frames, tmp_path / "a.gif", 8))
    assert gif.size == (20, 16) and gif.n_frames == 5
    strip = Image.open(write_frame_strip(np.stack([frames, frames]), tmp_path / "s.png", gap=2))
    assert strip.size == (5 * 20 + 4 * 2, 2 * 16 + 2)
