"""Variance-preserving paths (``alpha^2 + sigma^2 = 1``) and sub-VP.

A VP path is defined by ``log alpha(t)``; ``sigma = sqrt(1 - alpha^2)`` is computed with
``expm1`` so tiny noise levels keep full precision.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath, Time, as_time


class VP(GaussianPath):
    """Base of the variance-preserving family; construct with the classmethods below."""

    @abstractmethod
    def log_alpha(self, t: Time) -> torch.Tensor:
        """``log alpha(t)`` (negative, decreasing)."""

    @abstractmethod
    def d_log_alpha(self, t: Time) -> torch.Tensor:
        """``d log alpha / dt`` (= ``-beta(t) / 2`` in Song et al.'s notation)."""

    @abstractmethod
    def t_from_log_alpha(self, la: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`log_alpha`."""

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_alpha(self, t: Time) -> torch.Tensor:
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: Time) -> torch.Tensor:
        # d/dt sqrt(1 - alpha^2) = -alpha^2 (d log alpha/dt) / sigma
        return -torch.exp(2.0 * self.log_alpha(t)) * self.d_log_alpha(t) / self.sigma(t)

    def log_snr(self, t: Time) -> torch.Tensor:
        la2 = 2.0 * self.log_alpha(t)
        return la2 - torch.log(-torch.expm1(la2))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        # alpha^2 = sigmoid(lam)  =>  log alpha = -softplus(-lam) / 2   (DPM-Solver, App. D)
        lam = as_time(lam)
        return self.t_from_log_alpha(-0.5 * F.softplus(-lam))

    # ----- constructors ------------------------------------------------------------------
    @staticmethod
    def discrete(betas, zero_snr: bool = False) -> DiscreteVP:
        """DDPM's discrete chain with the given ``betas`` (Ho et al. 2020, eq. 2-4).

        ``zero_snr`` rescales them to zero terminal SNR (:func:`rescale_zero_terminal_snr`).
        """
        return DiscreteVP(_maybe_zero_snr(betas, zero_snr))

    @staticmethod
    def discrete_linear(N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                        zero_snr: bool = False):
        """DDPM's linear betas (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over 1000 steps)."""
        if N < 1:
            raise bad_value("N", N, "a positive number of steps")
        betas = torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
        return DiscreteVP(_maybe_zero_snr(betas, zero_snr))

    @staticmethod
    def discrete_scaled_linear(N: int = 1000, beta_start: float = 0.00085,
                               beta_end: float = 0.012, zero_snr: bool = False):
        """LDM's / Stable Diffusion's "scaled linear" betas: linear in ``sqrt(beta)`` from
        ``sqrt(beta_start)`` to ``sqrt(beta_end)`` (LDM's ``make_beta_schedule("linear")``
        with SD's ``linear_start = 0.00085``, ``linear_end = 0.012``)."""
        if N < 1:
            raise bad_value("N", N, "a positive number of steps")
        root = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, N, dtype=torch.float64)
        return DiscreteVP(_maybe_zero_snr(root ** 2, zero_snr))

    @staticmethod
    def discrete_cosine(N: int = 1000, s: float = 0.008, max_beta: float = 0.999,
                        zero_snr: bool = False):
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped."""
        if N < 1:
            raise bad_value("N", N, "a positive number of steps")
        n = torch.arange(N + 1, dtype=torch.float64)
        f = torch.cos((n / N + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        return DiscreteVP(_maybe_zero_snr(betas, zero_snr))

    @staticmethod
    def linear(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        """Continuous VP SDE with linear ``beta(t)`` (Song et al. 2021, eq. 11 / App. B)."""
        return LinearVP(beta_min, beta_max, t_min=t_min)

    @staticmethod
    def cosine(s: float = 0.008, t_min: float = 1e-5, t_max: float = 0.9946):
        """Continuous cosine schedule; ``t_max`` < 1 avoids ``alpha = 0`` (DPM-Solver, App. D)."""
        return CosineVP(s, t_min=t_min, t_max=t_max)


def rescale_zero_terminal_snr(betas) -> torch.Tensor:
    """Betas whose last step reaches ``alpha_bar = 0`` (zero terminal SNR).

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift ``sqrt(alpha_bar)`` so its last value is 0 and scale it so its first is unchanged,
    then read the betas back (the last one becomes exactly 1). A model on such a path sees pure
    noise at its last step, as it does at sampling time; it must predict ``v`` or ``x0`` there,
    since ``eps`` carries no information about ``x0`` at ``alpha = 0`` (their Sec. 3.2).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if betas.numel() < 2:
        raise bad_value("betas", betas.tolist(), "at least 2 steps for zero terminal SNR")
    root = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))   # sqrt(alpha_bar_n)
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root ** 2
    out = torch.empty_like(betas)
    out[0] = 1.0 - abar[0]
    out[1:] = 1.0 - abar[1:] / abar[:-1]
    out[-1] = 1.0
    return out


