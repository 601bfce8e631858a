"""Raw audio datasets: items `(wave, label)` with wave float32 (channels, samples) in [-1, 1], label an int.

Every dataset carries `num_classes` (0 if unlabelled), `sample_rate` and `fingerprint`, a string naming
the source and its preprocessing that scm_mm.data uses as a cache key (see scm_mm.modality).

- `SynthNotes`: the embedded default. Pitched notes synthesised on the fly (no files, no downloads)
  in five timbres with exact pitch and instrument labels.
- `AudioFolder`: audio files on disk, in one of five layouts ("folders", "flat", "ljspeech", "sc09",
  "nsynth"). Every file is decoded once when the dataset is built. Unreadable files are reported by
  path and skipped. Silent and non-finite clips are counted and dropped. A JSON manifest can cache the
  scan.
- `render_soundfont_notes` and `speak_digits`: optional builders of NSynth-like and SC09-like folders.
  They use pretty_midi's GM soundfont and the espeak-ng binary, so they need no download.

`build_dataset(name, **kwargs)` selects a dataset by name (the `DATASETS` registry).

Clip length: the default 1.008 s at 16 kHz is 16128 samples, i.e. 63 hops of 256. The centred STFT
of the small_16k mel spec (scm_mm_audio.mel) turns this into 1 + 63 = 64 frames, which is divisible by 16,
so a U-Net can halve the time axis four times. A 1.024 s clip (16384 samples) would give 65 frames.
At other rates or specs choose seconds = spec.samples(T) / sample_rate for such a T; e.g. for
hifigan_22k (uncentred frames) 64 frames are 16384 samples: seconds=0.74304 at 22.05 kHz (rounds to 16384).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from scm_mm.data import View, user_cache

from .io import AudioReadError, fit_length, load_audio

logger = logging.getLogger(__name__)

SYNTH_VERSION = "synth-notes-v1"  # bump whenever the synthesis changes: it is part of every fingerprint
INSTRUMENTS = ("organ", "clarinet", "plucked", "flute", "brass")
_TABLE = 4096  # wavetable length of the harmonic timbres (see _table_partials)
DEFAULT_SECONDS = 1.008  # 16128 samples at 16 kHz -> 64 centred frames with hop 256 (see the module docstring)


def midi_to_hz(midi: float) -> float:
    """Equal temperament, A4 = MIDI 69 = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


# ------------------------------------------------------------------------------------------ SynthNotes


@dataclasses.dataclass(frozen=True)
class _Note:
    """The draws that every timbre shares. Times are in seconds from the start of the clip."""

    midi: int
    instrument: str
    velocity: int  # MIDI velocity 40..127: sets the peak level (0.5..0.9) and the brightness
    detune: float  # cents, within +-8
    onset: float   # silence before the attack, 0..8 ms
    off: float     # note-off time: 70-90% of the clip


def _adsr(
    t: np.ndarray, onset: float, attack: float, decay: float, sustain: float, off: float, release: float
) -> np.ndarray:
    """Piecewise-linear ADSR envelope (S,) float32. It is 0 before onset, rises to 1 at onset + attack,
    falls to `sustain` by onset + attack + decay, holds until `off`, and reaches 0 at off + release."""
    knots = np.array([onset, onset + attack, onset + attack + decay, max(off, onset + attack + decay), 0.0])
    knots[4] = knots[3] + release
    return np.interp(t, knots, [0.0, 1.0, sustain, sustain, 0.0]).astype(np.float32)


def _vibrato(rng: np.random.Generator, t: np.ndarray, onset: float, cents: tuple[float, float]) -> np.ndarray:
    """Frequency ratio (S,) of a sinusoidal vibrato at 4-7 Hz with a depth drawn from `cents`. It fades in
    over 0.2 s after a 0.1-0.3 s delay, as players do."""
    rate, depth = rng.uniform(4.0, 7.0), rng.uniform(*cents)
    start = onset + rng.uniform(0.1, 0.3)
    t = t.astype(np.float32)
    fade = np.clip((t - np.float32(start)) * np.float32(5.0), 0.0, 1.0)  # 0 -> 1 over 0.2 s
    swing = np.sin(np.float32(2 * np.pi * rate) * t + np.float32(rng.uniform(0, 2 * np.pi)))
    return np.exp2(np.float32(depth / 1200) * fade * swing)


def _cycles(f0: float, t: np.ndarray, sample_rate: int, bend: np.ndarray | None = None) -> np.ndarray:
    """Phase of the fundamental in cycles (S,) float64. The frequency is f0 times `bend`, a ratio (S,)."""
    if bend is None:
        return f0 * t
    return np.cumsum(bend, dtype=np.float64) * (f0 / sample_rate)


