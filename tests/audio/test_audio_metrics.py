"""Audio metrics: pYIN pitch against tones of known pitch; the offline classifier learns pitch, saves and
loads exactly; the FAD separates pitch-shifted sets and agrees with the core; the RTF of a known delay."""

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port

from scm_mm.metrics import FeatureStats, frechet_distance, inception_score, precision_recall
from scm_mm.train.distributed import Shards, init_distributed
from scm_mm_audio import metrics
from scm_mm_audio.api import AudioModality
from scm_mm_audio.data import SynthNotes
from scm_mm_audio.mel import mel_spec
from scm_mm_audio.metrics import (
    AudioClassifier,
    classifier_features,
    estimate_pitch,
    evaluate_audio,
    frechet_audio_distance,
    pitch_accuracy,
    real_time_factor,
    train_audio_classifier,
)

SR = 16000
# harmonic amplitudes by timbre: bright (1/h), hollow (odd harmonics, 1/h), mellow (1/h^2)
TIMBRES = {
    "bright": lambda h: 1.0 / h,
    "hollow": lambda h: (h % 2) / h,
    "mellow": lambda h: 1.0 / h**2,
}


def tones(midi, timbres=("bright",), seconds=1.0, seed=0, missing_fundamental=False, detune_cents=0.0):
    """Harmonic tones, one per (pitch, timbre): float32 (len(midi) * len(timbres), 1, samples), and their
    MIDI pitches. Random phases, attack 5-30 ms, exponential decay, onset 0-50 ms, peak 0.2-0.9;
    harmonics below 0.45 * SR."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    waves, pitches = [], []
    for m in midi:
        for name in timbres:
            f0 = 440.0 * 2 ** ((m + rng.uniform(-detune_cents, detune_cents) / 100 - 69) / 12)
            h = np.arange(2 if missing_fundamental else 1, 21)
            gains = TIMBRES[name](h) * (h * f0 < 0.45 * SR)  # (H,)
            phases = rng.uniform(0, 2 * np.pi, len(h))
            wave = gains @ np.sin(2 * np.pi * f0 * h[:, None] * t + phases[:, None])  # (samples,)
            onset, attack, decay = rng.uniform(0, 0.05), rng.uniform(0.005, 0.03), rng.uniform(1.0, 4.0)
            tt = np.clip(t - onset, 0, None)
            envelope = np.minimum(tt / attack, 1) * np.exp(-decay * tt) * (t >= onset)
            wave *= envelope
            waves.append(rng.uniform(0.2, 0.9) * wave / np.abs(wave).max())
            pitches.append(m)
    return torch.tensor(np.stack(waves), dtype=torch.float32)[:, None], torch.tensor(pitches, dtype=torch.float64)


class Tones(torch.utils.data.Dataset):
    """Items as the project's datasets give them: (float wave (1, samples), int label)."""

    def __init__(self, waves, labels, sample_rate=SR):
        self.waves, self.labels, self.sample_rate = waves, labels, sample_rate

    def __len__(self):
        return len(self.waves)

    def __getitem__(self, i):
        return self.waves[i], int(self.labels[i])


# ------------------------------------------------------------------------------------------ pitch


@pytest.mark.parametrize("missing_fundamental", [False, True])
def test_estimate_pitch_recovers_midi(missing_fundamental):
    midi = list(range(48, 85, 3)) + [78, 79, 83, 84]  # 78-84 failed at 16 kHz before upsampling
    waves, target = tones(midi, ("bright", "hollow"), seconds=0.5, seed=1, missing_fundamental=missing_fundamental)
    estimate = estimate_pitch(waves, SR, fmin=target - 12, fmax=target + 12)
    assert (estimate - target).abs().max() < 0.1, (estimate - target).tolist()


def test_estimate_pitch_full_range_and_off_grid_pitch():
    waves, target = tones([50.37, 66.62, 81.25], seconds=0.5, seed=2)
    estimate = estimate_pitch(waves[:, 0], SR)  # MIDI 36-96, (N, samples) input
    assert (estimate - target).abs().max() <= 0.05 + 1e-9  # half a bin of the 0.1-semitone grid


