"""Vocos: a ConvNeXt backbone and an inverse-STFT head that turn log-mels into waveforms.

The architecture and parameter names of gemelo-ai/vocos (Siuzdak 2023, "Vocos: closing the gap between
time-domain and Fourier-based neural vocoders"; vocos/models.py, heads.py, modules.py, spectral_ops.py),
so that the published `charactr/vocos-mel-24khz` weights load with strict key matching:

    logmel (B, n_mels, T)
      backbone  embed Conv1d(k=7) -> LayerNorm -> num_layers x ConvNeXtBlock -> final LayerNorm  (B, T, dim)
                ConvNeXtBlock: x + gamma * pwconv2(GELU(pwconv1(LayerNorm(dwconv_k7(x)))))
      head      Linear(dim, n_fft + 2) -> log|S| and phase p, n_fft/2 + 1 bins each
                S = min(exp(log|S|), 1e2) * (cos p + i sin p)
                inverse STFT: irfft, Hann window of n_fft, overlap-add / window envelope
    wave (B, spec.samples(T))

Frames and samples (the head's padding follows the spec's `center`):
- center=True (vocos_24k, small_16k; Vocos padding "center"): frame t is centred on sample t * hop.
  Overlap-add and trim n_fft / 2 samples at both ends (= torch.istft(center=True)): T frames give
  (T - 1) * hop samples.
- center=False (hifigan_22k; Vocos padding "same"): the mel reflect-pads (n_fft - hop) / 2 samples on
  each side, so frame t is centred on sample t * hop + hop / 2: it covers samples [t*hop, (t+1)*hop) at
  its middle. Overlap-add and trim (n_fft - hop) / 2 at both ends: T frames give T * hop samples, and
  frame t's window is centred on t * hop + hop / 2 again.

Three ways to store a Vocos:
- `save_vocoder` / `load_vocoder_dir`: our own folder, config.json {"type": "vocos", "spec", "kwargs"}
  plus model.safetensors; the full MelSpec travels with the weights.
- `load_vocos` / `save_vocos`: the official folder, config.yaml (feature_extractor, backbone and head
  `init_args`) plus pytorch_model.bin (or model.safetensors), e.g. a downloaded copy of
  charactr/vocos-mel-24khz. The official state dict also holds the feature extractor's buffers
  (feature_extractor.mel_spec.spectrogram.window, feature_extractor.mel_spec.mel_scale.fb): they are
  checked against our MelSpec (a mel mismatch is the commonest vocoder failure) and dropped.
Nothing here touches the network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from scm_mm.modality import state_differences
from scm_mm.train.checkpoint import cpu_tensors, load_into, save_module_folder, writing_directory

from .mel import MelSpec, check_specs, mel_filters, mel_spec

MAGNITUDE_MAX = 1e2  # vocos heads.py: exp(log|S|) clipped here, "to prevent excessively large magnitudes"

# Named configurations: Vocos keyword arguments.
#   official-24k  the published charactr/vocos-mel-24khz (configs/vocos.yaml): 13.5M parameters.
#   small         for CPU training on 16 kHz data: 0.59M parameters (0.13M of them the head's Linear),
#                 about 300-380x faster than real time on one CPU thread, 10 s clips (bench/audio_vocoder.py;
#                 dim 192 / 512 / 6 layers measured 230-260x). Trains with lr 4e-3 (see the bench).
VOCOS_PRESETS: dict[str, dict[str, Any]] = {
    "official-24k": {"spec": "vocos_24k", "dim": 512, "intermediate_dim": 1536, "num_layers": 8},
    "small": {"spec": "small_16k", "dim": 128, "intermediate_dim": 384, "num_layers": 4},
}


class ConvNeXtBlock(nn.Module):
    """x + gamma * MLP(LayerNorm(depthwise_conv(x))) over (B, dim, T); ConvNeXt (Liu et al. 2022) in 1-D."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init: float) -> None:
        super().__init__()
        # The parameter order (gamma first) and names are vocos modules.ConvNeXtBlock's.
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)  # pointwise convs as Linear over channels-last
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).transpose(1, 2)  # (B, T, dim)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class VocosBackbone(nn.Module):
    """(B, n_mels, T) -> (B, T, dim): same temporal resolution throughout (no upsampling)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int, layer_scale_init: float):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(
            [ConvNeXtBlock(dim, intermediate_dim, layer_scale_init) for _ in range(num_layers)]
        )
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # vocos models.VocosBackbone: truncated normal, std 0.02
        if isinstance(m, (nn.Conv1d, nn.Linear)) and m.bias is not None:
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, dim, T)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


def overlap_add(frames: torch.Tensor, hop_length: int) -> torch.Tensor:
    """Sum frames (..., n, T) placed hop_length apart -> (..., (T - 1) * hop_length + n).

    Each frame is cut into ceil(n / hop) chunks of hop samples; output block b is the sum of chunk r of
    frame b - r. That is R slice-adds of (..., T, hop): on one CPU thread about 4x faster than F.fold
    (which vocos uses) forward and as fast backward.
    """
    n, frames_count = frames.shape[-2:]
    chunks_per_frame = -(-n // hop_length)
    frames = F.pad(frames, (0, 0, 0, chunks_per_frame * hop_length - n))  # zero tail: n -> R * hop
    chunks = frames.reshape(*frames.shape[:-2], chunks_per_frame, hop_length, frames_count).transpose(-1, -2)
    out = frames.new_zeros(*frames.shape[:-2], frames_count + chunks_per_frame - 1, hop_length)
    for r in range(chunks_per_frame):
        out[..., r : r + frames_count, :] += chunks[..., r, :, :]  # (..., T, hop)
    return out.flatten(-2)[..., : (frames_count - 1) * hop_length + n]


class ISTFT(nn.Module):
    """Inverse STFT by overlap-add with a periodic Hann window of n_fft, trimmed for "center" or "same"
    padding (see the module docstring); "center" equals torch.istft(center=True), "same" is vocos
    spectral_ops.ISTFT. (B, n_fft // 2 + 1, T) complex -> (B, (T - 1) * hop + n_fft - 2 * trim)."""

    window: torch.Tensor

    def __init__(self, n_fft: int, hop_length: int, padding: str) -> None:
        super().__init__()
        if padding not in ("center", "same"):
            raise ValueError(f"padding must be 'center' or 'same', got {padding!r}")
        if padding == "same" and (n_fft - hop_length) % 2:
            raise ValueError(f"'same' padding needs n_fft - hop_length even, got {n_fft} - {hop_length}")
        self.n_fft, self.hop_length, self.padding = n_fft, hop_length, padding
        self.trim = n_fft // 2 if padding == "center" else (n_fft - hop_length) // 2
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        segments = torch.fft.irfft(spec, n=self.n_fft, dim=1) * self.window[:, None]  # (B, n_fft, T)
        y = overlap_add(segments, self.hop_length)
        envelope = overlap_add(self.window.square()[:, None].expand(-1, spec.shape[-1]), self.hop_length)
        keep = slice(self.trim, y.shape[-1] - self.trim)
        if not bool((envelope[keep] > 1e-11).all()):  # NOLA, as torch.istft checks
            raise RuntimeError("the window envelope vanishes inside the output (NOLA fails)")
        return y[:, keep] / envelope[keep]


class ISTFTHead(nn.Module):
    """(B, T, dim) -> waveform: log-magnitude and phase per STFT bin, then the inverse STFT."""

    def __init__(self, dim: int, n_fft: int, hop_length: int, padding: str) -> None:
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_mag, phase = self.out(x).transpose(1, 2).chunk(2, dim=1)  # (B, n_fft // 2 + 1, T) each
        mag = torch.exp(log_mag).clamp(max=MAGNITUDE_MAX)
        # vocos writes exp(i atan2(sin p, cos p)): the same value, one rounding apart
        return self.istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)))