def _steady_partials(
    rng: np.random.Generator,
    freqs: np.ndarray,      # (H,) partial frequencies in Hz, any (inharmonic) ratios
    amps: np.ndarray,       # (G, H) amplitude of each partial in each envelope group
    envs: np.ndarray,       # (G, S) envelope of each group
    sample_rate: int,
) -> np.ndarray:
    """sum_g envs[g] * sum_h amps[g, h] * sin(w_h n + phase_h), float32 (S,), for constant frequencies.

    Split n = K q + k with K = 128. Then sin(w (K q + k) + phase) = sin(w K q + phase) cos(w k)
    + cos(w K q + phase) sin(w k). So the sum over partials becomes one (Q, 2H) @ (2H, K) matrix
    product per group, which needs only H (Q + K) sines instead of H S. It is exact in float64.
    """
    samples, k = envs.shape[1], 128
    q = -(-samples // k)
    omega = 2 * np.pi * np.asarray(freqs) / sample_rate  # (H,) radians per sample
    start = np.outer(omega, np.arange(q) * k) + rng.uniform(0, 2 * np.pi, (len(omega), 1))  # (H, Q)
    step = np.outer(omega, np.arange(k))  # (H, K)
    starts = np.concatenate([np.sin(start), np.cos(start)])  # (2H, Q)
    steps = np.concatenate([np.cos(step), np.sin(step)])  # (2H, K)
    out = np.zeros(samples, np.float32)
    for a, env in zip(amps, envs):
        block = (np.concatenate([a, a])[:, None] * starts).T @ steps  # (Q, K)
        out += env * block.reshape(-1)[:samples].astype(np.float32)
    return out


def _table_partials(
    rng: np.random.Generator,
    cycles: np.ndarray,     # (S,) phase of the fundamental in cycles (any pitch contour), float64
    harmonics: np.ndarray,  # (H,) harmonic numbers, integers below _TABLE / 2
    amps: np.ndarray,       # (G, H) amplitude of each harmonic in each envelope group
    envs: np.ndarray,       # (G, S) envelope of each group
) -> np.ndarray:
    """sum_g envs[g] * sum_h amps[g, h] * sin(2 pi (h cycles + phase_h)), float32 (S,).

    One period per group is built by an inverse FFT into a wavetable of _TABLE points and read with
    linear interpolation. The error is below (pi h / _TABLE)^2 / 2 of harmonic h's amplitude, i.e.
    3e-4 for h = 32.
    """
    phases = rng.uniform(0, 1, len(harmonics))
    spectrum = np.zeros((len(amps), _TABLE // 2 + 1), np.complex128)
    spectrum[:, harmonics.astype(int)] = amps * (_TABLE / 2) * np.exp(2j * np.pi * phases - 0.5j * np.pi)
    tables = np.fft.irfft(spectrum, _TABLE, axis=-1).astype(np.float32)
    tables = np.concatenate([tables, tables[:, :1]], axis=1)  # (G, TABLE + 1): wraps for interpolation
    position = (cycles - np.floor(cycles)) * _TABLE
    index = position.astype(np.int32)
    frac = (position - index).astype(np.float32)
    out = np.zeros(len(cycles), np.float32)
    for table, env in zip(tables, envs.astype(np.float32)):
        lower = table[index]
        out += env * (lower + frac * (table[index + 1] - lower))
    return out


def _band_limit(f0: float, ratios: np.ndarray, sample_rate: int) -> np.ndarray:
    """Keep the partials below 0.45 * sample_rate even at the top of a 30-cent vibrato (no aliasing)."""
    return ratios[ratios * f0 * 2 ** (30 / 1200) < 0.45 * sample_rate]


def _jitter(rng: np.random.Generator, n: int, db: float = 1.5) -> np.ndarray:
    """Per-partial gains, log-normal with a standard deviation of `db` decibels."""
    return 10.0 ** (rng.normal(0.0, db, n) / 20)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform white noise (n,) float32 with unit RMS. Uniform draws are cheaper than Gaussian ones."""
    return (rng.random(n, dtype=np.float32) - 0.5) * np.float32(math.sqrt(12))


def _box(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples (a low-pass with its first zero at sample_rate / width)."""
    c = np.concatenate([np.zeros(width, np.float32), np.cumsum(x, dtype=np.float32)])
    return (c[width:] - c[:-width]) / np.float32(width)


def _band_noise(rng: np.random.Generator, n: int, sample_rate: int, low: float, high: float) -> np.ndarray:
    """Coloured noise (n,) with unit RMS, mostly between `low` and `high` Hz: the difference of two
    moving averages, whose first zeros lie at `high` and `low`. Crude, but cheap."""
    x = _noise(rng, n)
    out = _box(x, max(1, round(sample_rate / high))) - _box(x, max(2, round(sample_rate / low)))
    return out / max(float(np.sqrt(np.mean(out**2))), 1e-12)


def _organ(rng, note, f0, t, sample_rate):
    """Drawbar organ: the 8', 4', 2 2/3', 2', 1 1/3' and 1' ranks (harmonics 1, 2, 3, 4, 6, 8) with a
    random registration. Flat sustain with a fast attack and release, and a short key click. No vibrato."""
    ratios = _band_limit(f0, np.array([1.0, 2.0, 3.0, 4.0, 6.0, 8.0]), sample_rate)
    amps = np.concatenate([[1.0], rng.uniform(0.1, 0.6, len(ratios) - 1)]) * _jitter(rng, len(ratios))
    env = _adsr(t, note.onset, rng.uniform(0.005, 0.015), 0.01, 1.0, note.off, rng.uniform(0.02, 0.06))
    tone = _steady_partials(rng, f0 * ratios, amps[None], env[None], sample_rate)
    click = _noise(rng, len(t)) * np.exp(-np.maximum(t - note.onset, 0) / 0.002) * (t >= note.onset)
    return tone + 0.05 * click


def _clarinet(rng, note, f0, t, sample_rate):
    """Reed in a cylindrical bore: strong odd harmonics and weak even ones (about -20 dB), rolled off
    above a cutoff that rises with velocity. Gentle vibrato of 10-20 cents and some breath noise."""
    ratios = _band_limit(f0, np.arange(1.0, 33.0), sample_rate)
    cutoff = 1500.0 + 1500.0 * (note.velocity - 40) / 87
    amps = np.where(ratios % 2 == 1, 1.0, 0.1) / ratios / (1 + (ratios * f0 / cutoff) ** 4)
    amps = amps * _jitter(rng, len(ratios))
    env = _adsr(t, note.onset, rng.uniform(0.02, 0.06), 0.1, rng.uniform(0.8, 0.95), note.off, rng.uniform(0.04, 0.1))
    cycles = _cycles(f0, t, sample_rate, _vibrato(rng, t, note.onset, (10.0, 20.0)))
    breath = 0.02 * _band_noise(rng, len(t), sample_rate, 1000.0, 5000.0) * env
    return _table_partials(rng, cycles, ratios, amps[None], env[None]) + breath


def _plucked(rng, note, f0, t, sample_rate):
    """Plucked string: stiff-string partials f_h = h f0 sqrt(1 + B h^2) (B = 2e-5..2e-4), comb-filtered
    by the pluck position, with exponential decays that shorten with partial number (three groups),
    damped at note-off, plus a short pluck noise."""
    h = np.arange(1.0, 33.0)
    stiffness = rng.uniform(2e-5, 2e-4)
    ratios = _band_limit(f0, h * np.sqrt(1 + stiffness * h**2), sample_rate)
    h = h[: len(ratios)]
    position = rng.uniform(0.08, 0.25)  # pluck point as a fraction of the string length
    amps = np.abs(np.sin(np.pi * h * position)) / h**1.3 * _jitter(rng, len(h))
    groups = np.digitize(h, [2.5, 6.5])  # partials 1-2, 3-6, 7+
    tau = rng.uniform(0.6, 1.5) * 2 ** ((60 - note.midi) / 24)  # low strings ring longer
    lifetimes = np.array([tau, tau / 2.5, tau / 6])
    since = np.maximum(t - note.onset, 0).astype(np.float32)
    attack = np.clip(since / rng.uniform(0.001, 0.003), 0, 1) * (t >= note.onset)
    damping = np.exp(-np.maximum(t - note.off, 0) / 0.08)
    envs = np.exp(-since[None] / lifetimes[:, None].astype(np.float32)) * (attack * damping)[None]
    amps_g = np.zeros((3, len(h)))
    amps_g[groups, np.arange(len(h))] = amps
    pluck = _noise(rng, len(t)) * np.exp(-since / 0.005) * (t >= note.onset)
    return _steady_partials(rng, f0 * ratios, amps_g, envs, sample_rate) + 0.1 * amps[0] * pluck


def _flute(rng, note, f0, t, sample_rate):
    """Flute: a nearly sinusoidal tone with a few weak harmonics, a slow attack with a noisy chiff,
    vibrato of 15-30 cents with a matching tremolo, and breath noise at -30 to -22 dB."""
    ratios = _band_limit(f0, np.arange(1.0, 7.0), sample_rate)
    base = np.array([1.0, rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.25), rng.uniform(0.03, 0.1), 0.02, 0.01])
    amps = base[: len(ratios)] * _jitter(rng, len(ratios))
    env = _adsr(t, note.onset, rng.uniform(0.05, 0.12), 0.1, rng.uniform(0.8, 0.95), note.off, rng.uniform(0.06, 0.15))
    bend = _vibrato(rng, t, note.onset, (15.0, 30.0))
    tremolo = (1 + 2.5 * (bend - 1)).astype(np.float32)  # louder when sharper, as the breath pressure swings
    breath = 10 ** (rng.uniform(-30, -22) / 20) * _band_noise(rng, len(t), sample_rate, 500.0, 6000.0)
    chiff = 4 * np.exp(-np.maximum(t - note.onset, 0) / 0.03) * (t >= note.onset)
    tone = _table_partials(rng, _cycles(f0, t, sample_rate, bend), ratios, amps[None], (env * tremolo)[None])
    return tone + breath * env * (1 + chiff)


def _brass(rng, note, f0, t, sample_rate):
    """Brass: a sawtooth-like spectrum (1/h^1-1.5, brighter when louder), whose upper harmonics follow the
    envelope squared, so the tone brightens with loudness. The pitch scoops up 20-40 cents into the
    note, and a vibrato of 10-20 cents follows."""
    ratios = _band_limit(f0, np.arange(1.0, 33.0), sample_rate)
    tilt = 1.5 - 0.5 * (note.velocity - 40) / 87
    amps = 1 / ratios**tilt * _jitter(rng, len(ratios))
    env = _adsr(t, note.onset, rng.uniform(0.03, 0.07), 0.1, rng.uniform(0.7, 0.85), note.off, rng.uniform(0.05, 0.1))
    scoop = -rng.uniform(20, 40) * np.exp(-np.maximum(t - note.onset, 0) / rng.uniform(0.02, 0.04))
    bend = 2.0 ** (scoop / 1200) * _vibrato(rng, t, note.onset, (10.0, 20.0))
    amps_g = np.stack([np.where(ratios <= 3, amps, 0.0), np.where(ratios > 3, amps, 0.0)])
    return _table_partials(rng, _cycles(f0, t, sample_rate, bend), ratios, amps_g, np.stack([env, env**2]))


TIMBRES: dict[str, Callable[..., np.ndarray]] = {
    "organ": _organ,
    "clarinet": _clarinet,
    "plucked": _plucked,
    "flute": _flute,
    "brass": _brass,
}

SYNTH_LABELS = ("pitch", "instrument", "note")
SPLITS = {"train": 0, "test": 1}


class SynthNotes(Dataset):
    """Synthetic pitched notes, generated on the fly: the offline default audio dataset.

    Item i is a note in timbre `instruments[i % I]` at pitch `pitches[(i // I) % P]`, where I and P are
    the numbers of instruments and pitches. So every (pitch, instrument) pair occurs equally often when
    `size` is a multiple of P * I. All other properties are drawn from a generator seeded with
    (seed, split, i). They are: velocity, which sets the peak level (0.5-0.9) and the brightness; a
    detune of +-8 cents; an onset within 8 ms; the note-off at 70-90% of the clip; the envelope times;
    per-partial gains (+-1.5 dB); vibrato (4-7 Hz, 10-30 cents) on clarinet, flute and brass; noise. The
    same (settings, index) always gives the same clip, and the train and test splits use disjoint seeds.
    `TIMBRES` describes each timbre. The waves are additive syntheses, band-limited below
    0.45 * sample_rate, with a white noise floor at -70 to -55 dB.

    Labels: "pitch" gives the index into `pitches`; "instrument" the index into `instruments`; "note"
    gives pitch_index * len(instruments) + instrument_index. `midi_of_label` maps a label back to MIDI.
    """

    def __init__(
        self,
        size: int = 2400,                                # number of items (40 per pitch x instrument)
        sample_rate: int = 16000,                        # Hz
        seconds: float = DEFAULT_SECONDS,                # clip length; 1.008 s = 16128 samples -> 64 frames
        pitches: Sequence[int] = tuple(range(60, 72)),   # MIDI note numbers (C4..B4)
        instruments: Sequence[str] = INSTRUMENTS,        # timbres, keys of TIMBRES
        label: str = "pitch",                            # "pitch", "instrument" or "note"
        split: str = "train",                            # "train" or "test": disjoint random streams
        seed: int = 0,                                   # base seed of every item
    ) -> None:
        unknown = [name for name in instruments if name not in TIMBRES]
        if unknown or not instruments:
            raise ValueError(f"unknown instruments {unknown or '(none given)'}; choose from {sorted(TIMBRES)}")
        if label not in SYNTH_LABELS:
            raise ValueError(f"label must be one of {SYNTH_LABELS}, got {label!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not pitches or not all(0 <= p <= 127 for p in pitches):
            raise ValueError(f"pitches must be MIDI numbers in 0..127, got {tuple(pitches)}")
        if midi_to_hz(max(pitches) + 0.38) >= 0.45 * sample_rate:  # + 8 cents detune + 30 cents vibrato
            raise ValueError(f"MIDI {max(pitches)} is too high for {sample_rate} Hz: its fundamental must stay "
                             f"below 0.45 * sample_rate = {0.45 * sample_rate:g} Hz")  # fmt: skip
        self.size = int(size)
        self.sample_rate = int(sample_rate)
        self.samples = round(seconds * sample_rate)
        if self.samples < 1 or self.size < 1:
            raise ValueError(f"need size >= 1 and at least one sample, got size={size}, seconds={seconds}")
        self.pitches = tuple(int(p) for p in pitches)
        self.instruments = tuple(instruments)
        self.label = label
        self.split = split
        self.seed = int(seed)
        self.classes = self._class_names()
        self.num_classes = len(self.classes)
        self.fingerprint = (
            f"{SYNTH_VERSION}:size={self.size}:sr={self.sample_rate}:samples={self.samples}"
            f":pitches={','.join(map(str, self.pitches))}:instruments={','.join(self.instruments)}"
            f":label={label}:split={split}:seed={self.seed}"
        )
        self._t = np.arange(self.samples) / self.sample_rate  # (S,) seconds, shared by every item

    def _class_names(self) -> list[str]:
        if self.label == "pitch":
            return [f"midi{p}" for p in self.pitches]
        if self.label == "instrument":
            return list(self.instruments)
        return [f"midi{p}-{name}" for p in self.pitches for name in self.instruments]

    def __len__(self) -> int:
        return self.size

    def midi_of_label(self, label: int) -> int | None:
        """The MIDI pitch a label stands for (None for instrument labels)."""
        if self.label == "pitch":
            return self.pitches[label]
        if self.label == "note":
            return self.pitches[label // len(self.instruments)]
        return None

    def _cell(self, index: int) -> tuple[int, int]:
        """(pitch index, instrument index) of item `index`: the grid is walked instrument-fastest."""
        return divmod(index % (len(self.pitches) * len(self.instruments)), len(self.instruments))

    def _note(self, index: int) -> tuple[_Note, np.random.Generator]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} notes")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        pitch_index, instrument_index = self._cell(index)
        duration = self.samples / self.sample_rate
        note = _Note(
            midi=self.pitches[pitch_index],
            instrument=self.instruments[instrument_index],
            velocity=int(rng.integers(40, 128)),
            detune=float(rng.uniform(-8.0, 8.0)),
            onset=float(rng.uniform(0.0, min(0.008, 0.1 * duration))),
            off=float(rng.uniform(0.7, 0.9) * duration),
        )
        return note, rng

    def meta(self, index: int) -> dict[str, Any]:
        """The note behind item `index`: {"pitch": MIDI, "instrument": name, "velocity": 40..127}."""
        note, _ = self._note(index)
        return {"pitch": note.midi, "instrument": note.instrument, "velocity": note.velocity}

    def _label(self, index: int) -> int:
        p, i = self._cell(index)
        return {"pitch": p, "instrument": i, "note": p * len(self.instruments) + i}[self.label]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        note, rng = self._note(index)
        f0 = midi_to_hz(note.midi + note.detune / 100)
        wave = TIMBRES[note.instrument](rng, note, f0, self._t, self.sample_rate)
        peak = 0.5 + 0.4 * (note.velocity - 40) / 87
        wave = wave * np.float32(peak / max(float(np.abs(wave).max()), 1e-12))
        wave += np.float32(10 ** (rng.uniform(-70, -55) / 20)) * _noise(rng, self.samples)
        return torch.from_numpy(wave.astype(np.float32, copy=False))[None], self._label(int(index))


# ----------------------------------------------------------------------------------------- AudioFolder

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
LAYOUTS = ("folders", "flat", "ljspeech", "sc09", "nsynth")
SC09_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SC09_SPLITS = {"train": None, "valid": "validation_list.txt", "test": "testing_list.txt"}
NSYNTH_FAMILIES = (
    "bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead", "vocal",
)  # fmt: skip  (instrument_family 0..10, as in NSynth's examples.json)
MANIFEST_VERSION = "audio-folder-manifest-v1"
_PROGRESS_FROM = 100  # show a progress bar when checking at least this many files


@dataclasses.dataclass
class _Listing:
    """What a layout finds before any decoding: files with labels, class names, the index files whose
    content decides the labels (metadata.csv, examples.json, split lists), and files listed there but absent."""

    files: list[tuple[Path, int]]
    classes: list[str]
    index_files: list[Path] = dataclasses.field(default_factory=list)
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _audio_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Audio files under folder, recursively, sorted by relative path, hidden files and folders skipped."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in extensions and not any(part.startswith(".") for part in relative.parts):
            found.append((relative.as_posix(), path))
    return [path for _, path in sorted(found) if path.is_file()]


def _list_folders(root: Path, extensions: Sequence[str]) -> _Listing:
    """root/<class>/**/*.wav: one class per subfolder (sorted names), files sorted within each."""
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in extensions]
    if loose:
        raise ValueError(
            f"{root} holds {len(loose)} audio file(s) outside class folders (e.g. {loose[0].name}); "
            "move them into a class folder, or use layout='flat' for unlabelled audio"
        )
    per_class = {
        p.name: _audio_files(p, extensions) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    }
    per_class = {name: found for name, found in per_class.items() if found}
    files = [(path, label) for label, found in enumerate(per_class.values()) for path in found]
    return _Listing(files, list(per_class))


def _list_flat(root: Path, extensions: Sequence[str]) -> _Listing:
    return _Listing([(path, -1) for path in _audio_files(root, extensions)], [])


def _list_ljspeech(root: Path) -> _Listing:
    """LJSpeech: root/metadata.csv ("id|text|normalised text" lines) names root/wavs/<id>.wav."""
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"layout='ljspeech' needs {metadata} (lines 'id|text|normalised text')")
    files, missing = [], []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        path = root / "wavs" / f"{line.split('|', 1)[0].strip()}.wav"
        if path.is_file():
            files.append((path, -1))
        else:
            missing.append((str(path), f"listed in {metadata.name} line {number} but missing"))
    return _Listing(files, [], [metadata], missing)


def _list_sc09(root: Path, extensions: Sequence[str], split: str | None) -> _Listing:
    """Speech Commands: root/<word>/*.wav. The ten digit words are classes 0..9 and other words
    (and _background_noise_) are ignored. validation_list.txt and testing_list.txt name the held-out
    files relative to root; split="train" is every digit file in neither list."""
    files = [(path, label) for label, word in enumerate(SC09_WORDS) if (root / word).is_dir()
             for path in _audio_files(root / word, extensions)]  # fmt: skip
    if split is None:
        return _Listing(files, list(SC09_WORDS))
    lists = {name: root / name for name in SC09_SPLITS.values() if name}
    absent = [str(p) for p in lists.values() if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"split={split!r} needs the Speech Commands split lists, missing: {absent}")
    held_out = {
        name: {line.strip() for line in path.read_text().splitlines() if line.strip()} for name, path in lists.items()
    }
    relative = [(path.relative_to(root).as_posix(), path, label) for path, label in files]
    if split == "train":
        chosen = [(p, y) for rel, p, y in relative if not any(rel in names for names in held_out.values())]
    else:
        names = held_out[SC09_SPLITS[split]]  # type: ignore[index]
        chosen = [(p, y) for rel, p, y in relative if rel in names]
    return _Listing(chosen, list(SC09_WORDS), sorted(lists.values()))


def _list_nsynth(root: Path, label: str) -> _Listing:
    """NSynth: root/examples.json maps each note_str to its attributes; the audio is root/audio/<note_str>.wav.
    label="pitch" gives the MIDI pitch (128 classes), "instrument_family" the family 0..10."""
    index = root / "examples.json"
    if not index.is_file():
        raise FileNotFoundError(f"layout='nsynth' needs {index} (note_str -> attributes, as NSynth ships it)")
    examples = json.loads(index.read_text())
    files, missing = [], []
    for name in sorted(examples):
        if label not in examples[name]:
            raise ValueError(f"{index}: example {name!r} has no {label!r}; keys: {sorted(examples[name])}")
        path = root / "audio" / f"{name}.wav"
        if path.is_file():
            files.append((path, int(examples[name][label])))
        else:
            missing.append((str(path), f"listed in {index.name} but missing"))
    classes = [f"midi{p}" for p in range(128)] if label == "pitch" else list(NSYNTH_FAMILIES)
    return _Listing(files, classes, [index], missing)


def manifest_folder() -> Path:
    """Where manifest="auto" caches folder scans: $SCM_MM_CACHE/audio-manifests (default ~/.cache/scm-mm)."""
    return user_cache() / "audio-manifests"


def _content_key(root: Path, listing: _Listing, settings: dict[str, Any]) -> str:
    """sha256 of every listed file's relative path, size and mtime, the index files, and the settings
    that decide what a check finds. A changed, added or removed file gives another key."""
    stats = []
    for path in [p for p, _ in listing.files] + listing.index_files:
        st = path.stat()
        stats.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"version": MANIFEST_VERSION, "settings": settings, "files": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_file(
    path: Path, sample_rate: int, channels: int, min_rms: float
) -> tuple[str, int | str]:
    """Decode one file: ("ok", samples), ("nonfinite" | "silent", ""), or ("skipped", reason)."""
    try:
        wave, _ = load_audio(path, sample_rate=sample_rate, channels=channels)
    except AudioReadError as error:
        # load_audio refuses NaN/inf samples with this reason; such a file decodes, its content is bad
        return ("nonfinite", "") if error.reason.startswith("non-finite") else ("skipped", error.reason)
    except Exception as error:  # anything else from a decoder: report this file, go on with the rest
        return "skipped", f"unexpected {type(error).__name__} while reading: {error}"
    if wave.shape[-1] == 0:
        return "skipped", "decodes to no samples"
    if not torch.isfinite(wave).all():  # load_audio refuses these already; checked here too (cheap)
        return "nonfinite", ""
    if float(wave.double().pow(2).mean().sqrt()) < min_rms:
        return "silent", ""
    return "ok", int(wave.shape[-1])


class AudioFolder(Dataset):
    """Audio files on disk. Items are (wave (channels, samples) float32 at `sample_rate`, label).

    Layouts (labels -1 where there are none):
        folders   root/<class>/**/*.<ext>: one class per subfolder, in sorted order
        flat      root/**/*.<ext>, unlabelled
        ljspeech  root/wavs/<id>.wav for each line of root/metadata.csv, unlabelled
        sc09      Speech Commands: root/<word>/*.wav. The digit words zero..nine are classes 0..9 and
                  other words are ignored. split = "train" | "valid" | "test" follows
                  validation_list.txt and testing_list.txt; split=None takes every digit file.
        nsynth    root/audio/<note_str>.wav for each entry of root/examples.json. label="pitch" gives
                  MIDI classes 0..127, "instrument_family" gives the families 0..10 (NSYNTH_FAMILIES).

    Construction decodes every file once with io.load_audio, which also resamples and remixes channels.
    A file that fails to decode (corrupt, truncated, empty, not audio) is logged with its path and reason,
    recorded in `skipped` as (path, reason), and left out. So is any unexpected error from a decoder: one
    bad file never stops the scan. Clips with NaN/inf samples, or with RMS below `min_rms`, are
    counted in `dropped` and left out. One summary line is printed. `manifest` caches the outcome as JSON,
    keyed by the files' paths, sizes and mtimes and the settings, so a second construction decodes nothing.

    With `seconds` set, each item is cut or zero-padded to round(seconds * sample_rate) samples by
    io.fit_length. crop="random" draws a fresh window at every access, from torch's global generator
    (which DataLoader seeds per worker). Training sets (scm_mm.data.training_set) do not read those
    items: `random_views` has them cache each file's whole mel once and cut a fresh window, in mel
    frames, every time an item is drawn; the mel statistics (MelCodec.fit) are measured on the whole
    clips too. The metrics read a random-crop folder with crop="center" (`with_crop`), so their
    reference is the same at every evaluation. seconds=None keeps every clip whole, so items differ in
    length: use batch_size 1; a training set needs `seconds`.
    A file that decoded during the scan but fails later raises an error naming it (the folder changed).
    """

    def __init__(
        self,
        root: str | Path,                               # dataset folder
        sample_rate: int = 16000,                       # Hz; other rates are resampled by load_audio
        seconds: float | None = DEFAULT_SECONDS,        # crop/pad length; None: whole clips (batch size 1)
        channels: int = 1,                              # output channels (load_audio mixes down or copies)
        layout: str = "folders",                        # see LAYOUTS and the class docstring
        crop: str = "start",                            # "start", "center" or "random" (fit_length's mode)
        extensions: Sequence[str] = AUDIO_EXTENSIONS,   # file suffixes for folders / flat / sc09
        min_rms: float = 1e-4,                          # clips quieter than this (RMS) are dropped as silent
        manifest: str | Path | None = None,             # JSON file caching the scan; "auto": one in the user's
                                                        # cache (manifest_folder); None: always scan
        split: str | None = None,                       # sc09 only: "train", "valid", "test" or None (all)
        label: str | None = None,                       # nsynth only: "pitch" (default) or "instrument_family"
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"audio folder {self.root} does not exist or is not a directory")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if crop not in ("start", "center", "random"):
            raise ValueError(f"crop must be 'start', 'center' or 'random', got {crop!r}")
        if split is not None and (layout != "sc09" or split not in SC09_SPLITS):
            raise ValueError(f"split={split!r} applies only to layout='sc09', as one of {sorted(SC09_SPLITS)}")
        if layout == "nsynth":
            label = label or "pitch"
            if label not in ("pitch", "instrument_family"):
                raise ValueError(f"nsynth label must be 'pitch' or 'instrument_family', got {label!r}")
        elif label is not None:
            raise ValueError(f"label={label!r} applies only to layout='nsynth'; {layout!r} decides its own labels")
        self.sample_rate = int(sample_rate)
        self.seconds = seconds
        self.samples = None if seconds is None else round(seconds * sample_rate)
        self.channels = int(channels)
        self.layout, self.crop, self.split, self.label = layout, crop, split, label
        self.min_rms = float(min_rms)
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)

        listing = self._list()
        settings = {
            "layout": layout, "label": label, "split": split, "sample_rate": self.sample_rate,
            "channels": self.channels, "min_rms": self.min_rms, "extensions": list(self.extensions),
        }  # fmt: skip
        self.content_key = _content_key(self.root, listing, settings)
        if manifest == "auto":  # one manifest per set of files and settings
            manifest = manifest_folder() / f"{self.content_key[:32]}.json"
        scan = self._read_manifest(manifest)
        from_manifest = scan is not None
        if scan is None:
            scan = self._scan(listing)
            if manifest is not None:
                self._write_manifest(manifest, scan)
        self.files = [self.root / rel for rel, _, _ in scan["kept"]]
        self.labels = [label for _, label, _ in scan["kept"]]
        self.lengths = [n for _, _, n in scan["kept"]]  # samples per clip at sample_rate, before fit_length
        self.skipped: list[tuple[str, str]] = [tuple(x) for x in scan["skipped"]]  # type: ignore[misc]
        self.dropped: dict[str, int] = dict(scan["dropped"])
        self.classes = listing.classes
        self.num_classes = len(self.classes)
        self._summarise(len(listing.files) + len(listing.missing), from_manifest, manifest)
        if not self.files:
            raise ValueError(
                f"no usable audio under {self.root} (layout={layout!r}): {len(listing.files)} file(s) found, "
                f"{len(self.skipped)} unreadable, {self.dropped['nonfinite']} non-finite, "
                f"{self.dropped['silent']} silent (RMS < {self.min_rms:g})"
            )
        self.fingerprint = self._fingerprint()

    def midi_of_label(self, label: int) -> int | None:
        """The MIDI pitch of class `label` when the classes are pitches (nsynth with label="pitch": class k is
        MIDI k), so the metrics score pitch accuracy; None otherwise."""
        return int(label) if self.layout == "nsynth" and self.label == "pitch" else None

    def _fingerprint(self) -> str:
        return (
            f"audio-folder:{self.root.resolve()}:layout={self.layout}:label={self.label}:split={self.split}"
            f":sr={self.sample_rate}:samples={self.samples}:ch={self.channels}:crop={self.crop}"
            f":min_rms={self.min_rms:g}:n={len(self.files)}:files={self.content_key[:16]}"
        )

    def _list(self) -> _Listing:
        if self.layout == "folders":
            return _list_folders(self.root, self.extensions)
        if self.layout == "flat":
            return _list_flat(self.root, self.extensions)
        if self.layout == "ljspeech":
            return _list_ljspeech(self.root)
        if self.layout == "sc09":
            return _list_sc09(self.root, self.extensions, self.split)
        return _list_nsynth(self.root, self.label)  # type: ignore[arg-type]

    def _scan(self, listing: _Listing) -> dict[str, Any]:
        """Decode every listed file once; see the class docstring for what happens to bad ones."""
        kept, skipped = [], list(listing.missing)
        dropped = {"nonfinite": 0, "silent": 0}
        for path, reason in listing.missing:
            logger.warning("skipping %s: %s", path, reason)
        progress = tqdm(
            listing.files, desc=f"checking {self.root.name}", unit="file", leave=False,
            disable=len(listing.files) < _PROGRESS_FROM,
        )
        for path, label in progress:
            outcome, detail = _check_file(path, self.sample_rate, self.channels, self.min_rms)
            if outcome == "ok":
                kept.append((path.relative_to(self.root).as_posix(), label, detail))
            elif outcome == "skipped":
                logger.warning("skipping unreadable audio %s: %s", path, detail)
                skipped.append((str(path), str(detail)))
            else:
                logger.info("dropping %s clip %s", outcome, path)
                dropped[outcome] += 1
        return {"kept": kept, "skipped": skipped, "dropped": dropped}

    def _read_manifest(self, manifest: str | Path | None) -> dict[str, Any] | None:
        """The cached scan if `manifest` holds one for exactly these files and settings, else None."""
        if manifest is None or not Path(manifest).is_file():
            return None
        try:
            cached = json.loads(Path(manifest).read_text())
        except (OSError, ValueError) as error:
            logger.warning("ignoring unreadable manifest %s (%s); scanning again", manifest, error)
            return None
        if cached.get("version") != MANIFEST_VERSION or cached.get("key") != self.content_key:
            logger.info("manifest %s is for other files or settings; scanning again", manifest)
            return None
        return cached

    def _write_manifest(self, manifest: str | Path, scan: dict[str, Any]) -> None:
        path = Path(manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "key": self.content_key, "root": str(self.root),
                                   **scan}, indent=1))  # fmt: skip
        os.replace(tmp, path)  # atomic: a killed scan never leaves half a manifest

    def _summarise(self, found: int, from_manifest: bool, manifest: str | Path | None) -> None:
        source = f" (from manifest {manifest})" if from_manifest else ""
        print(
            f"AudioFolder {self.root} [{self.layout}]: {len(self.files)} of {found} clips usable; "
            f"{len(self.skipped)} unreadable skipped, {self.dropped['nonfinite']} non-finite and "
            f"{self.dropped['silent']} silent dropped{source}"
        )

    def __len__(self) -> int:
        return len(self.files)

    def whole(self, index: int) -> torch.Tensor:
        """The whole clip of item `index`: (channels, lengths[index]) float32."""
        path = self.files[index]
        try:
            return load_audio(path, sample_rate=self.sample_rate, channels=self.channels)[0]
        except AudioReadError as error:
            raise RuntimeError(
                f"{path} decoded when {self.root} was scanned but fails now ({error}): the folder changed; "
                "build the dataset again (with a fresh manifest)"
            ) from error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        wave = self.whole(index)
        if self.samples is not None:
            wave = fit_length(wave, self.samples, mode=self.crop)  # type: ignore[arg-type]
        return wave, self.labels[index]

    def with_crop(self, crop: str) -> AudioFolder:
        """The same clips cut another way ("start", "center" or "random"), without scanning again; e.g. a
        deterministic reference set for the metrics from a training set of random crops."""
        if crop not in ("start", "center", "random"):
            raise ValueError(f"crop must be 'start', 'center' or 'random', got {crop!r}")
        out = copy.copy(self)
        out.crop = crop
        out.fingerprint = out._fingerprint()
        return out

    def random_views(self, codec: Any) -> tuple[Dataset, View] | None:
        """scm_mm.data.training_set's hook for random crops (crop="random" with `seconds` set; else None):
        (`PaddedClips(self)`, cut `codec.spec.frames(samples)` frames at a random offset). The whole
        clips' mels are encoded and cached once, and every draw of an item cuts a fresh window from its
        mel; a window at frame offset k is the mel of the samples from k * hop on (up to the edge frames,
        which see the clip around the window where a crop would see padding). Clips shorter than the window
        are zero-padded on both sides, so the window places them at a random offset among zeros, as
        fit_length does."""
        if self.crop != "random" or self.samples is None:
            return None
        return PaddedClips(self), functools.partial(crop_frames, frames=codec.spec.frames(self.samples))


