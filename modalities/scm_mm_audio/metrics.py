"""Offline audio metrics: a classifier for the Frechet audio distance and IS, pitch accuracy, real-time factor.

- `AudioClassifier`: the SC09 recipe (WaveGAN, DiffWave, SaShiMi): a small CNN over log-mels trained on
  the dataset itself (`train_audio_classifier`); its penultimate layer gives the features of the Frechet
  audio distance and precision/recall, its logits the Inception Score. No VGGish / PANN / CLAP weights,
  so nothing is downloaded. Numbers are comparable only between runs that use the same classifier folder,
  and not with published SC09 / NSynth numbers.
- `evaluate_audio`: {"fad", "is_mean", "is_std", "precision", "recall"} of generated waves against
  reference waves or their cached features, like scm_mm_image.metrics.evaluate_images.
- `estimate_pitch` / `pitch_accuracy`: pYIN (Mauch & Dixon 2014, via librosa) median pitch per clip, and
  the fraction of clips whose pitch is the target's (GANSynth's "pitch accuracy", with pYIN in place of a
  pitch classifier, so it needs no training).
- `real_time_factor`: wall time / seconds of audio produced.

The distances themselves live in the core (`scm_mm.metrics`) and see only features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import librosa
import numpy as np
import scipy.signal
import torch
from torch import nn

from scm_mm.metrics import FeatureStats, frechet_distance, median_seconds
from scm_mm.metrics.classifier import extract_features, feature_scores, fit_classifier
from scm_mm.train.checkpoint import load_module_folder, save_module_folder

from .mel import MelSpec, log_mel, mel_spec

# ------------------------------------------------------------------------------------------ classifier


def _mono(waves: torch.Tensor, what: str = "waves") -> torch.Tensor:
    """Float (B, samples) or (B, channels, samples) -> (B, samples), the channels averaged: the classifier
    hears a stereo run's clips (and its reference's, on which it is trained) mixed down."""
    if not waves.dtype.is_floating_point or waves.ndim not in (2, 3):
        raise ValueError(f"{what}: expected float waves (B, samples) or (B, channels, samples), "
                         f"got {waves.dtype} {tuple(waves.shape)}")  # fmt: skip
    return waves.mean(1) if waves.ndim == 3 else waves


class AudioClassifier(nn.Module):
    """A small CNN over log-mels for the offline FAD / IS: float waves (B, samples) or (B, channels, samples;
    mixed down) at `spec.sample_rate` -> (features (B, feature_dim), logits (B, num_classes)). Features are
    the penultimate layer after its ReLU.

    wave -> log_mel (spec) -> standardised per clip (mean and std over all bins and frames, so loudness
    does not dominate) -> `stages` x (conv 3x3, GroupNorm, ReLU, max pool 2, ceil mode) over (bins, frames)
    -> mean over frames (any clip length works) -> flatten channels x bins -> linear + ReLU (features) ->
    linear (logits). 0.09M parameters at the defaults (small_16k: 64 bins). `train_audio_classifier`
    documents the accuracy it reaches.
    """

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any] = "small_16k",  # mel settings: a preset name, spec or dict
        num_classes: int = 10,                                  # classes of the dataset
        width: int = 16,                                        # channels of the first stage, doubled per stage
        stages: int = 3,                                        # conv stages; each halves bins and frames
        feature_dim: int = 128,                                 # size of the feature layer (the FAD features)
    ) -> None:
        super().__init__()
        self.spec = mel_spec(spec)
        if width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm with 8 groups), got {width}")
        self.feature_dim = feature_dim
        self.settings: dict[str, Any] = dict(spec=self.spec.to_dict(), num_classes=num_classes, width=width,
                                             stages=stages, feature_dim=feature_dim)
        layers: list[nn.Module] = []
        channels, bins = 1, self.spec.n_mels
        for i in range(stages):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            channels, bins = out, math.ceil(bins / 2)
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(channels * bins, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def standardised_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """Waves (B, samples) or (B, channels, samples) -> log-mel standardised per clip (B, n_mels, frames)."""
        x = log_mel(_mono(waves).to(self.head.weight.device, torch.float32), self.spec)
        mean = x.mean(dim=(1, 2), keepdim=True)
        std = x.std(dim=(1, 2), keepdim=True, unbiased=False)
        return (x - mean) / (std + 1e-5)  # a silent clip (all at the floor) becomes zeros

    def forward(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.convs(self.standardised_mel(waves)[:, None])  # (B, C, bins', frames')
        features = self.features(x.mean(dim=3).flatten(1))   # (B, feature_dim)
        return features, self.head(features)

    def save(self, path: str | os.PathLike) -> None:
        """Write a folder: model.safetensors (weights) and config.json (constructor settings, the mel spec
        included)."""
        save_module_folder(self, self.settings, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> AudioClassifier:
        """Inverse of `save`; in eval mode, without gradients."""
        config, weights = load_module_folder(path, "audio classifier")
        model = cls(**config)
        model.load_state_dict(weights, strict=True)
        return model.to(device).eval().requires_grad_(False)


def classifier_spec(sample_rate: int = 16000) -> MelSpec:
    """The default mel spec of the classifier at a data set's rate: small_16k's framing and 64 bins up to
    8 kHz (or Nyquist, below 16 kHz), so the classifier of a 22.05 or 24 kHz run reads its clips as they are."""
    return mel_spec("small_16k", sample_rate=int(sample_rate), fmax=min(8000.0, sample_rate / 2))


def train_audio_classifier(
    dataset: torch.utils.data.Dataset,   # items (float wave (1, samples), int label in [0, num_classes))
    num_classes: int,                    # classes of the labels
    epochs: int = 4,                     # passes over the dataset
    batch_size: int = 64,                # the whole dataset when it is smaller (see fit_classifier)
    lr: float = 3e-3,                    # peak AdamW learning rate of a one-cycle schedule
    seed: int = 0,                       # initialisation, shuffling, augmentation; the global RNG is untouched
    device: str | torch.device = "cpu",
    max_steps: int | None = None,        # stop early after this many steps (tests)
    log_every: int = 0,                  # print the loss every so many steps; 0: silent
    **settings: Any,                     # AudioClassifier settings (spec, width, stages, feature_dim);
                                         # spec defaults to classifier_spec(the dataset's sample_rate)
) -> AudioClassifier:
    """Train an `AudioClassifier` with cross-entropy; returns it in eval mode without gradients.

    Measured on SynthNotes (scm_mm_audio.data, synth-notes-v1: 12 pitches C4..B4 x 5 timbres, 1.008 s at
    16 kHz), 2,400 "train" notes pre-synthesised in memory, 1,200 held-out "test" notes, with the defaults
    (4 epochs, 148 steps of 64, small_16k), one CPU thread (torch 2.14, OMP_NUM_THREADS=1, a shared
    2-core machine): held-out accuracy 100.0% for seeds 0, 1, 2 with pitch labels (12 classes), in 24-29 s;
    also 100.0% with "note" (60 classes, seeds 0, 1) and "instrument" labels (5 classes, seeds 0, 1).
    One epoch already gives 100.0% on pitch (seeds 0, 1; 7.5 s). SynthNotes synthesises ~1.1 ms per
    item, so reading it on the fly adds ~11 s to 4 epochs. The slow test re-measures (on the fly):

        OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/audio/test_audio_metrics.py -m slow -s

    Augmentation (random gain -12..0 dB, time shift up to 5% of the clip) was tried and made no measurable
    difference (100.0% with and without, on all three label sets: the task is saturated), so there is none.
    The fast test trains 40 steps of 32 on 12 pitches x 3 timbres of its own 0.5-s tones (100% held out, ~2 s).
    """
    rate = getattr(dataset, "sample_rate", None)
    spec = mel_spec(settings.pop("spec")) if "spec" in settings else classifier_spec(rate or 16000)
    if rate is not None and rate != spec.sample_rate:
        raise ValueError(f"the dataset is at {rate} Hz but the classifier's mel spec at {spec.sample_rate} Hz: "
                         f"leave spec out (classifier_spec({rate}) is the default) or resample the data")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AudioClassifier(spec=spec, num_classes=num_classes, **settings)
    fit_classifier(model, dataset, num_classes, epochs, batch_size, lr, seed, device, max_steps, log_every)
    return model


def classifier_features(
    classifier: AudioClassifier,
    waves: torch.Tensor | Iterable[torch.Tensor],  # (N, samples) or (N, 1, samples), or an iterable of batches
    batch_size: int = 64,                          # clips per forward pass, when given one tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, feature_dim), logits (N, num_classes)), float32 on the CPU."""
    return extract_features(classifier, waves, batch_size)


