"""Raw audio datasets: SynthNotes (exact pitches, distinct timbres, determinism), AudioFolder (layouts,
bad files, manifest) and the optional soundfont / espeak-ng builders."""

import json
import logging
import os
import shutil
import stat
import sys
import types

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

import scm_mm_audio.data as data_module
from scm_mm.data import training_set
from scm_mm_audio.api import AudioModality
from scm_mm_audio.codec import MelCodec
from scm_mm_audio.data import (
    AudioFolder,
    SynthNotes,
    build_dataset,
    midi_to_hz,
    render_soundfont_notes,
    speak_digits,
)

SR = 16000

# -------------------------------------------------------------------------------------- SynthNotes


def _median_midi(wave: np.ndarray, sr: int = SR, start: float = 0.05, stop: float = 0.65) -> float:
    """librosa's YIN pitch over the sustained part of a clip (the note is released at 70-90%), median
    over frames, as a MIDI number."""
    f0 = librosa.yin(wave[int(start * sr) : int(stop * sr)], fmin=50, fmax=2000, sr=sr, frame_length=2048)
    return float(librosa.hz_to_midi(np.median(f0)))


def test_synth_notes_items_deterministic_distinct_finite_and_in_level():
    data = SynthNotes(size=120)
    again = SynthNotes(size=120)
    assert len(data) == 120 and data.sample_rate == SR and data.num_classes == 12
    waves = []
    for i in range(0, 120, 7):
        wave, label = data[i]
        assert wave.shape == (1, 16128) and wave.dtype == torch.float32 and isinstance(label, int)
        assert torch.equal(wave, again[i][0]) and torch.equal(wave, data[i][0])  # same every time, no storage
        assert torch.isfinite(wave).all()
        velocity = data.meta(i)["velocity"]
        peak = float(wave.abs().max())
        assert 0.5 - 0.01 <= peak <= 0.9 + 0.01
        assert peak == pytest.approx(0.5 + 0.4 * (velocity - 40) / 87, abs=0.006)  # level follows velocity
        onset = int(np.argmax(wave[0].abs().numpy() > 0.05 * peak))
        assert onset < 0.05 * SR  # the note starts at or near the start
        waves.append(wave)
    for a, b in zip(waves, waves[1:]):
        assert (a - b).abs().max() > 0.1  # distinct clips
    # the same (pitch, instrument) cell, another index: a different performance of the same note
    assert data.meta(3)["pitch"] == data.meta(63)["pitch"] and data.meta(3)["instrument"] == data.meta(63)["instrument"]
    assert (data[3][0] - data[63][0]).abs().max() > 0.1


def test_synth_notes_pitch_matches_label_for_all_instruments():
    data = SynthNotes()
    indices = [49 * k for k in range(48)]  # 49 = -11 mod 60: 48 distinct (pitch, instrument) cells
    assert {data.meta(i)["instrument"] for i in indices} == set(data.instruments)
    hits = 0
    for i in indices:
        wave, label = data[i]
        assert data.midi_of_label(label) == data.meta(i)["pitch"] == data.pitches[label]
        hits += abs(_median_midi(wave[0].numpy()) - data.midi_of_label(label)) < 0.5
    assert hits >= 0.98 * len(indices)


def _harmonic_energy(wave: np.ndarray, f0: float, count: int = 8) -> np.ndarray:
    """Energy near each of the first `count` harmonics of f0, from 0.25 to 0.65 s (sustain)."""
    segment = wave[int(0.25 * SR) : int(0.65 * SR)]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment)))) ** 2
    freqs = np.fft.rfftfreq(len(segment), 1 / SR)
    return np.array([spectrum[np.abs(freqs - h * f0) < 0.3 * f0].sum() for h in range(1, count + 1)])