def _maybe_zero_snr(betas, zero_snr: bool):
    if not isinstance(zero_snr, bool):
        raise bad_value("zero_snr", zero_snr, "true or false")
    return rescale_zero_terminal_snr(betas) if zero_snr else betas


class DiscreteVP(VP):
    """A discrete DDPM chain seen as a continuous path.

    Step ``n = 0..N-1`` sits at the knot ``t_n = (n+1)/N`` with
    ``log alpha(t_n) = 0.5 * sum_{i<=n} log(1 - beta_i)``; an extra knot ``(0, 0)`` is the data.
    ``log alpha`` is piecewise linear between knots, so the model is exact at its own steps and
    continuous-time solvers can evaluate it anywhere in between. The network's time signal is the
    fractional step index ``t N - 1``.

    A last beta of exactly 1 is zero terminal SNR (:func:`rescale_zero_terminal_snr`): then
    ``alpha`` (not ``log alpha``, which ends at ``-inf``) is linear on the last segment, so
    ``alpha``, ``sigma`` and their derivatives stay finite up to ``alpha(1) = 0``.
    """

    name = "discrete"

    def __init__(self, betas) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        inner = betas[:-1]
        if (betas.numel() < 1 or not bool(((inner > 0) & (inner < 1)).all())
                or not 0 < float(betas[-1]) <= 1):
            raise bad_value("betas", betas.tolist()[:5],
                            "a non-empty sequence in (0, 1) (the last may be 1: zero terminal SNR)")
        self.betas = betas
        self.N = int(betas.numel())
        self.zero_terminal_snr = float(betas[-1]) == 1.0
        if self.zero_terminal_snr and self.N < 2:
            raise bad_value("betas", betas.tolist(), "at least 2 steps for zero terminal SNR")
        self._knots = torch.cat([torch.zeros(1, dtype=torch.float64),
                                 0.5 * torch.cumsum(torch.log1p(-betas), 0)])
        self.t_min = 1.0 / self.N
        self.t_max = 1.0

    @property
    def t_max_finite(self) -> float:
        """The largest time with finite log-SNR: ``(N-1)/N`` at zero terminal SNR."""
        return (self.N - 1.0) / self.N if self.zero_terminal_snr else self.t_max

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """DDPM's ``alpha_bar_n`` for ``n = 0..N-1``."""
        return torch.exp(2.0 * self._knots[1:])

    def step_time(self, n) -> torch.Tensor:
        """The time ``(n+1)/N`` of integer step(s) ``n``."""
        return (torch.as_tensor(n, dtype=torch.float64) + 1.0) / self.N

    def _segment(self, t: Time):
        t = as_time(t)
        L = self._knots.to(t.device)
        u = t.double() * self.N
        idx = u.floor().clamp(0, self.N - 1)
        i = idx.long()
        return t, L, i, u - idx

    def log_alpha(self, t: Time) -> torch.Tensor:
        t, L, i, frac = self._segment(t)
        if self.zero_terminal_snr:  # last segment: alpha = alpha_{N-1} (1 - frac)
            last = i == self.N - 1
            inner = L[i] + torch.where(last, 0.0, frac) * torch.where(last, 0.0, L[i + 1] - L[i])
            return torch.where(last, L[i] + torch.log1p(-frac), inner).to(t.dtype)
        return (L[i] + frac * (L[i + 1] - L[i])).to(t.dtype)

    def d_log_alpha(self, t: Time) -> torch.Tensor:
        t, L, i, frac = self._segment(t)
        if self.zero_terminal_snr:
            last = i == self.N - 1
            inner = (torch.where(last, 0.0, L[i + 1] - L[i])) * self.N
            return torch.where(last, -self.N / (1.0 - frac), inner).to(t.dtype)
        return ((L[i + 1] - L[i]) * self.N).to(t.dtype)

    def d_alpha(self, t: Time) -> torch.Tensor:
        if not self.zero_terminal_snr:
            return super().d_alpha(t)
        # finite at alpha = 0: on the last segment d alpha / dt = -alpha_{N-1} N
        t, L, i, _ = self._segment(t)
        last = i == self.N - 1
        slope = torch.exp(L[i]) * -self.N
        return torch.where(last, slope, self.alpha(t).double() * self.d_log_alpha(t).double()
                           ).to(t.dtype)

    def d_sigma(self, t: Time) -> torch.Tensor:
        if not self.zero_terminal_snr:
            return super().d_sigma(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def t_from_log_alpha(self, la: torch.Tensor) -> torch.Tensor:
        L = self._knots.to(la.device)
        target = la.double()
        # -L is increasing; pos is the first knot with L <= la
        pos = torch.searchsorted(-L, -target.reshape(-1).contiguous()).reshape(target.shape)
        i = (pos - 1).clamp(0, self.N - 1)
        if self.zero_terminal_snr:
            last = i == self.N - 1
            Li1 = torch.where(last, L[i] - 1.0, L[i + 1])  # any finite stand-in on the last
            frac = ((target - L[i]) / (Li1 - L[i])).clamp(0.0, 1.0)
            frac_last = (-torch.expm1(target - L[i])).clamp(0.0, 1.0)
            frac = torch.where(last, frac_last, frac)
        else:
            frac = ((target - L[i]) / (L[i + 1] - L[i])).clamp(0.0, 1.0)
        return ((i.double() + frac) / self.N).to(la.dtype)

    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.N - 1.0

    def __repr__(self) -> str:
        return f"VP.discrete(N={self.N}{', zero_snr' if self.zero_terminal_snr else ''})"


def _solve_linear_log_alpha(la: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    """Solve ``-(b1 - b0) t^2 / 4 - b0 t / 2 = la`` for ``t >= 0``."""
    d = b1 - b0
    if d == 0:
        return -2.0 * la / b0
    # stable root of (d/4) t^2 + (b0/2) t + la = 0
    disc = torch.sqrt(0.25 * b0 * b0 - d * la)
    return (-2.0 * la) / (0.5 * b0 + disc)


class LinearVP(VP):
    """``beta(t) = beta_min + t (beta_max - beta_min)``; ``log alpha = -t^2 (b1-b0)/4 - t b0/2``."""

    name = "linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5,
                 t_max: float = 1.0) -> None:
        if not 0 <= beta_min <= beta_max or beta_max <= 0:
            raise DifflabError(
                f"beta_min={beta_min}, beta_max={beta_max} are not valid: "
                "expected 0 <= beta_min <= beta_max and beta_max > 0"
            )
        if not 0 < t_min < t_max:
            raise DifflabError(f"t_min={t_min}, t_max={t_max}: expected 0 < t_min < t_max")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t: Time) -> torch.Tensor:
        t = as_time(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_log_alpha(self, t: Time) -> torch.Tensor:
        t = as_time(t)
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def t_from_log_alpha(self, la: torch.Tensor) -> torch.Tensor:
        return _solve_linear_log_alpha(la, self.beta_min, self.beta_max)

    def __repr__(self) -> str:
        return f"VP.linear(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"


class CosineVP(VP):
    """``alpha = cos(phi(t)) / cos(phi(0))``, ``phi(t) = (t + s)/(1 + s) pi/2`` (iDDPM eq. 17)."""

    name = "cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-5, t_max: float = 0.9946) -> None:
        if not s >= 0:
            raise bad_value("s", s, "an offset >= 0 (iDDPM uses 0.008)")
        if not 0 < t_min < t_max < 1:  # alpha(1) = 0
            raise DifflabError(f"t_min={t_min}, t_max={t_max}: expected 0 < t_min < t_max < 1")
        self.s = float(s)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_cos0 = math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))
        self._tan0 = math.tan(self.s / (1 + self.s) * math.pi / 2)

    def _phi(self, t: Time) -> torch.Tensor:
        return (as_time(t) + self.s) / (1 + self.s) * (math.pi / 2)

    def log_alpha(self, t: Time) -> torch.Tensor:
        # cos(phi0 + d) / cos(phi0) = cos d - tan(phi0) sin d, d = phi(t) - phi(0): exactly 0 at
        # t = 0 in any dtype (log cos(phi) - log cos(phi0) gave sigma(0) = NaN in float64)
        d = as_time(t) * (math.pi / (2 * (1 + self.s)))
        return torch.log1p(-2.0 * torch.sin(0.5 * d) ** 2 - self._tan0 * torch.sin(d))

    def d_log_alpha(self, t: Time) -> torch.Tensor:
        return -torch.tan(self._phi(t)) * (math.pi / (2 * (1 + self.s)))

    def t_from_log_alpha(self, la: torch.Tensor) -> torch.Tensor:
        phi = torch.arccos(torch.exp(la + self._log_cos0))
        return phi * (2 * (1 + self.s) / math.pi) - self.s

    def __repr__(self) -> str:
        return f"VP.cosine(s={self.s:g})"