def frechet_audio_distance(
    features_a: torch.Tensor | FeatureStats,  # (N, D) features, or their FeatureStats
    features_b: torch.Tensor | FeatureStats,  # (M, D)
) -> float:
    """Squared Frechet distance between Gaussians fitted to two feature sets (the FAD, Kilgour et al. 2019,
    here over AudioClassifier features)."""
    a, b = (f if isinstance(f, FeatureStats) else FeatureStats().update(f) for f in (features_a, features_b))
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def evaluate_audio(
    waves: torch.Tensor | Iterable[torch.Tensor],  # generated (N, samples) or (N, 1, samples), or batches
    reference: torch.Tensor | FeatureStats,        # reference waves (M, [1,] samples), their cached features
                                                   # (M, feature_dim) from the same classifier, or FeatureStats
    classifier: AudioClassifier,                   # waves must be at classifier.spec.sample_rate
    batch_size: int = 64,                          # clips per forward pass
    splits: int = 10,                              # IS splits
    k: int = 3,                                    # neighbour rank of precision / recall
    reference_radii: torch.Tensor | None = None,   # (M,) cached knn_radii of the reference features
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,  # this process's per-clip rows -> all
                                                   # processes' (Shards.gather); None: one process
) -> dict[str, float]:
    """{"fad", "is_mean", "is_std", "precision", "recall"}; precision and recall only when the reference
    gives features (waves or features, not FeatureStats alone). A 2-D reference of width
    classifier.feature_dim is read as features; waves that short (8 ms) are not audio worth scoring.
    With `gather`, `waves` are this process's share and the scores are every process's clips'."""
    features, logits = classifier_features(classifier, waves, batch_size)
    if gather is not None:  # a distributed evaluation: score every process's clips
        features, logits = gather(features), gather(logits)
    if not isinstance(reference, FeatureStats):
        is_features = reference.ndim == 2 and reference.shape[1] == classifier.feature_dim
        reference = reference.float() if is_features else classifier_features(classifier, reference, batch_size)[0]
    scores = feature_scores(features, logits, reference, splits=splits, k=k, reference_radii=reference_radii)
    return {"fad": scores.pop("frechet"), **scores}


