"""Images for scm-mm: pixel and SD-VAE latent codecs, datasets, the paper's U-Net presets, FID, ImageSCM."""
