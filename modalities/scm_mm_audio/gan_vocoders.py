"""Pretrained HiFi-GAN and BigVGAN generators, loaded from local checkpoints with strict key matching.

The modules reproduce the generators of jik876/hifi-gan (models.py; Kong et al. 2020) and NVIDIA/BigVGAN
(bigvgan.py, activations.py, alias_free_activation/torch; Lee et al. 2023, "BigVGAN: a universal neural
vocoder with large-scale training") with the same parameter and buffer names, so that the published
weights load with no key left over:

    HiFi-GAN  logmel (B, n_mels, T) -> conv_pre -> [LeakyReLU(0.1) -> ups.i -> mean_j resblocks[i*K + j]]
              -> LeakyReLU(0.01) -> conv_post -> tanh -> (B, 1, T * prod(upsample_rates))
              ResBlock1 ("1", V1/V2): 3 x [x + convs2.j(lrelu(convs1.j(lrelu(x))))], dilations d_j then 1
              ResBlock2 ("2", V3):    2 x [x + convs.j(lrelu(x))]
    BigVGAN   logmel -> conv_pre -> [ups.i.0 -> mean_j resblocks[i*K + j]] -> activation_post -> conv_post
              -> tanh, or clamp to [-1, 1] (use_tanh_at_final=false, the v2 checkpoints)
              AMPBlock1 / AMPBlock2: the two resblocks with each LeakyReLU replaced by an anti-aliased
              Snake or SnakeBeta (`Activation1d`: x2 upsample -> activation -> x2 downsample)

Both give T * hop samples for T frames (checked: prod(upsample_rates) == hop_size), which is
`spec.samples(T)` for their uncentred mels (center=False: samples // hop frames).

Weight norm. The official training code wraps every convolution in torch.nn.utils.weight_norm(dim=0),
so a checkpoint stores `<conv>.weight_g` (the norm, over all dims but 0: per output channel of a
Conv1d, per *input* channel of a ConvTranspose1d) and `<conv>.weight_v` (the direction); newer torch
writes `<conv>.parametrizations.weight.original0/1` for the same pair. The modules here hold plain
`weight`s (the inference layout after remove_weight_norm): `fuse_weight_norm` turns either pair into
weight = g * v / ||v|| before a strict load, and `weight_norm_state` writes the training layout back.

Mels: `spec_from_hparams` reads a config.json's mel fields with HiFi-GAN's conventions
(meldataset.py): librosa Slaney filters, |STFT| with 1e-9 inside the root, ln(clamp(x, 1e-5)),
reflect padding of (n_fft - hop) / 2 and no centring; BigVGAN's meldataset.py is the same, with
fmax = null meaning sr / 2. Nothing here downloads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scm_mm.train.checkpoint import load_into, writing_directory

from .mel import MelSpec, check_specs, mel_spec

LRELU_SLOPE = 0.1  # hifi-gan models.py; the last LeakyReLU before conv_post keeps torch's default 0.01
SNAKE_EPS = 1e-9  # activations.py: 1 / (alpha + eps)
HIFIGAN_FILE = "g_00000000"  # train.py names generator checkpoints g_<8-digit step>
BIGVGAN_FILE = "bigvgan_generator.pt"  # BigVGAN.from_pretrained reads this beside config.json

MEL_FIELDS = ("sampling_rate", "n_fft", "hop_size", "win_size", "num_mels", "fmin", "fmax")
HIFIGAN_FIELDS = ("resblock", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                  "resblock_kernel_sizes", "resblock_dilation_sizes")  # fmt: skip
BIGVGAN_FIELDS = (*HIFIGAN_FIELDS, "activation", "snake_logscale")
BIGVGAN_OPTIONAL = {"use_tanh_at_final": True, "use_bias_at_final": True}  # bigvgan.py: h.get(name, True)


def _require(h: Mapping[str, Any], names: Sequence[str], where: str) -> None:
    missing = [name for name in names if name not in h]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}")


def spec_from_hparams(h: Mapping[str, Any], where: str = "the config") -> MelSpec:
    """A HiFi-GAN / BigVGAN config's mel fields -> MelSpec with their mel conventions (module docstring).
    The V1 config gives PRESETS["hifigan_22k"]; fmax null -> sampling_rate / 2 (librosa's default)."""
    _require(h, MEL_FIELDS, where)
    sample_rate = int(h["sampling_rate"])
    return MelSpec(
        sample_rate=sample_rate, n_fft=int(h["n_fft"]), hop_length=int(h["hop_size"]),
        win_length=int(h["win_size"]), window="hann", n_mels=int(h["num_mels"]), fmin=float(h["fmin"]),
        fmax=float(sample_rate / 2 if h["fmax"] is None else h["fmax"]), mel_scale="slaney", mel_norm="slaney",
        power=1.0, magnitude_eps=1e-9, log="ln", clamp=1e-5, center=False, pad_mode="reflect",
    )  # fmt: skip


def hparams_from_spec(spec: MelSpec) -> dict[str, Any]:
    """The inverse of `spec_from_hparams`; refuses a spec HiFi-GAN's mel code cannot compute."""
    h = {
        "sampling_rate": spec.sample_rate, "n_fft": spec.n_fft, "hop_size": spec.hop_length,
        "win_size": spec.win_length, "num_mels": spec.n_mels, "fmin": spec.fmin, "fmax": spec.fmax,
    }  # fmt: skip
    check_specs(spec_from_hparams(h), spec, "mel settings HiFi-GAN/BigVGAN configs can express and this spec's")
    return h


# ---- weight norm ------------------------------------------------------------------------------

_WEIGHT_NORM_PAIRS = (  # (g, v) suffixes: torch.nn.utils.weight_norm, then its parametrizations version
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fuse_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with weight-norm pairs -> one with `<conv>.weight = g * v / ||v||` (norm over all dims
    but 0, as weight_norm(dim=0)) in float32, in g's place. Other entries pass unchanged; a g without its v
    (or the reverse) stays too, so that a strict load reports it."""
    pairs = {}  # g key -> (v key, fused key)
    for g_suffix, v_suffix in _WEIGHT_NORM_PAIRS:
        for key in state:
            prefix = key[: -len(g_suffix)]
            if key.endswith(g_suffix) and prefix + v_suffix in state:
                pairs[key] = (prefix + v_suffix, prefix + ".weight")
    directions = {v_key for v_key, _ in pairs.values()}
    out = {}
    for key, tensor in state.items():
        if key in pairs:
            v_key, fused_key = pairs[key]
            g, v = tensor.float(), state[v_key].float()
            out[fused_key] = v * (g / torch.norm_except_dim(v, 2, 0))
        elif key not in directions:
            out[key] = tensor
    return out


def weight_norm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """module's state dict (CPU copies) in the official training layout: every convolution's `weight`
    becomes weight_g = ||weight|| (over all dims but 0) and weight_v = weight, as torch.nn.utils.weight_norm
    stores a freshly wrapped layer."""
    convs = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))}
    state = {}
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").clone()
        if key in convs:
            state[key[: -len("weight")] + "weight_g"] = torch.norm_except_dim(tensor, 2, 0)
            state[key[: -len("weight")] + "weight_v"] = tensor
        else:
            state[key] = tensor
    return state


# ---- HiFi-GAN ---------------------------------------------------------------------------------


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 dilated convolution (odd kernel)."""
    return (kernel_size * dilation - dilation) // 2


def _conv(channels: int, kernel_size: int, dilation: int) -> nn.Conv1d:
    return nn.Conv1d(channels, channels, kernel_size, 1, dilation=dilation, padding=get_padding(kernel_size, dilation))


def _init_weights(module: nn.Module) -> None:
    """The official init (utils.init_weights): N(0, 0.01) for every convolution's weight."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.01)


class ResBlock1(nn.Module):
    """HiFi-GAN's resblock "1": for each dilation d, x += convs2(lrelu(convs1_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilation: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilation])
        self.convs2 = nn.ModuleList([_conv(channels, kernel_size, 1) for _ in dilation])
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    """HiFi-GAN's resblock "2" (V3): for each dilation d, x += convs_d(lrelu(x))."""

    def __init__(self, channels: int, kernel_size: int, dilation: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilation])
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
        return x


def _check_upsampling(spec: MelSpec, rates: Sequence[int], kernels: Sequence[int], who: str) -> None:
    """T frames must give spec.samples(T) = T * hop samples: uncentred mels, prod(rates) = hop, and
    each transposed conv (padding (k - u) / 2) multiplying the length exactly by u."""
    if spec.center:
        raise ValueError(f"{who} inverts uncentred mels (T * hop samples for T frames): the spec needs center=False")
    if len(rates) != len(kernels):
        raise ValueError(f"{who}: {len(rates)} upsample_rates but {len(kernels)} upsample_kernel_sizes")
    if math.prod(rates) != spec.hop_length:
        product = math.prod(rates)
        raise ValueError(f"{who}: upsample_rates {list(rates)} multiply to {product}, not hop {spec.hop_length}")
    odd = [(u, k) for u, k in zip(rates, kernels) if (k - u) % 2 or k < u]
    if odd:
        raise ValueError(f"{who}: (rate, kernel) {odd}: kernel - rate must be even and >= 0 for T * rate outputs")


def _upsampler(channels: int, i: int, rate: int, kernel: int) -> nn.ConvTranspose1d:
    return nn.ConvTranspose1d(channels // 2**i, channels // 2 ** (i + 1), kernel, rate, padding=(kernel - rate) // 2)


class _GANGenerator(nn.Module):
    """What the HiFi-GAN and BigVGAN generators share: the mels they invert (`spec`), the config.json
    fields that rebuild them (`arch`) and the check of their input."""

    spec: MelSpec
    arch: dict[str, Any]

    def hparams(self) -> dict[str, Any]:
        """The config.json fields that rebuild this generator (`from_hparams`) and its mels."""
        return {**self.arch, **hparams_from_spec(self.spec)}

    def _check(self, logmel: torch.Tensor) -> None:
        if logmel.ndim != 3 or logmel.shape[1] != self.spec.n_mels:
            raise ValueError(f"expected log-mels (B, {self.spec.n_mels}, T), got {tuple(logmel.shape)}")


def _arch(
    resblock: str,
    upsample_rates: Sequence[int],
    upsample_kernel_sizes: Sequence[int],
    upsample_initial_channel: int,
    resblock_kernel_sizes: Sequence[int],
    resblock_dilation_sizes: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """The architecture fields both generators' config.json files share, as plain JSON values."""
    return {
        "resblock": resblock, "upsample_rates": [int(u) for u in upsample_rates],
        "upsample_kernel_sizes": [int(k) for k in upsample_kernel_sizes],
        "upsample_initial_channel": int(upsample_initial_channel),
        "resblock_kernel_sizes": [int(k) for k in resblock_kernel_sizes],
        "resblock_dilation_sizes": [[int(d) for d in ds] for ds in resblock_dilation_sizes],
    }  # fmt: skip


class HiFiGANGenerator(_GANGenerator):
    """The HiFi-GAN generator as a vocoder: forward(logmel (B, n_mels, T)) -> wave (B, spec.samples(T)).

    Defaults are config_v1.json; V2 has upsample_initial_channel=128; V3 resblock="2",
    upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8), upsample_initial_channel=256,
    resblock_kernel_sizes=(3, 5, 7), resblock_dilation_sizes=((1, 2), (2, 6), (3, 12)).
    `from_hparams` builds one from a config.json dict.
    """

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any] = "hifigan_22k",       # the mels it inverts (uncentred)
        resblock: str = "1",                                           # "1": ResBlock1 (V1, V2); "2": ResBlock2 (V3)
        upsample_rates: Sequence[int] = (8, 8, 2, 2),                  # their product is the hop
        upsample_kernel_sizes: Sequence[int] = (16, 16, 4, 4),
        upsample_initial_channel: int = 512,                           # halved after each upsampling
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),             # one resblock per kernel, averaged
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
    ) -> None:
        super().__init__()
        self.spec = mel_spec(spec)
        _check_upsampling(self.spec, upsample_rates, upsample_kernel_sizes, "HiFiGANGenerator")
        convs_per_block = {"1": 3, "2": 2}  # the official blocks read exactly this many dilations
        if resblock not in convs_per_block:
            raise ValueError(f"resblock must be '1' or '2', got {resblock!r}")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes) or any(
            len(d) != convs_per_block[resblock] for d in resblock_dilation_sizes
        ):
            raise ValueError(
                f"resblock {resblock!r} needs one list of {convs_per_block[resblock]} dilations per kernel size; "
                f"got resblock_kernel_sizes {list(resblock_kernel_sizes)}, "
                f"resblock_dilation_sizes {resblock_dilation_sizes}"
            )
        self.arch = _arch(resblock, upsample_rates, upsample_kernel_sizes, upsample_initial_channel,
                          resblock_kernel_sizes, resblock_dilation_sizes)  # fmt: skip
        block = ResBlock1 if resblock == "1" else ResBlock2
        c = upsample_initial_channel
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(self.spec.n_mels, c, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            [_upsampler(c, i, u, k) for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))]
        )
        self.resblocks = nn.ModuleList(
            [
                block(c // 2 ** (i + 1), k, d)
                for i in range(len(self.ups))
                for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)
            ]
        )
        self.conv_post = nn.Conv1d(c // 2 ** len(self.ups), 1, 7, 1, padding=3)
        _init_weights(self.ups)
        _init_weights(self.conv_post)

    @classmethod
    def from_hparams(cls, h: Mapping[str, Any], where: str = "the config") -> HiFiGANGenerator:
        """From a hifi-gan config.json dict (config_v1.json ...); other fields (batch_size ...) are ignored."""
        _require(h, HIFIGAN_FIELDS, where)
        return cls(spec_from_hparams(h, where), **{name: h[name] for name in HIFIGAN_FIELDS})

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        self._check(logmel)
        x = self.conv_pre(logmel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels  # type: ignore[assignment]
        x = torch.tanh(self.conv_post(F.leaky_relu(x)))  # slope 0.01 here, as in models.py
        return x[:, 0]  # (B, T * hop)


# ---- BigVGAN: anti-aliased periodic activations -------------------------------------------------


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """A (1, 1, kernel_size) Kaiser-windowed sinc low-pass with unit DC gain; `cutoff` and the transition
    `half_width` in cycles per sample. The window's beta follows Kaiser's empirical formula for the
    stop-band attenuation A (dB) as alias-free-torch/julius compute it: A = 2.285 (K/2 - 1) pi (4 half_width)
    + 7.95 (ratio 2, K = 12: A = 51.0 dB, beta = 4.66). Even K: taps at half-integer times."""
    if not 0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5] cycles per sample, got {cutoff}")
    attenuation = 2.285 * (kernel_size // 2 - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    # computed on the CPU (a few taps; also under a meta-device context), then moved to the default device
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False, device="cpu")
    time = torch.arange(kernel_size, device="cpu") - (kernel_size - 1) / 2
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    return (taps / taps.sum()).view(1, 1, kernel_size).to(torch.get_default_device())


class LowPassFilter1d(nn.Module):
    """Depthwise low-pass over (B, C, T), replicate-padded to keep the length (before the stride)."""

    filter: torch.Tensor  # (1, 1, kernel_size) buffer, stored in the checkpoints

    def __init__(self, cutoff: float = 0.5, half_width: float = 0.6, stride: int = 1, kernel_size: int = 12) -> None:
        super().__init__()
        self.stride = stride
        self.pad_left = kernel_size // 2 - (1 - kernel_size % 2)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(x.shape[1], -1, -1), stride=self.stride, groups=x.shape[1])


class UpSample1d(nn.Module):
    """(B, C, T) -> (B, C, ratio * T): zero-stuffing and the low-pass in one transposed conv, gain ratio.
    For ratio 2 and 12 taps, output sample m lies at input time (m - 1/2) / 2 (a quarter-sample delay),
    which DownSample1d's half-sample offset undoes: Activation1d keeps the timing."""

    filter: torch.Tensor  # (1, 1, kernel_size) buffer, stored in the checkpoints

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.ratio = ratio
        self.pad = kernel_size // ratio - 1  # input samples replicated at each end
        self.trim_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.trim_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = F.conv_transpose1d(x, self.filter.expand(x.shape[1], -1, -1), stride=self.ratio, groups=x.shape[1])
        return self.ratio * x[..., self.trim_left : x.shape[-1] - self.trim_right]


class DownSample1d(nn.Module):
    """(B, C, ratio * T) -> (B, C, T): the low-pass, then every ratio-th sample."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, stride=ratio, kernel_size=kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x)


class Activation1d(nn.Module):
    """An anti-aliased pointwise activation: run it at twice the rate, low-passed on the way up and down,
    so that the harmonics it creates above the input's Nyquist frequency are filtered instead of aliased."""

    def __init__(self, activation: nn.Module, ratio: int = 2, kernel_size: int = 12) -> None:
        super().__init__()
        self.act = activation
        self.upsample = UpSample1d(ratio, kernel_size)
        self.downsample = DownSample1d(ratio, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x)))


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha per channel (Ziyin et al. 2020); alpha = exp(param) if logscale."""

    def __init__(self, channels: int, logscale: bool = False) -> None:
        super().__init__()
        self.logscale = logscale
        self.alpha = nn.Parameter(torch.zeros(channels) if logscale else torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]
        alpha = alpha.exp() if self.logscale else alpha
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha) ** 2


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta per channel (BigVGAN): frequency and magnitude apart."""

    def __init__(self, channels: int, logscale: bool = False) -> None:
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.alpha[None, :, None], self.beta[None, :, None]
        if self.logscale:
            alpha, beta = alpha.exp(), beta.exp()
        return x + (1.0 / (beta + SNAKE_EPS)) * torch.sin(x * alpha) ** 2


