"""Video files: mp4 written and read back (exact fps, frame count, size, pixels), odd sizes padded, grey input,
resampling by timestamps (also for variable frame rates and other containers), bad files reported by name, gif
and frame strips. Frames carry their index in their brightness so that it survives lossy coding."""

import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from scm_mm_video.api import VideoModality
from scm_mm_video.io import VideoError, frame_rate, probe, read_video, write_frame_strip, write_gif, write_mp4


def numbered_frames(t: int, h: int = 32, w: int = 32, channels: int = 3, step: int = 10) -> np.ndarray:
    """Frame k: brightness step * k plus a smooth horizontal ramp of 0..40 (mean 20)."""
    ramp = np.linspace(0, 40, w, dtype=np.float32)[None, None, :, None]
    frames = np.arange(t, dtype=np.float32)[:, None, None, None] * step + ramp
    return np.broadcast_to(frames, (t, h, w, channels)).clip(0, 255).astype(np.uint8).copy()


def frame_index(frames: torch.Tensor, step: int = 10) -> list[int]:
    """k of each frame made by numbered_frames: (mean brightness - 20) / step, rounded."""
    return [round((float(f.float().mean()) - 20) / step) for f in frames]


def moving_blob(t: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth coloured Gaussian blob crossing a gradient: typical smooth content, (T, H, W, 3) uint8."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for k in range(t):
        blob = np.exp(-((y - h / 2) ** 2 + (x - 8 - 3 * k) ** 2) / 60)
        frames.append(np.stack([60 + 150 * blob, 40 + x * 2, 200 - 120 * blob], -1))
    return np.clip(frames, 0, 255).astype(np.uint8)


def stream_rate(path) -> Fraction:
    with av.open(str(path)) as container:
        return container.streams.video[0].average_rate


@pytest.mark.parametrize(
    "fps, exact", [(8, Fraction(8)), (30000 / 1001, Fraction(30000, 1001)), (29.97, Fraction(30000, 1001))]
)
def test_mp4_round_trip_keeps_exact_fps_frames_size_and_pixels(tmp_path, fps, exact):
    frames = moving_blob(12)
    path = write_mp4(frames, tmp_path / "a" / "b" / "clip.mp4", fps)  # parent folders created
    assert stream_rate(path) == exact  # stated exactly in the file, 29.97 as 30000/1001
    info = probe(path)
    assert (info.frames, info.frames_exact, info.width, info.height) == (12, True, 64, 48)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert info.duration == pytest.approx(12 / float(exact)) and info.fps == pytest.approx(float(exact))
    back, rate = read_video(path)
    assert back.shape == (12, 48, 64, 3) and back.dtype == torch.uint8 and rate == pytest.approx(float(exact))
    error = (back.float() - torch.from_numpy(frames).float()).abs().mean()
    assert error < 3, error  # crf 18 on smooth content
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["clip.mp4"]  # the temporary file was renamed


def test_frame_rate_is_exact():
    assert frame_rate(8) == 8 and frame_rate(12.5) == Fraction(25, 2)
    assert frame_rate(29.97) == Fraction(30000, 1001) and frame_rate(23.976) == Fraction(24000, 1001)
    assert frame_rate(59.94) == Fraction(60000, 1001) and frame_rate(Fraction(30000, 1001)) == Fraction(30000, 1001)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps"):
            frame_rate(bad)


def test_fps_may_be_a_numpy_scalar_or_a_tensor(tmp_path):
    assert frame_rate(np.float32(8.0)) == 8 and frame_rate(np.float32(12.5)) == Fraction(25, 2)
    assert frame_rate(torch.tensor(29.97)) == Fraction(30000, 1001) and frame_rate(np.int64(24)) == 24
    assert stream_rate(write_mp4(numbered_frames(2), tmp_path / "np.mp4", np.float32(10.0))) == 10
    assert Image.open(write_gif(numbered_frames(2), tmp_path / "t.gif", torch.tensor(10.0))).info["duration"] == 100
    for bad in ("fast", None, torch.ones(2)):
        with pytest.raises(ValueError, match="fps must be a number"):
            frame_rate(bad)


def test_an_unknown_suffix_is_refused_not_made_a_folder(tmp_path):
    clips = torch.from_numpy(numbered_frames(3, 16, 16)).permute(3, 0, 1, 2)[None]  # (1, C, T, H, W)
    for name in ("clip.mov", "clip.MKV"):
        with pytest.raises(ValueError, match=r"clip\.(mov|MKV): cannot write \.(mov|MKV) files"):
            VideoModality().save(clips, tmp_path / name)
    assert list(tmp_path.iterdir()) == []  # nothing written, no folder named clip.mov
    assert [p.name for p in VideoModality().save(clips.expand(2, -1, -1, -1, -1), tmp_path / "a.MP4")] == [
        "a-000.MP4", "a-001.MP4"]
    (tmp_path / "run.v2").mkdir()  # an existing folder is a folder, whatever its name
    assert VideoModality().save(clips, tmp_path / "run.v2")[0] == tmp_path / "run.v2" / "000000.mp4"
    assert VideoModality().save(clips, tmp_path / "new")[0] == tmp_path / "new" / "000000.mp4"


def test_frame_k_is_at_k_over_fps(tmp_path):
    path = write_mp4(numbered_frames(5), tmp_path / "t.mp4", Fraction(30000, 1001))
    with av.open(str(path)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert times == pytest.approx([k * 1001 / 30000 for k in range(5)], abs=1e-9)


@pytest.mark.parametrize("pad", ["edge", "black"])
def test_odd_sizes_are_padded_never_rescaled(tmp_path, pad):
    frames = moving_blob(3, h=33, w=35)
    back, _ = read_video(write_mp4(frames, tmp_path / "odd.mp4", 8, pad=pad))
    assert back.shape == (3, 34, 36, 3)
    # The same as encoding the frames padded by hand (x264 is deterministic): padding, not rescaling.
    by_hand = np.pad(frames, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge" if pad == "edge" else "constant")
    assert torch.equal(back, read_video(write_mp4(by_hand, tmp_path / "even.mp4", 8))[0])
    grey = numbered_frames(3, h=33, w=35, channels=1)
    back, _ = read_video(write_mp4(grey, tmp_path / "grey.mp4", 8, pad=pad))
    assert (back[:, :33, :35].float() - torch.from_numpy(grey).float()).abs().mean() < 1  # content in the top-left
    edge = torch.from_numpy(grey[:, 32]).float() if pad == "edge" else 0
    assert (back[:, 33, :35].float() - edge).abs().mean() < 2  # the added row: the last one again, or black


def test_grey_input_is_replicated_to_rgb(tmp_path):
    grey = numbered_frames(4, channels=1)
    back, _ = read_video(write_mp4(torch.from_numpy(grey), tmp_path / "grey.mp4", 8))
    assert back.shape == (4, 32, 32, 3)
    assert (back.float() - torch.from_numpy(grey).float()).abs().max() <= 3  # every channel is the grey value
    assert frame_index(back) == [0, 1, 2, 3]


def test_bad_frames_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="shape"):
        write_mp4(np.zeros((2, 8, 8, 4), np.uint8), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="shape"):
        write_mp4(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.mp4", 8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", 0)
    with pytest.raises(av.error.FFmpegError):  # the encoder refuses: no file, no temporary left behind
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", 8, preset="no-such-preset")
    assert list(tmp_path.iterdir()) == []


def test_reading_at_another_rate_picks_the_frame_shown_at_each_time(tmp_path):
    path = write_mp4(numbered_frames(20), tmp_path / "c.mp4", 10)  # 2 s
    half, rate = read_video(path, fps=5)
    assert rate == 5 and frame_index(half) == list(range(0, 20, 2))
    double, _ = read_video(path, fps=20)
    assert frame_index(double) == [k // 2 for k in range(40)]
    same, _ = read_video(path, fps=10)
    assert frame_index(same) == list(range(20))
    clip, _ = read_video(path, fps=5, max_frames=3, start=1.0)  # seeks, stops after the clip
    assert frame_index(clip) == [10, 12, 14]
    clip, rate = read_video(path, max_frames=4, start=0.55)  # every frame from the one shown at 0.55 s
    assert rate == 10 and frame_index(clip) == [5, 6, 7, 8]


def write_vfr(path, times_ms: list[int], frames: np.ndarray, container_format: str = "mp4") -> None:
    """A variable-frame-rate file: frame i at times_ms[i] milliseconds, through PyAV."""
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("libx264", rate=1000)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for t, image in zip(times_ms, frames, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize("container_format, suffix", [("mp4", ".mp4"), ("matroska", ".mkv")])
def test_variable_frame_rate_files_are_resampled_by_timestamps(tmp_path, container_format, suffix):
    times_ms = [0, 100, 150, 400, 500, 900]  # irregular presentation times
    path = tmp_path / f"vfr{suffix}"
    write_vfr(path, times_ms, numbered_frames(len(times_ms)), container_format)
    out, rate = read_video(path, fps=10, max_frames=10)
    # At t = 0.0, 0.1, ..., 0.9 s the frame on screen is the last one with time <= t.
    expected = [max(k for k, t in enumerate(times_ms) if t <= 100 * i) for i in range(10)]
    assert rate == 10 and frame_index(out) == expected == [0, 1, 2, 2, 3, 4, 4, 4, 4, 5]
    everything, _ = read_video(path)
    assert frame_index(everything) == list(range(6))


def test_other_containers_read_frame_exact(tmp_path):
    """Matroska stores times in whole milliseconds (frame 2 of 30 fps at 67 ms > 2/30 s): resampling at the
    file's own rate must still give every frame once."""
    path = tmp_path / "a.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k, image in enumerate(numbered_frames(24, step=8)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    info = probe(path)
    assert not info.frames_exact and info.frames == 24 and info.fps == 30  # estimated from the duration
    frames, _ = read_video(path, fps=30)
    assert frame_index(frames, step=8) == list(range(24))
    clip, _ = read_video(path, fps=15, max_frames=4, start=0.4)
    assert frame_index(clip, step=8) == [12, 14, 16, 18]


def test_an_alpha_source_is_read_as_rgb(tmp_path):
    if "qtrle" not in av.codecs_available:
        pytest.skip("this FFmpeg has no qtrle encoder (QuickTime RLE, lossless with alpha)")
    rgba = np.random.default_rng(0).integers(0, 256, (3, 16, 24, 4), dtype=np.uint8)
    path = tmp_path / "alpha.mov"
    with av.open(str(path), "w", format="mov") as container:
        stream = container.add_stream("qtrle", rate=8)
        stream.width, stream.height, stream.pix_fmt = 24, 16, "argb"
        for k, image in enumerate(rgba):
            frame = av.VideoFrame.from_ndarray(image, format="rgba")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe(path).pix_fmt == "argb"
    frames, _ = read_video(path)
    assert torch.equal(frames, torch.from_numpy(rgba[..., :3]))  # lossless: exactly the colour, alpha dropped


def no_video_stream(path):
    """An .mp4 holding only an AAC audio track."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, 1024 * k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_bad_files_raise_video_error_naming_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 50)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = {
        corrupt: "cannot be opened",
        text: "cannot be opened",
        empty: "cannot be opened",
        tmp_path / "missing.mp4": "no such file",
        no_video_stream(tmp_path / "audio.mp4"): "no video stream",
    }
    for path, reason in cases.items():
        for read in (read_video, probe):
            with pytest.raises(VideoError, match=reason) as error:
                read(path)
            assert str(path) in str(error.value)


def test_a_truncated_file_keeps_the_frames_before_the_damage(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (40, 64, 64, 3), dtype=np.uint8)  # noise: big frames
    good = write_mp4(frames, tmp_path / "good.mp4", 10, crf=10)
    data = good.read_bytes()
    with av.open(str(good)) as container:  # where each frame's packet lies in the file
        packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    full, _ = read_video(good)
    for fraction in (0.3, 0.5, 0.9):
        cut = int(len(data) * fraction)
        truncated = tmp_path / "truncated.mp4"
        truncated.write_bytes(data[:cut])
        with pytest.warns(UserWarning, match="truncated.mp4"):
            kept, _ = read_video(truncated)
        # Every frame whose packet arrived whole, including those still in H.264's reorder buffer at the cut.
        intact = sum(pos + size <= cut for pos, size in packets)
        assert 0 < kept.shape[0] == intact < 40 and torch.equal(kept, full[:intact])
    # Cut just after the start of the frame data: the index is there (faststart), no frame decodes.
    headless = tmp_path / "headless.mp4"
    headless.write_bytes(data[: data.index(b"mdat") + 16])
    with pytest.raises(VideoError, match="headless.mp4.*no decodable frame"):
        read_video(headless)


def test_an_mp4_cut_before_its_index_cannot_be_opened(tmp_path):
    path = tmp_path / "index_last.mp4"  # PyAV's default layout: the index ("moov") after the frames
    frames = numbered_frames(10)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    data = path.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")
    path.write_bytes(data[: data.index(b"moov")])
    with pytest.raises(VideoError, match="index_last.mp4"):
        read_video(path)


def test_a_complete_file_reads_without_warnings(tmp_path):
    path = write_mp4(numbered_frames(6), tmp_path / "ok.mp4", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_video(path)
        read_video(path, fps=3)


def test_gif_and_frame_strip(tmp_path):
    frames = moving_blob(5, 16, 20)
    gif = Image.open(write_gif(frames, tmp_path / "g" / "a.gif", 10))
    assert gif.size == (20, 16) and gif.n_frames == 5 and gif.info["loop"] == 0 and gif.info["duration"] == 100
    gif.seek(2)
    assert np.abs(np.asarray(gif.convert("RGB"), np.float32) - frames[2]).mean() < 8  # a 256-colour palette
    grey = Image.open(write_gif(numbered_frames(3, 8, 8, channels=1), tmp_path / "grey.gif", 8))
    assert grey.n_frames == 3
    clips = np.stack([frames, 255 - frames])
    strip = np.asarray(Image.open(write_frame_strip(clips, tmp_path / "s.png", gap=3)).convert("RGB"))
    assert strip.shape == (2 * 16 + 3, 5 * 20 + 4 * 3, 3)
    assert np.array_equal(strip[16 + 3 :, 2 * 23 : 2 * 23 + 20], 255 - frames[2])  # row 1, frame 2, exact
    assert (strip[16 : 16 + 3] == 255).all() and (strip[:, 20:23] == 255).all()  # white gaps
    one_row = Image.open(write_frame_strip(torch.from_numpy(frames[:, :, :, :1]), tmp_path / "one.png"))
    assert one_row.size == (5 * 20 + 4 * 2, 16)
