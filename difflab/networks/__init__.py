"""Networks: the ADM / LDM U-Net, its blocks and attention-processor hooks; the noise-aware
classifier and image-text alignment model; frozen text encoders."""

from difflab.networks.alignment import AlignmentConfig, AlignmentModel
from difflab.networks.attention import (
    Attention,
    AttentionBlock,
    AttentionProcessor,
    SDPAProcessor,
    SpatialTransformer,
    attention_modules,
    set_attn_processor,
)
from difflab.networks.classifier import ClassifierConfig, NoisyClassifier
from difflab.networks.layers import ResBlock, TimeEmbedding, timestep_embedding
from difflab.networks.noisy import NoisyModel
from difflab.networks.text import CaptionEmbeddings, TextEncoder, load_text_encoder
from difflab.networks.unet import UNet, UNetConfig

__all__ = [
    "AlignmentConfig",
    "AlignmentModel",
    "CaptionEmbeddings",
    "ClassifierConfig",
    "NoisyClassifier",
    "NoisyModel",
    "TextEncoder",
    "load_text_encoder",
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
