"""DCGAN (Radford, Metz & Chintala 2016, Sec. 3 "approach and model architecture"): a generator
of strided transposed convolutions with batch norm and ReLU ending in tanh, and a discriminator
of strided convolutions with LeakyReLU (0.2), batch norm after its first layer; no pooling, no
fully connected hidden layers. Sized for 28x28 or 32x32 images (two stride-2 stages on each
side, from a ``size / 4`` square)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difflab.components import Family, image_fields, image_shape, register_family
from difflab.errors import bad_value


@dataclass
class DCGANConfig:
    """``[model] arch = "dcgan"``.

    Attributes:
        image_size: side of the images, a multiple of 4.
        in_channels: image channels.
        latent_dim: width of the generator's noise ``z`` (the paper: 100).
        width: base channels (the generator starts at ``2 * width``, the discriminator at
            ``width``).
    """

    image_size: int = 28
    in_channels: int = 1
    latent_dim: int = 100
    width: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 4 or self.image_size % 4:
            raise bad_value("image_size", self.image_size, "a multiple of 4")
        for key in ("in_channels", "latent_dim", "width"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_value(key, v, "a positive int")


def _init(m: nn.Module) -> None:
    """The paper's initialisation: weights from N(0, 0.02); batch-norm scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGAN(nn.Module):
    """Generator and discriminator of one GAN, trained together by the ``gan`` task."""

    def __init__(self, config: DCGANConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or DCGANConfig()
        w, s = c.width, c.image_size // 4
        self.generator = nn.Sequential(
            nn.Linear(c.latent_dim, 2 * w * s * s, bias=False), nn.Unflatten(1, (2 * w, s, s)),
            nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.ConvTranspose2d(w, c.in_channels, 4, 2, 1), nn.Tanh())
        self.discriminator = nn.Sequential(
            nn.Conv2d(c.in_channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * w * s * s, 1))
        self.apply(_init)

    def forward(self, z: Tensor, real: Tensor | None = None, loss: str = "non_saturating"
                ) -> Tensor:
        """``G(z)``; with ``real`` images, the per-example GAN loss of one simultaneous update
        of both players: the generator's term through a detached copy of the discriminator
        (so its gradient reaches only the generator) plus the discriminator's term on real
        and detached fake images (one optimizer stepping both is then two optimizers with the
        same settings). Everything runs in this forward, so DDP sees every parameter used."""
        fake = self.generator(z)
        if real is None:
            return fake
        from torch.func import functional_call

        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        g_logit = functional_call(self.discriminator, frozen, (fake,)).squeeze(1)
        d_real = self.discriminator(real).squeeze(1)
        d_fake = self.discriminator(fake.detach()).squeeze(1)
        if loss == "hinge":
            return -g_logit + torch.relu(1 - d_real) + torch.relu(1 + d_fake)
        softplus = torch.nn.functional.softplus  # -log sigmoid(a) = softplus(-a)
        return softplus(-g_logit) + softplus(-d_real) + softplus(d_fake)

    @torch.no_grad()
    def sample(self, z: Tensor) -> Tensor:
        """Images for noise ``z (B, latent_dim)`` (batch norm in eval mode: running stats)."""
        return self.generator(z)


FAMILY = register_family(Family(
    name="dcgan", config=DCGANConfig, build=DCGAN, kind="gan", resolve=image_fields,
    input_shape=image_shape,
    doc="DCGAN's generator and discriminator (Radford et al. 2016)"))
