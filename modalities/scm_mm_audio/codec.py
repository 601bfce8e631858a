"""The mel codec of the audio modality (`MelCodec`) and the weight-free vocoder (`GriffinLim`).

    waveform (B, channels, samples) --log_mel--> (B, channels, n_mels, T)
        --(log_mel - mean) / std * sigma_d, per mel bin--> x0 in the codec's layout
    x0 --to_mel--> log-mel --vocoder, one channel at a time--> waveform (B, channels, spec.samples(T))

Layouts: "2d" gives x0 (B, channels, n_mels, T) for a 2-D U-Net over (bins x frames); "1d" gives
x0 (B, channels * n_mels, T) (channel-major: row c * n_mels + m) for a transformer over frames whose
channels are the mel bins.

Lengths (pad/crop rules). The codec itself never pads or crops: a clip of `samples` samples encodes to
T = spec.frames(samples) frames (1 + samples // hop centred, samples // hop uncentred) and T frames
decode to spec.samples(T) samples ((T - 1) * hop centred, T * hop uncentred). A clip of exactly
spec.samples(T) samples therefore encodes to T frames and decodes to its own length, aligned sample
for sample. So: pick T (`frames_for(seconds)`, rounded up to what the network's stride divides), then
crop or zero-pad every waveform to spec.samples(T) with `io.fit_length` before encoding. Other lengths
work, but the decoded clip is shorter by the samples that do not fill a hop.

Normalisation. `fit` measures the mean and std of the log-mel of every bin over all frames of a data
set (float64), so that x0 has per-bin mean about 0 and std about sigma_d (the sCM convention for
latents, like the per-channel statistics of scm_mm_image.codecs.SDVAECodec). Bins that the data never
reaches (above its bandwidth, stuck at the clamp floor) have std about 0; dividing by it would turn
any deviation into an enormous x0, so std is floored at `STD_FLOOR_FRACTION` (0.1) times the RMS of
the per-bin stds (the typical spread of a bin): such a bin then carries x0 with std below 0.1 *
sigma_d, the loss weighs it little, and a model error of e in x0 there costs e * floor / sigma_d in
log-mel, which is small. Bins with real content (std of a nat or more) are far above the floor.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .mel import MelSpec, check_specs, log_mel, mel_filters, mel_power, mel_spec

logger = logging.getLogger(__name__)

STD_FLOOR_FRACTION = 0.1  # std floor = this * RMS of the per-bin stds (module docstring)
STATE_FIELDS = ("type", "spec", "sigma_d", "layout", "channels", "mean", "std")


# --- STFT pair with the spec's framing -----------------------------------------------------------


def _window(spec: MelSpec, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    """The periodic Hann window of win_length, zero-padded to n_fft in the middle (as torch.stft does)."""
    w = torch.hann_window(spec.win_length, device=device, dtype=dtype)
    left = (spec.n_fft - spec.win_length) // 2
    return F.pad(w, (left, spec.n_fft - spec.win_length - left))


def stft(wave: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """(..., samples) -> complex STFT (..., n_fft // 2 + 1, spec.frames(samples)), framed as log_mel
    frames it: centred (torch.stft's padding) or HiFi-GAN's (n_fft - hop) / 2 padding without centring."""
    lead = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1])
    if not spec.center:
        pad = (spec.n_fft - spec.hop_length) // 2
        x = F.pad(x[:, None], (pad, pad), mode=spec.pad_mode)[:, 0]
    z = torch.stft(
        x, spec.n_fft, spec.hop_length, window=_window(spec, x.device, x.dtype), center=spec.center,
        pad_mode=spec.pad_mode, return_complex=True,
    )  # fmt: skip
    return z.reshape(*lead, *z.shape[-2:])


def istft(z: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """Complex (..., n_fft // 2 + 1, T) -> (..., spec.samples(T)): windowed overlap-add divided by the
    summed squared window (the least-squares inverse, Griffin & Lim 1984), cut where `stft` padded.
    istft(stft(x)) == x for x of spec.samples(T) samples, centred or not (torch.istft refuses the
    uncentred case: the window envelope is zero at the padded ends, which are cut anyway)."""
    lead, frames = z.shape[:-2], z.shape[-1]
    n, hop = spec.n_fft, spec.hop_length
    w = _window(spec, z.device, z.real.dtype)
    segments = torch.fft.irfft(z.reshape(-1, *z.shape[-2:]), n=n, dim=-2) * w[:, None]  # (N, n_fft, T)
    length = (frames - 1) * hop + n  # the padded signal both framings cut from
    y = F.fold(segments, (1, length), (1, n), stride=(1, hop))[:, 0, 0]
    envelope = F.fold(w.square()[None, :, None].expand(1, n, frames), (1, length), (1, n), stride=(1, hop))[0, 0, 0]
    start = n // 2 if spec.center else (n - hop) // 2
    samples = spec.samples(frames)
    y = y[:, start : start + samples] / envelope[start : start + samples].clamp_min(1e-11)
    return y.reshape(*lead, samples)


# --- Griffin-Lim ---------------------------------------------------------------------------------


class GriffinLim(nn.Module):
    """The weight-free vocoder: log-mel (B, n_mels, T) -> waveform (B, spec.samples(T)).

    1. mel_power(logmel): the mel energies M^T |X|^power, M the (n_freqs, n_mels) filterbank.
    2. |X|^power >= 0 from the mel energies: non-negative least squares min ||M^T X - mel||^2, X >= 0,
       by `nnls_steps` FISTA-accelerated projected-gradient steps (Beck & Teboulle 2009) started from
       the clamped pseudo-inverse (librosa's mel_to_stft solves the same NNLS). Measured by mean |log-mel
       error| over the bins within 60 dB of the peak (64 frames; a harmonic tone, a chord, a sweep and
       white noise on each preset; 3 seeds): the clamped pseudo-inverse alone (nnls_steps=0, what
       torchaudio's InverseMelScale does) misses the mel energies by up to 0.81 nats and leaves
       0.27-0.91 nats after Griffin-Lim; 50 FISTA steps miss by <= 0.03 and leave 0.15-0.42, better in
       every case but white noise (0.06-0.07 either way: the pseudo-inverse is already exact there).
       Bins above fmax have no filter and stay 0: Griffin-Lim makes no sound above the mel fmax.
    3. Fast Griffin-Lim (Perraudin et al. 2013; librosa/torchaudio's update with
       momentum / (1 + momentum)) with the spec's own framing (`stft`/`istft` above), so the output
       has exactly spec.samples(T) samples and is aligned with the analysed clip, centred or not.

    The initial phase is uniform random from `seed`, drawn on the CPU for one (n_freqs, T) item and
    shared by the batch: the same log-mel gives the same waveform on any device and in any batch.
    Buffers are not persistent: the state_dict is empty.
    """

    filters: torch.Tensor  # (n_freqs, n_mels) mel filterbank M
    gram: torch.Tensor  # (n_freqs, n_freqs) M M^T
    pinv: torch.Tensor  # (n_freqs, n_mels) pseudo-inverse of M^T

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any],  # preset name, MelSpec or dict of settings
        n_iter: int = 32,          # Griffin-Lim iterations (torchaudio's default)
        momentum: float = 0.99,    # fast Griffin-Lim momentum in [0, 1); 0: plain Griffin-Lim
        seed: int = 0,             # initial phase
        nnls_steps: int = 50,      # projected-gradient steps of the mel inverse; 0: clamped pseudo-inverse
    ) -> None:
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.spec = mel_spec(spec)
        self.n_iter, self.momentum, self.seed = int(n_iter), float(momentum), int(seed)
        self.nnls_steps = int(nnls_steps)
        filters = mel_filters(self.spec).double()  # (n_freqs, n_mels)
        gram = filters @ filters.T
        self.register_buffer("filters", filters.float(), persistent=False)
        self.register_buffer("gram", gram.float(), persistent=False)
        self.register_buffer("pinv", torch.linalg.pinv(filters.T).float(), persistent=False)  # (n_freqs, n_mels)
        self.step = 1.0 / float(torch.linalg.eigvalsh(gram)[-1])  # 1 / Lipschitz constant of the gradient

    def linear_magnitude(self, logmel: torch.Tensor) -> torch.Tensor:
        """log-mel (..., n_mels, T) -> |X| (..., n_freqs, T) >= 0 whose mel energies match (step 2)."""
        mel = mel_power(logmel.float(), self.spec)
        target = self.filters @ mel  # M mel, (..., n_freqs, T)
        x = (self.pinv @ mel).clamp_min(0)
        y, t = x, 1.0
        for _ in range(self.nnls_steps):
            x_next = (y - self.step * (self.gram @ y - target)).clamp_min(0)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = x_next + ((t - 1) / t_next) * (x_next - x)
            x, t = x_next, t_next
        if self.spec.power != 1.0:
            x = x.pow(1.0 / self.spec.power)
        if self.spec.magnitude_eps:  # the spec measured sqrt(re^2 + im^2 + eps)
            x = (x.square() - self.spec.magnitude_eps).clamp_min(0).sqrt()
        return x

    def initial_phase(self, n_freqs: int, frames: int, device: torch.device) -> torch.Tensor:
        """Unit complex numbers (n_freqs, T) of uniform random phase, the same for a given seed."""
        generator = torch.Generator().manual_seed(self.seed)
        phase = 2 * math.pi * torch.rand(n_freqs, frames, generator=generator)
        return torch.polar(torch.ones_like(phase), phase).to(device)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """log-mel (B, n_mels, T) in the spec's log domain -> waveform (B, spec.samples(T)), float32."""
        if logmel.ndim != 3 or logmel.shape[1] != self.spec.n_mels:
            raise ValueError(f"expected a log-mel (B, {self.spec.n_mels}, T), got shape {tuple(logmel.shape)}")
        magnitude = self.linear_magnitude(logmel)  # (B, n_freqs, T)
        angles = self.initial_phase(magnitude.shape[-2], magnitude.shape[-1], magnitude.device).expand_as(magnitude)
        alpha = self.momentum / (1 + self.momentum)
        previous = torch.zeros((), dtype=angles.dtype, device=angles.device)
        for _ in range(self.n_iter):
            rebuilt = stft(istft(magnitude * angles, self.spec), self.spec)
            angles = rebuilt - alpha * previous
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        return istft(magnitude * angles, self.spec)


# --- the codec -----------------------------------------------------------------------------------


def _floats(values: Sequence[float] | torch.Tensor | None, n: int, name: str) -> list[float] | None:
    if values is None:
        return None
    out = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(out) != n:
        raise ValueError(f"{name} needs one value per mel bin ({n}), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} has non-finite values")
    return out


def _name(dataset: Any, index: int) -> str:
    """The item's file as " (path)" when the dataset reads files (AudioFolder's `files`), else ""."""
    files = getattr(dataset, "files", None)
    return f" ({files[index]})" if files is not None and 0 <= index < len(files) else ""


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


class MelCodec:
    """Waveforms (B, channels, samples) <-> x0 = (log_mel - mean) / std * sigma_d per mel bin (the
    module docstring has the layouts, the length rules and the std floor). Fit the statistics with
    `fit` (or give them) before encoding; decoding goes through a vocoder, Griffin-Lim by default."""

    cacheable = True  # an STFT per clip: scm_mm.data encodes a dataset once and caches it

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any] = "small_16k",  # preset name, MelSpec or dict of settings
        sigma_d: float = 0.5,                    # std of x0 in each bin after normalisation
        layout: Literal["2d", "1d"] = "2d",      # x0 (B, C, n_mels, T) or (B, C * n_mels, T)
        channels: int = 1,                       # audio channels (1 mono, 2 stereo)
        mean: Sequence[float] | None = None,     # per-bin log-mel mean (n_mels floats); None until fitted
        std: Sequence[float] | None = None,      # per-bin log-mel std (n_mels floats, floored); None until fitted
        vocoder: nn.Module | None = None,        # log-mel -> waveform with the same spec; None: GriffinLim(spec)
    ) -> None:
        self.spec = mel_spec(spec)
        if layout not in ("2d", "1d"):
            raise ValueError(f"layout must be '2d' or '1d', got {layout!r}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then call fit)")
        self.sigma_d, self.layout, self.channels = float(sigma_d), layout, int(channels)
        self.mean = _floats(mean, self.spec.n_mels, "mean")
        self.std = _floats(std, self.spec.n_mels, "std")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive in every bin, got min {min(self.std)}")
        self.vocoder = GriffinLim(self.spec) if vocoder is None else self._checked(vocoder)

    def to(self, device: str | torch.device) -> MelCodec:
        """Vocode on `device`; returns self."""
        self.vocoder.to(device)
        return self

    # -- statistics

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    @torch.no_grad()
    def fit(self, raw_dataset: Any, max_items: int = 2000, batch_size: int = 64) -> MelCodec:
        """Measure the per-bin mean and std of the log-mel over all frames (and channels) of up to
        `max_items` items, at evenly spaced indices, in float64; std floored (module docstring).
        raw_dataset: items (wave (channels, samples), label). A dataset of random crops (one with
        `random_views`, see scm_mm.data) is measured on the whole clips the crops are cut from: every
        frame of the data, and the same statistics (so the same cache key) at every run. Items shorter
        than the spec's STFT needs (`spec.min_samples`: a click, a truncated file) are left out with a
        warning that names them. Returns self."""
        views = raw_dataset.random_views(self) if hasattr(raw_dataset, "random_views") else None
        if views is not None:
            raw_dataset = views[0]
        n = len(raw_dataset)
        if n == 0:
            raise ValueError("cannot fit the mel statistics on an empty dataset")
        rate = getattr(raw_dataset, "sample_rate", self.spec.sample_rate)
        if rate != self.spec.sample_rate:
            raise ValueError(f"the dataset gives {rate} Hz audio but the mel spec expects {self.spec.sample_rate} Hz; "
                             f"set the dataset's sample_rate to {self.spec.sample_rate}")
        k = min(max_items, n)
        indices = [i * n // k for i in range(k)]  # evenly spaced, deterministic
        count = 0  # frames measured
        mean = torch.zeros(self.spec.n_mels, dtype=torch.float64)
        m2 = torch.zeros(self.spec.n_mels, dtype=torch.float64)  # sum of squared deviations from the mean
        for start in range(0, k, batch_size):
            for mels in self._batch_mels(raw_dataset, indices[start : start + batch_size]):
                values = mels.double().transpose(-2, -1).reshape(-1, self.spec.n_mels)  # (frames, n_mels)
                # Chan et al.'s pairwise update of (count, mean, M2): no cancellation of large sums
                b_count, b_mean = values.shape[0], values.mean(0)
                b_m2 = (values - b_mean).square().sum(0)
                delta, total = b_mean - mean, count + b_count
                mean = mean + delta * (b_count / total)
                m2 = m2 + b_m2 + delta.square() * (count * b_count / total)
                count = total
        if count == 0:
            raise ValueError(f"no item of the dataset is long enough for the mel spec ({self.spec.min_samples} "
                             "samples): nothing to measure")  # fmt: skip
        std = (m2 / count).sqrt()
        floor = max(STD_FLOOR_FRACTION * float(std.square().mean().sqrt()), 1e-6)
        self.mean, self.std = mean.tolist(), std.clamp_min(floor).tolist()
        return self

    def _batch_mels(self, raw_dataset: Any, indices: list[int]) -> list[torch.Tensor]:
        """Log-mels (..., n_mels, T) of the items at `indices`, stacked where their lengths agree. Items
        too short for the spec's STFT are left out with a warning naming them."""
        waves = []
        for i in indices:
            wave = torch.as_tensor(raw_dataset[i][0])
            if wave.ndim != 2 or wave.shape[0] != self.channels:
                raise ValueError(
                    f"dataset item {i}{_name(raw_dataset, i)}: expected a waveform ({self.channels}, samples), "
                    f"got shape {tuple(wave.shape)}"
                )
            if not torch.isfinite(wave).all():
                raise ValueError(f"dataset item {i}{_name(raw_dataset, i)}: the waveform has non-finite samples")
            if wave.shape[-1] < self.spec.min_samples:
                logger.warning("dataset item %d%s: %d samples, fewer than the %d the mel spec needs; left out of "
                               "the statistics", i, _name(raw_dataset, i), wave.shape[-1], self.spec.min_samples)
                continue
            waves.append(wave.float())
        if not waves:
            return []
        if all(w.shape == waves[0].shape for w in waves):
            return [log_mel(torch.stack(waves), self.spec)]
        return [log_mel(w, self.spec) for w in waves]

    # -- encode / decode

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and std as (n_mels, 1) tensors on like's device."""
        if self.mean is None or self.std is None:
            raise ValueError("the mel codec is not fitted: call codec.fit(raw_dataset) or give mean and std")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=like.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=like.device)
        return mean[:, None], std[:, None]

    def encode(self, media: torch.Tensor) -> torch.Tensor:
        """Waveforms (B, channels, samples) in [-1, 1] -> x0 float32: (B, channels, n_mels, T) for
        layout "2d", (B, channels * n_mels, T) for "1d"; T = spec.frames(samples)."""
        if media.ndim != 3 or media.shape[1] != self.channels:
            raise ValueError(
                f"the mel codec expects waveforms (B, {self.channels}, samples), got shape {tuple(media.shape)}"
            )
        mean, std = self._stats(media)
        x0 = (log_mel(media, self.spec) - mean) * (self.sigma_d / std)  # (B, C, n_mels, T)
        return x0.flatten(1, 2) if self.layout == "1d" else x0

    def to_mel(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in the codec's layout -> log-mel (B, channels, n_mels, T), un-normalised (the vocoder's input)."""
        c, m = self.channels, self.spec.n_mels
        if self.layout == "1d":
            if x0.ndim != 3 or x0.shape[1] != c * m:
                raise ValueError(f"layout '1d' expects x0 (B, {c * m}, T), got shape {tuple(x0.shape)}")
            x0 = x0.unflatten(1, (c, m))
        elif x0.ndim != 4 or x0.shape[1:3] != (c, m):
            raise ValueError(f"layout '2d' expects x0 (B, {c}, {m}, T), got shape {tuple(x0.shape)}")
        mean, std = self._stats(x0)
        return x0.float() * (std / self.sigma_d) + mean

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 in the codec's layout -> waveforms (B, channels, spec.samples(T)) in [-1, 1], on x0's device,
        through the vocoder (on its own device) one channel at a time."""
        mel = self.to_mel(x0)
        device = _device_of(self.vocoder)
        device = mel.device if device is None else device
        waves = [self.vocoder(mel[:, c].to(device)).float().to(x0.device) for c in range(self.channels)]
        return torch.stack(waves, 1).clamp(-1, 1)

    # -- lengths, state, vocoder

    def frames_for(self, seconds: float) -> int:
        """Frames of a clip lasting `seconds` (round(seconds * sample_rate) samples)."""
        return self.spec.frames(round(seconds * self.spec.sample_rate))

    def state(self) -> dict[str, Any]:
        return {
            "type": "mel",
            "spec": self.spec.to_dict(),
            "sigma_d": self.sigma_d,
            "layout": self.layout,
            "channels": self.channels,
            "mean": self.mean,  # log-mel units of the spec, per bin
            "std": self.std,
        }

    def _checked(self, vocoder: nn.Module) -> nn.Module:
        found = getattr(vocoder, "spec", None)
        if not isinstance(found, MelSpec):
            raise TypeError(
                f"a vocoder must carry its mel settings as .spec (a MelSpec); {type(vocoder).__name__} has none"
            )
        check_specs(self.spec, found, "mel settings of the codec and the vocoder")
        return vocoder

    def with_vocoder(self, vocoder: nn.Module) -> MelCodec:
        """A copy of this codec that decodes with `vocoder`; refused (ValueError listing every differing
        field) if the vocoder's spec differs from the codec's."""
        out = copy.copy(self)
        out.vocoder = self._checked(vocoder)
        return out

    def __repr__(self) -> str:
        fitted = "fitted" if self.fitted else "not fitted"
        return (
            f"MelCodec({self.spec.sample_rate} Hz, {self.spec.n_mels} bins, layout={self.layout!r}, "
            f"channels={self.channels}, sigma_d={self.sigma_d}, {fitted}, vocoder={type(self.vocoder).__name__})"
        )


def codec_from_state(state: Mapping[str, Any], vocoder: nn.Module | None = None, **overrides: Any) -> MelCodec:
    """Rebuild the codec a checkpoint stored with `state()`. vocoder: None for Griffin-Lim; overrides:
    other constructor arguments. Refuses another "type", missing fields and unknown fields."""
    if state.get("type") != "mel":
        raise ValueError(f"not a mel codec state: type is {state.get('type', '<missing>')!r}, expected 'mel'")
    missing = [k for k in STATE_FIELDS if k not in state]
    unknown = sorted(set(state) - set(STATE_FIELDS))
    if missing or unknown:
        raise ValueError(
            f"mel codec state: missing fields {missing}, unknown fields {unknown}; expected {list(STATE_FIELDS)}"
        )
    kwargs = {k: state[k] for k in STATE_FIELDS if k != "type"}
    kwargs["spec"] = MelSpec.from_dict(state["spec"])
    return MelCodec(**{**kwargs, **overrides}, vocoder=vocoder)