ACTIVATIONS: dict[str, type[nn.Module]] = {"snake": Snake, "snakebeta": SnakeBeta}


def _activations(n: int, activation: str, channels: int, logscale: bool) -> nn.ModuleList:
    return nn.ModuleList([Activation1d(ACTIVATIONS[activation](channels, logscale)) for _ in range(n)])


class AMPBlock1(nn.Module):
    """BigVGAN's AMP block "1": ResBlock1 with anti-aliased Snake(Beta) in place of each LeakyReLU;
    activations[2j] precedes convs1[j], activations[2j + 1] precedes convs2[j]."""

    def __init__(self, channels: int, kernel_size: int, dilation: Sequence[int], activation: str, logscale: bool):
        super().__init__()
        self.convs1 = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilation])
        self.convs2 = nn.ModuleList([_conv(channels, kernel_size, 1) for _ in dilation])
        self.activations = _activations(2 * len(dilation), activation, channels, logscale)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations[::2], self.activations[1::2]):
            x = x + c2(a2(c1(a1(x))))
        return x


class AMPBlock2(nn.Module):
    """BigVGAN's AMP block "2": for each dilation d, x += convs_d(activations_d(x))."""

    def __init__(self, channels: int, kernel_size: int, dilation: Sequence[int], activation: str, logscale: bool):
        super().__init__()
        self.convs = nn.ModuleList([_conv(channels, kernel_size, d) for d in dilation])
        self.activations = _activations(len(dilation), activation, channels, logscale)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, act in zip(self.convs, self.activations):
            x = x + conv(act(x))
        return x


