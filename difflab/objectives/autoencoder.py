"""The first-stage objective's weights (``[objective] name = "autoencoder"``); the loss itself
is computed by the autoencoder task (:mod:`difflab.tasks.autoencoder`) with
:mod:`difflab.latent.losses`, since it spans two trained parts (autoencoder, discriminator)."""

from __future__ import annotations

from dataclasses import dataclass

from difflab.errors import bad_value


@dataclass(frozen=True)
class AutoencoderObjective:
    """Per example: ``l1 |x - x_hat| + l2 (x - x_hat)^2 + perceptual_weight d(x, x_hat)``
    (pixel means) ``+ kl_weight KL / pixels`` (a VQ model: ``+ codebook_weight L_vq``)
    ``+ adaptive(disc_weight) gan`` after ``disc_start`` steps, and the discriminator's hinge
    loss. ``KL / pixels`` keeps LDM's ``kl_weight`` meaning (LDM sums both terms over pixels;
    dividing both by the pixel count only rescales the loss). ``disc_weight = 0`` trains no
    discriminator.

    Attributes:
        l1: weight of the L1 reconstruction term (LDM: 1).
        l2: weight of an L2 term (0: none).
        kl_weight: LDM's KL weight (1e-6 for its KL-f8 model).
        codebook_weight: weight of a VQ model's codebook + commitment loss (VQGAN: 1).
        perceptual: the extractor that gives the perceptual distance (``emoji-perceptual``,
            ``mnist-perceptual``; None: none).
        perceptual_weight: its weight (LDM: 1).
        disc_weight: the adversarial weight on top of the adaptive one (LDM: 0.5).
        disc_start: the step at which the discriminator switches on (LDM: 50,001).
        disc_layers: stride-2 stages of the patch discriminator.
        disc_width: its first width.
        sample_posterior: reconstruct a posterior sample (LDM) rather than its mean.
    """

    l1: float = 1.0
    l2: float = 0.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    perceptual: str | None = None
    perceptual_weight: float = 1.0
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_layers: int = 2
    disc_width: int = 32
    sample_posterior: bool = True

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "kl_weight", "codebook_weight", "perceptual_weight",
                     "disc_weight"):
            v = getattr(self, name)
            if not v >= 0:
                raise bad_value(f"objective.{name}", v, "a number >= 0")
        if self.disc_start < 0:
            raise bad_value("objective.disc_start", self.disc_start, "a step >= 0")
        if self.disc_layers < 1 or self.disc_width < 1:
            raise bad_value("objective.disc_layers / disc_width",
                            (self.disc_layers, self.disc_width), "integers >= 1")
        if self.l1 == self.l2 == 0 and (self.perceptual is None or self.perceptual_weight == 0):
            raise bad_value("objective.l1 / l2 / perceptual", (self.l1, self.l2,
                            self.perceptual), "at least one reconstruction term")


def _autoencoder(*, l1: float = 1.0, l2: float = 0.0, kl_weight: float = 1e-6,
                 codebook_weight: float = 1.0, perceptual: str | None = None,
                 perceptual_weight: float = 1.0,
                 disc_weight: float = 0.0, disc_start: int = 0, disc_layers: int = 2,
                 disc_width: int = 32, sample_posterior: bool = True) -> AutoencoderObjective:
    return AutoencoderObjective(l1, l2, kl_weight, codebook_weight, perceptual,
                                perceptual_weight, disc_weight, disc_start, disc_layers,
                                disc_width, sample_posterior)
