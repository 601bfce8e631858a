"""The video modality of scm-mm: a causal 3-D autoencoder, a spatiotemporal DiT, datasets, mp4 and `VideoSCM`."""
