"""The first-stage training losses of LDM (Rombach et al. 2022, App. G; Esser et al. 2021,
VQGAN, Sec. 3.1): reconstruction (L1, plus a perceptual feature distance), the KL term of the
posterior, and a patch discriminator whose weight adapts to the reconstruction gradient.

- Perceptual distance (:class:`PerceptualDistance`): LPIPS's form (Zhang et al. 2018, eq. 1)
  ``sum_l mean_hw || n(f_l(x)) - n(f_l(x_hat)) ||^2`` with ``n`` the unit normalisation over
  channels and unit per-channel weights, on the convolutional layers of a network difflab
  trains itself on the same kind of data (no pretrained VGG can be had here). It is *not* the
  network that the rFID features come from (a different seed and role, see
  :data:`difflab.evaluation.features.EXTRACTORS`), so the loss does not optimise the metric.
- Patch discriminator (:class:`PatchDiscriminator`): pix2pix's N-layer design (Isola et al.
  2017) as LDM uses it, with GroupNorm in place of BatchNorm so a patch's logit never depends on
  the rest of the micro-batch (bit-exact resume and gradient accumulation).
- Adaptive weight (VQGAN eq. 7): ``lambda = ||grad_L rec|| / (||grad_L gan|| + 1e-4)`` at the
  decoder's last layer ``L``, clamped to ``[0, 1e4]`` and detached, times ``disc_weight``; the
  adversarial terms start at step ``disc_start``. Generator: ``-mean D(x_hat)``; discriminator:
  the hinge loss ``0.5 (relu(1 - D(x)) + relu(1 + D(x_hat)))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PatchDiscriminator", "PerceptualDistance", "adaptive_weight", "hinge_d_loss"]


class PatchDiscriminator(nn.Module):
    """A 4x4-convolution PatchGAN: ``layers`` stride-2 stages from ``width`` channels (doubling,
    at most 8x), one stride-1 stage, then a 1-channel map of patch logits ``(B, 1, h, w)``.

    Weights start as DCGAN's (Radford et al. 2016): N(0, 0.02) convolutions, norms at 1."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1 or width < 1:
            raise ValueError("PatchDiscriminator: layers and width must be at least 1")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)

    @staticmethod
    def _side(side: int, layers: int) -> int:
        side = side // 2                   # the first stride-2 convolution (4x4, padding 1)
        for i in range(1, layers + 1):
            side = side // 2 if i < layers else side - 1
        return side - 1                    # the final 4x4 stride-1 convolution

    def output_side(self, side: int) -> int:
        """The side of the logit map for a ``side x side`` input (< 1: the input is too
        small for this many layers)."""
        layers = sum(1 for m in self.main if isinstance(m, nn.GroupNorm))
        return self._side(side, layers)

    @classmethod
    def max_layers(cls, side: int) -> int:
        """The most stride-2 stages that leave at least one patch of a ``side`` image."""
        n = 0
        while cls._side(side, n + 1) >= 1:
            n += 1
        return n


def _norm(channels: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Per-example hinge loss of the discriminator ``(B,)``."""
    real = F.relu(1.0 - real_logits).flatten(1).mean(1)
    fake = F.relu(1.0 + fake_logits).flatten(1).mean(1)
    return 0.5 * (real + fake)


def adaptive_weight(rec: Tensor, gan: Tensor, last_layer: Tensor, max_weight: float = 1e4
                    ) -> Tensor:
    """VQGAN's eq. 7: the ratio of the gradient norms of the reconstruction and adversarial
    losses at ``last_layer`` (detached)."""
    g_rec, = torch.autograd.grad(rec, last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PerceptualDistance(nn.Module):
    """LPIPS-form distance (see the module docstring) on the activations after every ReLU of
    ``body`` up to its first ``Flatten``: ``(B,)`` per example. ``body`` is frozen."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for m in body:
            if isinstance(m, nn.Flatten):
                break
            layers.append(m)
        if not any(isinstance(m, nn.ReLU) for m in layers):
            raise ValueError("PerceptualDistance: the network has no convolutional ReLU layers")
        self.layers = nn.ModuleList(layers).eval().requires_grad_(False)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # frozen: batch norms keep their running statistics

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([x, y])
        total = x.new_zeros(x.shape[0])
        for m in self.layers:
            h = m(h)
            if isinstance(m, nn.ReLU):
                a, b = h.chunk(2)
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + (a - b).pow(2).sum(1).flatten(1).mean(1)
        return total