def crop_frames(x0: torch.Tensor, generator: torch.Generator, frames: int) -> torch.Tensor:
    """(..., T) -> (..., frames) at a uniformly random offset in [0, T - frames], drawn from `generator`."""
    if x0.shape[-1] < frames:
        raise ValueError(f"cannot cut {frames} frames from an item of {x0.shape[-1]}")
    offset = int(torch.randint(x0.shape[-1] - frames + 1, (), generator=generator))
    return x0[..., offset : offset + frames]


class PaddedClips(Dataset):
    """The whole clips of an AudioFolder, each zero-padded on both sides by what it lacks of the folder's
    `samples` (so any window of `samples` holds the clip, or lies inside it): the deterministic source of
    AudioFolder.random_views. Items (wave (channels, max(n, 2 * samples - n)), label)."""

    def __init__(self, folder: AudioFolder) -> None:
        if folder.samples is None:
            raise ValueError("PaddedClips needs an AudioFolder with `seconds` set")
        self.folder, self.samples = folder, folder.samples
        self.sample_rate, self.num_classes = folder.sample_rate, folder.num_classes
        self.fingerprint = f"{folder.fingerprint}:whole-clips-padded"

    @property
    def files(self) -> list[Path]:
        return self.folder.files

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        wave = self.folder.whole(index)
        gap = max(self.samples - wave.shape[-1], 0)
        return torch.nn.functional.pad(wave, (gap, gap)), self.folder.labels[index]


