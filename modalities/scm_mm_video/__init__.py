"""The video modality of scm-mm: a causal video autoencoder, spatiotemporal DiT presets, datasets, mp4 and `VideoSCM`.

    from scm_mm_video import VideoSCM
    model = VideoSCM.load("runs/digits_scd")
    videos = model.generate(8, steps=2, seed=0)     # uint8 (8, T, H, W, C)
    model.save_mp4("digits.mp4")
"""

from typing import TYPE_CHECKING, Any

__all__ = ["VideoModality", "VideoSCM"]

if TYPE_CHECKING:
    from .api import VideoModality, VideoSCM


def __getattr__(name: str) -> Any:
    """The API on first use, so the networks and presets import without PyAV (a GPU machine without FFmpeg)."""
    if name in __all__:
        from . import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
