"""The video modality of scm-mm: a causal video autoencoder, spatiotemporal DiT presets, datasets, mp4 and `VideoSCM`.

    from scm_mm_video import VideoSCM
    model = VideoSCM.load("runs/digits_scd")
    videos = model.generate(8, steps=2, seed=0)     # uint8 (8, T, H, W, C)
    model.save_mp4("digits.mp4")
"""

from .api import VideoModality, VideoSCM

__all__ = ["VideoModality", "VideoSCM"]
