"""The audio modality's plug (`AudioModality`) and its Python API (`AudioSCM`).

    from scm_mm_audio import AudioSCM
    model = AudioSCM.load("runs/notes_scd", vocoder="runs/notes_vocoder")   # Griffin-Lim if no vocoder
    waves, sample_rate = model.generate(8, steps=2, labels=[0, 2, 4, 5, 7, 9, 11, 0], guidance=1.2, seed=0)
    model.save("notes.wav")                      # notes-000.wav ... notes-007.wav, 16-bit PCM, peak-normalised

Durations: a model trained on clips of T frames generates any number of frames that its network's
stride divides (`frame_multiple`); `seconds=` is rounded up to such a frame count and the waveform is
cut to the requested length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchaudio.functional as AF
from torch.utils.data import Dataset

from scm_mm.metrics.classifier import cached_classifier, cached_features
from scm_mm.metrics.reference import subset_indices
from scm_mm.pipeline import SCMPipeline
from scm_mm.train.distributed import Shards

from .codec import MelCodec, codec_from_state
from .io import save_wav
from .metrics import AudioClassifier, classifier_features, evaluate_audio, pitch_accuracy, train_audio_classifier
from .presets import frame_multiple
from .vocoders import load_vocoder


def spectrogram_picture(waves: torch.Tensor, n_fft: int = 256) -> torch.Tensor:
    """Waveforms (B, channels, samples) -> one uint8 RGB picture (3, H, W) for TensorBoard: their
    log-magnitude STFTs stacked, low frequencies at the bottom, the batch's top 80 dB over [0, 255]."""
    window = torch.hann_window(n_fft)
    z = torch.stft(waves.float().mean(1), n_fft, n_fft // 4, window=window, return_complex=True)
    db = 20 * z.abs().clamp_min(1e-5).log10()  # (B, n_fft // 2 + 1, frames)
    db = ((db - (db.amax() - 80)).clamp_min(0) / 80).flip(1)
    gap = torch.ones(db.shape[0], 2, db.shape[2])  # a white line between clips
    gray = (torch.cat([db, gap], 1).flatten(0, 1)[:-2] * 255).round().to(torch.uint8)
    return gray.expand(3, -1, -1).contiguous()


def audio_paths(path: str | Path, n: int, format: str = "wav") -> list[Path]:
    """Where `save` writes n clips: `path` itself for one .wav (.flac), `stem-000.wav`... for several,
    or `000000.wav`... inside `path` when it has another suffix or none (a folder)."""
    path, suffix = Path(path), f".{format}"
    if path.suffix.lower() != suffix:
        return [path / f"{i:06d}{suffix}" for i in range(n)]
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:03d}{suffix}") for i in range(n)]


class AudioModality:
    """The plug of scm_mm.modality.Modality for audio (registered as entry point "audio")."""

    name = "audio"
    default_suffix = ".wav"  # one file per clip

    @property
    def pipeline(self) -> type[AudioSCM]:
        return AudioSCM

    def codec_from_state(self, state: Mapping[str, Any], vocoder: Any = None, **overrides: Any) -> MelCodec:
        """The codec a checkpoint was trained with; `vocoder`: a module, a local path or None (Griffin-Lim)."""
        codec = codec_from_state(state, **overrides)
        return codec if vocoder is None else codec.with_vocoder(load_vocoder(vocoder, codec.spec))

    def preview(self, media: torch.Tensor) -> torch.Tensor:
        return spectrogram_picture(media)

    def save(
        self,
        media: torch.Tensor,            # waveforms (B, channels, samples) in [-1, 1]
        path: str | Path,
        sample_rate: int = 16000,
        format: str = "wav",            # "wav" or "flac"
        subtype: str = "PCM_16",        # soundfile subtype: PCM_16, PCM_24, FLOAT
        normalize: str | None = "peak",  # None, "peak" or "loudness" (io.save_wav)
    ) -> list[Path]:
        """One file per clip (see `audio_paths`)."""
        return [save_wav(wave, p, sample_rate, subtype=subtype, normalize=normalize, format=format)  # type: ignore[arg-type]
                for wave, p in zip(media, audio_paths(path, media.shape[0], format), strict=True)]  # fmt: skip

    def evaluate(
        self,
        waves: torch.Tensor | Iterable[torch.Tensor],  # generated (N, channels, samples), or batches of them
        reference: Dataset,             # real clips: items (wave (channels, samples), label)
        labels: torch.Tensor | None = None,  # the classes the clips were generated for (pitch accuracy)
        sample_rate: int = 16000,
        classifier_path: str | None = None,
        cache_dir: str | Path | None = None,
        max_reference: int = 5000,      # real clips scored against: a random subset of this size
        reference_seed: int = 0,        # which subset; fixed, so scores are reproducible
        shards: Shards | None = None,   # a distributed evaluation: `waves` are this process's share
        **_: Any,                       # image-only options of scm-mm-eval (features, inception_path)
    ) -> dict[str, float]:
        """Frechet distance, IS, precision and recall in the features of a classifier trained on the
        reference data (the SC09 recipe), plus pitch accuracy when the data knows each class's pitch.
        The reference is a uniform subset of at most max_reference clips (`subset_indices`: not the first
        ones, which a folder sorts by speaker or class), reported as "reference_clips" and "reference_seed".
        A reference of random crops is read with centred ones: the same clips at every evaluation.
        The classifier trained here works at the reference's rate; a given one at another rate gets
        both sets of clips resampled to its own. The reference's features are computed once per data, clips
        and classifier weights and kept in `cache_dir` (`cached_features`). With `shards`, each process
        featurises and pitch-analyses its own share and gathers the per-clip rows; `labels` are every
        process's."""
        shards = shards or Shards()
        waves = waves if isinstance(waves, torch.Tensor) else torch.cat(list(waves))
        if getattr(reference, "crop", None) == "random" and hasattr(reference, "with_crop"):
            reference = reference.with_crop("center")
        indices = subset_indices(len(reference), max_reference, reference_seed)  # type: ignore[arg-type]
        with shards.main_first():  # the classifier and the reference's features, computed once and cached
            classifier = self._classifier(reference, classifier_path, cache_dir)
            rate = classifier.spec.sample_rate
            real_rate = int(getattr(reference, "sample_rate", sample_rate))

            def compute() -> dict[str, torch.Tensor]:
                real = torch.stack([torch.as_tensor(reference[i][0]) for i in indices.tolist()]).mean(1)
                real = AF.resample(real.float(), real_rate, rate) if real_rate != rate else real
                return {"features": classifier_features(classifier, real)[0]}

            real_features = cached_features(cache_dir, reference, indices, [classifier], compute)["features"]
        generated = AF.resample(waves.mean(1).float(), sample_rate, rate) if sample_rate != rate else waves.mean(1)
        out = evaluate_audio(generated, real_features, classifier, gather=shards.gather)
        midi_of_label = getattr(reference, "midi_of_label", None)
        midi = [midi_of_label(int(y)) for y in labels] if labels is not None and midi_of_label else [None]
        if None not in midi:  # the classes are pitches (not instruments or speakers)
            target = shards.share(torch.tensor(midi, dtype=torch.float64))
            pitch = pitch_accuracy(waves.mean(1), sample_rate, target, gather=shards.gather)
            out.update({f"pitch_{k}": v for k, v in pitch.items()})
        return {**out, "reference_clips": len(indices), "reference_seed": reference_seed}

    @staticmethod
    def _classifier(reference: Dataset, path: str | None, cache_dir: str | Path | None) -> AudioClassifier:
        def train(data: Dataset, num_classes: int) -> AudioClassifier:
            return train_audio_classifier(data, num_classes=num_classes)

        return cached_classifier(reference, path, cache_dir, AudioClassifier.load, train, name="audio-classifier")


