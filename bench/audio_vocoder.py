"""The small Vocos on one CPU thread: how many iterations it needs to beat Griffin-Lim at copy synthesis.

    python bench/audio_vocoder.py --iters 2000 --out bench_out/vocoder   # about 6 minutes on one thread
    python bench/audio_vocoder.py --iters 200 --eval-every 50 --out /tmp/v  # a quick look

Data: synthetic notes at 16 kHz (a tiny synthesiser below: 1 s notes at MIDI pitches 48-84, sums of
harmonics up to 7.8 kHz with random spectral tilts and per-harmonic exponential decays, a 10 ms attack,
random onsets and peak levels). Training notes use seed 0, the held-out test notes seed 1.

The vocoder is the "small" Vocos preset on the small_16k mel spec, trained by `train_vocoder` (mel L1
x45 + multi-resolution STFT, AdamW, cosine decay over --iters) on one CPU thread. Every --eval-every
iterations the run stops (a checkpoint) and the test notes are copy-synthesised (real wave -> log-mel
-> vocoder -> wave): mel L1 (mean |log-mel difference|, ln units) and the MR-STFT distance
(spectral convergence + log-magnitude L1, three resolutions). The baseline is Griffin-Lim from the
same mels (torchaudio InverseMelScale, least squares, then torchaudio griffinlim, momentum 0.99) at
32 (torchaudio's default) and 128 iterations. Training time counts only the training calls, not the
evaluations. Vocoding speed is the median time of one 10 s clip on one thread.

Writes DIR/results.json, DIR/run/ (the training run; reruns resume it) and a few test notes as WAV
(original, Griffin-Lim, Vocos) in DIR/wav/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn

from scm_mm_audio.mel import MelSpec, mel_power, mel_spec
from scm_mm_audio.vocoder_train import VocoderOptions, copy_synthesis, train_vocoder
from scm_mm_audio.vocos import VOCOS_PRESETS, vocos_preset


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="training iterations (the cosine decay ends here)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--preset", default="small", choices=sorted(VOCOS_PRESETS))
    p.add_argument("--eval-every", type=int, default=200, help="iterations between copy-synthesis evaluations")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--segment-frames", type=int, default=32, help="training crops, in mel frames")
    p.add_argument("--lr", type=float, default=4e-3, help="Vocos uses 5e-4 at 13.5M parameters")
    p.add_argument("--mel-weight", type=float, default=45.0)
    p.add_argument("--stft-weight", type=float, default=15.0)
    p.add_argument("--train-notes", type=int, default=512)
    p.add_argument("--test-notes", type=int, default=16)
    p.add_argument("--gl-iters", type=int, nargs="+", default=[32, 128], help="Griffin-Lim iterations")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def synth_notes(count: int, seed: int, sample_rate: int = 16000, seconds: float = 1.0) -> torch.Tensor:
    """(count, samples) harmonic notes: MIDI 48-84, harmonics below 7.8 kHz with amplitudes k^-tilt times
    random factors, each decaying exponentially (faster for higher harmonics), random onset and peak."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    notes = np.zeros((count, n), dtype=np.float32)
    for i in range(count):
        f0 = 440.0 * 2 ** ((rng.integers(48, 85) - 69) / 12)
        k = np.arange(1, int(7800 // f0) + 1)
        amps = rng.uniform(0.2, 1.0, k.size) * k ** -rng.uniform(0.5, 2.0)
        decays = rng.uniform(1.0, 6.0) * (1 + rng.uniform(0.05, 0.4) * (k - 1))  # 1/s
        onset = int(rng.uniform(0.0, 0.2) * sample_rate)
        t = np.arange(n - onset) / sample_rate
        partials = amps[:, None] * np.exp(-decays[:, None] * t) * np.sin(
            2 * np.pi * f0 * k[:, None] * t + rng.uniform(0, 2 * np.pi, k.size)[:, None]
        )
        note = partials.sum(0) * np.minimum(t / 0.01, 1.0)  # 10 ms attack
        notes[i, onset:] = note / np.abs(note).max() * rng.uniform(0.1, 0.9)
    return torch.from_numpy(notes)


class Notes:
    """A raw dataset of notes: items (wave (1, samples), label -1)."""

    num_classes = 0

    def __init__(self, waves: torch.Tensor, sample_rate: int, seed: int) -> None:
        self.waves, self.sample_rate = waves, sample_rate
        self.fingerprint = f"synth-notes-{len(waves)}-seed{seed}-{sample_rate}hz"

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.waves[index][None], -1


class TorchaudioGriffinLim(nn.Module):
    """The baseline as a vocoder: log-mel -> mel energies -> least-squares linear magnitudes -> Griffin-Lim."""

    def __init__(self, spec: MelSpec, n_iter: int) -> None:
        super().__init__()
        self.spec, self.n_iter = spec, n_iter
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_stft=spec.n_fft // 2 + 1, n_mels=spec.n_mels, sample_rate=spec.sample_rate, f_min=spec.fmin,
            f_max=spec.fmax, norm="slaney" if spec.mel_norm == "slaney" else None, mel_scale=spec.mel_scale,
        )  # fmt: skip
        self.register_buffer("window", torch.hann_window(spec.win_length))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        linear = self.inverse_mel(mel_power(logmel, self.spec))  # |STFT|^power, least squares, clamped at 0
        s = self.spec
        return torchaudio.functional.griffinlim(
            linear, self.window, s.n_fft, s.hop_length, s.win_length, s.power, self.n_iter, 0.99,
            s.samples(logmel.shape[-1]), True,
        )  # fmt: skip


def vocoding_speed(vocoder: nn.Module, spec: MelSpec, seconds: float = 10.0, repeats: int = 10) -> float:
    """x real time: seconds of audio per second of wall clock, one clip at a time."""
    logmel = torch.randn(1, spec.n_mels, spec.frames(int(seconds * spec.sample_rate))) - 5
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            vocoder(logmel)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return seconds / statistics.median(times)


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = mel_spec(VOCOS_PRESETS[args.preset]["spec"])
    train_set = Notes(synth_notes(args.train_notes, seed=0, sample_rate=spec.sample_rate), spec.sample_rate, 0)
    test = synth_notes(args.test_notes, seed=1, sample_rate=spec.sample_rate)

    rows: list[dict[str, object]] = []
    baselines: dict[int, dict[str, float]] = {}
    for n_iter in args.gl_iters:
        torch.manual_seed(0)  # Griffin-Lim starts from random phases
        gl = TorchaudioGriffinLim(spec, n_iter)
        baselines[n_iter] = copy_synthesis(gl, test)
        speed = vocoding_speed(gl, spec)  # as the vocoder's: vocoding alone, not the scoring copy_synthesis does
        rows.append({"vocoder": f"Griffin-Lim {n_iter} it", "iters": "-", "train_s": "-", **baselines[n_iter],
                     "x_realtime": speed})  # fmt: skip

    torch.manual_seed(0)
    vocoder = vocos_preset(args.preset)
    params = sum(p.numel() for p in vocoder.parameters())
    speed = vocoding_speed(vocoder, spec)
    options = VocoderOptions(
        iters=args.iters, batch_size=args.batch_size, segment_frames=args.segment_frames, lr=args.lr,
        mel_weight=args.mel_weight, stft_weight=args.stft_weight, ckpt_every=args.eval_every, log_every=50,
        keep_last=1, progress=False,
    )  # fmt: skip
    run_dir = args.out / "run"
    train_seconds, beats = 0.0, None
    best_gl = {key: min(b[key] for b in baselines.values()) for key in ("mel_l1", "mr_stft")}
    for stop in [*range(args.eval_every, args.iters, args.eval_every), args.iters]:
        result = train_vocoder(vocoder, train_set, options, run_dir, stop_at=stop)
        train_seconds += result.seconds
        scores = copy_synthesis(vocoder.eval(), test)
        rows.append({"vocoder": f"Vocos {args.preset}", "iters": stop, "train_s": round(train_seconds, 1),
                     **scores, "x_realtime": speed})  # fmt: skip
        if beats is None and all(scores[k] < best_gl[k] for k in best_gl):
            beats = {"iters": stop, "train_s": round(train_seconds, 1)}
        print(f"iteration {stop}: train {train_seconds:.0f} s, mel L1 {scores['mel_l1']:.4f}, "
              f"MR-STFT {scores['mr_stft']:.4f}", flush=True)  # fmt: skip

    wav_dir = args.out / "wav"
    wav_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    gl = TorchaudioGriffinLim(spec, max(args.gl_iters))
    from scm_mm_audio.mel import log_mel  # noqa: PLC0415

    with torch.no_grad():
        for i in range(min(4, len(test))):
            logmel = log_mel(test[i : i + 1], spec)
            for name, wave in (("original", test[i]), ("griffinlim", gl(logmel)[0]), ("vocos", vocoder(logmel)[0])):
                sf.write(wav_dir / f"note{i}-{name}.wav", wave.numpy(), spec.sample_rate)

    header = f"{'vocoder':<22}{'iters':>7}{'train s':>9}{'mel L1':>9}{'MR-STFT':>9}{'x RT':>8}"
    print(f"\n{args.preset} Vocos: {params / 1e6:.3f}M parameters, {args.threads} thread(s); "
          f"{args.test_notes} held-out notes, small_16k mels\n{header}")  # fmt: skip
    for r in rows:
        print(f"{r['vocoder']:<22}{r['iters']!s:>7}{r['train_s']!s:>9}{r['mel_l1']:>9.4f}{r['mr_stft']:>9.4f}"
              f"{r['x_realtime']:>8.0f}")  # fmt: skip
    verdict = (f"beats the best Griffin-Lim on both metrics from iteration {beats['iters']} "
               f"({beats['train_s']} s of training)" if beats else "does not beat Griffin-Lim on both metrics")
    print(f"\nVocos {verdict}")
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "params": params, "rows": rows, "beats_gl": beats},
        indent=2,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
