"""Loss weightings, each defined once and expressed in any target's space.

At fixed ``(x_t, t)`` every parameterization is affine in ``x0``, so an error of ``d`` in ``x0``
is an error of ``c(t) d`` in target ``k`` (``Prediction.error_scale``):
``|err_k|^2 = c^2 |err_x0|^2``. A weighting named after the literature is a weight ``w(t)`` on the
**x0-MSE**; on target ``k`` it becomes ``w / c^2`` (Kingma & Gao 2023, "Understanding diffusion
objectives", Sec. 2 and Table 1 make the same bookkeeping in log-SNR). Two weightings are instead
defined in the target's own space: ``uniform`` (DDPM's ``L_simple``, Ho et al. 2020 eq. 14, when
the target is ``eps``) and ``sigma2`` (NCSN's ``lambda(sigma) = sigma^2``).

Weights are float64 tensors ``(B,)`` and carry no gradient.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from difflab.errors import bad_value
from difflab.paths.base import GaussianPath
from difflab.prediction import Prediction


class Weighting(ABC):
    """``w(t)``: on the x0-MSE when ``x0_space`` is True, else in the target's own space."""

    name: str = "weighting"
    x0_space: bool = True

    @abstractmethod
    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        """The weight in its defining space (x0 or the target's own)."""

    def __call__(self, true: Prediction, target: str) -> torch.Tensor:
        """The weight on the ``target``-space squared error at ``(true.x_t, true.t)``."""
        w = self.base(true.path, true.t)
        if not self.x0_space:
            return w
        c = true.error_scale(target)
        return w / (c * c)


@dataclass(frozen=True)
class Uniform(Weighting):
    """Unit weight on the target's own MSE (``L_simple`` for ``eps``; flow matching for
    ``velocity``; the plain x0 loss for ``x0``)."""

    name = "uniform"
    x0_space = False

    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t, dtype=torch.float64)


@dataclass(frozen=True)
class SNR(Weighting):
    """``w_x0 = SNR(t) = alpha^2 / sigma^2``: the ELBO weighting of the x0-MSE for a continuous
    path up to ``-d log SNR / dt`` (Kingma et al. 2021, eq. 15); equals ``L_simple`` on ``eps``."""

    name = "snr"

    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(path.log_snr(t.double()))


@dataclass(frozen=True)
class MinSNR(Weighting):
    """Min-SNR-gamma (Hang et al. 2023, eq. 5-6): ``w_x0 = min(SNR, gamma)``.

    On ``eps`` this is ``min(SNR, gamma) / SNR``, on ``v`` (VP paths) ``min(SNR, gamma)/(SNR+1)``,
    exactly the paper's Sec. 3.4 variants.
    """

    gamma: float = 5.0
    name = "min_snr"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise bad_value("gamma", self.gamma, "a positive number (Hang et al. use 5)")

    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(path.log_snr(t.double())).clamp_max(self.gamma)


@dataclass(frozen=True)
class EDMWeighting(Weighting):
    """EDM's ``lambda(sigma~) = (sigma~^2 + sigma_data^2) / (sigma~ sigma_data)^2`` on the
    x0-MSE (Karras et al. 2022, eq. 8 and Table 1), with ``sigma~ = sigma / alpha``; it makes
    the effective weight of the preconditioned network's ``F`` unity (eq. 8-9)."""

    sigma_data: float = 0.5
    name = "edm"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise bad_value("sigma_data", self.sigma_data, "a positive number (EDM uses 0.5)")

    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        sv = path.sigma_ve(t.double())
        sd = self.sigma_data
        return (sv * sv + sd * sd) / (sv * sd) ** 2


@dataclass(frozen=True)
class Sigma2(Weighting):
    """NCSN's ``lambda(sigma) = sigma^2`` in the target's own space (Song & Ermon 2019, eq. 2-6):
    with target ``score`` it makes ``sigma^2 |s - score|^2 = |sigma s + eps|^2`` scale-free."""

    name = "sigma2"
    x0_space = False

    def base(self, path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
        return path.sigma(t.double()) ** 2


WEIGHTINGS: dict[str, type[Weighting]] = {
    "uniform": Uniform,
    "snr": SNR,
    "min_snr": MinSNR,
    "edm": EDMWeighting,
    "sigma2": Sigma2,
}


def build_weighting(name: str | Weighting, gamma: float = 5.0,
                    sigma_data: float = 0.5) -> Weighting:
    """A weighting by name; ``gamma`` goes to ``min_snr``, ``sigma_data`` to ``edm``."""
    if isinstance(name, Weighting):
        return name
    if name not in WEIGHTINGS:
        raise bad_value("weighting", name, "one of " + ", ".join(repr(k) for k in WEIGHTINGS))
    cls = WEIGHTINGS[name]
    given = {"gamma": gamma, "sigma_data": sigma_data}
    params = {k: v for k, v in given.items() if k in inspect.signature(cls).parameters}
    return cls(**params)