# -------------------------------------------------------------------------------- optional builders

# General MIDI program groups of eight -> NSynth instrument families (the nearest one; GM has no
# vocal or bass-synth split, pads and effects count as synth_lead, percussive and ethnic as mallet/string).
_GM_FAMILIES = (
    "keyboard", "mallet", "organ", "guitar", "bass", "string", "string", "brass",
    "reed", "flute", "synth_lead", "synth_lead", "synth_lead", "string", "mallet", "mallet",
)  # fmt: skip


def render_soundfont_notes(
    out_dir: str | Path,                                 # created if needed; gets audio/ and examples.json
    programs: Sequence[int] = (0, 24, 40, 73),           # GM programs: piano, nylon guitar, violin, flute
    pitches: Iterable[int] = range(48, 73),              # MIDI notes C3..C5
    velocities: Sequence[int] = (64, 100),               # MIDI velocities
    seconds: float = 2.0,                                # clip length; the key is released at 3/4 of it
    sample_rate: int = 16000,                            # Hz
) -> Path:
    """Render an NSynth-like folder (audio/<note_str>.wav + examples.json) from the General MIDI
    soundfont TimGM6mb.sf2 that pretty_midi ships, with tinysoundfont, offline.

    As in NSynth, each note is held for 3/4 of the clip and then released. The audio is the mean of the
    synth's two channels, written as 16-bit PCM. examples.json has NSynth's keys (pitch, velocity,
    instrument_family[_str], ...) plus "program" and "preset". Notes that render silent are left out.
    Read the folder with AudioFolder(out_dir, layout="nsynth", label="pitch" or "instrument_family").

    Licence: TimGM6mb.sf2 (Tim Brechbill) is GPL-2. Audio rendered from it may carry that licence, so
    never commit the rendered files; render them where they are needed. 4 programs x 25 pitches x
    2 velocities = 200 notes of 2 s take well under a second to render.
    Needs `pip install pretty_midi` and `pip install --no-deps tinysoundfont`. The --no-deps is
    there because tinysoundfont declares pyaudio, which is only for playback and often fails to build.
    """
    try:
        import importlib.resources

        import soundfile
        import tinysoundfont

        soundfont = importlib.resources.files("pretty_midi") / "TimGM6mb.sf2"
    except ImportError as error:
        raise ImportError(
            f"render_soundfont_notes needs pretty_midi and tinysoundfont ({error}); install them with\n"
            "    pip install pretty_midi\n    pip install --no-deps tinysoundfont"
        ) from error
    if not soundfont.is_file():
        raise FileNotFoundError(f"pretty_midi ships no TimGM6mb.sf2 at {soundfont}; reinstall pretty_midi")
    out = Path(out_dir)
    pitches = list(pitches)  # read once per program: a generator would play for the first program only
    (out / "audio").mkdir(parents=True, exist_ok=True)
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(str(soundfont))
    total = round(seconds * sample_rate)
    held = round(0.75 * total)
    examples: dict[str, dict[str, Any]] = {}
    silent = 0
    for program in programs:
        family = _GM_FAMILIES[program // 8]
        preset = synth.sfpreset_name(sfid, 0, program)
        instrument_str = f"{family}_synthetic_{program:03d}"
        for pitch in pitches:
            for velocity in velocities:
                synth.sounds_off()
                synth.program_select(0, sfid, 0, program)
                synth.noteon(0, pitch, velocity)
                on = np.frombuffer(synth.generate(held), np.float32)
                synth.noteoff(0, pitch)
                off = np.frombuffer(synth.generate(total - held), np.float32)
                wave = np.concatenate([on, off]).reshape(-1, 2).mean(axis=1)  # interleaved stereo -> mono
                if np.sqrt(np.mean(wave**2)) < 1e-4:
                    silent += 1
                    continue
                if np.abs(wave).max() > 1:
                    logger.warning("program %d pitch %d velocity %d clipped to [-1, 1]", program, pitch, velocity)
                name = f"{instrument_str}-{pitch:03d}-{velocity:03d}"
                soundfile.write(out / "audio" / f"{name}.wav", np.clip(wave, -1, 1), sample_rate, subtype="PCM_16")
                examples[name] = {
                    "note": len(examples), "note_str": name, "pitch": int(pitch), "velocity": int(velocity),
                    "sample_rate": sample_rate, "instrument": int(program), "instrument_str": instrument_str,
                    "instrument_family": NSYNTH_FAMILIES.index(family), "instrument_family_str": family,
                    "instrument_source": 2, "instrument_source_str": "synthetic", "qualities": [0] * 10,
                    "qualities_str": [], "program": int(program), "preset": preset,
                    "soundfont": "TimGM6mb.sf2 (GPL-2)",
                }  # fmt: skip
    if silent:
        logger.warning("%d notes rendered silent (outside their preset's range) and were left out", silent)
    (out / "examples.json").write_text(json.dumps(examples, indent=1))
    return out


def speak_digits(
    out_dir: str | Path,                                          # created if needed; gets <word>/ folders
    voices: Sequence[str] = ("en-us", "en-gb", "en-us+m3", "en-us+f2", "en-gb+m5", "en-us+f4"),  # espeak-ng -v
    speeds: Sequence[int] = (130, 165, 200),                      # words per minute (espeak-ng -s)
    pitches: Sequence[int] = (30, 50, 70),                        # 0..99 (espeak-ng -p)
    held_out: float = 0.1,                                        # fraction of speakers in each of valid, test
) -> Path:
    """Speak the ten digits with the espeak-ng binary into an SC09-like folder.

    Each (voice, speed, pitch) is one "speaker", so the defaults give 54 speakers x 10 digits = 540
    clips. The files are <word>/<speaker>_nohash_0.wav as in Speech Commands, where <speaker> is the
    first 8 hex digits of the sha1 of "voice|speed|pitch". espeak-ng writes 22.05 kHz 16-bit mono;
    AudioFolder resamples it when loading. Whole speakers are held out, as in Speech Commands: sorted by
    that hash, the first ceil(held_out * speakers) go to validation_list.txt and the next as many to
    testing_list.txt. Read the folder with AudioFolder(out_dir, layout="sc09", split=...).
    Needs espeak-ng on PATH (Debian/Ubuntu: apt install espeak-ng; macOS: brew install espeak-ng).
    """
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError(
            "speak_digits needs the espeak-ng program on PATH; install it with `apt install espeak-ng` "
            "(Debian/Ubuntu) or `brew install espeak-ng` (macOS)"
        )
    out = Path(out_dir)
    speakers = {}
    for voice in voices:
        for speed in speeds:
            for pitch in pitches:
                key = hashlib.sha1(f"{voice}|{speed}|{pitch}".encode()).hexdigest()[:8]
                speakers[key] = (voice, speed, pitch)
    for word in SC09_WORDS:
        (out / word).mkdir(parents=True, exist_ok=True)
        for key, (voice, speed, pitch) in speakers.items():
            path = out / word / f"{key}_nohash_0.wav"
            command = [binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    ranked = sorted(speakers)
    n = math.ceil(held_out * len(ranked)) if held_out > 0 else 0
    for name, chosen in (("validation_list.txt", ranked[:n]), ("testing_list.txt", ranked[n : 2 * n])):
        lines = [f"{word}/{key}_nohash_0.wav" for word in SC09_WORDS for key in chosen]
        (out / name).write_text("".join(line + "\n" for line in lines))
    return out


# -------------------------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Dataset]] = {
    "notes": SynthNotes,
    "folder": AudioFolder,
}


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """DATASETS[name](**kwargs), e.g. build_dataset("folder", root="sc09", layout="sc09", split="train")."""
    if name not in DATASETS:
        raise KeyError(f"unknown audio dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
