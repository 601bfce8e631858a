"""Vocoder losses against direct computations, training (resume, learning), copy synthesis."""

import json

import librosa
import numpy as np
import pytest
import torch

from scm_mm_audio.mel import PRESETS, log_mel
from scm_mm_audio.vocoder_train import (
    VocoderOptions,
    copy_synthesis,
    mel_l1,
    multi_resolution_stft_loss,
    random_crops,
    train_vocoder,
    vocoder_lr,
)
from scm_mm_audio.vocos import Vocos, load_vocoder_dir

SPEC = PRESETS["small_16k"]


def note(seconds=0.5, f0=220.0, sample_rate=16000, seed=0):
    """A decaying harmonic note (float32, samples)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    k = np.arange(1, 8)[:, None]
    wave = (rng.uniform(0.2, 1, (7, 1)) / k * np.exp(-3 * k * t) * np.sin(2 * np.pi * f0 * k * t)).sum(0)
    return torch.from_numpy(0.5 * wave / np.abs(wave).max()).float()


class Clips:
    sample_rate, num_classes, fingerprint = 16000, 0, "test-clips"

    def __init__(self, waves):
        self.waves = waves

    def __len__(self):
        return len(self.waves)

    def __getitem__(self, i):
        return self.waves[i], -1


def numpy_stft_magnitude(x, n_fft, hop, win, eps):
    """|STFT| by hand: reflect-pad n_fft / 2, frames every hop, periodic Hann of win centred in n_fft."""
    x = np.pad(x, n_fft // 2, mode="reflect")
    window = np.zeros(n_fft)
    left = (n_fft - win) // 2
    window[left : left + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    starts = range(0, len(x) - n_fft + 1, hop)
    spectrum = np.stack([np.fft.rfft(x[s : s + n_fft] * window) for s in starts], axis=-1)
    return np.sqrt(np.maximum(spectrum.real**2 + spectrum.imag**2, eps))


def test_multi_resolution_stft_loss_against_numpy():
    rng = np.random.default_rng(0)
    wave = rng.standard_normal((2, 3000)) * 0.3
    wave_hat = wave + rng.standard_normal((2, 3000)) * 0.1
    resolutions = ((512, 128, 512), (256, 100, 200))  # win < n_fft too
    expected = 0.0
    for n_fft, hop, win in resolutions:
        mag = np.stack([numpy_stft_magnitude(w, n_fft, hop, win, 1e-7) for w in wave])
        mag_hat = np.stack([numpy_stft_magnitude(w, n_fft, hop, win, 1e-7) for w in wave_hat])
        sc = np.linalg.norm(mag - mag_hat) / np.linalg.norm(mag)  # Frobenius over the batch
        expected += sc + np.abs(np.log(mag) - np.log(mag_hat)).mean()
    expected /= len(resolutions)
    got = multi_resolution_stft_loss(torch.from_numpy(wave_hat), torch.from_numpy(wave), resolutions)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert multi_resolution_stft_loss(torch.from_numpy(wave), torch.from_numpy(wave)).item() == 0.0


def test_mel_l1_against_numpy_and_librosa_filters():
    wave, wave_hat = note(seed=0).double(), note(seed=1).double()
    filters = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0, fmax=8000)  # Slaney scale and norm

    def reference_log_mel(x):
        return np.log(np.maximum(filters @ numpy_stft_magnitude(x.numpy(), 1024, 256, 1024, 0.0), 1e-5))

    expected = np.abs(reference_log_mel(wave_hat) - reference_log_mel(wave)).mean()
    assert mel_l1(wave_hat, wave, SPEC).item() == pytest.approx(expected, rel=1e-4)


def test_random_crops():
    stereo = torch.stack([torch.arange(1000.0), -torch.arange(1000.0) + 2])  # mono = 1 everywhere
    short = torch.ones(1, 100) * 3
    data = Clips([stereo, short])
    crops = random_crops(data, 8, 300, torch.Generator().manual_seed(0))
    again = random_crops(data, 8, 300, torch.Generator().manual_seed(0))
    assert crops.shape == (8, 300) and torch.equal(crops, again)
    for row in crops:
        if row[0] == 1:  # from the stereo clip: channels averaged
            assert torch.all(row == 1)
        else:  # the short clip, zero-padded at the end
            assert torch.all(row[:100] == 3) and torch.all(row[100:] == 0)
    assert {1.0, 3.0} == {float(r[0]) for r in crops}


def test_lr_schedule():
    options = VocoderOptions(iters=100, lr=1e-3, warmup_iters=10)
    assert vocoder_lr(options, 0) == pytest.approx(1e-4)
    assert vocoder_lr(options, 10) == pytest.approx(1e-3)
    assert vocoder_lr(options, 55) == pytest.approx(5e-4)
    assert vocoder_lr(VocoderOptions(iters=100, lr_decay="none"), 99) == 5e-4


def tiny_vocoder():
    torch.manual_seed(0)
    return Vocos("small_16k", dim=16, intermediate_dim=32, num_layers=1)


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    data = Clips([note(seed=i)[None] for i in range(3)])
    options = VocoderOptions(iters=6, batch_size=2, segment_frames=6, ckpt_every=2, log_every=1, progress=False)
    full = train_vocoder(tiny_vocoder(), data, options, tmp_path / "full")

    killed = tiny_vocoder()
    first = train_vocoder(killed, data, options, tmp_path / "killed", stop_at=5)  # dies after iteration 5
    assert first.iteration == 5 and first.vocoder_dir is None
    assert not (tmp_path / "killed" / "vocoder").exists()
    resumed_model = tiny_vocoder()
    resumed = train_vocoder(resumed_model, data, options, tmp_path / "killed")  # from iter-4
    assert resumed.start_iteration == 4
    assert first.losses == full.losses[:5]
    assert resumed.losses == full.losses[4:]  # exactly, on the CPU

    final = load_vocoder_dir(tmp_path / "full" / "vocoder")
    for key, value in final.state_dict().items():
        assert torch.equal(value, load_vocoder_dir(resumed.vocoder_dir).state_dict()[key]), key
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["iter-000000004", "iter-000000006"]  # keep_last=2, no temporary folders
    lines = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[0]["train/loss"] == pytest.approx(full.losses[0])


def test_resume_refuses_another_vocoder(tmp_path):
    data = Clips([note()[None]])
    options = VocoderOptions(iters=2, batch_size=1, segment_frames=6, ckpt_every=1, progress=False)
    train_vocoder(tiny_vocoder(), data, options, tmp_path, stop_at=1)
    with pytest.raises(ValueError, match="segment_frames=4"):
        train_vocoder(tiny_vocoder(), data, VocoderOptions(segment_frames=4), tmp_path / "short")
    with pytest.raises(ValueError, match="'dim': 16"):
        train_vocoder(Vocos("small_16k", dim=8, intermediate_dim=32, num_layers=1), data, options, tmp_path)


def test_loss_decreases_on_one_clip(tmp_path):
    data = Clips([note(seconds=0.3)[None]])
    options = VocoderOptions(iters=50, batch_size=2, segment_frames=8, lr=2e-3, ckpt_every=50, progress=False)
    vocoder = tiny_vocoder()
    result = train_vocoder(vocoder, data, options, tmp_path)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.6 * first, (first, last)


def test_copy_synthesis_scores():
    class Oracle(torch.nn.Module):
        """Returns the clip whose mel it is given (a perfect vocoder)."""

        spec = SPEC

        def __init__(self, clips):
            super().__init__()
            self.clips = clips

        def forward(self, logmel):
            for clip in self.clips:
                if torch.equal(log_mel(clip[None], SPEC), logmel):
                    return clip[None, : SPEC.samples(logmel.shape[-1])]
            raise AssertionError("unknown mel")

    clips = [note(0.3, seed=0), note(0.41, seed=1)]  # different lengths, not whole hops
    scores = copy_synthesis(Oracle(clips), clips)
    assert scores["mel_l1"] == 0.0 and scores["mr_stft"] == 0.0
    if "pesq" in scores:  # the audio-metrics extra is installed: identical clips get PESQ's maximum, ~4.64
        assert scores["pesq"] > 4.5
    stereo = torch.stack([clips[0], clips[0]])[None]  # (B, channels, samples): channels averaged
    assert copy_synthesis(Oracle(clips), stereo)["mel_l1"] == 0.0

    vocoder = tiny_vocoder()
    scores = copy_synthesis(vocoder, torch.stack([clips[0], clips[0] * 0.5]))
    wave = clips[0][None]
    with torch.no_grad():
        out = vocoder(log_mel(wave, SPEC))
    expected = mel_l1(out, wave[:, : out.shape[-1]], SPEC).item()
    assert scores["mel_l1"] > 0 and scores["mr_stft"] > 0
    assert copy_synthesis(vocoder, wave)["mel_l1"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="n_mels"):
        copy_synthesis(vocoder, wave, spec=PRESETS["hifigan_22k"])
