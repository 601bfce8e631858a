"""Audio files: `load_audio` (any format libsndfile or FFmpeg reads), `fit_length`, `save_wav`.

Reading. soundfile (libsndfile) decodes wav, flac, ogg/vorbis/opus, mp3, aiff and more; PyAV (FFmpeg)
is the fallback only for files libsndfile does not recognise or whose encoding it lacks (m4a/aac, wma,
...). A file libsndfile recognises but cannot decode (a truncated flac or ogg) is an error, never
handed to FFmpeg, which might decode a part of it. Every failure raises `AudioReadError(path, reason)`:
missing, empty, truncated, corrupt, not audio, no samples, non-finite samples (the reason then starts
with "non-finite"), or a channel count that cannot be converted to the one asked for.

Truncation is checked because decoders often do not: libsndfile reads a wav whose data chunk was cut
in half as a shorter clip without complaint (its log says "data : 32000 (should be 15978)"), and an
mp3 cut in half decodes to its first part. So a RIFF/WAVE data chunk that declares more bytes than the
file holds is refused, and so is any file that decodes to fewer frames than its header declares, by
more than `TRUNCATION_SLACK` (mp3 lengths from the bitrate are estimates, off by an ID3 tag or a frame).

Writing. `save_wav` writes a .wav atomically (a temporary file in the same folder, then os.replace),
optionally normalised: "peak" scales so max |x| = peak; "loudness" scales to an integrated loudness
(ITU-R BS.1770-4, torchaudio.functional.loudness) and then, if a sample exceeds 1, scales down so the
peak is 1 (a gain, not a clipper: the clip is then quieter than the target). Loudness needs at least
one 400 ms gating block and a clip above the -70 LUFS absolute gate; shorter or silent clips fall back
to peak normalisation (with a warning). Integer subtypes clip at +-1 (x is clamped before writing).
"""

from __future__ import annotations

import math
import os
import struct
import uuid
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

TRUNCATION_SLACK = (2 * 1152, 0.01)  # (frames, fraction): allowed shortfall, the larger of the two
MAX_CHANNELS = 64  # save_wav refuses more: such a "waveform" is (samples, channels) the wrong way round
SF_FALLBACK_CODES = (1, 4)  # libsndfile: SF_ERR_UNRECOGNISED_FORMAT, SF_ERR_UNSUPPORTED_ENCODING
LOUDNESS_BLOCK_SECONDS = 0.4  # BS.1770 gating block