class Vocos(nn.Module):
    """A vocoder: `forward(logmel (B, n_mels, T)) -> wave (B, spec.samples(T))`, in the spec's log domain.

    The head's STFT has the spec's n_fft and hop (window n_fft, like the official head) and pads as the
    spec's frames are laid out: "center" for center=True, "same" for center=False.
    """

    def __init__(
        self,
        spec: str | MelSpec | Mapping[str, Any],  # the mels it inverts: a preset name, MelSpec or dict
        dim: int = 512,                           # backbone width (official: 512)
        intermediate_dim: int = 1536,             # ConvNeXt MLP width (official: 1536)
        num_layers: int = 8,                      # ConvNeXt blocks (official: 8)
        layer_scale_init: float | None = None,    # initial gamma; None: 1 / num_layers (official)
    ) -> None:
        super().__init__()
        self.spec = mel_spec(spec)
        layer_scale_init = 1.0 / num_layers if layer_scale_init is None else float(layer_scale_init)
        if layer_scale_init <= 0:
            raise ValueError(f"layer_scale_init must be positive (or None for 1 / num_layers), got {layer_scale_init}")
        self.kwargs = {
            "dim": dim, "intermediate_dim": intermediate_dim, "num_layers": num_layers,
            "layer_scale_init": layer_scale_init,
        }  # fmt: skip
        self.backbone = VocosBackbone(self.spec.n_mels, dim, intermediate_dim, num_layers, layer_scale_init)
        padding = "center" if self.spec.center else "same"
        self.head = ISTFTHead(dim, self.spec.n_fft, self.spec.hop_length, padding)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        if logmel.ndim != 3 or logmel.shape[1] != self.spec.n_mels:
            raise ValueError(f"expected log-mels (B, {self.spec.n_mels}, T), got {tuple(logmel.shape)}")
        return self.head(self.backbone(logmel))

    def config(self) -> dict[str, Any]:
        """What `load_vocoder_dir` needs to rebuild this module (config.json)."""
        return {"type": "vocos", "spec": self.spec.to_dict(), "kwargs": dict(self.kwargs)}


