"""Variance-exploding paths (NCSN / score-SDE VE, EDM) and the SiT interpolants."""

from __future__ import annotations

import math

import torch

from difflab.errors import DifflabError
from difflab.paths.base import GaussianPath, Time, as_time


def _check_sigmas(sigma_min: float, sigma_max: float) -> None:
    if not 0 < sigma_min < sigma_max:
        raise DifflabError(
            f"sigma_min={sigma_min}, sigma_max={sigma_max} are not valid: "
            "expected 0 < sigma_min < sigma_max"
        )


class VE(GaussianPath):
    """Geometric noise levels ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``alpha = 1``.

    NCSN (Song & Ermon 2019) and the score-SDE VE SDE (Song et al. 2021, eq. 9 and App. C).
    ``t = 0`` is the clean data (``sigma = 0``), reached by a final denoising step.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5,
                 t_max: float = 1.0) -> None:
        _check_sigmas(sigma_min, sigma_max)
        if not 0 < t_min < t_max:
            raise DifflabError(f"t_min={t_min}, t_max={t_max}: expected 0 < t_min < t_max")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def d_alpha(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def _sigma_geo(self, t: Time) -> torch.Tensor:
        return self.sigma_min * torch.exp(as_time(t) * self._log_ratio)

    def sigma(self, t: Time) -> torch.Tensor:
        t = as_time(t)
        return torch.where(t == 0, torch.zeros_like(t), self._sigma_geo(t))

    def d_sigma(self, t: Time) -> torch.Tensor:
        return self._sigma_geo(t) * self._log_ratio

    def log_snr(self, t: Time) -> torch.Tensor:
        return -2.0 * torch.log(self.sigma(t))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        return (-0.5 * as_time(lam) - math.log(self.sigma_min)) / self._log_ratio

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(self._sigma_geo(t)) / 4.0

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


class EDM(GaussianPath):
    """Karras et al. 2022: ``alpha = 1, sigma = t`` on ``[sigma_min, sigma_max]`` (Table 1)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        _check_sigmas(sigma_min, sigma_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def d_alpha(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(as_time(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return as_time(t).clone()

    def d_sigma(self, t: Time) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        return -2.0 * torch.log(as_time(t))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        return torch.exp(-0.5 * as_time(lam))

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log(t) / 4.0  # EDM's c_noise (Table 1)

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


class Linear(GaussianPath):
    """Rectified flow / SiT linear interpolant: ``alpha = 1 - t``, ``sigma = t``.

    ``t_max`` stays below 1 so ``alpha > 0`` and every parameterization is defined; a velocity
    model can be integrated from there (Ma et al. 2024, SiT Sec. 3).
    """

    name = "linear"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3) -> None:
        if not 0 < t_min < t_max < 1:
            raise DifflabError(f"t_min={t_min}, t_max={t_max}: expected 0 < t_min < t_max < 1")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: Time) -> torch.Tensor:
        return 1.0 - as_time(t)

    def sigma(self, t: Time) -> torch.Tensor:
        return as_time(t).clone()

    def d_alpha(self, t: Time) -> torch.Tensor:
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t: Time) -> torch.Tensor:
        return torch.ones_like(as_time(t))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        # (1 - t)/t = exp(lam/2)  =>  t = sigmoid(-lam/2)
        return torch.sigmoid(-0.5 * as_time(lam))

    def __repr__(self) -> str:
        return "Linear()"


class GVP(GaussianPath):
    """SiT's generalized VP interpolant: ``alpha = cos(pi t/2)``, ``sigma = sin(pi t/2)``."""

    name = "gvp"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3) -> None:
        if not 0 < t_min < t_max < 1:
            raise DifflabError(f"t_min={t_min}, t_max={t_max}: expected 0 < t_min < t_max < 1")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.cos(0.5 * math.pi * as_time(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * as_time(t))

    def d_alpha(self, t: Time) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * as_time(t))

    def d_sigma(self, t: Time) -> torch.Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * as_time(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * as_time(t)))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        return torch.atan(torch.exp(-0.5 * as_time(lam))) * (2.0 / math.pi)

    def __repr__(self) -> str:
        return "GVP()"
