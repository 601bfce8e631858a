"""Shared layers and backbones: attention with a JVP, time embeddings, U-Net, DiT."""
