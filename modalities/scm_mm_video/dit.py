"""`VideoDiT`: the core DiT over video latents (B, C, T, H, W), with the video defaults.

    net(x (B, C, T, H, W), c_noise (B,), labels=None, guidance=None) -> (B, out_channels, T, H, W)

x is x_t / sigma_d and c_noise = 1000 t (scm_mm.precond.TrigFlowPrecond does both). Everything is
`scm_mm.nn.dit.DiT` (adaptive double normalisation, sCM §4.1; QK-norm; adaLN-Zero gates; class and CFG-scale
conditioning, App. G.2; RoPE or sin-cos positions; full or factorized attention); what a video net fixes:

- Patches of (pt, ph, pw) latent voxels, (1, 2, 2) by default as Wan; any frame count T divisible by pt.
- 3-D rotary positions by default (Wan2.1, rcm/networks/wan2pt1_jvp.py): a head's channels split into
  temporal / height / width parts of h = w = 2 (head_dim // 6) and t = the rest (44/42/42 for head_dim 128,
  24/20/20 for 64). Scores then depend on relative offsets only, so a net trained on 5 latent frames meets
  no unseen absolute code at 9.
- `attention="full"` (Wan; what rCM distils with sCM) by default; "factorized" alternates blocks that attend
  within each frame and across frames at each position (Latte's "variant 1", Vchitect/Latte
  models/latte.py), rather than both in one block (STDiT), because Latte's ablation found the interleaved
  variant best and the blocks stay the core DiTBlock: full and factorized nets of one preset have the same
  parameters and MLP compute and differ only in which tokens meet.

Parameter names are the core DiT's, so with pos_embed="sincos" and attention="full" a VideoDiT is the core
DiT with 3-D patches (same state dict, same function; tests/video/test_dit.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from scm_mm.nn.dit import DiT


class VideoDiT(DiT):
    """`DiT` with 3-D patches, (1, 2, 2) by default, 12 blocks and 3-D RoPE; any other DiT keyword passes through."""

    def __init__(
        self,
        in_channels: int,  # latent channels
        patch_size: Sequence[int] = (1, 2, 2),  # (pt, ph, pw) latent voxels per token
        depth: int = 12,  # number of blocks
        pos_embed: Literal["rope", "sincos"] = "rope",  # see scm_mm.nn.dit
        **kwargs: Any,  # hidden, heads, attention, num_classes, guidance_embed, dropout, ... (DiT's)
    ) -> None:
        patch = tuple(patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (pt, ph, pw), got {patch}")
        super().__init__(in_channels, patch_size=patch, depth=depth, pos_embed=pos_embed, **kwargs)
