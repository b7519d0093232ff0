"""The ``GaussianPath`` contract: ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Data is at ``t -> 0`` and the prior at ``t = t_max``. ``t`` is a float tensor of shape ``(B,)``
(or a Python float). Schedule scalars are computed in float64 when ``t`` is a Python float and in
``t``'s own dtype otherwise; samplers pass float64 grids and cast coefficients to the data dtype.

The time ``t = 0`` is the clean-data end on every path (``alpha = 1, sigma = 0``); a grid may end
there, which means "return the model's clean-data estimate" (DDPM's last step, NCSNv2's final
denoising step, k-diffusion's ``sigma = 0``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from difflab.errors import DifflabError

Time = torch.Tensor | float


def as_time(t: Time) -> torch.Tensor:
    """Return ``t`` as a float tensor (Python numbers become float64)."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.tensor(float(t), dtype=torch.float64)


def expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient ``(B,)`` (or scalar) to broadcast over ``x`` (B, ...)."""
    coef = coef.to(dtype=x.dtype, device=x.device)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise DifflabError(
            f"t has shape {tuple(coef.shape)} but x has batch size {x.shape[0]}: "
            "expected t of shape (B,) matching x, or a scalar"
        )
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


def same_marginals(a: GaussianPath, b: GaussianPath) -> bool:
    """Whether two paths give ``x_t`` the same law at the same ``t``: equal ``alpha`` and
    ``sigma`` at 17 times across ``a``'s range. A model trained on one path reads ``x_t`` from
    another only when this holds (guidance networks, classifiers)."""
    if a is b:
        return True
    ts = torch.linspace(a.t_min, a.t_max, 17, dtype=torch.float64)
    try:
        return bool(torch.allclose(a.alpha(ts), b.alpha(ts)) and
                    torch.allclose(a.sigma(ts), b.sigma(ts)))
    except Exception:  # noqa: BLE001 - b may reject a's times: not the same path
        return False


class GaussianPath(ABC):
    """A forward process with Gaussian marginals ``q(x_t | x0) = N(alpha x0, sigma^2 I)``.

    Subclasses implement ``alpha, sigma, d_alpha, d_sigma`` (and ideally a closed-form
    ``t_from_log_snr``); everything else (log-SNR, the SDE, posteriors, the prior) is derived
    here once, so VP, VE and sub-VP agree by construction.
    """

    t_min: float
    t_max: float
    name: str = "path"

    @property
    def t_max_finite(self) -> float:
        """The largest time whose log-SNR is finite (``t_max`` except at zero terminal SNR,
        where ``alpha(t_max) = 0``); grids spaced in log-SNR or sigma start their spacing here."""
        return self.t_max

    # ----- the four primitives -------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Time) -> torch.Tensor:
        """Signal coefficient ``alpha(t)``."""

    @abstractmethod
    def sigma(self, t: Time) -> torch.Tensor:
        """Noise coefficient ``sigma(t)``."""

    @abstractmethod
    def d_alpha(self, t: Time) -> torch.Tensor:
        """``d alpha / dt``."""

    @abstractmethod
    def d_sigma(self, t: Time) -> torch.Tensor:
        """``d sigma / dt``."""

    # ----- derived quantities -------------------------------------------------------------
    def log_snr(self, t: Time) -> torch.Tensor:
        """``2 log(alpha / sigma)``; DPM-Solver's ``lambda`` is half of this."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        """Inverse of ``log_snr`` by bisection (subclasses override with closed forms).

        ``log_snr`` is strictly decreasing on ``[t_min, t_max]``; 100 float64 halvings reach
        machine precision. Values outside the path's range are clamped to its ends.
        """
        lam = as_time(lam)
        lo = torch.full_like(lam, self.t_min, dtype=torch.float64)
        hi = torch.full_like(lam, self.t_max, dtype=torch.float64)
        target = lam.double()
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > target  # still too little noise: move right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def sigma_ve(self, t: Time) -> torch.Tensor:
        """``sigma / alpha``: the noise level of ``x_t / alpha`` (EDM's change of variables)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, sigma_ve: Time) -> torch.Tensor:
        """Inverse of ``sigma_ve``, through ``log_snr = -2 log(sigma / alpha)``."""
        return self.t_from_log_snr(-2.0 * torch.log(as_time(sigma_ve)))

    def sde(self, t: Time) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift rate and squared diffusion ``(f, g^2)`` of ``dx = f x dt + g dw``.

        Matching the marginals (Song et al. 2021; Kingma et al. 2021, eq. 17-18):
        ``f = d log alpha / dt`` and ``g^2 = d sigma^2 / dt - 2 f sigma^2``.
        """
        a, s = self.alpha(t), self.sigma(t)
        f = self.d_alpha(t) / a
        g2 = 2.0 * s * self.d_sigma(t) - 2.0 * f * s * s
        return f, g2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: Time) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) eps`` with ``t`` of shape ``(B,)`` broadcast over data dims."""
        if x0.shape != eps.shape:
            raise DifflabError(
                f"eps has shape {tuple(eps.shape)} but x0 has shape {tuple(x0.shape)}: "
                "expected equal shapes"
            )
        t = as_time(t)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def transition(self, t: Time, s: Time) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(x_t | x_s) = N(alpha_ts x_s, sigma2_ts I)`` for ``s < t`` (VDM eq. 4)."""
        a_ts = self.alpha(t) / self.alpha(s)
        sigma2_ts = self.sigma(t) ** 2 - a_ts**2 * self.sigma(s) ** 2
        return a_ts, sigma2_ts.clamp_min(0.0)

    def posterior(
        self, t: Time, s: Time
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q(x_s | x_t, x0) = N(c_xt x_t + c_x0 x0, var)`` for ``s < t``.

        DDPM eq. 6-7 for any two times on any path (VDM eq. 5-6): with ``alpha_ts, sigma2_ts``
        from :meth:`transition`, ``c_xt = alpha_ts sigma_s^2 / sigma_t^2``,
        ``c_x0 = alpha_s sigma2_ts / sigma_t^2`` and ``var = sigma2_ts sigma_s^2 / sigma_t^2``
        (DDPM's ``beta_tilde``). At ``s = 0`` it is the point mass at ``x0``.
        """
        a_ts, sigma2_ts = self.transition(t, s)
        s2_t = self.sigma(t) ** 2
        s2_s = self.sigma(s) ** 2
        c_xt = a_ts * s2_s / s2_t
        c_x0 = self.alpha(s) * sigma2_ts / s2_t
        var = sigma2_ts * s2_s / s2_t
        return c_xt, c_x0, var

    # ----- the prior ------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior ``N(0, sigma(t_max)^2 I)``."""
        return float(self.sigma(self.t_max))

    def prior_sample(self, shape: tuple[int, ...], noise=None, **kw) -> torch.Tensor:
        """Draw from the prior; ``noise`` is an object with ``randn_like`` (see samplers.noise)."""
        if noise is None:
            return torch.randn(shape, **kw) * self.prior_std
        return noise.randn_like(torch.empty(shape, **kw)) * self.prior_std

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """``log N(z; 0, sigma(t_max)^2 I)`` summed over all but the batch dim."""
        s = self.prior_std
        d = z[0].numel()
        sq = z.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s * s) - 0.5 * sq / (s * s)

    # ----- the network's time signal and validation --------------------------------------------
    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is fed as its time signal (default ``1000 t``)."""
        return 1000.0 * t

    def check_time(self, t: torch.Tensor, name: str = "t", allow_zero: bool = False) -> None:
        """Raise if any ``t`` lies outside ``[t_min, t_max]`` (0 allowed when ``allow_zero``)."""
        tol = 1e-9 * max(1.0, abs(self.t_max))
        bad = (t < self.t_min - tol) | (t > self.t_max + tol) | ~torch.isfinite(t)
        if allow_zero:
            bad &= t != 0
        if bool(bad.any()):
            raise DifflabError(
                f"{name} contains {float(t[bad].flatten()[0]):.6g}, outside the valid range of "
                f"{self!r}: expected values in [t_min={self.t_min:g}, t_max={self.t_max:g}]"
                + (" or exactly 0 (the data end)" if allow_zero else "")
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
