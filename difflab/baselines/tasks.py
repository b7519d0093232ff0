"""The baselines' training tasks: ``[task] kind = "vae"`` (a ``vae`` family, the negative ELBO)
and ``kind = "gan"`` (a ``gan`` family, the two-player game). Both sample with one network
pass per image from a per-sample noise stream (:meth:`draw_images`), which
:func:`difflab.sampling.generate` uses instead of a sampler."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difflab.cond import Cond
from difflab.tasks import register_task
from difflab.tasks.base import TrainingTask


class _OnePassTask(TrainingTask):
    generative = True

    def wrap(self, net: nn.Module, check_finite: bool = True) -> nn.Module:
        return net

    def draw_images(self, net: nn.Module, seeds: list[int], batch_size: int,
                    device=None) -> Tensor:
        """One image per seed: ``z`` from that seed's own stream, through the decoder /
        generator (so image ``i`` does not depend on the batch size)."""
        dim = self.model_config.latent_dim
        device = device or next(net.parameters()).device
        z = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                return torch.cat([net.sample(b.to(device)).float().cpu()
                                  for b in z.split(batch_size)])
        finally:
            net.train(was)


@register_task
class VAETask(_OnePassTask):
    """``[task] kind = "vae"`` with ``[model] arch = "vae"``: per example, the negative ELBO in
    nats per dimension (:meth:`difflab.baselines.vae.GaussianVAE.neg_elbo` / pixels)."""

    kind = "vae"
    family_kinds = ("vae",)
    objectives = ("elbo",)
    default_objective = "elbo"

    def loss(self, modules: dict[str, nn.Module], x: Tensor, cond: Cond,
             generator: torch.Generator) -> Tensor:
        beta = self.objective.beta if self.objective is not None else 1.0
        return modules["model"](x, generator, beta) / x[0].numel()


@register_task
class GANTask(_OnePassTask):
    """``[task] kind = "gan"`` with ``[model] arch = "dcgan"``: per example, the generator's
    and the discriminator's losses of one simultaneous update
    (:meth:`difflab.baselines.dcgan.DCGAN.forward`)."""

    kind = "gan"
    family_kinds = ("gan",)
    objectives = ("gan",)
    default_objective = "gan"

    def loss(self, modules: dict[str, nn.Module], x: Tensor, cond: Cond,
             generator: torch.Generator) -> Tensor:
        dim = self.model_config.latent_dim
        z = torch.randn(x.shape[0], dim, generator=generator, device=generator.device)
        kind = self.objective.loss if self.objective is not None else "non_saturating"
        return modules["model"](z.to(x.device), x, kind)