class AudioReadError(OSError):
    """An audio file could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read audio file {self.path}: {reason}")

    def __reduce__(self):  # type: ignore[override]  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


# --- reading -------------------------------------------------------------------------------------


def _riff_truncation(path: Path, size: int) -> str | None:
    """The reason a RIFF/WAVE file is truncated (its data chunk runs past the end), or None."""
    with path.open("rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk, length = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                available = size - offset - 8
                if length not in (0, 0xFFFFFFFF) and length > available:  # 0 / -1: streamed, length unknown
                    return f"truncated: the data chunk declares {length} bytes but the file holds {available}"
                return None
            offset += 8 + length + (length & 1)  # chunks are padded to even sizes
    return "truncated or corrupt: no data chunk in the RIFF/WAVE file"


def _check_length(path: Path, decoded: int, declared: int | None) -> None:
    if declared is None or declared <= 0:
        return
    slack = max(TRUNCATION_SLACK[0], TRUNCATION_SLACK[1] * declared)
    if decoded < declared - slack:
        raise AudioReadError(path, f"truncated: decoded {decoded} frames of the {declared} its header declares")


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the rate, via libsndfile."""
    with sf.SoundFile(str(path)) as f:
        declared, rate = f.frames, f.samplerate
        data = f.read(dtype="float32", always_2d=True)
    _check_length(path, data.shape[0], declared)
    return data, rate


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the rate, via PyAV (FFmpeg): the first audio stream."""
    import av  # imported here: only the fallback needs FFmpeg

    with av.open(str(path)) as container:
        if not container.streams.audio:
            kinds = [s.type for s in container.streams]
            raise ValueError(f"no audio stream (FFmpeg reads it as {container.format.name} with streams {kinds})")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # float planar, same layout and rate
        chunks = [
            out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)
        ]  # each (channels, n)
        chunks += [out.to_ndarray() for out in resampler.resample(None)]  # flush
        rate = stream.codec_context.sample_rate
        declared = None
        if stream.duration is not None and stream.time_base is not None:
            declared = round(float(stream.duration * stream.time_base) * rate)
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    data = np.concatenate(chunks, axis=1).T.astype(np.float32)
    _check_length(path, data.shape[0], declared)
    return data, rate


def _decode(path: Path) -> tuple[np.ndarray, int]:
    try:
        return _read_soundfile(path)
    except sf.LibsndfileError as e:
        if e.code not in SF_FALLBACK_CODES:
            raise AudioReadError(path, f"libsndfile: {e.error_string.rstrip('.')}") from e
        sf_reason = f"libsndfile: {e.error_string.rstrip('.')}"
    except (sf.SoundFileError, RuntimeError) as e:  # e.g. mpg123 errors surface as RuntimeError
        raise AudioReadError(path, f"libsndfile: {e}") from e
    try:
        return _read_pyav(path)
    except AudioReadError:
        raise
    except Exception as e:  # av.error.FFmpegError, EOFError, ValueError: all mean "not readable"
        raise AudioReadError(path, f"{sf_reason}; FFmpeg (PyAV): {e}") from e


def load_audio(
    path: str | os.PathLike,
    sample_rate: int | None = None,  # resample to this rate; None: the file's
    channels: int | None = None,     # 1: average to mono; 2: duplicate mono or keep stereo; None: the file's
) -> tuple[torch.Tensor, int]:
    """An audio file -> (wave (channels, samples) float32, sample rate). Raises AudioReadError."""
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(path, "no such file" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise AudioReadError(path, "empty file (0 bytes)")
    reason = _riff_truncation(path, size)
    if reason is not None:
        raise AudioReadError(path, reason)
    data, rate = _decode(path)
    if data.shape[0] == 0:
        raise AudioReadError(path, "no samples")
    if not np.isfinite(data).all():
        raise AudioReadError(path, "non-finite samples (a float file holding NaN or inf)")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (channels, samples)
    if channels is not None:
        wave = _to_channels(wave, channels, path)
    if sample_rate is not None and sample_rate != rate:
        wave = AF.resample(wave, rate, sample_rate)  # windowed-sinc (Hann), torchaudio's default
        rate = sample_rate
    return wave.float().contiguous(), rate


def _to_channels(wave: torch.Tensor, channels: int, path: Path) -> torch.Tensor:
    have = wave.shape[0]
    if channels == have:
        return wave
    if channels == 1:
        return wave.mean(0, keepdim=True)
    if have == 1:
        return wave.expand(channels, -1)
    raise AudioReadError(path, f"{have} channels cannot become {channels} (mono is averaged to, or duplicated from)")


def fit_length(
    wave: torch.Tensor,                      # (..., samples)
    samples: int,                            # the length wanted
    mode: Literal["start", "center", "random"] = "start",
    generator: torch.Generator | None = None,  # for mode "random"
) -> torch.Tensor:
    """Crop or zero-pad the last axis to exactly `samples`. "start": keep the beginning / pad at the
    end; "center": keep the middle / pad both sides equally (the extra sample at the end); "random":
    a uniformly random window / a uniformly random placement among the zeros."""
    n = wave.shape[-1]
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if mode not in ("start", "center", "random"):
        raise ValueError(f"mode must be 'start', 'center' or 'random', got {mode!r}")
    if n == samples:
        return wave
    gap = abs(n - samples)
    if mode == "start":
        offset = 0
    elif mode == "center":
        offset = gap // 2
    else:
        offset = int(torch.randint(gap + 1, (1,), generator=generator))
    if n > samples:
        return wave[..., offset : offset + samples]
    return torch.nn.functional.pad(wave, (offset, gap - offset))


# --- writing -------------------------------------------------------------------------------------


def _peak_gain(wave: torch.Tensor, peak: float) -> float:
    top = float(wave.abs().max()) if wave.numel() else 0.0
    return peak / top if top > 0 else 1.0  # silence stays silence


def _loudness_gain(wave: torch.Tensor, sample_rate: int, target: float, peak: float) -> float:
    """Gain to an integrated loudness of `target` LUFS, or the peak gain (with a warning) for clips
    too short for one gating block or too quiet for the absolute gate."""
    if wave.shape[-1] < round(LOUDNESS_BLOCK_SECONDS * sample_rate):
        warnings.warn(
            f"clip of {wave.shape[-1]} samples is shorter than one {LOUDNESS_BLOCK_SECONDS} s loudness block at "
            f"{sample_rate} Hz; peak-normalised to {peak} instead",
            stacklevel=3,
        )
        return _peak_gain(wave, peak)
    measured = float(AF.loudness(wave.double(), sample_rate))
    if not math.isfinite(measured):
        warnings.warn("clip is silent below the -70 LUFS gate; peak-normalised instead", stacklevel=3)
        return _peak_gain(wave, peak)
    gain = 10 ** ((target - measured) / 20)
    top = float(wave.abs().max()) * gain
    return gain / top if top > 1 else gain  # limit: the loudest sample to 1


def save_wav(
    wave: torch.Tensor | np.ndarray,          # (channels, samples) or (samples,), float
    path: str | os.PathLike,
    sample_rate: int,
    subtype: str = "PCM_16",                  # soundfile subtype: PCM_16, PCM_24, PCM_32, FLOAT (wav), ...
    normalize: Literal["peak", "loudness"] | None = None,
    peak: float = 0.95,                       # "peak": max |x| after scaling
    loudness_lufs: float = -23.0,             # "loudness": integrated loudness target (EBU R128: -23)
    format: Literal["wav", "flac"] = "wav",   # the container; the path's suffix must agree
) -> Path:
    """Write a .wav (or .flac) file (atomically, creating its folder); returns its path. A wave with more
    channels than samples (beyond stereo), or more than MAX_CHANNELS, is refused as (samples, channels)."""
    path = Path(path)
    if format not in ("wav", "flac"):
        raise ValueError(f"format must be 'wav' or 'flac', got {format!r}")
    if path.suffix.lower() != f".{format}":
        raise ValueError(f"writing {format} needs a .{format} path; got {path}")
    if not sf.check_format(format.upper(), subtype):
        raise ValueError(f"{subtype!r} is not a {format} subtype soundfile writes; "
                         f"see soundfile.available_subtypes({format.upper()!r})")  # fmt: skip
    x = torch.as_tensor(wave).detach()
    if not x.is_floating_point():  # int16 PCM read as integers would clip to +-1 whole
        raise ValueError(f"the waveform for {path} is {x.dtype}: expected float samples in [-1, 1] (divide int16 "
                         "PCM by 32768)")  # fmt: skip
    x = x.to("cpu", torch.float64)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"expected a waveform (channels, samples) or (samples,), got shape {tuple(x.shape)}")
    if x.shape[0] > MAX_CHANNELS or x.shape[0] > max(x.shape[1], 2):  # soundfile's layout: (samples, channels)
        raise ValueError(f"expected a waveform (channels, samples); got {tuple(x.shape)}, i.e. {x.shape[0]} "
                         f"channels of {x.shape[1]} samples: transpose it?")  # fmt: skip
    if not torch.isfinite(x).all():
        raise ValueError(f"the waveform for {path} has non-finite samples")
    if normalize == "peak":
        x = x * _peak_gain(x, peak)
    elif normalize == "loudness":
        if x.shape[0] > 5:  # ITU-R BS.1770's channel weights (torchaudio's loudness) cover up to 5.1 without LFE
            raise ValueError(f"normalize='loudness' measures up to 5 channels; the waveform for {path} has "
                             f"{x.shape[0]}: use normalize='peak'")  # fmt: skip
        x = x * _loudness_gain(x, sample_rate, loudness_lufs, peak)
    elif normalize is not None:
        raise ValueError(f"normalize must be None, 'peak' or 'loudness', got {normalize!r}")
    if subtype not in ("FLOAT", "DOUBLE"):
        x = x.clamp(-1, 1)  # integer PCM holds [-1, 1] (libsndfile clips as well)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: os.replace is atomic
    try:
        sf.write(tmp, x.T.numpy(), sample_rate, subtype=subtype, format=format.upper())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
