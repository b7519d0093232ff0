"""A Gaussian VAE (Kingma & Welling 2014): a convolutional encoder gives ``q(z | x) =
N(mu, diag(sigma^2))``, the prior is ``N(0, I)``, and the decoder gives ``p(x | z) =
N(x_hat, s^2 I)`` with one learned scale ``s`` (the "calibrated" decoder of Rybkin et al. 2021,
which sets the balance of reconstruction and KL by maximum likelihood instead of a hand-set
weight). Trained on the negative ELBO (their eq. 3, one reparameterised sample, eq. 10)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.components import Family, image_fields, image_shape, register_family
from difflab.errors import bad_value


@dataclass
class VAEConfig:
    """``[model] arch = "vae"``.

    Attributes:
        image_size: side of the (square) images, a multiple of 4.
        in_channels: image channels.
        latent_dim: width of ``z``.
        width: channels of the first convolution (the second has twice as many).
    """

    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 32
    width: int = 32

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 4 or self.image_size % 4:
            raise bad_value("image_size", self.image_size, "a multiple of 4")
        for key in ("in_channels", "latent_dim", "width"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_value(key, v, "a positive int")


class GaussianVAE(nn.Module):
    """See the module docstring. ``forward(x)`` is the per-example negative ELBO in nats."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or VAEConfig()
        w, s = c.width, c.image_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(c.in_channels, w, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.SiLU(), nn.Flatten(),
            nn.Linear(2 * w * s * s, 2 * c.latent_dim))
        self.decoder_in = nn.Linear(c.latent_dim, 2 * w * s * s)
        self.decoder = nn.Sequential(
            nn.SiLU(), nn.Unflatten(1, (2 * w, s, s)),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(w, c.in_channels, 4, 2, 1))
        self.log_scale = nn.Parameter(torch.zeros(()))  # log s of p(x | z)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)`` of ``q(z | x)``, each ``(B, latent_dim)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean ``x_hat`` (the image a latent stands for)."""
        return self.decoder(self.decoder_in(z))

    def neg_elbo(self, x: Tensor, generator: torch.Generator | None = None,
                 beta: float = 1.0) -> Tensor:
        """``-ELBO = -E_q[log p(x | z)] + beta KL(q(z | x) || N(0, I))`` per example, in nats,
        with one reparameterised draw ``z = mu + sigma eps`` (``beta = 1``: the ELBO)."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        x_hat = self.decode(z)
        d = x[0].numel()
        s2 = (2 * self.log_scale).exp()
        rec = (0.5 * (x - x_hat).pow(2).flatten(1).sum(1) / s2
               + d * (self.log_scale + 0.5 * math.log(2 * math.pi)))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return rec + beta * kl

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                beta: float = 1.0) -> Tensor:
        return self.neg_elbo(x, generator, beta)

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """Images for prior draws ``z (B, latent_dim)``: the decoder means (the usual way
        VAE samples are shown; adding the ``s``-noise would only blur them)."""
        return self.decode(z)


FAMILY = register_family(Family(
    name="vae", config=VAEConfig, build=GaussianVAE, kind="vae", resolve=image_fields,
    input_shape=image_shape,
    doc="a Gaussian VAE with a calibrated Gaussian decoder (Kingma & Welling 2014)"))