def vocos_preset(name: str, **overrides: Any) -> Vocos:
    """A Vocos from `VOCOS_PRESETS[name]`, keyword arguments overridden (e.g. spec="hifigan_22k")."""
    if name not in VOCOS_PRESETS:
        raise KeyError(f"unknown Vocos preset {name!r}; presets: {sorted(VOCOS_PRESETS)}")
    return Vocos(**{**VOCOS_PRESETS[name], **overrides})


# The registry of our vocoder folders' "type" field.
VOCODER_TYPES: dict[str, type[nn.Module]] = {"vocos": Vocos}


def save_vocoder(vocoder: Vocos, path: str | Path) -> Path:
    """Write our vocoder folder atomically: config.json {"type", "spec", "kwargs"} + model.safetensors."""
    return save_module_folder(vocoder, vocoder.config(), path)


def read_vocoder_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a vocoder folder written by `save_vocoder`, checked for its fields."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = " It holds config.yaml: an official Vocos folder, load it with load_vocos." if (
            folder / "config.yaml"
        ).is_file() else ""
        raise FileNotFoundError(f"no vocoder at {folder}: expected config.json and model.safetensors.{hint}")
    config = json.loads(config_path.read_text())
    missing = [k for k in ("type", "spec", "kwargs") if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks the field(s) {missing}")
    if config["type"] not in VOCODER_TYPES:
        raise ValueError(f"{config_path}: unknown vocoder type {config['type']!r}; known: {sorted(VOCODER_TYPES)}")
    return config


def load_vocoder_dir(path: str | Path, device: str | torch.device = "cpu") -> Vocos:
    """A vocoder folder written by `save_vocoder` -> the module in eval mode, on `device`."""
    folder = Path(path)
    config = read_vocoder_config(folder)
    vocoder = VOCODER_TYPES[config["type"]](spec=MelSpec.from_dict(config["spec"]), **config["kwargs"])
    load_into(vocoder, load_file(str(folder / "model.safetensors")), f"{folder / 'model.safetensors'}")
    return vocoder.to(device).eval()  # type: ignore[return-value]


# ---- the official Vocos folder (config.yaml + pytorch_model.bin) ----------------------------------

OFFICIAL_CLASSES = {
    "feature_extractor": "vocos.feature_extractors.MelSpectrogramFeatures",
    "backbone": "vocos.models.VocosBackbone",
    "head": "vocos.heads.ISTFTHead",
}
# MelSpectrogramFeatures' arguments: the released package (vocos 0.1.0) has the first five; a later
# branch (configs/vocos-matcha.yaml) adds f_min, f_max, norm and mel_scale. Absent ones take the
# released defaults, i.e. torchaudio.transforms.MelSpectrogram's (htk, no norm, fmax = sr // 2).
_FEATURE_DEFAULTS: dict[str, Any] = {
    "sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "n_mels": 100, "padding": "center",
    "f_min": 0.0, "f_max": None, "norm": None, "mel_scale": "htk",
}  # fmt: skip
_BACKBONE_ARGS = ("input_channels", "dim", "intermediate_dim", "num_layers", "layer_scale_init_value",
                  "adanorm_num_embeddings")  # fmt: skip
_HEAD_ARGS = ("dim", "n_fft", "hop_length", "padding")
_FEATURE_PREFIX = "feature_extractor.mel_spec."


def spec_from_official(init_args: Mapping[str, Any], where: str = "feature_extractor.init_args") -> MelSpec:
    """Official MelSpectrogramFeatures arguments -> MelSpec: torchaudio MelSpectrogram(power=1) with
    win_length = n_fft, then ln(clip(mel, 1e-7)) (vocos modules.safe_log); padding "center" -> centred
    frames, "same" -> reflect-pad (n_fft - hop) / 2 (our center=False)."""
    unknown = sorted(set(init_args) - set(_FEATURE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{where}: unknown mel setting(s) {unknown}; scm-mm maps only {sorted(_FEATURE_DEFAULTS)} "
            "to a MelSpec, so it cannot tell which mels this vocoder expects"
        )
    a = {**_FEATURE_DEFAULTS, **init_args}
    if a["padding"] not in ("center", "same"):
        raise ValueError(f"{where}.padding: expected 'center' or 'same', got {a['padding']!r}")
    if a["norm"] not in (None, "slaney"):
        raise ValueError(f"{where}.norm: expected null or 'slaney', got {a['norm']!r}")
    if a["mel_scale"] not in ("htk", "slaney"):
        raise ValueError(f"{where}.mel_scale: expected 'htk' or 'slaney', got {a['mel_scale']!r}")
    sr = int(a["sample_rate"])
    return MelSpec(
        sample_rate=sr, n_fft=int(a["n_fft"]), hop_length=int(a["hop_length"]), win_length=int(a["n_fft"]),
        window="hann", n_mels=int(a["n_mels"]), fmin=float(a["f_min"]),
        fmax=float(sr // 2 if a["f_max"] is None else a["f_max"]),  # torchaudio: f_max None -> sr // 2
        mel_scale=a["mel_scale"], mel_norm="slaney" if a["norm"] == "slaney" else "none", power=1.0,
        magnitude_eps=0.0, log="ln", clamp=1e-7, center=a["padding"] == "center", pad_mode="reflect",
    )  # fmt: skip


def official_config(vocoder: Vocos) -> dict[str, Any]:
    """The official config.yaml content for this Vocos; refuses a spec the official features cannot make."""
    spec = vocoder.spec
    features: dict[str, Any] = {
        "sample_rate": spec.sample_rate, "n_fft": spec.n_fft, "hop_length": spec.hop_length,
        "n_mels": spec.n_mels, "padding": "center" if spec.center else "same",
    }  # fmt: skip
    # the later branch's extra arguments, written only where they leave torchaudio's defaults
    if spec.fmin != 0.0:
        features["f_min"] = spec.fmin
    if spec.fmax != spec.sample_rate // 2:
        features["f_max"] = spec.fmax
    if spec.mel_norm == "slaney":
        features["norm"] = "slaney"
    if spec.mel_scale != "htk":
        features["mel_scale"] = spec.mel_scale
    check_specs(spec_from_official(features), spec, "mel settings the official Vocos can express and this vocoder's")
    k = vocoder.kwargs
    backbone = {"input_channels": spec.n_mels, "dim": k["dim"], "intermediate_dim": k["intermediate_dim"],
                "num_layers": k["num_layers"]}  # fmt: skip
    if k["layer_scale_init"] != 1.0 / k["num_layers"]:
        backbone["layer_scale_init_value"] = k["layer_scale_init"]
    head = {"dim": k["dim"], "n_fft": spec.n_fft, "hop_length": spec.hop_length, "padding": features["padding"]}
    return {
        part: {"class_path": OFFICIAL_CLASSES[part], "init_args": args}
        for part, args in (("feature_extractor", features), ("backbone", backbone), ("head", head))
    }


def _feature_buffers(spec: MelSpec) -> dict[str, torch.Tensor]:
    """The official state dict's feature-extractor buffers (torchaudio MelSpectrogram's) for this spec."""
    return {
        _FEATURE_PREFIX + "spectrogram.window": torch.hann_window(spec.win_length),
        _FEATURE_PREFIX + "mel_scale.fb": mel_filters(spec),
    }


def save_vocos(vocoder: Vocos, path: str | Path) -> Path:
    """Write the official layout atomically (config.yaml + pytorch_model.bin, feature buffers included),
    loadable by `load_vocos` and by the vocos package's `Vocos.from_hparams` + `load_state_dict`."""
    import yaml  # noqa: PLC0415 (only this format needs it)

    config = official_config(vocoder)
    state = {**_feature_buffers(vocoder.spec), **cpu_tensors(vocoder.state_dict())}
    with writing_directory(path) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        torch.save(state, tmp / "pytorch_model.bin")
    return Path(path)


def _check_args(args: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown argument(s) {unknown}; this loader knows {list(allowed)}")


def _vocos_from_official(config: Mapping[str, Any], where: str) -> Vocos:
    for part, class_path in OFFICIAL_CLASSES.items():
        found = (config.get(part) or {}).get("class_path")
        if found != class_path:
            raise ValueError(f"{where}: {part}.class_path is {found!r}; only {class_path!r} is supported")
    features = config["feature_extractor"].get("init_args") or {}
    backbone = config["backbone"].get("init_args") or {}
    head = config["head"].get("init_args") or {}
    spec = spec_from_official(features, f"{where}: feature_extractor.init_args")
    _check_args(backbone, _BACKBONE_ARGS, f"{where}: backbone.init_args")
    _check_args(head, _HEAD_ARGS, f"{where}: head.init_args")
    if backbone.get("adanorm_num_embeddings") is not None:
        raise ValueError(f"{where}: backbone.init_args.adanorm_num_embeddings: conditional (AdaLayerNorm) "
                         "backbones are for EnCodec features, not mels; unsupported")  # fmt: skip
    # The head must invert the features' own frames, and the backbone read all their bins.
    expected = {
        "backbone.init_args.input_channels": spec.n_mels, "head.init_args.dim": backbone.get("dim"),
        "head.init_args.n_fft": spec.n_fft, "head.init_args.hop_length": spec.hop_length,
        "head.init_args.padding": "center" if spec.center else "same",
    }  # fmt: skip
    found = {
        "backbone.init_args.input_channels": backbone.get("input_channels"), "head.init_args.dim": head.get("dim"),
        "head.init_args.n_fft": head.get("n_fft"), "head.init_args.hop_length": head.get("hop_length"),
        "head.init_args.padding": head.get("padding", "same"),  # ISTFTHead's default padding is "same"
    }  # fmt: skip
    diff = state_differences(expected, found)
    if diff:
        raise ValueError(f"{where}: the head/backbone do not fit the feature extractor (expected != found):\n"
                         + "\n".join(diff))  # fmt: skip
    return Vocos(
        spec=spec, dim=int(backbone["dim"]), intermediate_dim=int(backbone["intermediate_dim"]),
        num_layers=int(backbone["num_layers"]), layer_scale_init=backbone.get("layer_scale_init_value"),
    )  # fmt: skip


def load_vocos(path: str | Path, device: str | torch.device = "cpu") -> Vocos:
    """An official Vocos folder (config.yaml + pytorch_model.bin or model.safetensors, e.g. a downloaded
    copy of charactr/vocos-mel-24khz) -> our Vocos in eval mode. Its MelSpec comes from the config (the
    vocos_24k preset for the published model); the checkpoint's own mel filterbank and window are checked
    against that spec and dropped. Never downloads."""
    import yaml  # noqa: PLC0415

    folder = Path(path)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no official Vocos at {folder}: expected config.yaml and pytorch_model.bin (a local copy of e.g. "
            "charactr/vocos-mel-24khz; scm-mm never downloads). A folder with config.json is ours: load_vocoder_dir."
        )
    vocoder = _vocos_from_official(yaml.safe_load(config_path.read_text()) or {}, str(config_path))
    if (folder / "pytorch_model.bin").is_file():
        weights_path = folder / "pytorch_model.bin"
        state = torch.load(weights_path, map_location="cpu", weights_only=True)  # tensors only, no pickled code
    elif (folder / "model.safetensors").is_file():
        weights_path = folder / "model.safetensors"
        state = load_file(str(weights_path))
    else:
        raise FileNotFoundError(f"{folder} has config.yaml but no pytorch_model.bin or model.safetensors")
    features = {k: v for k, v in state.items() if k.startswith("feature_extractor.")}
    _check_feature_buffers(features, vocoder.spec, weights_path)
    load_into(vocoder, {k: v for k, v in state.items() if k not in features}, str(weights_path))
    return vocoder.to(device).eval()


def _check_feature_buffers(found: Mapping[str, torch.Tensor], spec: MelSpec, where: Path) -> None:
    """The checkpoint's filterbank is the mel the vocoder was trained on: it must be our spec's."""
    expected = _feature_buffers(spec)
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise ValueError(f"{where}: unexpected feature-extractor tensors {unknown}; expected {sorted(expected)}")
    for key, tensor in found.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape) or not torch.allclose(tensor.float(), want, atol=1e-5):
            raise ValueError(
                f"{where}: {key} differs from the one computed from config.yaml's mel settings ({spec}); "
                "the checkpoint was trained on other mels (e.g. another vocos branch's fmax/norm defaults): "
                "state them in config.yaml's feature_extractor.init_args"
            )