class SubVP(GaussianPath):
    """Sub-VP SDE (Song et al. 2021, eq. 12): VP's ``alpha`` with ``sigma = 1 - alpha^2``."""

    name = "subvp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5,
                 t_max: float = 1.0) -> None:
        self._vp = LinearVP(beta_min, beta_max, t_min, t_max)
        self.beta_min, self.beta_max = self._vp.beta_min, self._vp.beta_max
        self.t_min, self.t_max = float(t_min), float(t_max)

    def alpha(self, t: Time) -> torch.Tensor:
        return self._vp.alpha(t)

    def sigma(self, t: Time) -> torch.Tensor:
        return -torch.expm1(2.0 * self._vp.log_alpha(t))

    def d_alpha(self, t: Time) -> torch.Tensor:
        return self._vp.d_alpha(t)

    def d_sigma(self, t: Time) -> torch.Tensor:
        return -2.0 * torch.exp(2.0 * self._vp.log_alpha(t)) * self._vp.d_log_alpha(t)

    def log_snr(self, t: Time) -> torch.Tensor:
        la = self._vp.log_alpha(t)
        return 2.0 * la - 2.0 * torch.log(-torch.expm1(2.0 * la))

    def t_from_log_snr(self, lam: Time) -> torch.Tensor:
        # alpha / (1 - alpha^2) = r := exp(lam/2)  =>  alpha = 2r / (1 + sqrt(1 + 4 r^2))
        lam = as_time(lam)
        log_r = 0.5 * lam
        # log alpha = log 2 + log r - log(1 + sqrt(1 + 4 r^2)), written to avoid overflow
        big = log_r > 0
        r_small = torch.exp(torch.where(big, torch.zeros_like(log_r), log_r))
        inv_r = torch.exp(torch.where(big, -log_r, torch.zeros_like(log_r)))
        la_small = math.log(2.0) + log_r - torch.log1p(torch.sqrt(1 + 4 * r_small**2))
        # for r > 1: alpha = 2 / (1/r + sqrt(1/r^2 + 4))
        la_big = math.log(2.0) - torch.log(inv_r + torch.sqrt(inv_r**2 + 4))
        la = torch.where(big, la_big, la_small)
        return self._vp.t_from_log_alpha(la)

    def __repr__(self) -> str:
        return f"SubVP(beta_min={self.beta_min:g}, beta_max={self.beta_max:g})"
