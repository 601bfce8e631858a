"""Images for scm-mm: pixel and SD-VAE latent codecs, datasets, the paper's U-Net presets, FID, ImageSCM."""

from .api import ImageModality, ImageSCM, image_grid, save_png

__all__ = ["ImageModality", "ImageSCM", "image_grid", "save_png"]
