"""The first-stage task: train a codec (LDM's KL autoencoder) on images with
:class:`~difflab.objectives.autoencoder.AutoencoderObjective` (reconstruction, perceptual
distance, KL, and an adaptive-weight patch discriminator; :mod:`difflab.latent.losses`).

Trainable parts: ``model`` (the codec) and, with ``objective.disc_weight > 0``,
``discriminator``. One AdamW steps both: the loss sums the generator terms, whose gradient
reaches the discriminator's weights only through a detached copy
(:func:`torch.func.functional_call`), and the discriminator's hinge loss on detached
reconstructions, which reaches no autoencoder weight. Since AdamW updates every parameter from
its own gradient and moments, this is exactly two optimizers with the same settings (LDM's
``opt_ae`` and ``opt_disc``) stepping together.

At every checkpoint the codec's ``scale_factor`` is re-estimated from the EMA weights on the
first 512 training images (one over the latents' standard deviation, SD's way), so the saved
codec carries it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.tasks import register_task
from difflab.tasks.base import FrozenPart, TrainingTask, content_hash

logger = logging.getLogger("difflab.training")

SCALE_IMAGES = 512


def _unwrap(m: nn.Module) -> nn.Module:
    return getattr(m, "module", m)


@register_task
class AutoencoderTask(TrainingTask):
    """``[task] kind = "autoencoder"`` with ``[model] arch`` a codec family."""

    kind = "autoencoder"
    usage = ("it is a codec: name it in a diffusion run's [codec] section (run = \"{run}\") to "
             "train a latent diffusion model on its latents")
    family_kinds = ("codec",)
    objectives = ("autoencoder",)
    default_objective = "autoencoder"

    def __init__(self, cfg, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.step = 0
        self.perceptual = None
        self._perceptual_source = None
        obj = self.objective
        if obj is not None and obj.perceptual is not None and obj.perceptual_weight > 0:
            self.perceptual = self._load_perceptual(obj.perceptual)

    def _load_perceptual(self, name: str):
        from difflab.data import build_dataset
        from difflab.evaluation.features import EXTRACTORS, get_extractor
        from difflab.latent.losses import PerceptualDistance

        spec = EXTRACTORS.get(name)
        if spec is None:
            raise DifflabError(f"objective.perceptual={name!r} is not a network difflab "
                               f"trains: expected one of {sorted(EXTRACTORS)}")
        if spec.channels != self.model_config.in_channels:
            raise DifflabError(f"objective.perceptual={name!r} takes {spec.channels}-channel "
                               f"images, the data has {self.model_config.in_channels}")
        data = None
        d = self.cfg.data
        if d.name.lower().replace("-", "_") == spec.dataset:
            # the run's own images (its split, without its hold-out), at the network's size
            data = build_dataset(d.name, root=d.root, image_size=spec.image_size, split=d.split,
                                 **d.options())
        ext = get_extractor(name, data, train=True)
        body = getattr(ext.net, "encoder", None) or ext.net.body
        self._perceptual_source = f"extractor:{name}-{ext.meta.get('key', '?')}"
        return PerceptualDistance(body).to(self.device)

    # ----- parts ------------------------------------------------------------------------------
    def build_trainable(self) -> dict[str, nn.Module]:
        model = self.build_model()
        if not any(p.requires_grad for p in model.parameters()):
            raise DifflabError(f"model.arch={self.family.name!r} has no weights to train: "
                               "train a learned codec such as 'autoencoder_kl'")
        parts = {"model": model}
        obj = self.objective
        if obj is not None and obj.disc_weight > 0:
            from difflab.latent.losses import PatchDiscriminator

            disc = PatchDiscriminator(self.model_config.in_channels, obj.disc_width,
                                      obj.disc_layers)
            side = self.model_config.image_size
            if disc.output_side(side) < 1:
                raise DifflabError(
                    f"objective.disc_layers={obj.disc_layers}: a patch discriminator that deep "
                    f"leaves no patch of a {side}x{side} image; use at most "
                    f"{max(disc.max_layers(side), 0)} layers (or larger images)")
            parts["discriminator"] = disc
        return parts

    def part_family(self, name: str):
        return (self.family, self.model_config) if name == "model" else (None, None)

    def frozen_parts(self) -> dict[str, FrozenPart]:
        if self.perceptual is None:
            return {}
        src = self._perceptual_source
        return {"perceptual": FrozenPart(self.perceptual, src,
                                         content_hash(src, self.perceptual))}

    def wrap(self, net: nn.Module, check_finite: bool = True) -> nn.Module:
        return net

    # ----- the loss ---------------------------------------------------------------------------
    def loss(self, modules: dict[str, nn.Module], x: Tensor, cond: Cond,
             generator: torch.Generator) -> Tensor:
        obj = self.objective
        ae = modules["model"]
        x_hat, post = ae(x, generator=generator, sample=obj.sample_posterior)
        diff = x_hat - x
        rec = obj.l1 * diff.abs().flatten(1).mean(1)
        if obj.l2:
            rec = rec + obj.l2 * diff.pow(2).flatten(1).mean(1)
        if self.perceptual is not None:
            rec = rec + obj.perceptual_weight * self.perceptual(x, x_hat)
        from difflab.latent.codec import DiagonalGaussian

        if isinstance(post, DiagonalGaussian):  # KL-regularised (LDM's KL weight per pixel)
            total = rec + obj.kl_weight * post.kl() / x[0].numel()
        else:  # vector-quantised: codebook + commitment (VQGAN eq. 4)
            total = rec + obj.codebook_weight * post.loss
        disc = modules.get("discriminator")
        if disc is None or self.step < obj.disc_start:
            return total
        d = _unwrap(disc)
        frozen = {k: v.detach() for k, v in d.named_parameters()}
        g = -torch.func.functional_call(d, frozen, (x_hat,)).flatten(1).mean(1)
        weight = obj.disc_weight
        if torch.is_grad_enabled():
            weight = weight * adaptive_weight_or_one(rec.mean(), g.mean(),
                                                     _unwrap(ae).last_layer)
        from difflab.latent.losses import hinge_d_loss

        d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
        return total + weight * g + d_loss

    # ----- the codec's scale ------------------------------------------------------------------
    @torch.no_grad()
    def before_checkpoint(self, parts: dict[str, nn.Module], emas: dict) -> None:
        """Estimate the codec's ``scale_factor`` from the EMA weights and store it in both the
        trained and the EMA codec."""
        from difflab.latent.codec import estimate_scale

        ema = emas["model"].model
        n = min(SCALE_IMAGES, len(self.dataset))
        x = torch.stack([self.dataset[i][0] for i in range(n)]).to(next(ema.parameters()).device)
        scale, shift = estimate_scale(ema, x)
        for m in (parts["model"], ema):
            m.set_scale(scale, shift)


def adaptive_weight_or_one(rec: Tensor, gan: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's adaptive weight (:func:`difflab.latent.losses.adaptive_weight`); 1 when the
    graph does not reach the last layer (no gradient to compare)."""
    from difflab.latent.losses import adaptive_weight

    if not (rec.requires_grad and gan.requires_grad):
        return torch.ones((), device=rec.device)
    return adaptive_weight(rec, gan, last_layer)
