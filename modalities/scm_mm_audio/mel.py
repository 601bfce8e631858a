"""The mel-spectrogram every audio model and vocoder here agrees on: `MelSpec`, presets, `log_mel`.

A generator and its vocoder must compute mels the same way, to the last setting: a different log
base, clamp floor, fmax or filter norm turns even ground-truth mels into noise (hifi-gan #4, #115).
So every setting is a field of `MelSpec`, a spec is stored with every checkpoint, and a vocoder whose
spec differs in any field is refused with the list of fields (`check_specs`).

Presets match the common pretrained vocoders:

    hifigan_22k  22.05 kHz, 80 bins, 0-8 kHz, Slaney scale and norm, |STFT| with HiFi-GAN's 1e-9
                 inside the root, ln(clamp(x, 1e-5)), reflect padding of (n_fft - hop) / 2 and no
                 centring (jik876/hifi-gan meldataset.py; BigVGAN's *_fmax8k_* checkpoints)
    vocos_24k    24 kHz, 100 bins, 0-12 kHz, HTK scale, no filter norm, |STFT|, ln(clamp(x, 1e-7)),
                 centred frames (charactr/vocos-mel-24khz: torchaudio MelSpectrogram(power=1))
    small_16k    16 kHz, 64 bins, 0-8 kHz, Slaney scale and norm, centred frames: the embedded notes
                 and small datasets

Frame count: centred frames give 1 + samples // hop; uncentred (HiFi-GAN) padding gives
samples // hop. A vocoder turns T frames back into `spec.samples(T)` samples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torchaudio.functional as AF

from scm_mm.modality import check_state

CHOICES = {  # the values of MelSpec's Literal fields that log_mel computes
    "window": ("hann",),
    "mel_scale": ("slaney", "htk"),
    "mel_norm": ("slaney", "none"),
    "log": ("ln", "log10"),
    "pad_mode": ("reflect", "constant"),
}


@dataclass(frozen=True)
class MelSpec:
    """Every setting of waveform -> log-mel, so that two specs are equal only if the mels are."""

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    window: Literal["hann"] = "hann"      # periodic Hann, as torch.hann_window
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0
    mel_scale: Literal["slaney", "htk"] = "slaney"
    mel_norm: Literal["slaney", "none"] = "slaney"  # area-normalised triangles (librosa default) or none
    power: float = 1.0                    # 1: magnitude, 2: power spectrogram
    magnitude_eps: float = 0.0            # |X| = sqrt(re^2 + im^2 + eps) (HiFi-GAN: 1e-9)
    log: Literal["ln", "log10"] = "ln"
    clamp: float = 1e-5                   # log(max(mel, clamp)): the floor
    center: bool = True                   # centred frames; False: reflect-pad (n_fft - hop) / 2 (HiFi-GAN)
    pad_mode: Literal["reflect", "constant"] = "reflect"

    def __post_init__(self) -> None:
        # Specs come from user-editable configs and checkpoints: a value this code would compute differently
        # (log2, "Slaney", a Hamming window) is refused, so two equal specs always mean equal mels.
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"mel setting {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"mel setting {name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer becomes an int (JSON, equality)
        if not isinstance(self.center, bool):
            raise ValueError(f"mel setting center must be true or false, got {self.center!r}")
        if not self.power > 0 or not self.magnitude_eps >= 0:
            raise ValueError(f"need power > 0 and magnitude_eps >= 0, got {self.power} and {self.magnitude_eps}")
        if not self.center and (self.n_fft - self.hop_length) % 2:
            raise ValueError(f"uncentred frames pad (n_fft - hop_length) / 2 on each side, so n_fft - hop_length "
                             f"must be even; got {self.n_fft} - {self.hop_length}")  # fmt: skip
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} > n_fft {self.n_fft}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate / 2, got {self.fmin}, {self.fmax}, {self.sample_rate}"
            )
        if self.clamp <= 0:
            raise ValueError(f"clamp must be positive, got {self.clamp}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MelSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown mel settings {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def floor(self) -> float:
        """The log-mel of silence."""
        return math.log(self.clamp) if self.log == "ln" else math.log10(self.clamp)

    @property
    def min_samples(self) -> int:
        """The shortest clip `log_mel` frames: reflect padding needs more samples than it pads (n_fft / 2
        centred, (n_fft - hop) / 2 uncentred), and an uncentred frame needs a hop."""
        reflect = self.pad_mode == "reflect"
        if self.center:
            return self.n_fft // 2 + 1 if reflect else 1
        pad = (self.n_fft - self.hop_length) // 2
        return max(self.hop_length, pad + 1 if reflect else 1)

    def frames(self, samples: int) -> int:
        return samples // self.hop_length + (1 if self.center else 0)

    def samples(self, frames: int) -> int:
        return (frames - (1 if self.center else 0)) * self.hop_length


PRESETS: dict[str, MelSpec] = {
    "hifigan_22k": MelSpec(
        sample_rate=22050, n_fft=1024, hop_length=256, win_length=1024, n_mels=80, fmin=0.0, fmax=8000.0,
        mel_scale="slaney", mel_norm="slaney", power=1.0, magnitude_eps=1e-9, log="ln", clamp=1e-5, center=False,
    ),
    "vocos_24k": MelSpec(
        sample_rate=24000, n_fft=1024, hop_length=256, win_length=1024, n_mels=100, fmin=0.0, fmax=12000.0,
        mel_scale="htk", mel_norm="none", power=1.0, magnitude_eps=0.0, log="ln", clamp=1e-7, center=True,
    ),
    "small_16k": MelSpec(
        sample_rate=16000, n_fft=1024, hop_length=256, win_length=1024, n_mels=64, fmin=0.0, fmax=8000.0,
        mel_scale="slaney", mel_norm="slaney", power=1.0, magnitude_eps=0.0, log="ln", clamp=1e-5, center=True,
    ),
}  # fmt: skip


def mel_spec(spec: str | MelSpec | Mapping[str, Any], **overrides: Any) -> MelSpec:
    """A preset name, a spec or a dict of settings -> MelSpec, with fields overridden."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KeyError(f"unknown mel preset {spec!r}; presets: {sorted(PRESETS)}")
        base = PRESETS[spec].to_dict()
    elif isinstance(spec, MelSpec):
        base = spec.to_dict()
    else:
        base = dict(spec)
    return MelSpec.from_dict({**base, **overrides})