def test_estimate_pitch_unvoiced_noise_and_silence():
    gen = torch.Generator().manual_seed(0)
    white = 0.3 * torch.randn(3, SR // 2, generator=gen)
    brown = torch.cumsum(torch.randn(3, SR // 2, generator=gen), dim=1)
    brown = 0.3 * (brown - brown.mean(1, keepdim=True)) / brown.abs().amax(1, keepdim=True)
    silence = torch.zeros(1, SR // 2)
    estimate = estimate_pitch(torch.cat([white, brown, silence]), SR)
    assert estimate.isnan().all(), estimate.tolist()


def test_pitch_accuracy_counts_detuned_and_noise_as_wrong():
    midi = [48, 55, 60, 67, 72, 79]
    good, target = tones(midi, seconds=0.5, seed=3, detune_cents=20)
    sharp, _ = tones([m + 1 for m in midi], seconds=0.5, seed=4)  # one semitone off the target
    noise = 0.3 * torch.randn(len(midi), 1, SR // 2, generator=torch.Generator().manual_seed(1))
    result = pitch_accuracy(good, SR, target)
    assert result["accuracy"] == 1.0 and result["voiced_fraction"] == 1.0
    assert result["mean_abs_cents_error"] < 25  # detuned by up to 20 cents, bins of 10 cents
    result = pitch_accuracy(sharp, SR, target)
    assert result["accuracy"] == 0.0 and result["voiced_fraction"] == 1.0
    assert abs(result["mean_abs_cents_error"] - 100) < 10
    result = pitch_accuracy(noise, SR, target)
    assert result["accuracy"] == 0.0 and result["voiced_fraction"] == 0.0 and math.isnan(result["mean_abs_cents_error"])
    mixed = pitch_accuracy(torch.cat([good, sharp, noise]), SR, target.repeat(3))
    assert mixed["accuracy"] == pytest.approx(1 / 3) and mixed["voiced_fraction"] == pytest.approx(2 / 3)
    # a 30-cent tolerance: a 20-cent detune still passes
    assert pitch_accuracy(good, SR, target, tolerance_semitones=0.3)["accuracy"] == 1.0


def test_pitch_accuracy_scores_only_the_targets_pyin_can_measure():
    """A class-conditional NSynth model cycles through MIDI 0-127: targets below pYIN's lowest pitch (MIDI
    11.3 in its 128 ms frame) or above Nyquist are left out, not searched for (pYIN refused MIDI 0's range)."""
    good, target = tones([48, 60, 72], seconds=0.5, seed=3)
    noise = 0.3 * torch.randn(3, 1, SR // 2, generator=torch.Generator().manual_seed(1))
    result = pitch_accuracy(torch.cat([good, noise]), SR, torch.cat([target, torch.tensor([0.0, 11.0, 127.0])]))
    assert result["scored_clips"] == 3 and result["accuracy"] == 1.0 and result["voiced_fraction"] == 1.0
    assert math.isnan(pitch_accuracy(noise, SR, [0.0, 5.0, 126.0])["accuracy"])


def two_shares(first_rows: list[torch.Tensor]):
    """A `gather` for the first of two shares, as Shards.gather with batches the size of a share: it appends
    the rows the second share gave (recorded by its own `gather`, in the same order) to this share's."""
    others = iter(first_rows)
    return lambda rows: torch.cat([rows, next(others)])


def test_pitch_accuracy_of_two_shares_gathered_is_the_whole_sets():
    """Each process estimates its own clips' pitches against its own targets; the scores are everyone's."""
    waves, target = tones([48, 55, 60, 67, 72], seconds=0.5, seed=5, detune_cents=40)
    noise = 0.3 * torch.randn(2, 1, SR // 2, generator=torch.Generator().manual_seed(2))
    waves, target = torch.cat([waves, noise]), torch.cat([target, torch.tensor([60.0, 64.0])])
    rows: list[torch.Tensor] = []
    pitch_accuracy(waves[4:], SR, target[4:], gather=lambda r: rows.append(r) or r)
    gathered = pitch_accuracy(waves[:4], SR, target[:4], gather=two_shares(rows))
    whole = pitch_accuracy(waves, SR, target)
    assert 0 < whole["accuracy"] < 1 and 0 < whole["voiced_fraction"] < 1  # detuned, noise: not all right
    assert gathered == pytest.approx(whole, rel=1e-12)


# ------------------------------------------------------------------------------------------ classifier

PITCHES = list(range(60, 72))  # one chromatic octave: neighbours a semitone apart


@pytest.fixture(scope="module")
def trained():
    """A classifier trained on 12 pitches x 3 timbres (0.5-s tones), and held-out tones."""
    train, train_midi = tones(PITCHES * 12, tuple(TIMBRES), seconds=0.5, seed=10, detune_cents=10)
    held, held_midi = tones(PITCHES * 4, tuple(TIMBRES), seconds=0.5, seed=11, detune_cents=10)
    start = time.perf_counter()
    model = train_audio_classifier(Tones(train, train_midi - 60), num_classes=12, batch_size=32, max_steps=40)
    seconds = time.perf_counter() - start
    return model, held, (held_midi - 60).long(), seconds


def test_classifier_learns_pitch(trained):
    model, held, labels, seconds = trained
    features, logits = classifier_features(model, held)
    assert features.shape == (len(held), 128) and logits.shape == (len(held), 12)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy  # chance is 1/12
    print(f"held-out accuracy {accuracy:.3f} after 40 steps in {seconds:.1f} s")


def test_classifier_round_trips_and_leaves_global_rng(trained, tmp_path):
    model, held, _, _ = trained
    model.save(tmp_path / "clf")
    loaded = AudioClassifier.load(tmp_path / "clf")
    assert loaded.settings == model.settings and loaded.spec == mel_spec("small_16k")
    for a, b in zip(classifier_features(loaded, held[:40]), classifier_features(model, held[:40])):
        assert torch.equal(a, b)
    # (B, samples) and (B, 1, samples) agree; batching does not change features
    assert torch.allclose(loaded(held[:8, 0])[0], loaded(held[:8])[0])
    assert torch.allclose(classifier_features(loaded, held[:40], batch_size=7)[0],
                          classifier_features(loaded, held[:40])[0], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        AudioClassifier.load(tmp_path / "nope")
    # same seed, same classifier; the global RNG is untouched
    waves, midi = tones(PITCHES, ("bright",), seconds=0.25, seed=12)
    state = torch.random.get_rng_state()
    a = train_audio_classifier(Tones(waves, midi - 60), 12, batch_size=4, max_steps=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_audio_classifier(Tones(waves, midi - 60), 12, batch_size=4, max_steps=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_classifier_trains_and_scores_on_a_small_reference_set(recwarn):
    """Fewer labelled clips than the batch of 64 (was: "20 items make no full batch of 64"): the classifier
    trains on batches of all 20, as asking for them does, without a warning; below FEW_ITEMS it warns."""
    waves, midi = tones(PITCHES + PITCHES[:8], seconds=0.25, seed=13)  # 20 clips
    model = train_audio_classifier(Tones(waves, midi - 60), 12)
    same = train_audio_classifier(Tones(waves, midi - 60), 12, batch_size=20)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), same.state_dict().values()))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    out = evaluate_audio(waves[:10], waves, model)
    assert all(np.isfinite(out[key]) for key in ("fad", "is_mean", "precision", "recall")), out
    with pytest.warns(RuntimeWarning, match="on 8 items"):
        train_audio_classifier(Tones(waves[:8], midi[:8] - 60), 12, max_steps=1)


def test_classifier_takes_any_length_and_is_level_invariant():
    model = AudioClassifier(num_classes=3).eval()
    for samples in (600, 4000, 16000):  # the centred STFT reflect-pads n_fft // 2: more samples than that
        features, logits = model(torch.randn(2, 1, samples))
        assert features.shape == (2, 128) and logits.shape == (2, 3)
    # per-clip standardisation: a 6 dB change moves the log-mel by ln 2 everywhere above the clamp floor
    # (noise keeps every bin above it), which the standardisation removes
    noise = 0.3 * torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    assert model.standardised_mel(noise).std() == pytest.approx(1, abs=1e-3)
    assert torch.allclose(model.standardised_mel(noise), model.standardised_mel(0.5 * noise), atol=1e-4)


def test_classifier_mixes_channels_down_and_refuses_bad_inputs():
    model = AudioClassifier(num_classes=3)
    stereo = torch.randn(2, 2, 8000, generator=torch.Generator().manual_seed(0))
    for got, mixed in zip(model(stereo), model(stereo.mean(1, keepdim=True)), strict=True):
        torch.testing.assert_close(got, mixed)  # a stereo run's clips and its reference are scored mixed down
    with pytest.raises(ValueError, match="float waves"):
        model(torch.randint(-100, 100, (2, 1, 1000), dtype=torch.int16))
    waves, midi = tones([60, 61], seconds=0.25)
    with pytest.raises(ValueError, match="22050 Hz"):  # a spec at another rate than the data's
        train_audio_classifier(Tones(waves, midi - 60, sample_rate=22050), 2, max_steps=1, spec="small_16k")
    with pytest.raises(ValueError, match="unlabelled"):
        train_audio_classifier(Tones(waves, torch.tensor([-1, -1])), 2, batch_size=2, max_steps=1)


# ------------------------------------------------------------------------------------------ FAD


def test_fad_separates_pitch_shifted_sets(trained):
    model, _, _, _ = trained
    a, _ = tones(PITCHES * 4, tuple(TIMBRES), seconds=0.5, seed=20)
    b, _ = tones(PITCHES * 4, tuple(TIMBRES), seconds=0.5, seed=21)  # same distribution, other draws
    shifted, _ = tones([m + 1 for m in PITCHES] * 4, tuple(TIMBRES), seconds=0.5, seed=22)
    fa, fb, fs = (classifier_features(model, w)[0] for w in (a, b, shifted))
    self_fad, same, other = (frechet_audio_distance(fa, f) for f in (fa, fb, fs))
    assert abs(self_fad) < 1e-6 * other
    assert other > 20 * same, (same, other)  # measured: ~0.07 against 12-15 (seeds 0-2)
    # against the core: FeatureStats in, and the formula of scm_mm.metrics
    sa, sb = FeatureStats().update(fa), FeatureStats().update(fb)
    assert frechet_audio_distance(sa, fb) == pytest.approx(frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma))


def test_evaluate_audio_agrees_with_core(trained):
    model, held, _, _ = trained
    gen, ref = held[:72], held[72:]
    out = evaluate_audio(gen, ref, model, batch_size=32)
    (fg, lg), (fr, _) = classifier_features(model, gen), classifier_features(model, ref)
    assert out["fad"] == pytest.approx(frechet_audio_distance(fg, fr), rel=1e-6)
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(lg, splits=10), rel=1e-6)
    assert (out["precision"], out["recall"]) == pytest.approx(precision_recall(fr, fg, k=3))
    # cached reference features or stats give the same FAD; batches in an iterable too
    assert evaluate_audio(gen.split(20), fr, model)["fad"] == pytest.approx(out["fad"], rel=1e-6)
    stats_only = evaluate_audio(gen, FeatureStats().update(fr), model)
    assert stats_only["fad"] == pytest.approx(out["fad"], rel=1e-6) and "precision" not in stats_only
    # two shares gathered (a distributed evaluation) score as the whole set
    rows: list[torch.Tensor] = []
    evaluate_audio(gen[40:], fr, model, gather=lambda r: rows.append(r) or r)
    gathered = evaluate_audio(gen[:40], fr, model, gather=two_shares(rows))
    assert gathered == pytest.approx(out, rel=1e-5)


class Stereo(torch.utils.data.Dataset):
    """A dataset's clips as stereo (the left channel, and half of it on the right), as a `channels: 2` run has."""

    def __init__(self, data):
        self.data, self.num_classes, self.sample_rate = data, data.num_classes, data.sample_rate

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        wave, label = self.data[i]
        return torch.cat([wave, 0.5 * wave]), label


def test_a_stereo_run_is_evaluated_mixed_down():
    """The classifier trained on the reference hears its clips mixed down, as the generated ones (it refused
    stereo items before, so a stereo run could not be evaluated without a classifier_path)."""
    reference = Stereo(SynthNotes(size=24))
    waves = torch.stack([reference[i][0] for i in range(6)])
    scores = AudioModality().evaluate(waves, reference, sample_rate=reference.sample_rate)
    assert math.isfinite(scores["fad"]) and scores["reference_clips"] == 24


class PitchedTones(Tones):
    """Tones whose classes are the pitches of PITCHES, as SynthNotes says (pitch accuracy is scored)."""

    def midi_of_label(self, label: int) -> int:
        return PITCHES[label]


def _evaluate_worker(rank: int, port: int, clips: dict, folder: str, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    shards = Shards(len(clips["waves"]), 3, init_distributed("cpu"))  # 8 clips: rank 0 draws 0-2 and 6-7, rank 1 3-5
    estimate = metrics.estimate_pitch  # count the clips this process analyses
    metrics.estimate_pitch = lambda waves, *args, **kwargs: out.update({("analysed", rank): len(waves)}) or estimate(
        waves, *args, **kwargs)
    out[rank] = AudioModality().evaluate(shards.share(clips["waves"]), clips["reference"], labels=clips["labels"],
                                         classifier_path=folder, shards=shards)  # fmt: skip


def test_audio_evaluation_shared_between_two_processes_scores_as_one(trained, tmp_path):
    """Under torchrun each process scores its own clips (features, pitch) and gathers the rows: the scores
    of 2 gloo processes are one process's."""
    model, held, labels, _ = trained
    model.save(tmp_path / "clf")
    waves, _ = tones(PITCHES[:7] + [61], seconds=0.5, seed=30, detune_cents=40)
    clips = {"waves": waves, "labels": torch.tensor([0, 1, 2, 3, 4, 5, 6, 3]),  # the last tone (61) is not 63
             "reference": PitchedTones(held, labels)}  # fmt: skip
    alone = AudioModality().evaluate(clips["waves"], clips["reference"], labels=clips["labels"],
                                     classifier_path=str(tmp_path / "clf"))  # fmt: skip
    assert alone["pitch_accuracy"] == 7 / 8
    out = mp.Manager().dict()
    mp.spawn(_evaluate_worker, args=(free_port(), clips, str(tmp_path / "clf"), out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank] == pytest.approx(alone, rel=1e-5), rank
    assert (out["analysed", 0], out["analysed", 1]) == (5, 3)  # each its own share


# ------------------------------------------------------------------------------------------ speed


def test_real_time_factor_of_a_known_delay():
    calls = []
    result = real_time_factor(lambda: (calls.append(1), time.sleep(0.05)), audio_seconds=2.0, repeats=3, warmup=1)
    assert len(calls) == 4
    # a loaded CI machine may wake late from the sleep: the upper bound only catches a wrong unit or sum
    assert 0.05 <= result["wall_s"] < 0.5 and result["rtf"] == pytest.approx(result["wall_s"] / 2.0)


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_classifier_recipe_on_synth_notes():
    """The number quoted in train_audio_classifier: the full recipe on SynthNotes."""
    from scm_mm_audio.data import SynthNotes

    train, test = SynthNotes(split="train"), SynthNotes(size=1200, split="test")
    waves = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    for seed in (0, 1, 2):
        start = time.perf_counter()
        model = train_audio_classifier(train, train.num_classes, seed=seed)
        seconds = time.perf_counter() - start
        accuracy = (classifier_features(model, waves)[1].argmax(1) == labels).float().mean().item()
        print(f"SynthNotes held-out accuracy seed {seed}: {accuracy:.4f} in {seconds:.1f} s")
        assert accuracy >= 0.97


@pytest.mark.slow
def test_pitch_speed_and_accuracy_on_synth_notes():
    """The pYIN numbers quoted in estimate_pitch: ms per 1-s clip, and accuracy on SynthNotes."""
    from scm_mm_audio.data import SynthNotes

    notes = SynthNotes(size=240, split="test")
    waves = torch.stack([notes[i][0] for i in range(len(notes))])
    target = torch.tensor([notes.midi_of_label(notes[i][1]) for i in range(len(notes))], dtype=torch.float64)
    start = time.perf_counter()
    result = pitch_accuracy(waves, notes.sample_rate, target)
    per_clip = (time.perf_counter() - start) / len(notes)
    start = time.perf_counter()
    estimate_pitch(waves[:24], notes.sample_rate)
    full = (time.perf_counter() - start) / 24
    print(f"pitch_accuracy {result}; {1000 * per_clip:.0f} ms per clip (+- 1 octave), "
          f"{1000 * full:.0f} ms per clip (MIDI 36-96)")
    assert result["accuracy"] >= 0.95


class Recording(Tones):
    """Tones that record which items were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def test_the_reference_is_a_seeded_subset_across_classes(tmp_path):
    """A reference listed class by class (as a folder of speakers is): the clips scored against are a seeded
    uniform subset that spans the classes, not the first ones, the same for the same seed."""
    from scm_mm.metrics import subset_indices
    from scm_mm_audio import AudioModality

    waves, _ = tones([60] * 40, seconds=0.1)
    labels = torch.arange(4).repeat_interleave(10)  # 4 classes x 10 clips, sorted by class
    torch.manual_seed(0)
    AudioClassifier(num_classes=4).save(tmp_path / "clf")

    def scored(seed):
        reference = Recording(waves, labels)
        out = AudioModality().evaluate(waves[::3], reference, classifier_path=str(tmp_path / "clf"), max_reference=12,
                                       reference_seed=seed)  # fmt: skip
        assert (out["reference_clips"], out["reference_seed"]) == (12, seed) and np.isfinite(out["fad"])
        return reference.read

    read = scored(0)
    assert read == subset_indices(40, 12, 0).tolist()
    assert {int(labels[i]) for i in read} == {0, 1, 2, 3}  # the first 12 would hold classes 0 and 1 only
    assert scored(0) == read and scored(1) != read


def test_the_references_features_are_computed_once_and_kept_in_cache_dir(tmp_path):
    from scm_mm_audio import AudioModality

    waves, _ = tones([60] * 20, seconds=0.1)
    torch.manual_seed(0)
    AudioClassifier(num_classes=2).save(tmp_path / "clf")
    labels = torch.arange(2).repeat(10)
    scores, reads = [], []
    for cache in ("cache", "cache", None):
        reference = Recording(waves, labels)
        reference.fingerprint = "twenty-tones"  # what names cached features (a dataset's own fingerprint)
        cache_dir = None if cache is None else tmp_path / cache
        scores.append(AudioModality().evaluate(waves[::2], reference, classifier_path=str(tmp_path / "clf"),
                                               cache_dir=cache_dir, max_reference=8))  # fmt: skip
        reads.append(len(reference.read))
    assert reads == [8, 0, 8]  # the second evaluation read its reference features from the cache
    assert len(list((tmp_path / "cache").glob("reference-features-*.pt"))) == 1
    for key in ("fad", "precision", "recall", "is_mean"):
        assert scores[1][key] == pytest.approx(scores[0][key], rel=1e-6) == scores[2][key], key
