"""One entry point for every vocoder: `load_vocoder(source, spec)`.

A vocoder maps log-mels (B, n_mels, T) in its spec's own log domain to waveforms (B, spec.samples(T))
and carries that spec as `.spec`. Sources, all local (nothing is downloaded):

    None, "griffin-lim"            Griffin-Lim for `spec` (no weights)
    an nn.Module                   used as it is
    <dir>/config.json with "type"  a vocoder trained by scm-mm (vocos.save_vocoder), or a vocoder
                                   training run whose <run>/vocoder holds one
    <dir>/config.yaml              an official Vocos checkpoint (charactr/vocos-mel-24khz layout)
    <dir>/bigvgan_generator.pt     an official BigVGAN checkpoint (with its config.json)
    <file g_* or generator*>,      an official HiFi-GAN or BigVGAN generator (train.py's checkpoints, HiFi-GAN's
    or a <dir> holding one         and BigVGAN v1's releases), which the config.json beside it tells apart
    any other file                 its folder, when that holds one of the above (a weights file)

The caller (MelCodec.with_vocoder) refuses a vocoder whose spec differs from the model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .codec import GriffinLim
from .gan_vocoders import BIGVGAN_FILE, is_bigvgan_config, is_generator_file, load_bigvgan, load_hifigan
from .mel import MelSpec
from .vocos import load_vocoder_dir, load_vocos


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from e


def _generator_kind(folder: Path) -> str:
    """"bigvgan" or "hifigan": whose generator file (g_*, generator_*) `folder` holds, by its config.json."""
    config = folder / "config.json"
    return "bigvgan" if config.is_file() and is_bigvgan_config(_read_json(config)) else "hifigan"


def load_vocoder(source: Any, spec: MelSpec | None = None) -> nn.Module:
    """A vocoder from `source` (see the module docstring); `spec` is needed only for Griffin-Lim."""
    if isinstance(source, nn.Module):
        return source
    if source is None or source == "griffin-lim":
        if spec is None:
            raise ValueError("Griffin-Lim needs the mel spec of the model it decodes")
        return GriffinLim(spec)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no vocoder at {path}")
    if is_generator_file(path):
        return LOADERS[_generator_kind(path.parent)](path)
    if path.is_file():  # a weights file (pytorch_model.bin, bigvgan_generator.pt, model.safetensors)
        if _folder_kind(path.parent) is None:
            raise ValueError(f"{path} is a file, and its folder holds no vocoder scm-mm can read; pass the "
                             f"vocoder's folder: {EXPECTED}")  # fmt: skip
        path = path.parent  # the loaders read the config beside the weights
    if (path / "vocoder" / "config.json").exists():  # a vocoder training run
        path = path / "vocoder"
    kind = _folder_kind(path)
    if kind is not None:
        return LOADERS[kind](path)
    checkpoints = sorted((path / "checkpoints").glob("iter-*/vocoder/config.json"))
    if checkpoints:
        raise ValueError(f"{path} is a vocoder training run that has not finished (no vocoder/ yet); its newest "
                         f"checkpoint loads: {checkpoints[-1].parent.parent}")  # fmt: skip
    raise ValueError(f"{path} holds no vocoder scm-mm can read: {EXPECTED}")


EXPECTED = (
    "expected a scm-mm vocoder (config.json with 'type') or its training run, a Vocos folder (config.yaml + "
    "pytorch_model.bin), a BigVGAN folder (config.json + bigvgan_generator.pt) or a HiFi-GAN or BigVGAN "
    "generator (g_XXXXXXXX or generator_*, with config.json beside it)"
)
LOADERS = {"scm-mm": load_vocoder_dir, "vocos": load_vocos, "bigvgan": load_bigvgan, "hifigan": load_hifigan}


def _folder_kind(path: Path) -> str | None:
    """Which vocoder a folder holds (a key of LOADERS), or None."""
    if not path.is_dir():
        return None
    config = path / "config.json"
    if config.exists() and "type" in _read_json(config):
        return "scm-mm"
    if (path / "config.yaml").exists():
        return "vocos"
    if (path / BIGVGAN_FILE).exists():
        return "bigvgan"
    if any(is_generator_file(p) for p in path.iterdir()):
        return _generator_kind(path)
    return None
