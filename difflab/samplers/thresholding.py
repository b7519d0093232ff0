"""``correct_x0`` hooks that keep the clean-data estimate in the data range.

Use with any sampler: ``hooks=Hooks(correct_x0=DynamicThreshold(0.995))``. The sampler then sees
the corrected ``x0_hat`` and the matching ``eps`` (``Prediction.with_x0``), in every
parameterization and on every path.

* :class:`StaticThreshold`: clip ``x0_hat`` to ``[lo, hi]`` (DDPM's ``clip_denoised``; Ho et al.
  2020 sample with it, Saharia et al. 2022 Sec. 2.3 call it static thresholding).
* :class:`DynamicThreshold`: Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3):
  per sample, ``s = max(1, percentile(|x0_hat|, p))``; clip to ``[-s, s]`` and divide by ``s``.
  Pixels are pushed inwards instead of saturating, which matters at large guidance weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.errors import bad_value


@dataclass(frozen=True)
class StaticThreshold:
    """``x0 -> clamp(x0, lo, hi)`` (default: the ``[-1, 1]`` image range)."""

    lo: float = -1.0
    hi: float = 1.0

    def __post_init__(self) -> None:
        if not self.lo < self.hi:
            raise bad_value("lo/hi", (self.lo, self.hi), "lo < hi")

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return x0.clamp(self.lo, self.hi)


@dataclass(frozen=True)
class DynamicThreshold:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3).

    Attributes:
        p: the percentile as a fraction in ``(0, 1]`` (Imagen: 0.995 / 99.5th percentile).
        max_value: the range bound the data lives in (``s`` is at least this; 1 for [-1, 1]).

    For each sample ``b``: ``s_b = max(max_value, quantile(|x0_b|, p))`` over all its elements
    (linear interpolation, as ``numpy.percentile``), then ``x0_b <- clamp(x0_b, -s_b, s_b) / s_b *
    max_value``. With ``max_value = 1`` this is exactly the paper's rule.
    """

    p: float = 0.995
    max_value: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise bad_value("p", self.p, "a fraction in (0, 1], e.g. 0.995")
        if not self.max_value > 0:
            raise bad_value("max_value", self.max_value, "a positive number")

    def __call__(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1).abs()
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        s = torch.quantile(flat, self.p, dim=1)
        s = s.to(x0.dtype).clamp_min(self.max_value)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s * self.max_value


def static_threshold(x0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Clip to ``[-1, 1]``: a ready-made ``correct_x0`` hook."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(p: float = 0.995, max_value: float = 1.0) -> DynamicThreshold:
    """Imagen's dynamic thresholding at percentile ``p`` as a ``correct_x0`` hook."""
    return DynamicThreshold(p, max_value)