class BigVGANGenerator(_GANGenerator):
    """The BigVGAN (v1 and v2) generator as a vocoder: forward(logmel (B, n_mels, T)) -> (B, spec.samples(T)).

    Defaults are bigvgan_v2_22khz_80band_fmax8k_256x (whose mels are PRESETS["hifigan_22k"]), 112M
    parameters; bigvgan_base_* have upsample_rates=(8, 8, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4),
    upsample_initial_channel=512 and tanh/bias at the end. `from_hparams` builds one from config.json.
    """

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any] = "hifigan_22k",        # the mels it inverts (uncentred)
        resblock: str = "1",                                            # "1": AMPBlock1, "2": AMPBlock2
        upsample_rates: Sequence[int] = (4, 4, 2, 2, 2, 2),             # their product is the hop
        upsample_kernel_sizes: Sequence[int] = (8, 8, 4, 4, 4, 4),
        upsample_initial_channel: int = 1536,                           # halved after each upsampling
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5),) * 3,
        activation: str = "snakebeta",                                  # "snake" or "snakebeta"
        snake_logscale: bool = True,                                    # alpha (and beta) stored as logs
        use_tanh_at_final: bool = False,                                # v2: clamp to [-1, 1] instead
        use_bias_at_final: bool = False,                                # v2: conv_post without bias
    ) -> None:
        super().__init__()
        self.spec = mel_spec(spec)
        _check_upsampling(self.spec, upsample_rates, upsample_kernel_sizes, "BigVGANGenerator")
        blocks = {"1": AMPBlock1, "2": AMPBlock2}
        if resblock not in blocks:
            raise ValueError(f"resblock must be '1' or '2', got {resblock!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError(f"resblock_kernel_sizes {list(resblock_kernel_sizes)} and resblock_dilation_sizes "
                             f"{resblock_dilation_sizes} differ in length")  # fmt: skip
        self.arch = {
            **_arch(resblock, upsample_rates, upsample_kernel_sizes, upsample_initial_channel,
                    resblock_kernel_sizes, resblock_dilation_sizes),
            "activation": activation, "snake_logscale": bool(snake_logscale),
            "use_tanh_at_final": bool(use_tanh_at_final), "use_bias_at_final": bool(use_bias_at_final),
        }  # fmt: skip
        c = upsample_initial_channel
        self.num_kernels = len(resblock_kernel_sizes)
        self.use_tanh_at_final = use_tanh_at_final
        self.conv_pre = nn.Conv1d(self.spec.n_mels, c, 7, 1, padding=3)
        # each upsampler sits in a one-element list (keys ups.i.0.*): bigvgan.py's layout
        self.ups = nn.ModuleList(
            [
                nn.Sequential(_upsampler(c, i, u, k))
                for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
            ]
        )
        self.resblocks = nn.ModuleList(
            [
                blocks[resblock](c // 2 ** (i + 1), k, d, activation, snake_logscale)
                for i in range(len(self.ups))
                for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)
            ]
        )
        out = c // 2 ** len(self.ups)
        self.activation_post = Activation1d(ACTIVATIONS[activation](out, snake_logscale))
        self.conv_post = nn.Conv1d(out, 1, 7, 1, padding=3, bias=use_bias_at_final)
        _init_weights(self.ups)
        _init_weights(self.conv_post)

    @classmethod
    def from_hparams(cls, h: Mapping[str, Any], where: str = "the config") -> BigVGANGenerator:
        """From a BigVGAN config.json dict; absent use_tanh_at_final / use_bias_at_final mean true (v1
        configs), as in bigvgan.py. Training fields (discriminators, losses ...) are ignored."""
        _require(h, BIGVGAN_FIELDS, where)
        kwargs = {name: h[name] for name in BIGVGAN_FIELDS}
        kwargs.update({name: h.get(name, default) for name, default in BIGVGAN_OPTIONAL.items()})
        return cls(spec_from_hparams(h, where), **kwargs)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        self._check(logmel)
        x = self.conv_pre(logmel)
        for i, up in enumerate(self.ups):
            x = up(x)  # no activation before upsampling in BigVGAN
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels  # type: ignore[assignment]
        x = self.conv_post(self.activation_post(x))
        x = torch.tanh(x) if self.use_tanh_at_final else x.clamp(-1.0, 1.0)
        return x[:, 0]  # (B, T * hop)


