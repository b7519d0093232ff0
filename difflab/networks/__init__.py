"""Networks: the ADM / LDM U-Net, its blocks, and the attention-processor hooks."""

from difflab.networks.attention import (
    Attention,
    AttentionBlock,
    AttentionProcessor,
    SDPAProcessor,
    SpatialTransformer,
    attention_modules,
    set_attn_processor,
)
from difflab.networks.layers import ResBlock, TimeEmbedding, timestep_embedding
from difflab.networks.unet import UNet, UNetConfig

__all__ = [
    "Attention",
    "AttentionBlock",
    "AttentionProcessor",
    "ResBlock",
    "SDPAProcessor",
    "SpatialTransformer",
    "TimeEmbedding",
    "UNet",
    "UNetConfig",
    "attention_modules",
    "set_attn_processor",
    "timestep_embedding",
]
