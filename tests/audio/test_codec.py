"""The mel codec and Griffin-Lim, checked against analytic mel scales, exact inverses and round trips.

Griffin-Lim round trip (64 frames, n_iter=32). Metrics: the mean |log-mel error| over the bins within
60 dB of the clip's peak, in nats (bins further down hold leakage and numerical noise, whose log error
says nothing about the sound), and the spectral convergence ||mel' - mel||_F / ||mel||_F of the mel
energies. Worst over 4 seeds x 2 amplitudes, measured when these tests were written:

    small_16k    harmonic tone 0.43 / 0.107    chord 0.31 / 0.092
    hifigan_22k  harmonic tone 0.24 / 0.068    chord 0.23 / 0.099
    vocos_24k    harmonic tone 0.27 / 0.095    chord 0.17 / 0.121

Thresholds leave about 30 % headroom: Griffin-Lim is non-convex and a change of the last bit of the
input moves these numbers by a few hundredths. Its random starting phase (n_iter=0) gives 0.72-0.85,
and Griffin-Lim must remove at least 40 % of that (measured: 49-80 %).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from scm_mm.data import training_set
from scm_mm_audio.codec import STD_FLOOR_FRACTION, GriffinLim, MelCodec, codec_from_state, istft, stft
from scm_mm_audio.data import AudioFolder
from scm_mm_audio.mel import PRESETS, log_mel, mel_spec, stft_magnitude

torch.set_num_threads(1)


def harmonic_tone(sample_rate: int, samples: int, f0: float = 220.0, harmonics: int = 7) -> torch.Tensor:
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    x = sum((0.25 / k) * torch.sin(2 * math.pi * f0 * k * t + k) for k in range(1, harmonics + 1))
    return x.float()


def chord(sample_rate: int, samples: int) -> torch.Tensor:
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    return sum(0.2 * torch.sin(2 * math.pi * f * t + f) for f in (261.63, 329.63, 392.0, 523.25)).float()


def mel_errors(original: torch.Tensor, rebuilt: torch.Tensor, spec) -> tuple[float, float]:
    """(mean |log-mel error| over bins within 60 dB of the peak, spectral convergence of the mel energies)."""
    a, b = log_mel(original, spec), log_mel(rebuilt, spec)
    assert spec.log == "ln" and spec.power == 1.0  # all presets: 60 dB of magnitude is 3 ln(10) nats
    loud = a > a.max() - 3 * math.log(10)
    convergence = (b.exp() - a.exp()).norm() / a.exp().norm()
    return float((b - a)[loud].abs().mean()), float(convergence)


# --- mel scale ---------------------------------------------------------------------------------


def mel_of(f: float, scale: str) -> float:
    """Analytic mel scales: HTK (O'Shaughnessy) and Slaney's (linear below 1 kHz, log above)."""
    if scale == "htk":
        return 2595.0 * math.log10(1.0 + f / 700.0)
    return f / (200.0 / 3) if f < 1000 else 15.0 + math.log(f / 1000.0) / (math.log(6.4) / 27.0)


def hz_of(m: float, scale: str) -> float:
    if scale == "htk":
        return 700.0 * (10 ** (m / 2595.0) - 1.0)
    return m * (200.0 / 3) if m < 15.0 else 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_pure_tone_peaks_at_its_mel_bin(preset):
    spec = PRESETS[preset]
    lo, hi = mel_of(spec.fmin, spec.mel_scale), mel_of(spec.fmax, spec.mel_scale)
    for k in (spec.n_mels // 4, spec.n_mels // 2, 3 * spec.n_mels // 4):
        centre = hz_of(lo + (k + 1) * (hi - lo) / (spec.n_mels + 1), spec.mel_scale)  # bin k's triangle apex
        t = torch.arange(spec.sample_rate // 4, dtype=torch.float64) / spec.sample_rate
        mel = log_mel((0.5 * torch.sin(2 * math.pi * centre * t)).float(), spec)
        assert int(mel[:, 5:-5].mean(1).argmax()) == k, (preset, k, centre)


# --- STFT pair and Griffin-Lim -----------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_stft_frames_as_log_mel_and_istft_inverts_it(preset):
    spec = PRESETS[preset]
    frames = 20
    x = torch.randn(2, spec.samples(frames), generator=torch.Generator().manual_seed(0)) * 0.3
    z = stft(x, spec)
    assert z.shape == (2, spec.n_fft // 2 + 1, frames)
    magnitude = (z.real.square() + z.imag.square() + spec.magnitude_eps).sqrt()
    torch.testing.assert_close(magnitude, stft_magnitude(x, spec), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(istft(z, spec), x, atol=1e-5, rtol=0)
    if spec.center:  # the same least-squares inverse as torch's
        window = torch.hann_window(spec.win_length)
        reference = torch.istft(z, spec.n_fft, spec.hop_length, spec.win_length, window, length=x.shape[-1])
        torch.testing.assert_close(istft(z, spec), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("frames", [6, 17])
def test_griffin_lim_output_length(preset, frames):
    spec = PRESETS[preset]
    vocoder = GriffinLim(preset, n_iter=2)
    wave = vocoder(torch.full((3, spec.n_mels, frames), spec.floor) + torch.rand(3, spec.n_mels, frames))
    assert wave.shape == (3, spec.samples(frames))
    assert wave.dtype == torch.float32 and torch.isfinite(wave).all()


@pytest.mark.parametrize(
    ("preset", "signal", "max_error", "max_convergence"),
    [
        ("small_16k", harmonic_tone, 0.55, 0.14),
        ("small_16k", chord, 0.40, 0.12),
        ("hifigan_22k", harmonic_tone, 0.32, 0.09),
        ("hifigan_22k", chord, 0.30, 0.13),
        ("vocos_24k", harmonic_tone, 0.35, 0.125),
        ("vocos_24k", chord, 0.23, 0.16),
    ],
)
def test_griffin_lim_round_trip(preset, signal, max_error, max_convergence):
    spec = PRESETS[preset]
    x = signal(spec.sample_rate, spec.samples(64))
    mel = log_mel(x, spec)[None]
    error, convergence = mel_errors(x, GriffinLim(spec)(mel)[0], spec)
    start_error, _ = mel_errors(x, GriffinLim(spec, n_iter=0)(mel)[0], spec)
    assert error < max_error and convergence < max_convergence, (error, convergence)
    assert error < 0.6 * start_error, (error, start_error)


def test_nnls_inverse_matches_the_mel_energies_better_than_the_pseudo_inverse():
    spec = PRESETS["small_16k"]
    mel = log_mel(harmonic_tone(spec.sample_rate, spec.samples(32)), spec)[None]
    above = mel > spec.floor + 1e-3

    def miss(nnls_steps: int) -> float:
        vocoder = GriffinLim(spec, nnls_steps=nnls_steps)
        magnitude = vocoder.linear_magnitude(mel)
        rebuilt = (vocoder.filters.T @ magnitude).clamp_min(spec.clamp).log()
        assert (magnitude >= 0).all()
        return float((rebuilt - mel)[above].abs().mean())

    nnls, pinv = miss(50), miss(0)  # measured 0.03 and 0.98 nats
    assert nnls < 0.1 and nnls < pinv / 5, (nnls, pinv)


@pytest.mark.parametrize("preset", ["small_16k", "hifigan_22k"])  # centred and uncentred frames
def test_griffin_lim_output_is_aligned_with_the_input(preset):
    spec = PRESETS[preset]
    n = spec.samples(48)
    x = torch.zeros(n)
    t = torch.arange(n) / spec.sample_rate
    burst = slice(n // 3, n // 3 + n // 5)  # a tone burst: its envelope fixes the time axis
    x[burst] = 0.5 * torch.sin(2 * math.pi * 440 * t[burst])
    y = GriffinLim(spec)(log_mel(x, spec)[None])[0]

    def envelope(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool1d(w.square()[None, None], 64, 16)[0, 0]

    a, b = envelope(x), envelope(y)
    lags = range(-24, 25)  # in steps of 16 samples: +-384
    score = [float((a[max(0, -k) : len(a) - max(0, k)] * b[max(0, k) : len(b) - max(0, -k)]).sum()) for k in lags]
    lag = 16 * list(lags)[max(range(len(score)), key=score.__getitem__)]
    assert abs(lag) <= spec.hop_length // 4, lag  # a half-hop framing error would show as 128 samples


def test_griffin_lim_is_deterministic_and_batch_independent():
    spec = PRESETS["small_16k"]
    clips = torch.stack([harmonic_tone(16000, spec.samples(24)), chord(16000, spec.samples(24))])
    mel = log_mel(clips, spec)
    vocoder = GriffinLim(spec, n_iter=8)
    both = vocoder(mel)
    torch.testing.assert_close(vocoder(mel), both, atol=0, rtol=0)
    # Batch size changes the FFTs' float32 rounding, which 8 nonlinear iterations grow to ~1e-5; a leak between
    # clips would be of the signal's order.
    torch.testing.assert_close(vocoder(mel[1:]), both[1:], atol=2e-5, rtol=0)
    assert (GriffinLim(spec, n_iter=8, seed=1)(mel) - both).abs().max() > 1e-3
    assert len(vocoder.state_dict()) == 0  # weight-free


# --- MelCodec ----------------------------------------------------------------------------------


class Clips:
    """A raw dataset of tones below 2 kHz with smooth fades (so the top mel bins stay at the clamp floor:
    an abrupt start or end would splash energy over every bin)."""

    def __init__(self, n: int = 12, samples: int = 16000 // 4, channels: int = 1) -> None:
        g = torch.Generator().manual_seed(0)
        t = torch.arange(samples) / 16000
        fade = torch.sin(torch.linspace(0, math.pi, samples)).square()  # zero value and slope at both ends
        self.items = []
        for i in range(n):
            f = 110 * 2 ** (float(torch.rand(1, generator=g)) * 4)
            amplitude = 0.05 + 0.5 * float(torch.rand(1, generator=g))
            wave = amplitude * fade * torch.sin(2 * math.pi * f * t + torch.arange(channels)[:, None])
            self.items.append((wave.float(), i % 3))
        self.accessed: list[int] = []
        self.num_classes, self.sample_rate, self.fingerprint = 3, 16000, "test-clips"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        self.accessed.append(i)
        return self.items[i]


def test_fit_normalises_each_bin_to_sigma_d():
    data = Clips()
    codec = MelCodec(sigma_d=0.5).fit(data, batch_size=5)
    x0 = codec.encode(torch.stack([w for w, _ in data.items]))  # (B, 1, n_mels, T)
    values = x0[:, 0].double().transpose(0, 1).flatten(1)  # (n_mels, B * T): per bin, all frames
    raw = log_mel(torch.stack([w for w, _ in data.items]), codec.spec)[:, 0].double().transpose(0, 1).flatten(1)
    raw_std = raw.std(1, unbiased=False)
    floor = STD_FLOOR_FRACTION * float(raw_std.square().mean().sqrt())
    live = raw_std > floor
    assert 0 < int(live.sum()) < codec.spec.n_mels  # both kinds of bin are exercised
    torch.testing.assert_close(values.mean(1), torch.zeros(codec.spec.n_mels, dtype=torch.float64), atol=1e-4, rtol=0)
    live_std = values[live].std(1, unbiased=False)
    torch.testing.assert_close(live_std, torch.full_like(live_std, 0.5), atol=1e-4, rtol=0)
    assert (values[~live].std(1, unbiased=False) < 0.5 * 1.0001).all()  # floored bins: below sigma_d
    dead_std = torch.tensor(codec.std)[~live]
    torch.testing.assert_close(dead_std, torch.full_like(dead_std, floor), rtol=1e-5, atol=0)


def test_fit_uses_evenly_spaced_items_and_names_a_bad_one():
    data = Clips(n=10)
    MelCodec().fit(data, max_items=4)
    assert data.accessed == [0, 2, 5, 7]
    data.items[7] = (data.items[7][0].clone().index_fill_(1, torch.tensor([3]), float("nan")), 0)
    with pytest.raises(ValueError, match="item 7"):
        MelCodec().fit(data, max_items=4)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"log": "log2"}, "log must be one of"),            # was computed as log10
        ({"mel_norm": "Slaney"}, "mel_norm must be one of"),  # was no norm at all
        ({"window": "hamming"}, "window must be one of"),   # was Hann
        ({"pad_mode": "zeros"}, "pad_mode must be one of"),
        ({"hop_length": 0}, "hop_length must be a positive integer"),
        ({"n_mels": 64.5}, "n_mels must be a positive integer"),
        ({"center": "false"}, "center must be true or false"),
        ({"power": 0.0}, "power > 0"),
        ({"center": False, "hop_length": 255}, "n_fft - hop_length must be even"),  # frames() off by one
    ],
)
def test_a_spec_refuses_settings_it_would_compute_otherwise(setting, message):
    with pytest.raises(ValueError, match=message):
        mel_spec("small_16k", **setting)
    assert mel_spec("small_16k", n_mels=np.int64(64)) == PRESETS["small_16k"]  # numpy integers are ints
    assert type(mel_spec("small_16k", n_mels=np.int64(64)).n_mels) is int


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_min_samples_is_the_shortest_clip_log_mel_frames(preset, pad_mode):
    spec = mel_spec(preset, pad_mode=pad_mode)
    assert log_mel(torch.randn(2, spec.min_samples), spec).shape[-1] == spec.frames(spec.min_samples)
    n = spec.min_samples
    if n > 1:
        with pytest.raises(ValueError, match=rf"{n - 1} samples is too short .* at least {n}"):
            log_mel(torch.randn(2, n - 1), spec)


def test_fit_leaves_out_a_too_short_clip_naming_its_file(tmp_path, caplog):
    t = np.arange(16000) / 16000
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a/tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 16000)
    sf.write(tmp_path / "a/click.wav", 0.5 * np.sin(2 * np.pi * 440 * t[:100]), 16000)  # 100 samples < 513
    whole = AudioFolder(tmp_path, seconds=None)
    with caplog.at_level("WARNING", logger="scm_mm_audio.codec"):
        codec = MelCodec().fit(whole)
    assert "click.wav" in caplog.text and "100 samples" in caplog.text
    only_tone = torch.tensor(MelCodec().fit([(whole[1][0], 0)]).mean)
    torch.testing.assert_close(torch.tensor(codec.mean), only_tone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"AudioFolder's items differ in shape .*fixed length"):
        training_set(whole, codec)  # whole clips of unequal lengths: no tensor to train on
    padded = AudioFolder(tmp_path, seconds=0.25)  # the click zero-padded to 4000 samples: fine
    assert training_set(padded, codec)[0][0].shape == (1, 64, 16)
    with pytest.raises(ValueError, match="no item of the dataset is long enough"):
        MelCodec().fit([(torch.zeros(1, 100), 0)])


@pytest.mark.parametrize("layout", ["2d", "1d"])
def test_encode_to_mel_round_trip(layout):
    data = Clips(n=6, channels=2)
    codec = MelCodec(layout=layout, channels=2).fit(data)
    wave = torch.stack([w for w, _ in data.items])  # (6, 2, samples)
    x0 = codec.encode(wave)
    frames = codec.spec.frames(wave.shape[-1])
    expected_shape = (6, 2, 64, frames) if layout == "2d" else (6, 128, frames)
    assert x0.shape == expected_shape
    torch.testing.assert_close(codec.to_mel(x0), log_mel(wave, codec.spec), atol=1e-5, rtol=1e-6)
    if layout == "1d":  # channel-major rows: the 2-D layout flattened
        flat = MelCodec(layout="2d", channels=2, mean=codec.mean, std=codec.std).encode(wave).flatten(1, 2)
        torch.testing.assert_close(x0, flat, atol=0, rtol=0)


class RecordingVocoder(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.spec, self.calls = spec, []

    def forward(self, logmel):
        self.calls.append(logmel.clone())
        return torch.full((logmel.shape[0], self.spec.samples(logmel.shape[-1])), 2.0)


def test_decode_runs_the_vocoder_per_channel_and_clamps():
    data = Clips(n=3, channels=2)
    codec = MelCodec(channels=2, layout="1d").fit(data)
    vocoder = RecordingVocoder(codec.spec)
    x0 = codec.encode(torch.stack([w for w, _ in data.items]))
    wave = codec.with_vocoder(vocoder).decode(x0)
    mel = codec.to_mel(x0)
    assert wave.shape == (3, 2, codec.spec.samples(x0.shape[-1])) and float(wave.max()) == 1.0
    assert len(vocoder.calls) == 2
    for c in range(2):
        torch.testing.assert_close(vocoder.calls[c], mel[:, c], atol=0, rtol=0)


def test_griffin_lim_decode_keeps_the_length_and_the_sound():
    data = Clips(n=4)
    codec = MelCodec().fit(data)
    frames = codec.frames_for(0.25)
    assert frames == 1 + 4000 // 256
    wave = torch.stack([w for w, _ in data.items])[..., : codec.spec.samples(frames)]
    decoded = codec.decode(codec.encode(wave))
    assert decoded.shape == wave.shape and decoded.abs().max() <= 1
    error, _ = mel_errors(wave[:, 0], decoded[:, 0], codec.spec)
    assert error < 0.5, error


def test_state_round_trip_and_refusals():
    data = Clips(n=4)
    with pytest.raises(ValueError, match="16000 Hz audio but the mel spec expects 22050 Hz"):
        MelCodec("hifigan_22k").fit(data)
    data.sample_rate = 22050  # test signals: call them 22.05 kHz audio
    codec = MelCodec("hifigan_22k", sigma_d=0.7, layout="1d").fit(data)
    state = json.loads(json.dumps(codec.state()))
    assert set(state) == {"type", "spec", "sigma_d", "layout", "channels", "mean", "std"}
    rebuilt = codec_from_state(state)
    wave = torch.stack([w for w, _ in data.items])
    torch.testing.assert_close(rebuilt.encode(wave), codec.encode(wave), atol=0, rtol=0)
    assert rebuilt.state() == state
    with pytest.raises(ValueError, match="'pixels'"):
        codec_from_state({**state, "type": "pixels"})
    with pytest.raises(ValueError, match="missing fields \\['std'\\]"):
        codec_from_state({k: v for k, v in state.items() if k != "std"})


def test_with_vocoder_refuses_a_different_spec_naming_each_field():
    codec = MelCodec("small_16k")
    other = GriffinLim(mel_spec("small_16k", fmax=7600.0, n_mels=80), n_iter=1)
    with pytest.raises(ValueError) as info:
        codec.with_vocoder(other)
    message = str(info.value)
    assert "fmax: 8000.0 != 7600.0" in message and "n_mels: 64 != 80" in message and "2 field(s)" in message
    with pytest.raises(ValueError, match="n_mels"):
        MelCodec("small_16k", vocoder=other)
    same = GriffinLim("small_16k", n_iter=1)
    assert codec.with_vocoder(same).vocoder is same and codec.vocoder is not same


def test_encode_refuses_an_unfitted_codec_and_wrong_channels():
    with pytest.raises(ValueError, match="not fitted"):
        MelCodec().encode(torch.zeros(1, 1, 4096))
    codec = MelCodec(mean=[0.0] * 64, std=[1.0] * 64)
    with pytest.raises(ValueError, match="\\(B, 1, samples\\)"):
        codec.encode(torch.zeros(1, 2, 4096))
    with pytest.raises(ValueError, match="64"):
        MelCodec(mean=[0.0] * 63, std=[1.0] * 63)
