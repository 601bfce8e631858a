"""Video denoisers as presets: one registry of `VideoDiT` keyword dicts, `VIDEO_NET_PRESETS`.

A config names a preset as {"_target_": "scm_mm_video.presets.build_video_net", "name": ..., **overrides}
(configs/net/digits_dit.yaml, video_dit_*.yaml); `video_net_spec` writes the same net out as
{"_target_": "scm_mm_video.dit.VideoDiT", **kwargs}, the form a checkpoint stores
(scm_mm.train.checkpoint.canonical_spec), as in scm_mm_image.presets and scm_mm_audio.presets. Per-run
options are the keywords of `video_net_spec`: `num_classes`, `guidance_embed=True` for an sCD student
(App. G.2), `dropout` (sCT).

    preset        for                                                    tokens   params (M)
    digits-dit    9-frame 32x32 Moving digits through a 2x4x4 VAE,            80      2.832976
                  latent (4, 5, 8, 8); CPU-sized
    video-dit-s   17 frames at 256x256 through a 4x8x8 VAE,                 1280     32.512960
    video-dit-b   latent (16, 5, 32, 32); GPU                               1280    129.610048
    video-dit-l                                                             1280    456.900672

Parameter counts: unconditional, no guidance input, 4 (digits) or 16 latent channels, counted on the meta
device; tests/video/test_dit.py asserts them. A class table adds (num_classes + 1) * hidden parameters,
the guidance input 256 * hidden + hidden. Widths and depths are DiT-S/B/L's (384/12/6, 768/12/12,
1024/24/16; head_dim 64, so RoPE gives 24/20/20 channels to t/h/w).

All presets use full 3-D attention with 3-D RoPE and (1, 2, 2) patches, as Wan (and rCM, which distils
Wan with sCM). At 1280 tokens full attention is affordable: its FLOPs are 4 N hidden per token and layer
against 24 hidden^2 for the linear layers, 0.56x theirs at hidden 384 and 0.28x at 768. It also avoids the
factorized net's blind spot (a token never meets another frame's other positions within one block).
`attention="factorized"` (Latte) remains an override; bench/video_attention.py times both layouts at
these sequence lengths, and for 33 / 65 frames (9 / 17 latent frames, 2304 / 4352 tokens).

digits-dit trains on CPU. At batch 32 (2560 tokens), on one busy core of the 2-core dev box
(OMP_NUM_THREADS=1, median of 4): a teacher step (DiffusionLoss forward + backward + Adam) 0.55 s, an sCT
step 1.10 s, an sCD step 1.32 s (scm_mm.SCMLoss with a teacher; bench/step_time.py's protocol); one
forward + backward alone 0.57 s best of 3 (0.52 s with sincos positions: RoPE costs ~10%), one JVP under
no_grad 0.54 s. Matmuls are half of that time and GELU a sixth, so 2 threads should bring the teacher step
to about 0.3 s, a little above the 0.25 s aimed at. hidden 192 / depth 4 is already the small end of the
range planned for it (hidden 192-256, depth 4-6); depth=3 or hidden=160 are overrides if a run needs them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from scm_mm.nn.dit import DiT
from scm_mm.train.checkpoint import register_preset_builder, spec_target

from .dit import VideoDiT

VIDEO_NET_PRESETS: dict[str, dict[str, Any]] = {
    # 5 x 4 x 4 = 80 tokens of a (4, 5, 8, 8) latent; head_dim 48 -> RoPE 16/16/16.
    "digits-dit": {"patch_size": (1, 2, 2), "hidden": 192, "depth": 4, "heads": 4,
                   "attention": "full", "pos_embed": "rope"},  # fmt: skip
    # 5 x 16 x 16 = 1280 tokens of a (16, 5, 32, 32) latent.
    "video-dit-s": {"patch_size": (1, 2, 2), "hidden": 384, "depth": 12, "heads": 6,
                    "attention": "full", "pos_embed": "rope"},  # fmt: skip
    "video-dit-b": {"patch_size": (1, 2, 2), "hidden": 768, "depth": 12, "heads": 12,
                    "attention": "full", "pos_embed": "rope"},  # fmt: skip
    "video-dit-l": {"patch_size": (1, 2, 2), "hidden": 1024, "depth": 24, "heads": 16,
                    "attention": "full", "pos_embed": "rope"},  # fmt: skip
}

# Unconditional parameter counts (in_channels 4 for digits-dit, else 16), asserted by the tests; the same
# for attention="factorized" or pos_embed="sincos" (neither has parameters of its own).
PARAM_COUNTS: dict[str, int] = {
    "digits-dit": 2_832_976,
    "video-dit-s": 32_512_960,
    "video-dit-b": 129_610_048,
    "video-dit-l": 456_900_672,
}

_VIDEO_DIT_KWARGS = frozenset(inspect.signature(DiT.__init__).parameters) - {"self"}  # VideoDiT passes them on


def video_net_spec(
    name: str,  # a key of VIDEO_NET_PRESETS
    in_channels: int,  # latent channels
    num_classes: int = 0,  # 0 = unconditional
    guidance_embed: bool = False,  # the sCD student's CFG scale input (App. G.2)
    dropout: float = 0.0,  # in each block's MLP (sCT regularisation, App. G)
    **overrides: Any,  # any VideoDiT keyword, e.g. depth=8 or attention="factorized"
) -> dict[str, Any]:
    """The preset written out, {"_target_": "scm_mm_video.dit.VideoDiT", **kwargs}: what `build_video_net` builds."""
    if name not in VIDEO_NET_PRESETS:
        raise KeyError(f"unknown video network preset {name!r}; presets: {sorted(VIDEO_NET_PRESETS)}")
    unknown = set(overrides) - _VIDEO_DIT_KWARGS
    if unknown:
        raise TypeError(f"VideoDiT has no argument(s) {sorted(unknown)}; it takes {sorted(_VIDEO_DIT_KWARGS)}")
    return {
        "_target_": spec_target(VideoDiT),
        "in_channels": in_channels,
        **VIDEO_NET_PRESETS[name],
        "num_classes": num_classes,
        "guidance_embed": guidance_embed,
        "dropout": dropout,
        **overrides,
    }


def build_video_net(name: str, in_channels: int, **options: Any) -> VideoDiT:
    """VideoDiT(**preset `name`, **options), e.g. build_video_net("video-dit-b", 16, num_classes=101);
    the options are `video_net_spec`'s."""
    kwargs = video_net_spec(name, in_channels, **options)
    del kwargs["_target_"]
    return VideoDiT(**kwargs)


register_preset_builder(build_video_net, video_net_spec)  # a teacher stored either way starts the same students


def token_count(name_or_net: str | VideoDiT, latent_shape: Sequence[int]) -> int:
    """Tokens of one latent for a preset (by name) or a built net: prod((T, H, W) / patch_size).

    latent_shape: (C, T, H, W) or (T, H, W); each of T, H, W must be divisible by the patch.
    """
    if isinstance(name_or_net, nn.Module):
        patch = tuple(name_or_net.patch_size)
    elif name_or_net in VIDEO_NET_PRESETS:
        patch = tuple(VIDEO_NET_PRESETS[name_or_net]["patch_size"])
    else:
        raise KeyError(f"unknown video network preset {name_or_net!r}; presets: {sorted(VIDEO_NET_PRESETS)}")
    dims = tuple(latent_shape)[-3:]
    if len(latent_shape) not in (3, 4):
        raise ValueError(f"latent_shape must be (C, T, H, W) or (T, H, W), got {tuple(latent_shape)}")
    if any(d % p for d, p in zip(dims, patch, strict=True)):
        raise ValueError(f"latent dims (T, H, W) = {dims} are not divisible by patch_size {patch}")
    return math.prod(d // p for d, p in zip(dims, patch, strict=True))
