"""The codec contract (what latent diffusion needs of an autoencoder), the pixel-space codec,
and loading a trained codec from a run or component folder.

A codec ``C`` with downsampling factor ``f`` and ``c`` latent channels maps images
``(B, C_img, H, W)`` to a distribution over latents ``(B, c, H/f, W/f)`` (:meth:`Codec.encode`)
and latents back to images (:meth:`Codec.decode`). The diffusion model sees the *scaled*
latent ``z' = (z - shift) * scale_factor`` (LDM Sec. 4.3.2 and App. G: "we rescale the latents
by the component-wise standard deviation"; SD v1's 0.18215 is one over the std of its training
latents), so :meth:`Codec.to_latent` / :meth:`Codec.from_latent` are what training and
sampling call. ``scale_factor`` and ``shift`` are buffers: they travel with the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.components import Family, register_family
from difflab.errors import DifflabError

__all__ = ["Codec", "DiagonalGaussian", "IdentityCodec", "IdentityConfig", "estimate_scale"]


class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` of a KL autoencoder (LDM App. G;
    Kingma & Welling 2014). ``logvar`` is clamped to ``[-30, 20]`` as LDM does, so a collapsed
    or exploding channel cannot produce inf / NaN."""

    def __init__(self, mean: Tensor, logvar: Tensor | None = None) -> None:
        self.mean = mean
        self.deterministic = logvar is None
        self.logvar = (torch.zeros_like(mean) if logvar is None
                       else logvar.clamp(-30.0, 20.0))
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """From ``(B, 2c, h, w)``: the first ``c`` channels the mean, the rest the log-variance."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` (the reparameterisation trick), ``eps`` from ``generator``."""
        if self.deterministic:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q(z | x) || N(0, I))`` per example ``(B,)`` in nats, summed over the latent:
        ``0.5 * sum(mean^2 + var - 1 - logvar)``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        var = self.std ** 2
        return 0.5 * (self.mean ** 2 + var - 1.0 - self.logvar).flatten(1).sum(1)


class Codec(nn.Module):
    """Base class of every codec (see the module docstring).

    Subclasses set ``factor``, ``latent_channels`` and ``image_channels`` and implement
    :meth:`encode` and :meth:`decode`; the scaling buffers are registered here.
    """

    factor: int = 1
    latent_channels: int = 0
    image_channels: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(c, H/f, W/f)`` of an image shape ``(C, H, W)`` (sides must divide by ``f``)."""
        c, *sides = image_shape
        bad = [s for s in sides if s % self.factor]
        if bad:
            raise DifflabError(f"image sides {tuple(sides)} must be multiples of the codec's "
                               f"downsampling factor {self.factor}")
        return (self.latent_channels, *(s // self.factor for s in sides))

    def to_latent(self, x: Tensor, generator: torch.Generator | None = None,
                  sample: bool = True) -> Tensor:
        """The scaled latent the diffusion model is trained on: a posterior sample (or its mean
        with ``sample=False``), minus ``shift``, times ``scale_factor``."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return (z - self.shift) * self.scale_factor

    def from_latent(self, z: Tensor) -> Tensor:
        """Images from scaled latents (the inverse of :meth:`to_latent`'s scaling)."""
        return self.decode(z / self.scale_factor + self.shift)

    @torch.no_grad()
    def set_scale(self, scale: float, shift: float = 0.0) -> None:
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(shift)):
            raise DifflabError(f"codec scale_factor={scale}, shift={shift}: the scale must be "
                               "finite and positive and the shift finite")
        self.scale_factor.fill_(scale)
        self.shift.fill_(shift)


@torch.no_grad()
def estimate_scale(codec: Codec, images: Tensor, batch_size: int = 64,
                   centre: bool = False) -> tuple[float, float]:
    """``(scale_factor, shift)`` from the latents of ``images``: one over their standard
    deviation (the way SD v1's 0.18215 was found), and their mean when ``centre`` (else 0, as
    SD does). Posterior samples are drawn with a fixed seed, so the estimate is reproducible."""
    gen = torch.Generator(device=images.device).manual_seed(0)
    zs = [codec.encode(b).sample(gen).double() for b in images.split(batch_size)]
    z = torch.cat(zs)
    shift = float(z.mean()) if centre else 0.0
    std = float((z - shift).pow(2).mean().sqrt())
    if not (math.isfinite(std) and std > 0):
        raise DifflabError(f"the codec's latents have standard deviation {std}: it cannot be "
                           "scaled to unit variance (is the codec trained?)")
    return 1.0 / std, shift


# ----- the pixel-space codec ---------------------------------------------------------------------
@dataclass(frozen=True)
class IdentityConfig:
    """The pixel-space codec: ``channels`` image channels, factor 1."""

    channels: int = 3

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels={self.channels}: expected at least 1")


class IdentityCodec(Codec):
    """Pixel space as a codec (factor 1, the latent is the image, a point posterior), so every
    diffusion model has a codec."""

    def __init__(self, config: IdentityConfig | None = None) -> None:
        super().__init__()
        self.config = config or IdentityConfig()
        self.image_channels = self.latent_channels = self.config.channels

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(x)

    def decode(self, z: Tensor) -> Tensor:
        return z


register_family(Family(
    name="identity", config=IdentityConfig, build=IdentityCodec, kind="codec",
    resolve=lambda spec: {} if spec.channels is None else {"channels": spec.channels},
    doc="pixel space as a codec (factor 1): every diffusion model has one"))


# ----- loading -----------------------------------------------------------------------------------
