"""Shared layers and backbones: attention with a JVP, time embeddings, adaptive double norm, MLP, U-Net, DiT.

Every backbone follows one contract, net(x, c_noise, labels=None, guidance=None) -> like x, and passes
torch.func.jvp (attention routes live tangents to its own JVP op).
"""

# The attention op is imported from its module (scm_mm.nn.attention.attention): re-exporting the
# function here would shadow the submodule of the same name.
from .attention import JVPAttention, attention_backend, tangent_is_live
from .dit import DiT
from .embeddings import ConditionEmbedding, PositionalEmbedding
from .mlp import MLP
from .norm import AdaptiveDoubleNorm
from .unet import UNet

__all__ = [
    "AdaptiveDoubleNorm",
    "ConditionEmbedding",
    "DiT",
    "JVPAttention",
    "MLP",
    "PositionalEmbedding",
    "UNet",
    "attention_backend",
    "tangent_is_live",
]
