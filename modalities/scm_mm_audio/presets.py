"""Mel denoisers as presets: a transformer over frames and a 2-D U-Net over (mel bins x frames).

Two layouts of the mel codec (codec.MelCodec) meet two network families of the core:

    layout "1d": x0 (B, channels * n_mels, T) -> DiT with 1-D patches over frames; a token is
                 `patch` frames of every bin, so the mel bins are the channels
    layout "2d": x0 (B, channels, n_mels, T)  -> U-Net over (bins x frames), like an image

Both attend through the core's JVP-capable attention, take class labels (pitch, instrument, digit,
speaker) and, for an sCD student, the CFG scale as an input (App. G.2). Their token grids and
convolutions work for any number of frames divisible by `frame_multiple(net)`, so one model
generates clips of any length (AudioSCM.generate(seconds=...)).

A config names a preset as {"_target_": "scm_mm_audio.presets.build_mel_net", "name": ..., **overrides};
`mel_net_spec` writes the same net out as a DiT or UNet spec, the form a checkpoint stores
(scm_mm.train.checkpoint.canonical_spec), as in scm_mm_image.presets.

    preset      family  for                                        params (M), 12 classes
    notes-dit   DiT     the embedded notes on a CPU (small_16k)      1.30 (64 bins)
    mel-dit-s   DiT     speech/music mels (80 or 100 bins), GPU     32.59 (80 bins)
    mel-dit-m   DiT                                                 76.71 (80 bins)
    mel-dit-l   DiT                                                257.19 (80 bins)
    mel-unet-s  U-Net   the same mels as one-channel images, GPU    23.03 (80 bins)
    mel-unet-m  U-Net                                              121.04 (80 bins)

Counted on the meta device; tests/audio/test_presets.py checks them. The U-Nets halve the bins three times,
so they take bin counts divisible by 8 (80, 64; not the 100 of Vocos's 24 kHz mels, which the DiTs take: their
tokens are `patch` frames of every bin).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from scm_mm.nn.dit import DiT
from scm_mm.nn.unet import UNet
from scm_mm.train.checkpoint import build_from_spec, register_preset_builder, spec_target

PRESETS: dict[str, dict[str, Any]] = {
    # 16 tokens of 2 frames for the notes' 32 frames; the teacher trains at about 9 iterations/s at
    # batch 64 on 2 CPU cores (bench/audio_notes.py, docs/benchmarks.md section 6).
    "notes-dit": {"family": "dit", "patch": 2, "hidden": 128, "depth": 4, "heads": 2},
    "mel-dit-s": {"family": "dit", "patch": 2, "hidden": 384, "depth": 12, "heads": 6},
    "mel-dit-m": {"family": "dit", "patch": 2, "hidden": 512, "depth": 16, "heads": 8},
    "mel-dit-l": {"family": "dit", "patch": 1, "hidden": 768, "depth": 24, "heads": 12},
    # Halves bins and frames three times: bins and frames divisible by 8 (80 bins: 80, 40, 20, 10).
    "mel-unet-s": {"family": "unet", "model_channels": 64, "channel_mult": (1, 2, 3, 4), "num_blocks": 2,
                   "attn_levels": (2, 3)},  # fmt: skip
    "mel-unet-m": {"family": "unet", "model_channels": 128, "channel_mult": (1, 2, 3, 4), "num_blocks": 3,
                   "attn_levels": (2, 3)},  # fmt: skip
}


def mel_net_spec(
    name: str,                      # a key of PRESETS
    in_channels: int,               # "1d": channels * n_mels; "2d": audio channels
    num_classes: int = 0,           # 0 = unconditional
    guidance_embed: bool = False,   # the sCD student's CFG scale input (App. G.2)
    dropout: float = 0.0,           # sCT regularisation (App. G); 0 for teachers of small data and sCD
    **overrides: Any,               # any DiT or UNet keyword, e.g. depth=8
) -> dict[str, Any]:
    """The preset written out as the DiT (layout "1d") or 2-D UNet (layout "2d") spec that `build_mel_net` builds."""
    if name not in PRESETS:
        raise KeyError(f"unknown mel network preset {name!r}; presets: {sorted(PRESETS)}")
    preset = dict(PRESETS[name])
    family = preset.pop("family")
    common = {"num_classes": num_classes, "guidance_embed": guidance_embed, "dropout": dropout}
    if family == "dit":
        patch = (preset.pop("patch"),)
        return {"_target_": spec_target(DiT), "in_channels": in_channels, "patch_size": patch, **preset, **common,
                **overrides}  # fmt: skip
    return {"_target_": spec_target(UNet), "in_channels": in_channels, "dims": 2, **preset, **common, **overrides}


def build_mel_net(name: str, in_channels: int, **options: Any) -> nn.Module:
    """The preset `name` as a DiT (layout "1d") or a 2-D UNet (layout "2d"); the options are `mel_net_spec`'s."""
    return build_from_spec(mel_net_spec(name, in_channels, **options))


register_preset_builder(build_mel_net, mel_net_spec)  # a teacher stored either way starts the same students


def frame_multiple(net: nn.Module) -> int:
    """Clips must have a multiple of this many frames: the DiT's patch, or 2^(levels - 1) for a U-Net."""
    if isinstance(net, DiT):
        return net.patch_size[-1]
    if isinstance(net, UNet):
        return 2 ** (net.levels - 1) if net.dims - 1 in net.resample_axes else 1
    raise TypeError(f"no frame stride known for {type(net).__name__}")
