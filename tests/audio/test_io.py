"""Audio file I/O: round trips through soundfile and PyAV, normalisation targets, and every bad file."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from scm_mm_audio.io import AudioReadError, fit_length, load_audio, save_wav

torch.set_num_threads(1)


def tone(frequency: float, sample_rate: int, seconds: float, amplitude: float = 0.5, channels: int = 1) -> torch.Tensor:
    t = torch.arange(round(seconds * sample_rate), dtype=torch.float64) / sample_rate
    phases = torch.arange(channels, dtype=torch.float64)[:, None]  # channels differ
    return (amplitude * torch.sin(2 * math.pi * frequency * t + phases)).float()  # (channels, samples)


def dominant_frequency(wave: torch.Tensor, sample_rate: int) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.shape[-1], dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * sample_rate / wave.shape[-1]


# --- wav round trips -----------------------------------------------------------------------------


def test_pcm16_round_trip_keeps_rate_length_subtype_and_values(tmp_path):
    wave = tone(440, 16000, 0.5, channels=2) * torch.tensor([[1.0], [0.3]])
    path = save_wav(wave, tmp_path / "a" / "b" / "clip.wav", 16000)  # creates the folders
    info = sf.info(str(path))
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (16000, 8000, 2, "PCM_16")
    back, rate = load_audio(path)
    assert rate == 16000 and back.shape == (2, 8000) and back.dtype == torch.float32
    assert float((back - wave).abs().max()) <= 1 / 32768
    assert [p.name for p in path.parent.iterdir()] == ["clip.wav"]  # no temporary file left behind


def test_float_and_pcm24_subtypes_and_mono_shape(tmp_path):
    wave = tone(1000, 8000, 0.25)[0]  # (samples,)
    for subtype, tolerance in (("FLOAT", 0.0), ("PCM_24", 1 / 2**23)):
        path = save_wav(wave, tmp_path / f"{subtype}.wav", 8000, subtype=subtype)
        assert sf.info(str(path)).subtype == subtype
        back, _ = load_audio(path)
        assert back.shape == (1, wave.shape[0]) and float((back[0] - wave).abs().max()) <= tolerance


def test_save_wav_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=".wav"):
        save_wav(torch.zeros(100), tmp_path / "clip.flac", 16000)
    with pytest.raises(ValueError, match="non-finite"):
        save_wav(torch.tensor([0.0, float("nan")]), tmp_path / "clip.wav", 16000)
    with pytest.raises(ValueError, match="normalize"):
        save_wav(torch.zeros(100), tmp_path / "clip.wav", 16000, normalize="rms")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(channels, samples\); got \(16000, 2\).*transpose"):
        save_wav(torch.zeros(16000, 2), tmp_path / "clip.wav", 16000)  # soundfile's (samples, channels)
    with pytest.raises(ValueError, match="transpose"):
        save_wav(torch.zeros(5, 3), tmp_path / "clip.wav", 16000)
    with pytest.raises(ValueError, match=r"clip.wav is torch.int16: expected float"):  # would clip whole
        save_wav(torch.full((100,), 1000, dtype=torch.int16), tmp_path / "clip.wav", 16000)
    with pytest.raises(ValueError, match=r"up to 5 channels; the waveform for .*clip.wav has 6"):
        save_wav(torch.rand(6, 16000) - 0.5, tmp_path / "clip.wav", 16000, normalize="loudness")
    assert not list(tmp_path.iterdir())
    save_wav(torch.zeros(2, 1), tmp_path / "one-stereo-sample.wav", 16000)  # stereo is never refused


# --- normalisation -------------------------------------------------------------------------------


def test_peak_normalisation_reaches_the_peak(tmp_path):
    path = save_wav(tone(300, 16000, 0.3, amplitude=0.1), tmp_path / "p.wav", 16000, normalize="peak", peak=0.8)
    back, _ = load_audio(path)
    assert abs(float(back.abs().max()) - 0.8) <= 1 / 32768


def test_loudness_normalisation_reaches_the_target(tmp_path):
    g = torch.Generator().manual_seed(0)
    wave = tone(500, 16000, 2.0, amplitude=0.3, channels=2) + 0.05 * torch.randn(2, 32000, generator=g)
    path = save_wav(wave, tmp_path / "l.wav", 16000, normalize="loudness", loudness_lufs=-20.0)
    back, _ = load_audio(path)
    assert abs(float(AF.loudness(back.double(), 16000)) + 20.0) < 0.5


def test_loudness_normalisation_limits_peaks(tmp_path):
    clicks = torch.zeros(1, 16000)
    clicks[0, ::4000] = 0.5  # loud peaks, little energy: -3 LUFS needs a gain far above 1 / 0.5
    path = save_wav(clicks, tmp_path / "c.wav", 16000, normalize="loudness", loudness_lufs=-3.0, subtype="FLOAT")
    back, _ = load_audio(path)
    assert abs(float(back.abs().max()) - 1.0) < 1e-6
    assert float(AF.loudness(back.double(), 16000)) < -3.0 - 6


def test_loudness_of_a_short_clip_falls_back_to_peak(tmp_path):
    with pytest.warns(UserWarning, match="shorter than one 0.4 s loudness block"):
        path = save_wav(tone(440, 16000, 0.2, amplitude=0.1), tmp_path / "s.wav", 16000, normalize="loudness")
    back, _ = load_audio(path)
    assert abs(float(back.abs().max()) - 0.95) <= 1 / 32768
    with pytest.warns(UserWarning, match="silent"):
        path = save_wav(torch.zeros(16000), tmp_path / "z.wav", 16000, normalize="loudness")
    assert float(load_audio(path)[0].abs().max()) == 0.0


# --- resampling and channels ---------------------------------------------------------------------


def test_resampling_22050_to_16000_keeps_the_frequency(tmp_path):
    path = save_wav(tone(1000, 22050, 1.0), tmp_path / "r.wav", 22050, subtype="FLOAT")
    wave, rate = load_audio(path, sample_rate=16000)
    assert rate == 16000 and wave.shape == (1, 16000)
    assert abs(dominant_frequency(wave[0], 16000) - 1000) <= 1.0  # 1 Hz FFT bins
    assert abs(float(wave[0, 2000:-2000].abs().max()) - 0.5) < 0.01  # the amplitude survives too


def test_channel_conversion(tmp_path):
    stereo = save_wav(tone(440, 8000, 0.1, channels=2), tmp_path / "s.wav", 8000, subtype="FLOAT")
    mono = save_wav(tone(440, 8000, 0.1), tmp_path / "m.wav", 8000, subtype="FLOAT")
    both = load_audio(stereo)[0]
    torch.testing.assert_close(load_audio(stereo, channels=1)[0], both.mean(0, keepdim=True))
    assert torch.equal(load_audio(stereo, channels=2)[0], both)
    duplicated = load_audio(mono, channels=2)[0]
    assert duplicated.shape == (2, 800) and torch.equal(duplicated[0], duplicated[1])
    with pytest.raises(AudioReadError, match="s.wav: 2 channels cannot become 3"):
        load_audio(stereo, channels=3)


# --- other formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "tolerance"), [(".flac", 1 / 32768), (".ogg", None), (".mp3", None)])
def test_compressed_round_trips(tmp_path, suffix, tolerance):
    wave = tone(660, 16000, 1.0)
    path = tmp_path / f"clip{suffix}"
    try:
        sf.write(str(path), wave[0].numpy(), 16000)
    except sf.LibsndfileError as e:  # libsndfile builds without an encoder
        pytest.skip(f"soundfile cannot write {suffix} here: {e}")
    back, rate = load_audio(path)
    assert rate == 16000 and back.shape[0] == 1
    if tolerance is not None:  # lossless
        assert back.shape == wave.shape and float((back - wave).abs().max()) <= tolerance
    else:  # lossy: length within an encoder frame, same pitch and level
        assert abs(back.shape[1] - wave.shape[1]) <= 1152
        assert abs(dominant_frequency(back[0], 16000) - 660) <= 2.0
        assert abs(float(back.square().mean().sqrt()) - 0.5 / math.sqrt(2)) < 0.03


def test_pyav_reads_what_libsndfile_cannot(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.m4a"
    samples = tone(440, 16000, 1.0, amplitude=0.4)[0].numpy()
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=16000, layout="mono")
            frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in chain_packets(stream, frame):
                container.mux(packet)
    except (av.error.FFmpegError, ValueError) as e:
        pytest.skip(f"PyAV cannot write AAC here: {e}")
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))  # the file really needs the fallback
    wave, rate = load_audio(path, channels=1)
    assert rate == 16000 and abs(wave.shape[1] - 16000) <= 2048
    assert abs(dominant_frequency(wave[0], 16000) - 440) <= 2.0


def chain_packets(stream, frame):
    yield from stream.encode(frame)
    yield from stream.encode(None)  # flush


# --- bad files -----------------------------------------------------------------------------------


def written_wav(tmp_path: Path, name: str = "good.wav") -> Path:
    return save_wav(tone(440, 16000, 1.0), tmp_path / name, 16000)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "corrupt": tmp_path / "random.wav",
        "truncated": tmp_path / "half.wav",
        "empty": tmp_path / "empty.wav",
        "not audio": tmp_path / "notes.wav",
        "truncated flac": tmp_path / "half.flac",
        "truncated mp3": tmp_path / "half.mp3",
        "truncated ogg": tmp_path / "half.ogg",
        "header only": tmp_path / "header.wav",
    }
    files["corrupt"].write_bytes(np.random.default_rng(0).bytes(5000))
    good = written_wav(tmp_path).read_bytes()
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["empty"].write_bytes(b"")
    files["not audio"].write_text("these are notes, not audio\n" * 40)
    for suffix in ("flac", "mp3", "ogg"):
        whole = tmp_path / f"whole.{suffix}"
        sf.write(str(whole), tone(440, 16000, 1.0)[0].numpy(), 16000)
        files[f"truncated {suffix}"].write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    files["header only"].write_bytes(good[:30])
    return files


def test_bad_files_raise_audio_read_error_naming_the_path(tmp_path):
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(AudioReadError) as info:
            load_audio(path)
        assert str(path) in str(info.value), kind
        assert info.value.path == str(path)
    with pytest.raises(AudioReadError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioReadError, match="empty"):
        load_audio(tmp_path / "empty.wav")


def test_a_wav_cut_in_half_is_called_truncated(tmp_path):
    # libsndfile itself reads such a file as a shorter clip without an error; load_audio must not
    path = bad_files(tmp_path)["truncated"]
    assert sf.read(str(path))[0].shape[0] < 16000
    with pytest.raises(AudioReadError, match="truncated: the data chunk declares 32000 bytes"):
        load_audio(path)
    with pytest.raises(AudioReadError, match="truncated"):
        load_audio(tmp_path / "half.mp3")


def test_audio_read_error_pickles():
    error = pickle.loads(pickle.dumps(AudioReadError("x.wav", "empty file")))
    assert isinstance(error, OSError) and error.path == "x.wav"
    assert str(error) == "cannot read audio file x.wav: empty file"


# --- fit_length ----------------------------------------------------------------------------------


def test_fit_length_modes():
    x = torch.arange(1, 11, dtype=torch.float32)[None]  # (1, 10)
    assert fit_length(x, 4).tolist() == [[1, 2, 3, 4]]
    assert fit_length(x, 4, "center").tolist() == [[4, 5, 6, 7]]
    assert fit_length(x, 13).tolist() == [[*range(1, 11), 0, 0, 0]]
    assert fit_length(x, 13, "center").tolist() == [[0, *range(1, 11), 0, 0]]
    assert fit_length(x, 10) is x
    crops = {tuple(fit_length(x, 4, "random", torch.Generator().manual_seed(s))[0].tolist()) for s in range(40)}
    assert crops == {tuple(range(i, i + 4)) for i in range(1, 8)}  # every window, nothing else
    pads = [fit_length(x, 12, "random", torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(p.shape == (1, 12) and torch.equal(p[p != 0], x[0]) for p in pads)
    assert len({int((p[0] != 0).nonzero()[0]) for p in pads}) == 3  # offsets 0, 1, 2
    torch.testing.assert_close(
        fit_length(x, 4, "random", torch.Generator().manual_seed(3)),
        fit_length(x, 4, "random", torch.Generator().manual_seed(3)),
    )