def test_synth_notes_timbres_have_their_documented_traits():
    """Clarinet: odd harmonics >= 20 dB above even ones; plucked: decays, the rest sustain; vibrato on
    clarinet, flute and brass only; flute: the fundamental holds most of the harmonic energy."""
    data = SynthNotes(size=600)
    for k in range(30):
        i = 7 * k + k % 5
        wave = data[i][0][0].numpy().astype(np.float64)
        meta = data.meta(i)
        name = meta["instrument"]
        energy = _harmonic_energy(wave, midi_to_hz(meta["pitch"]))
        odd_over_even = 10 * np.log10(energy[0::2].sum() / energy[1::2].sum())
        if name == "clarinet":
            assert odd_over_even > 20, (i, odd_over_even)
        elif name != "flute":  # a flute's weak even harmonics are random, the others' are not weak
            assert odd_over_even < 12, (i, name, odd_over_even)
        rms_early = np.sqrt(np.mean(wave[int(0.03 * SR) : int(0.18 * SR)] ** 2))
        rms_late = np.sqrt(np.mean(wave[int(0.5 * SR) : int(0.65 * SR)] ** 2))
        assert (rms_late / rms_early < 0.8) == (name == "plucked"), (i, name, rms_late / rms_early)
        f0 = librosa.yin(wave[int(0.35 * SR) : int(0.65 * SR)], fmin=50, fmax=2000, sr=SR, frame_length=1024,
                         hop_length=128)  # fmt: skip
        cents = 1200 * np.log2(f0 / np.median(f0))
        wobble = np.std(cents[np.abs(cents) < 100])  # ignore octave slips of the tracker
        assert (wobble > 4) == (name in ("clarinet", "flute", "brass")), (i, name, wobble)
        if name == "flute":
            assert energy[0] / energy.sum() > 0.7


def test_synth_notes_labels_and_splits():
    pitch = SynthNotes(size=60)
    instrument = SynthNotes(size=60, label="instrument")
    note = SynthNotes(size=60, label="note")
    assert (pitch.num_classes, instrument.num_classes, note.num_classes) == (12, 5, 60)
    for i in (0, 7, 33, 59):
        meta = pitch.meta(i)
        p, k = pitch.pitches.index(meta["pitch"]), instrument.instruments.index(meta["instrument"])
        assert (pitch[i][1], instrument[i][1], note[i][1]) == (p, k, p * 5 + k)
        assert note.midi_of_label(note[i][1]) == meta["pitch"] and instrument.midi_of_label(k) is None
        assert instrument.classes[k] == meta["instrument"]
    assert sorted(note[i][1] for i in range(60)) == list(range(60))  # every cell once per 60 items
    test = SynthNotes(size=60, split="test")
    for i in (0, 7, 33):
        assert test.meta(i)["pitch"] == pitch.meta(i)["pitch"] and test[i][1] == pitch[i][1]  # same cells
        assert (test[i][0] - pitch[i][0]).abs().max() > 0.1  # other draws
    with pytest.raises(ValueError, match="unknown instruments"):
        SynthNotes(instruments=("organ", "kazoo"))
    with pytest.raises(ValueError, match="label"):
        SynthNotes(label="velocity")
    with pytest.raises(ValueError, match="too high"):
        SynthNotes(sample_rate=8000, pitches=(60, 110))  # 4.7 kHz lies above the 4 kHz Nyquist frequency
    with pytest.raises(IndexError):
        pitch[60]


def test_synth_notes_fingerprint_names_every_setting():
    base = SynthNotes().fingerprint
    assert base == SynthNotes().fingerprint and data_module.SYNTH_VERSION in base
    variants = [
        {"size": 100}, {"sample_rate": 22050}, {"seconds": 0.5}, {"pitches": (60, 62)},
        {"instruments": ("organ", "flute")}, {"label": "note"}, {"split": "test"}, {"seed": 1},
    ]  # fmt: skip
    prints = {SynthNotes(**v).fingerprint for v in variants}
    assert len(prints) == len(variants) and base not in prints