class AudioSCM(SCMPipeline):
    """A trained mel model with its codec and vocoder: `generate` returns (waveforms, sample_rate)."""

    codec: MelCodec
    last: torch.Tensor | None = None

    @property
    def sample_rate(self) -> int:
        return self.codec.spec.sample_rate

    def shape_for(self, seconds: float) -> list[int]:
        """x0 shape of a clip lasting at least `seconds`: frames rounded up to the network's stride."""
        spec, multiple = self.codec.spec, frame_multiple(self.model.net)
        frames = math.ceil(seconds * spec.sample_rate / spec.hop_length) + int(spec.center)  # samples(frames) >= it
        frames = math.ceil(frames / multiple) * multiple
        return [*self.sample_shape[:-1], frames]

    def cut_to_seconds(self, media: torch.Tensor, seconds: float) -> torch.Tensor:
        return media[..., : round(seconds * self.sample_rate)]

    def media_options(self) -> dict[str, Any]:
        return {"sample_rate": self.sample_rate}

    def generate(  # type: ignore[override]
        self,
        n: int,
        steps: int | None = None,       # None: 2 consistency steps, or a teacher's 32 heun steps
        seconds: float | None = None,   # None: the training clips' length
        labels: Any = None,             # class ids (pitch, instrument, ...); None: cycle through the classes
        guidance: float | None = None,  # the CFG scale input of an sCD student
        seed: int | None = None,
        vocoder: Any = None,            # a vocoder module or local path for this call; None: the codec's
        **kwargs: Any,                  # method="heun" for a teacher, t_mid, batch_size
    ) -> tuple[torch.Tensor, int]:
        """n clips: (waveforms (n, channels, samples) in [-1, 1], on the CPU; sample rate)."""
        shape = self.shape_for(seconds) if seconds is not None else None
        x0 = self.sample_latents(n, steps=steps, labels=labels, guidance=guidance, seed=seed, shape=shape, **kwargs)
        codec = self.codec if vocoder is None else self.codec.with_vocoder(load_vocoder(vocoder, self.codec.spec))
        codec.vocoder.to(self.device)  # vocode where the model runs (a GPU), not on the CPU
        waves = codec.decode(x0.float()).cpu()
        if seconds is not None:
            waves = self.cut_to_seconds(waves, seconds)
        self.last = waves
        return waves, self.sample_rate

    def save(
        self,
        path: str | Path,
        waves: torch.Tensor | None = None,  # default: the last generated
        format: str = "wav",                # "wav" or "flac"
        subtype: str = "PCM_16",            # soundfile subtype: PCM_16, PCM_24, FLOAT
        normalize: str | None = "peak",     # None, "peak" (to 0.95) or "loudness" (EBU R128, -23 LUFS)
    ) -> list[Path]:
        """Write one file per clip (see `audio_paths`); returns their paths."""
        waves = self.last if waves is None else waves
        if waves is None:
            raise ValueError("nothing to save: call generate() first or pass waves")
        return self.save_media(waves, path, format=format, subtype=subtype, normalize=normalize)
