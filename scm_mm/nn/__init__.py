"""Shared layers and backbones: attention with a JVP, time embeddings, adaptive double norm, MLP, U-Net, DiT.

Every backbone follows one contract, net(x, c_noise, labels=None, guidance=None) -> like x, and passes
torch.func.jvp (attention routes live tangents to its own JVP op).
"""

from .attention import attention, attention_backend, naive_attention, tangent_is_live
from .dit import DiT
from .embeddings import ConditionEmbedding, PositionalEmbedding
from .mlp import MLP
from .norm import AdaptiveDoubleNorm
from .unet import UNet

__all__ = [
    "AdaptiveDoubleNorm",
    "ConditionEmbedding",
    "DiT",
    "MLP",
    "PositionalEmbedding",
    "UNet",
    "attention",
    "attention_backend",
    "naive_attention",
    "tangent_is_live",
]
