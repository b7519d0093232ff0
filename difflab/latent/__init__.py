"""Autoencoders and latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models").

A *codec* maps images to the latents a diffusion model is trained on and back
(:class:`~difflab.latent.codec.Codec`): ``identity`` is pixel space, ``autoencoder_kl`` is
LDM's KL-regularised autoencoder (:mod:`difflab.latent.autoencoder`), ``vq`` VQGAN's
vector-quantised one (:mod:`difflab.latent.vq`). A codec carries the
``scale_factor`` / ``shift`` that bring its latents to unit variance (SD's 0.18215 is one over
the standard deviation of its training latents), estimated from data and saved with it.
"""

from difflab.latent.autoencoder import AutoencoderKL, AutoencoderKLConfig
from difflab.latent.codec import Codec, DiagonalGaussian, IdentityCodec, estimate_scale
from difflab.latent.loading import load_codec
from difflab.latent.vq import VQModel, VQModelConfig

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "Codec", "DiagonalGaussian", "IdentityCodec",
           "VQModel", "VQModelConfig", "estimate_scale", "load_codec"]