# ---- loading and saving the official layouts ------------------------------------------------------


def read_hparams(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A config.json path or an already-read dict -> (dict, a name for it in messages)."""
    if isinstance(config, Mapping):
        return dict(config), "the given config"
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"no config at {path}: expected the config.json the checkpoint was trained with")
    return json.loads(path.read_text()), str(path)


def is_generator_file(path: Path) -> bool:
    """g_<step> from HiFi-GAN's or BigVGAN's train.py (and BigVGAN's v1 releases), or generator_* as in
    HiFi-GAN's released LJ_V1 / VCTK folders (generator_v1 ...)."""
    return path.is_file() and (path.name.startswith("g_") or path.name.startswith("generator"))


def is_bigvgan_config(hparams: Mapping[str, Any]) -> bool:
    """BigVGAN's config.json names its Snake activation; HiFi-GAN's has none."""
    return "activation" in hparams


def _generator_file(path: Path, what: str, expected: str = "one g_XXXXXXXX or generator_* file") -> Path:
    """`path` if it is a generator file, else the one generator file in folder `path`."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if is_generator_file(p))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds {len(found)} {what} generator files ({[p.name for p in found]}); "
                                    f"expected {expected}: pass the file itself")  # fmt: skip
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no {what} generator at {path}: expected a g_XXXXXXXX file, config.json beside it")
    return path


def _generator_state(path: Path) -> dict[str, torch.Tensor]:
    """The "generator" entry of a checkpoint file, read as tensors only (no pickled code)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "generator" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"{path} is not a generator checkpoint: expected a dict with the key 'generator' (as hifi-gan's "
            f"train.py and BigVGAN save it), found {found}"
        )
    return dict(checkpoint["generator"])


def _load_generator(generator: nn.Module, weights_path: Path, config_name: str, device: str | torch.device) -> Any:
    state = fuse_weight_norm(_generator_state(weights_path))
    _check_filters(generator, state, weights_path)
    # weight-norm pairs are named by their fused `weight` in the message
    load_into(generator, state, f"the generator in {weights_path} (built from {config_name}; does the config fit?)")
    return generator.to(device).eval().requires_grad_(False)


def _check_filters(generator: nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """BigVGAN checkpoints carry the anti-aliasing filters as buffers: they must be the ones computed here."""
    for key, mine in generator.state_dict().items():
        found = state.get(key)
        if key.endswith(".filter") and found is not None and found.shape == mine.shape:
            if not torch.allclose(found.float(), mine, atol=1e-6):
                raise ValueError(f"{where}: the low-pass filter {key} differs from the Kaiser-sinc one computed here")


def load_hifigan(
    path: str | Path,
    config: str | Path | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> HiFiGANGenerator:
    """An official HiFi-GAN generator -> HiFiGANGenerator in eval mode, without gradients, on `device`.

    path: a generator file (g_02500000, generator_v1: a torch.save'd {"generator": state_dict}, with or
    without weight norm) or a folder holding exactly one such file. config: a config.json path or dict;
    by default the config.json beside the generator (inference_e2e.py's rule). Never downloads.
    """
    path = _generator_file(Path(path), "HiFi-GAN")
    h, config_name = read_hparams(path.parent / "config.json" if config is None else config)
    generator = HiFiGANGenerator.from_hparams(h, config_name)
    return _load_generator(generator, path, config_name, device)


def load_bigvgan(path: str | Path, device: str | torch.device = "cpu") -> BigVGANGenerator:
    """An official BigVGAN -> BigVGANGenerator in eval mode, without gradients, on `device`.

    path: a folder with config.json and bigvgan_generator.pt (a local copy of e.g.
    nvidia/bigvgan_v2_22khz_80band_fmax8k_256x), or a generator file g_XXXXXXXX as BigVGAN's train.py and
    its v1 releases save it (with config.json beside it), or a folder holding one; the weights under the key
    "generator". Weight-norm pairs are fused; the torch activations are used (no CUDA kernel).
    """
    path = Path(path)
    weights_path = (path / BIGVGAN_FILE if (path / BIGVGAN_FILE).is_file()
                    else _generator_file(path, "BigVGAN", f"{BIGVGAN_FILE} or one g_XXXXXXXX file"))  # fmt: skip
    if not (weights_path.parent / "config.json").is_file():
        raise FileNotFoundError(
            f"no BigVGAN at {path}: expected config.json beside {weights_path.name} (a local copy of e.g. "
            "nvidia/bigvgan_v2_22khz_80band_fmax8k_256x; scm-mm never downloads)"
        )
    h, config_name = read_hparams(weights_path.parent / "config.json")
    generator = BigVGANGenerator.from_hparams(h, config_name)
    return _load_generator(generator, weights_path, config_name, device)


def save_official(generator: HiFiGANGenerator | BigVGANGenerator, path: str | Path) -> Path:
    """Write `generator` as the official code stores it, atomically: a folder with config.json and the
    weight-norm state under "generator" in g_00000000 (HiFi-GAN) or bigvgan_generator.pt (BigVGAN).
    `load_hifigan` / `load_bigvgan` read it back."""
    name = HIFIGAN_FILE if isinstance(generator, HiFiGANGenerator) else BIGVGAN_FILE
    with writing_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(generator.hparams(), indent=4) + "\n")
        torch.save({"generator": weight_norm_state(generator)}, tmp / name)
    return Path(path)