# ------------------------------------------------------------------------------------------ pitch

# pYIN analysis window and hop, in seconds: 2048 and 512 samples at 16 kHz. The frame holds two periods
# down to 15.6 Hz; the hop of 32 ms halves the time of the 16 ms one (Viterbi cost is per frame) and
# still gives 31 frames per 1-s clip for the median.
PYIN_FRAME_SECONDS = 0.128
PYIN_HOP_SECONDS = 0.032
# YIN resolves the period to a sample (plus parabolic interpolation). At 16 kHz a 1 kHz period is 16
# samples: the interpolation is then biased by ~0.1 semitone (MIDI 80-84 read 0.1 sharp) and
# missing-fundamental tones near MIDI 78 lock an octave low. Analysing at >= 32 kHz (an integer
# upsampling) removed both: harmonic tones at MIDI 36-96 and tones without their fundamental (with two
# or more partials below Nyquist) read exactly on pyin's 0.1-semitone grid, at 16, 22.05, 24, 44.1 kHz.
PYIN_MIN_RATE = 32000


def _waves_numpy(waves: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, samples), (N, 1, samples) or (samples,) -> float32 numpy (N, samples)."""
    x = waves.detach().cpu().float().numpy() if isinstance(waves, torch.Tensor) else np.asarray(waves, np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 2:
        raise ValueError(f"expected mono waves (N, samples) or (N, 1, samples), got shape {x.shape}")
    return x


def estimate_pitch(
    waves: torch.Tensor | np.ndarray,                  # (N, samples) or (N, 1, samples), mono
    sample_rate: int,                                  # Hz
    fmin: float | Sequence[float] | np.ndarray | torch.Tensor = 36.0,  # lowest MIDI pitch searched; or one per clip
    fmax: float | Sequence[float] | np.ndarray | torch.Tensor = 96.0,  # highest MIDI pitch searched; or one per clip
    resolution: float = 0.1,                           # semitones per pYIN pitch bin
    voiced_threshold: float = 0.5,                     # a frame counts when pYIN's voiced probability reaches it
    batch_size: int = 64,                              # clips per pyin call
) -> torch.Tensor:
    """(N,) float64 MIDI pitch per clip: the median pYIN f0 over its voiced frames; nan when none is voiced.

    librosa.pyin with a 128 ms frame and a 32 ms hop, at an integer multiple of sample_rate >= 32 kHz
    (see PYIN_MIN_RATE). Estimates lie on pyin's grid of `resolution` semitones above fmin. A frame is
    voiced when pyin's Viterbi path says so and its voiced probability is >= voiced_threshold: pyin
    alone labels most frames of white noise voiced (its unvoiced probability is spread over all pitch
    bins), but with probability ~0.01, against > 0.9 for the frames of a clean tone.

    Speed (one CPU thread, 1-s clips at 16 kHz): 20-30 ms per clip searching +- one octave (what
    pitch_accuracy does), ~140 ms over the full MIDI 36-96 (librosa 0.11). pyin's Viterbi decoding over
    2 x (range / resolution) states dominates and grows with the square of the range; with a 16 ms hop
    both times double.
    """
    x = _waves_numpy(waves)
    n = x.shape[0]
    lo, hi = (np.asarray(f, np.float64).reshape(-1) for f in (fmin, fmax))
    if lo.shape[0] not in (1, n) or hi.shape[0] not in (1, n):
        raise ValueError(f"fmin and fmax must be scalars or have one entry per clip ({n}), "
                         f"got {lo.shape[0]} and {hi.shape[0]}")
    lo, hi = np.broadcast_to(lo, (n,)), np.broadcast_to(hi, (n,))
    nyquist = librosa.hz_to_midi(sample_rate / 2)
    if n and (not np.all(lo < hi) or hi.max() >= nyquist):
        raise ValueError(f"need fmin < fmax < MIDI {nyquist:.1f} (Nyquist of {sample_rate} Hz), got fmin "
                         f"{lo.min()}..{lo.max()}, fmax {hi.min()}..{hi.max()}")
    up = math.ceil(PYIN_MIN_RATE / sample_rate)
    rate = sample_rate * up
    if up > 1:
        x = scipy.signal.resample_poly(x, up, 1, axis=-1).astype(np.float32)
    out = np.full(n, np.nan)
    ranges = np.stack([lo, hi], 1)
    for pair in np.unique(ranges, axis=0):  # clips with the same search range share pyin calls
        index = np.flatnonzero((ranges == pair).all(1))
        for chunk in np.array_split(index, math.ceil(len(index) / batch_size)):
            f0, voiced, prob = librosa.pyin(
                x[chunk], fmin=librosa.midi_to_hz(pair[0]), fmax=librosa.midi_to_hz(pair[1]), sr=rate,
                frame_length=round(PYIN_FRAME_SECONDS * rate), hop_length=round(PYIN_HOP_SECONDS * rate),
                resolution=resolution,
            )  # each (len(chunk), frames)
            for i, f, v in zip(chunk, f0, voiced & (prob >= voiced_threshold)):
                if v.any():
                    out[i] = librosa.hz_to_midi(np.median(f[v]))
    return torch.from_numpy(out)


def pitch_accuracy(
    waves: torch.Tensor | np.ndarray,                      # (N, samples) or (N, 1, samples), mono
    sample_rate: int,                                      # Hz
    target_midi: Sequence[float] | np.ndarray | torch.Tensor,  # (N,) the pitch each clip should have
    tolerance_semitones: float = 0.5,                      # correct when |estimate - target| < tolerance
    search_semitones: float = 12.0,                        # pYIN searches target +- this
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,  # this process's per-clip rows -> all
                                                           # processes' (Shards.gather); None: one process
) -> dict[str, float]:
    """{"accuracy", "voiced_fraction", "mean_abs_cents_error", "scored_clips"} of `estimate_pitch` against
    the targets, over the clips whose target pYIN can measure (within the tolerance of MIDI 11.3, two periods
    in its 128 ms frame, to Nyquist): a class-conditional model of NSynth cycles through MIDI 0-127.

    accuracy: fraction of clips within the tolerance; unvoiced clips count as wrong. With integer
    targets and the default 0.5 this is "the rounded estimate equals the target". voiced_fraction:
    fraction of clips with a pitch. mean_abs_cents_error: mean |estimate - target| over the voiced
    clips, in cents (octave errors included; nan when no clip is voiced). Searching only +- an octave
    around each target keeps pYIN fast (see estimate_pitch) and still lets octave errors show.

    On 240 SynthNotes "test" notes (5 timbres, detuned up to +-8 cents): accuracy 1.0, voiced fraction
    1.0, mean error 3.4 cents, 20 ms per clip (tests/audio/test_audio_metrics.py, slow tests).

    With `gather`, `waves` and `target_midi` are this process's share and the scores are every process's clips'.
    """
    target = np.asarray(torch.as_tensor(target_midi, dtype=torch.float64).cpu(), np.float64).reshape(-1)
    x = _waves_numpy(waves)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"target_midi has {target.shape[0]} entries for {x.shape[0]} clips")
    lowest = librosa.hz_to_midi(2 / PYIN_FRAME_SECONDS) + 0.01  # pYIN's fmin: two periods in a frame
    top = librosa.hz_to_midi(sample_rate / 2) - 0.01  # pYIN's fmax must stay below Nyquist
    scored = (target - tolerance_semitones >= lowest) & (target + tolerance_semitones <= top)
    midi = torch.full((len(target),), math.nan, dtype=torch.float64)
    if scored.any():
        midi[torch.from_numpy(scored)] = estimate_pitch(
            x[scored], sample_rate, fmin=np.maximum(target[scored] - search_semitones, lowest),
            fmax=np.minimum(target[scored] + search_semitones, top))  # fmt: skip
    rows = torch.stack([midi, torch.from_numpy(target), torch.from_numpy(scored).double()], 1)
    if gather is not None:  # (estimate, target, scored) of every process's clips
        rows = gather(rows)
    kept = rows[rows[:, 2] > 0]
    error = (kept[:, 0] - kept[:, 1]).abs().numpy()
    voiced = np.isfinite(kept[:, 0].numpy())
    return {
        "accuracy": float(np.mean(voiced & (error < tolerance_semitones))) if len(kept) else math.nan,
        "voiced_fraction": float(voiced.mean()) if len(kept) else math.nan,
        "mean_abs_cents_error": float(100 * error[voiced].mean()) if voiced.any() else math.nan,
        "scored_clips": len(kept),
    }


# ------------------------------------------------------------------------------------------ speed


def real_time_factor(
    fn: Callable[[], Any],   # produces audio_seconds of audio per call
    audio_seconds: float,    # seconds of audio one call produces (all clips of a batch together)
    repeats: int = 3,        # timed calls; the median is reported
    warmup: int = 1,         # untimed calls first (compilation, allocator, caches)
) -> dict[str, float]:
    """{"rtf": wall_s / audio_seconds, "wall_s": median wall time of one call}. RTF 0.05 is 20x faster than
    real time. Pending CUDA work is synchronised before and after each timed call."""
    if audio_seconds <= 0:
        raise ValueError(f"need audio_seconds > 0, got {audio_seconds}")
    wall = median_seconds(fn, repeats, warmup)
    return {"rtf": wall / audio_seconds, "wall_s": wall}