def check_specs(expected: MelSpec, found: MelSpec, what: str = "mel settings of the model and the vocoder") -> None:
    """Refuse a vocoder (or data) whose mel spec differs, listing every differing field."""
    check_state(expected.to_dict(), found.to_dict(), what)


def mel_filters(spec: MelSpec, device: torch.device | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters (torchaudio's, equal to librosa's for Slaney)."""
    return AF.melscale_fbanks(
        spec.n_fft // 2 + 1, spec.fmin, spec.fmax, spec.n_mels, spec.sample_rate,
        norm="slaney" if spec.mel_norm == "slaney" else None, mel_scale=spec.mel_scale,
    ).to(device)  # fmt: skip


def stft_magnitude(wave: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """(..., samples) -> |STFT|^power (..., n_fft // 2 + 1, frames), padded as the spec says."""
    if wave.shape[-1] < spec.min_samples:
        raise ValueError(f"a clip of {wave.shape[-1]} samples is too short for the mel spec: it needs at least "
                         f"{spec.min_samples} ({spec.n_fft}-point STFT, hop {spec.hop_length}, "
                         f"{'centred' if spec.center else 'uncentred'}, {spec.pad_mode} padding); pad or drop it")
    lead = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1]).float()
    if not spec.center:
        pad = (spec.n_fft - spec.hop_length) // 2
        x = torch.nn.functional.pad(x[:, None], (pad, pad), mode=spec.pad_mode)[:, 0]
    window = torch.hann_window(spec.win_length, device=x.device)
    z = torch.stft(
        x, spec.n_fft, spec.hop_length, spec.win_length, window=window, center=spec.center,
        pad_mode=spec.pad_mode, return_complex=True,
    )  # fmt: skip
    mag = torch.sqrt(z.real**2 + z.imag**2 + spec.magnitude_eps) if spec.magnitude_eps else z.abs()
    if spec.power != 1.0:
        mag = mag**spec.power
    return mag.reshape(*lead, *mag.shape[-2:])


def log_mel(wave: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """Waveform (..., samples) in [-1, 1] -> log-mel (..., n_mels, spec.frames(samples)), float32."""
    mag = stft_magnitude(wave, spec)
    mel = torch.einsum("...ft,fm->...mt", mag, mel_filters(spec, mag.device))
    mel = mel.clamp_min(spec.clamp)
    return mel.log() if spec.log == "ln" else mel.log10()


def mel_power(logmel: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """Inverse of the log: log-mel -> mel filterbank energies (|STFT|^power through the filters)."""
    return torch.exp(logmel) if spec.log == "ln" else torch.pow(10.0, logmel)