def test_synth_notes_other_rates_stay_band_limited():
    data = SynthNotes(size=10, sample_rate=8000, seconds=0.5, pitches=(72,))
    for i in range(5):  # one per instrument
        wave = data[i][0][0].numpy()
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)))) ** 2
        top = spectrum[np.fft.rfftfreq(len(wave), 1 / 8000) > 0.46 * 8000]
        # only noise up there: no partial folded back over Nyquist (one would stand 40-60 dB above the noise)
        assert top.max() < 100 * np.median(top)
        assert abs(_median_midi(wave, 8000, 0.05, 0.35) - 72) < 0.5


def test_build_dataset_registry():
    assert isinstance(build_dataset("notes", size=10), SynthNotes)
    with pytest.raises(KeyError, match="available"):
        build_dataset("imagenet")


# ------------------------------------------------------------------------------------- AudioFolder


def _tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write(path, wave, sr=SR, subtype="PCM_16", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, sr, subtype=subtype, format=fmt)
    return path


@pytest.fixture
def messy_folder(tmp_path):
    """Class folders "high" and "low" with good wav/flac files and every kind of bad one."""
    root = tmp_path / "messy"
    good = {
        "low/a.wav": _write(root / "low/a.wav", _tone(220, 1.2)),
        "low/b.flac": _write(root / "low/b.flac", _tone(330, 0.5), subtype="PCM_24"),
        "high/c.wav": _write(root / "high/c.wav", _tone(660, 1.0, 22050), 22050),  # resampled to 16 kHz
        "high/deep/d.wav": _write(root / "high/deep/d.wav", _tone(880, 1.1)),
    }
    bad = {}
    bad["corrupt"] = root / "low/corrupt.wav"
    bad["corrupt"].write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(400))
    bad["empty"] = root / "high/empty.wav"
    bad["empty"].write_bytes(b"")
    bad["text"] = root / "high/notes.wav"
    bad["text"].write_text("these are my notes, not a recording\n" * 20)
    full = _write(root / "low/truncated.wav", _tone(440, 1.0)).read_bytes()
    bad["truncated"] = root / "low/truncated.wav"
    bad["truncated"].write_bytes(full[: len(full) // 2])  # cut inside the data: libsndfile alone reads half
    bad["header"] = root / "high/header.wav"
    bad["header"].write_bytes(full[:30])  # cut inside the fmt chunk
    nan = _tone(440, 0.5)
    nan[100:200] = np.nan
    _write(root / "high/nan.wav", nan, subtype="FLOAT")
    _write(root / "low/silent.wav", np.zeros(8000, np.float32))
    (root / "low/readme.txt").write_text("not audio, not an audio extension: ignored")
    return root, good, bad


def test_audio_folder_loads_good_files_and_reports_bad_ones(messy_folder, caplog, capsys):
    root, good, bad = messy_folder
    with caplog.at_level(logging.WARNING, logger="scm_mm_audio.data"):
        data = AudioFolder(root)
    assert data.classes == ["high", "low"] and data.num_classes == 2 and data.sample_rate == SR
    names = [p.relative_to(root).as_posix() for p in data.files]
    assert names == ["high/c.wav", "high/deep/d.wav", "low/a.wav", "low/b.flac"]
    assert data.labels == [0, 0, 1, 1]
    skipped = {path: reason for path, reason in data.skipped}
    assert set(skipped) == {str(p) for p in bad.values()}
    assert all(reason for reason in skipped.values())
    assert data.dropped == {"nonfinite": 1, "silent": 1}
    for path in bad.values():
        assert str(path) in caplog.text  # reported by path
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("AudioFolder")]
    assert len(summary) == 1 and "4 of 11" in summary[0]

    samples = round(1.008 * SR)
    for i in range(len(data)):
        wave, label = data[i]
        assert wave.shape == (1, samples) and wave.dtype == torch.float32 and label == data.labels[i]
    source, _ = sf.read(good["low/a.wav"], dtype="float32")
    assert torch.allclose(data[2][0][0], torch.from_numpy(source[:samples]), atol=1e-6)  # crop="start"
    short, _ = sf.read(good["low/b.flac"], dtype="float32")
    item = data[3][0][0]
    assert torch.allclose(item[:8000], torch.from_numpy(short), atol=1e-6) and item[8000:].abs().max() == 0
    # the 22.05 kHz file: 1 s at 16 kHz, and its 660 Hz tone in place
    assert abs(data.lengths[0] - SR) <= 1
    resampled = data[0][0][0, :SR].numpy()
    spectrum = np.abs(np.fft.rfft(resampled))
    assert np.fft.rfftfreq(SR, 1 / SR)[np.argmax(spectrum)] == pytest.approx(660, abs=1)


def test_audio_folder_crops_channels_and_whole_clips(messy_folder):
    root, good, _ = messy_folder
    source, _ = sf.read(good["low/a.wav"], dtype="float32")  # 19200 samples
    center = AudioFolder(root, seconds=0.5, crop="center")
    offset = (len(source) - 8000) // 2
    assert torch.allclose(center[2][0][0], torch.from_numpy(source[offset : offset + 8000]), atol=1e-6)
    torch.manual_seed(0)
    random = AudioFolder(root, seconds=0.5, crop="random", channels=2)
    wave = random[2][0]
    assert wave.shape == (2, 8000) and torch.equal(wave[0], wave[1])
    window = wave[0].numpy()
    starts = np.flatnonzero(np.abs(source[: len(source) - 7999] - window[0]) < 1e-6)
    assert any(np.abs(source[s : s + 8000] - window).max() < 1e-6 for s in starts)  # a window of the file
    whole = AudioFolder(root, seconds=None)
    assert [whole[i][0].shape[-1] for i in range(4)] == whole.lengths
    assert whole.lengths[2:] == [19200, 8000]
    assert len({center.fingerprint, random.fingerprint, whole.fingerprint, AudioFolder(root).fingerprint}) == 4


def _chirp(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)  # 200 Hz rising 600 Hz/s


def test_random_crops_train_on_a_fresh_window_of_each_cached_whole_mel(tmp_path, monkeypatch):
    root = tmp_path / "chirps"
    _write(root / "a/long.wav", _chirp(3.0))  # 188 frames; a window of 0.25 s is 16
    _write(root / "b/short.wav", _tone(440, 0.1))  # shorter than the window
    raw = AudioFolder(root, seconds=0.25, crop="random")
    codec = MelCodec("small_16k").fit(raw)
    assert codec.state() == MelCodec("small_16k").fit(raw).state()  # whole clips: the same statistics every run
    data = training_set(raw, codec, tmp_path / "cache")
    assert len(data) == 2
    draws = [data[0][0] for _ in range(8)]
    assert all(x.shape == (1, 64, 16) for x in draws)
    assert len({tuple(x.flatten().tolist()) for x in draws}) >= 6  # a fresh window at (almost) every draw
    whole = codec.encode(raw.whole(0)[None])[0].half().float()  # (1, 64, 188), as cached
    for x in draws:
        offsets = [k for k in range(188 - 15) if torch.equal(x, whole[..., k : k + 16])]
        assert len(offsets) == 1
        # the window at frame k is the mel of the crop from sample k * hop, but for the 2 frames at each
        # edge, which see the clip around the window where the crop's STFT sees reflect padding
        crop = raw.whole(0)[None, :, offsets[0] * 256 : offsets[0] * 256 + 4000]
        torch.testing.assert_close(x[..., 2:-2], codec.encode(crop)[0, ..., 2:-2], atol=4e-3, rtol=0)
    short = data[1][0]  # the 0.1-s clip somewhere in 0.25 s of silence
    assert short.shape == (1, 64, 16) and (short[0, 20] == short[0, 20].min()).sum() >= 4  # silent frames

    monkeypatch.setattr(AudioFolder, "whole", lambda self, i: pytest.fail("decoded again"))
    torch.manual_seed(3)
    again = training_set(raw, codec, tmp_path / "cache")  # a second run: from the cache, no decoding
    first = [again[0][0] for _ in range(3)]
    torch.manual_seed(3)
    assert all(torch.equal(x, again[0][0]) for x in first)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_the_metrics_read_a_random_crop_folder_with_centred_crops(messy_folder, monkeypatch):
    root, good, _ = messy_folder
    random = AudioFolder(root, seconds=0.5, crop="random")
    center = random.with_crop("center")
    assert center.crop == "center" and center.files == random.files and center.fingerprint != random.fingerprint
    assert center.fingerprint == AudioFolder(root, seconds=0.5, crop="center").fingerprint
    seen = []
    stub = types.SimpleNamespace(spec=types.SimpleNamespace(sample_rate=SR))
    monkeypatch.setattr(AudioModality, "_classifier", staticmethod(lambda ref, *_: seen.append(ref) or stub))
    monkeypatch.setattr("scm_mm_audio.api.classifier_features", lambda classifier, waves: (waves, None))  # as read
    monkeypatch.setattr("scm_mm_audio.api.evaluate_audio", lambda waves, real, classifier, **_: seen.append(real) or {})
    for seed in (0, 1):
        torch.manual_seed(seed)
        AudioModality().evaluate(torch.zeros(2, 1, 8000), random)
    assert seen[0].crop == "center" and seen[2].crop == "center"
    assert torch.equal(seen[1], seen[3])
    assert torch.equal(seen[1], torch.stack([center[i][0] for i in range(len(center))]).mean(1))


def test_audio_folder_survives_unexpected_decoder_errors(messy_folder, monkeypatch):
    root, good, _ = messy_folder
    real = data_module.load_audio

    def flaky(path, *args, **kwargs):
        if str(path).endswith("d.wav"):
            raise MemoryError("decoder blew up")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_audio", flaky)
    data = AudioFolder(root)
    assert len(data) == 3
    reasons = dict(data.skipped)
    assert "MemoryError" in reasons[str(good["high/deep/d.wav"])]


def test_audio_folder_without_usable_files_names_root_and_counts(tmp_path):
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    (root / "x/empty.wav").write_bytes(b"")
    _write(root / "x/silent.wav", np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match=r"no usable audio under .*bad.*1 unreadable.*0 non-finite, 1 silent"):
        AudioFolder(root)
    with pytest.raises(FileNotFoundError):
        AudioFolder(tmp_path / "nowhere")
    _write(root / "loose.wav", _tone(440, 0.1))
    with pytest.raises(ValueError, match="layout='flat'"):
        AudioFolder(root)


def test_an_auto_manifest_lives_in_the_cache_folder(messy_folder, tmp_path, monkeypatch, capsys):
    root, _, _ = messy_folder
    monkeypatch.setenv("SCM_MM_CACHE", str(tmp_path / "cache"))
    first = AudioFolder(root, manifest="auto")
    written = list((tmp_path / "cache" / "audio-manifests").glob("*.json"))
    assert [json.loads(p.read_text())["key"] for p in written] == [first.content_key]
    AudioFolder(root, manifest="auto")
    assert "from manifest" in capsys.readouterr().out


def test_audio_folder_manifest_skips_decoding_until_files_change(messy_folder, tmp_path, monkeypatch, capsys):
    root, good, _ = messy_folder
    manifest = tmp_path / "cache" / "manifest.json"
    first = AudioFolder(root, manifest=manifest)
    assert json.loads(manifest.read_text())["key"] == first.content_key
    calls = []
    real = data_module.load_audio

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_audio", counting)
    second = AudioFolder(root, manifest=manifest)
    assert calls == []  # nothing decoded
    assert "from manifest" in capsys.readouterr().out
    assert (second.files, second.labels, second.lengths) == (first.files, first.labels, first.lengths)
    assert (second.skipped, second.dropped, second.fingerprint) == (first.skipped, first.dropped, first.fingerprint)
    assert len(second[0][0][0]) == round(1.008 * SR) and len(calls) == 1  # items still decode

    other_settings = AudioFolder(root, manifest=manifest, min_rms=1e-3)  # another key: scanned again
    assert len(calls) == 1 + 11
    assert other_settings.content_key != first.content_key
    _write(good["low/a.wav"], _tone(220, 2.0))  # a file changes: scanned again, new fingerprint
    calls.clear()
    third = AudioFolder(root, manifest=manifest)
    assert len(calls) == 11 and third.fingerprint != first.fingerprint and third.lengths[2] == 2 * SR


def test_audio_folder_ljspeech_layout(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    for name, seconds in (("LJ001-0001", 1.5), ("LJ001-0002", 0.7)):
        _write(root / "wavs" / f"{name}.wav", _tone(200, seconds, 22050), 22050)
    _write(root / "wavs" / "LJ999-0000.wav", _tone(200, 0.3, 22050), 22050)  # not in metadata: ignored
    (root / "metadata.csv").write_text(
        "LJ001-0001|Printing, in the only sense|Printing, in the only sense\n"
        "LJ001-0002|in being comparatively modern.|in being comparatively modern.\n"
        "LJ001-0003|For although the Chinese took|For although the Chinese took\n",
        encoding="utf-8",
    )
    data = AudioFolder(root, layout="ljspeech", seconds=None)
    assert [p.name for p in data.files] == ["LJ001-0001.wav", "LJ001-0002.wav"]
    assert data.labels == [-1, -1] and data.num_classes == 0
    assert data.lengths == [round(1.5 * SR), round(0.7 * SR)]  # resampled from 22.05 kHz
    assert len(data.skipped) == 1 and "LJ001-0003.wav" in data.skipped[0][0] and "metadata.csv" in data.skipped[0][1]


def _sc09_tree(root):
    speakers = ["0a1b2c3d", "11aa22bb", "99ff00ee"]
    for word in ("zero", "one", "nine", "left", "_background_noise_"):
        for k, speaker in enumerate(speakers):
            _write(root / word / f"{speaker}_nohash_0.wav", _tone(300 + 50 * k, 1.0))
    (root / "validation_list.txt").write_text("zero/11aa22bb_nohash_0.wav\nleft/11aa22bb_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("zero/99ff00ee_nohash_0.wav\none/99ff00ee_nohash_0.wav\n")
    return root


def test_audio_folder_sc09_layout_and_splits(tmp_path):
    root = _sc09_tree(tmp_path / "sc09")
    every = AudioFolder(root, layout="sc09")
    assert every.num_classes == 10 and every.classes[9] == "nine"
    assert sorted(set(every.labels)) == [0, 1, 9] and len(every) == 9  # "left" and the noise ignored
    train = AudioFolder(root, layout="sc09", split="train")
    valid = AudioFolder(root, layout="sc09", split="valid")
    test = AudioFolder(root, layout="sc09", split="test")
    assert (len(train), len(valid), len(test)) == (6, 1, 2)
    assert [p.relative_to(root).as_posix() for p in valid.files] == ["zero/11aa22bb_nohash_0.wav"]
    assert sorted(test.labels) == [0, 1]
    assert not set(train.files) & (set(valid.files) | set(test.files))
    assert len({train.fingerprint, valid.fingerprint, test.fingerprint, every.fingerprint}) == 4
    (root / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testing_list.txt"):
        AudioFolder(root, layout="sc09", split="test")
    with pytest.raises(ValueError, match="sc09"):
        AudioFolder(root, layout="folders", split="train")


def test_audio_folder_nsynth_layout(tmp_path):
    root = tmp_path / "nsynth-test"
    examples = {}
    notes = ((0, "bass_synthetic_033", 40), (4, "keyboard_acoustic_004", 64), (8, "string_acoustic_012", 69))
    for family, name, pitch in notes:
        note = f"{name}-{pitch:03d}-100"
        _write(root / "audio" / f"{note}.wav", _tone(midi_to_hz(pitch), 0.5))
        examples[note] = {"pitch": pitch, "velocity": 100, "instrument_family": family, "note_str": note}
    examples["flute_synthetic_000-060-050"] = {"pitch": 60, "instrument_family": 2}  # its wav is missing
    (root / "examples.json").write_text(json.dumps(examples))
    by_pitch = AudioFolder(root, layout="nsynth")
    assert by_pitch.labels == [40, 64, 69] and by_pitch.num_classes == 128
    by_family = AudioFolder(root, layout="nsynth", label="instrument_family")
    assert by_family.labels == [0, 4, 8] and by_family.classes[8] == "string" and by_family.num_classes == 11
    assert len(by_pitch.skipped) == 1 and "flute_synthetic_000-060-050.wav" in by_pitch.skipped[0][0]
    assert by_pitch.fingerprint != by_family.fingerprint
    # the metrics score pitch accuracy where the classes are pitches
    assert [by_pitch.midi_of_label(y) for y in by_pitch.labels] == [40, 64, 69]
    assert by_family.midi_of_label(4) is None
    with pytest.raises(ValueError, match="label"):
        AudioFolder(root, layout="nsynth", label="velocity_class")


def test_audio_folder_flat_layout(tmp_path):
    root = tmp_path / "flat"
    _write(root / "one.wav", _tone(440, 0.3))
    _write(root / "sub" / "two.flac", _tone(440, 0.3))
    _write(root / ".hidden" / "three.wav", _tone(440, 0.3))
    data = AudioFolder(root, layout="flat", extensions=("wav", "flac"))
    assert [p.relative_to(root).as_posix() for p in data.files] == ["one.wav", "sub/two.flac"]
    assert data.labels == [-1, -1] and data.num_classes == 0
    assert len(AudioFolder(root, layout="flat", extensions=(".flac",))) == 1


# --------------------------------------------------------------------------------- optional builders


def test_render_soundfont_notes_builds_an_nsynth_folder(tmp_path):
    pytest.importorskip("pretty_midi", reason="optional: pip install pretty_midi")
    pytest.importorskip("tinysoundfont", reason="optional: pip install --no-deps tinysoundfont")
    root = render_soundfont_notes(tmp_path / "gm", programs=(0, 73), pitches=(60, 67), velocities=(100,), seconds=1.0)
    examples = json.loads((root / "examples.json").read_text())
    assert sorted(examples) == [
        "flute_synthetic_073-060-100", "flute_synthetic_073-067-100",
        "keyboard_synthetic_000-060-100", "keyboard_synthetic_000-067-100",
    ]  # fmt: skip
    assert examples["flute_synthetic_073-067-100"]["instrument_family_str"] == "flute"
    by_pitch = AudioFolder(root, layout="nsynth", seconds=1.0)
    assert len(by_pitch) == 4 and sorted(by_pitch.labels) == [60, 60, 67, 67] and not by_pitch.skipped
    for i in range(4):
        wave = by_pitch[i][0][0].numpy()
        assert abs(_median_midi(wave, SR, 0.1, 0.6) - by_pitch.labels[i]) < 0.5  # the soundfont plays in tune
    families = AudioFolder(root, layout="nsynth", label="instrument_family")
    assert sorted(set(families.labels)) == [2, 4]  # flute, keyboard


def test_render_soundfont_notes_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tinysoundfont", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install --no-deps tinysoundfont"):
        render_soundfont_notes(tmp_path)


class FakeSynth:
    """A stand-in for tinysoundfont.Synth that plays a sine at the note's pitch (the plumbing test)."""

    def __init__(self, samplerate: int) -> None:
        self.rate, self.pitch, self.done = samplerate, None, 0

    def sfload(self, path):
        return 0

    def sfpreset_name(self, sfid, bank, program):
        return f"preset {program}"

    def sounds_off(self):
        self.pitch, self.done = None, 0

    def program_select(self, channel, sfid, bank, program):
        pass

    def noteon(self, channel, pitch, velocity):
        self.pitch = pitch

    def noteoff(self, channel, pitch):
        pass

    def generate(self, frames: int) -> bytes:
        t = (self.done + np.arange(frames)) / self.rate
        self.done += frames
        mono = 0.3 * np.sin(2 * np.pi * midi_to_hz(self.pitch) * t)
        return np.repeat(mono, 2).astype(np.float32).tobytes()  # interleaved stereo


def test_render_soundfont_notes_plays_every_pitch_for_every_program(tmp_path, monkeypatch):
    package = tmp_path / "site" / "pretty_midi"  # a stand-in pretty_midi that ships the soundfont file
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "TimGM6mb.sf2").write_bytes(b"sf2")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "pretty_midi", raising=False)
    monkeypatch.setitem(sys.modules, "tinysoundfont", types.SimpleNamespace(Synth=FakeSynth))
    pitches = (p for p in (60, 67))  # a generator: read once, played for both programs
    root = render_soundfont_notes(tmp_path / "gm", programs=(0, 73), pitches=pitches, velocities=(100,), seconds=0.25)
    assert sorted(json.loads((root / "examples.json").read_text())) == [
        "flute_synthetic_073-060-100", "flute_synthetic_073-067-100",
        "keyboard_synthetic_000-060-100", "keyboard_synthetic_000-067-100",
    ]  # fmt: skip


FAKE_ESPEAK = """#!/bin/sh
# A stand-in for espeak-ng that copies a 0.5 s, 22.05 kHz tone to the -w file, for the plumbing test.
while [ $# -gt 0 ]; do
    if [ "$1" = "-w" ]; then cp "{template}" "$2"; fi
    shift
done
"""


def test_speak_digits_builds_an_sc09_folder(tmp_path, monkeypatch):
    """With a stand-in espeak-ng (the real one is used by the test below when installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    template = _write(tmp_path / "tone.wav", _tone(300, 0.5, 22050), 22050)
    fake.write_text(FAKE_ESPEAK.format(template=template))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")  # cp, sh
    root = speak_digits(tmp_path / "digits", voices=("en-us", "en-gb"), speeds=(150,), pitches=(20, 40, 60, 80, 99))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(data_module.SC09_WORDS)
    train = AudioFolder(root, layout="sc09", split="train")
    valid = AudioFolder(root, layout="sc09", split="valid")
    test = AudioFolder(root, layout="sc09", split="test")
    assert (len(train), len(valid), len(test)) == (80, 10, 10)  # 10 speakers: 1 for valid, 1 for test
    assert sorted(valid.labels) == list(range(10))
    speakers = lambda d: {p.name for p in d.files}  # noqa: E731
    assert not speakers(train) & speakers(valid) and not speakers(valid) & speakers(test)
    assert train.lengths[0] == SR // 2  # 0.5 s at 22.05 kHz, resampled

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="apt install espeak-ng"):
        speak_digits(tmp_path / "nothing")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="optional: apt install espeak-ng")
def test_speak_digits_with_espeak_ng(tmp_path):
    root = speak_digits(tmp_path / "digits", voices=("en-us",), speeds=(160,), pitches=(50,), held_out=0)
    data = AudioFolder(root, layout="sc09", seconds=None)
    assert len(data) == 10 and sorted(data.labels) == list(range(10)) and not data.skipped
    assert all(0.2 * SR < n < 1.5 * SR for n in data.lengths)  # one spoken word each
