"""``Prediction``: what a denoiser says about ``x_t``, in every parameterization at once.

All conversions between ``eps``, ``x0``, ``v``, ``score`` and ``velocity`` live here and nowhere
else. At fixed ``(x_t, t)`` each of them is an affine function of ``x0`` (and of ``eps``), so one
object holding ``x0`` and ``eps`` answers every question; samplers, losses and guidance never
branch on the parameterization.

With ``x_t = alpha x0 + sigma eps``:

* ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, eq. 6 generalised), inverted with
  ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)`` on any path;
* ``score = -eps / sigma`` (Tweedie; Song et al. 2021);
* ``velocity = d_alpha x0 + d_sigma eps`` (``dx_t/dt`` of the interpolant; Lipman et al. 2023,
  Ma et al. 2024), inverted through the 2x2 system ``[alpha sigma; d_alpha d_sigma]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath, as_time, expand_like

KINDS = ("eps", "x0", "v", "score", "velocity")


def check_kind(kind: str, name: str = "prediction") -> str:
    """Validate a parameterization name."""
    if kind not in KINDS:
        raise bad_value(name, kind, "one of " + ", ".join(repr(k) for k in KINDS))
    return kind


@dataclass
class Prediction:
    """A denoiser's answer at ``(x_t, t)``.

    Attributes:
        x_t: the noisy input ``(B, ...)``.
        t: times ``(B,)``.
        x0: the clean-data estimate ``E[x0 | x_t]``.
        eps: the matching noise estimate; ``x_t = alpha x0 + sigma eps`` holds exactly.
        path: the forward process.
        var_frac: improved DDPM's learned variance interpolation ``v`` mapped to ``[0, 1]``
            (Nichol & Dhariwal 2021, eq. 15) when the network learns its variance, else None.
            It is kept as a fraction, not a log-variance, because the variance it interpolates
            depends on the reverse step actually taken (respacing): see :meth:`reverse_log_var`.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    path: GaussianPath
    var_frac: torch.Tensor | None = None

    # ----- coefficients broadcast over the data ------------------------------------------------
    def _coef(self, fn) -> torch.Tensor:
        return expand_like(fn(self.t), self.x_t)

    @property
    def alpha(self) -> torch.Tensor:
        return self._coef(self.path.alpha)

    @property
    def sigma(self) -> torch.Tensor:
        return self._coef(self.path.sigma)

    # ----- derived parameterizations ------------------------------------------------------
    @property
    def score(self) -> torch.Tensor:
        """``grad log p_t(x_t) = -eps / sigma``."""
        return -self.eps / self.sigma

    @property
    def v(self) -> torch.Tensor:
        """``v = alpha eps - sigma x0``."""
        return self.alpha * self.eps - self.sigma * self.x0

    @property
    def velocity(self) -> torch.Tensor:
        """``dx_t/dt = d_alpha x0 + d_sigma eps`` (the flow-matching target)."""
        return self._coef(self.path.d_alpha) * self.x0 + self._coef(self.path.d_sigma) * self.eps

    def as_kind(self, kind: str) -> torch.Tensor:
        """The prediction expressed in parameterization ``kind``."""
        check_kind(kind)
        return getattr(self, kind)

    def error_scale(self, kind: str) -> torch.Tensor:
        """``c(t)`` such that an ``x0`` error ``d`` at fixed ``x_t`` is a ``kind`` error ``c d``.

        Used to express any weighting in any target's space: ``|err_kind|^2 = c^2 |err_x0|^2``.
        """
        check_kind(kind)
        a, s = self.path.alpha(self.t), self.path.sigma(self.t)
        if kind == "x0":
            return torch.ones_like(a)
        if kind == "eps":
            return -a / s
        if kind == "score":
            return a / (s * s)
        if kind == "v":
            return -(a * a + s * s) / s
        return self.path.d_alpha(self.t) - self.path.d_sigma(self.t) * a / s

    # ----- construction ------------------------------------------------------------------
    @classmethod
    def from_output(
        cls,
        kind: str,
        output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        path: GaussianPath,
        var_frac: torch.Tensor | None = None,
    ) -> Prediction:
        """Interpret a network output of parameterization ``kind`` at ``(x_t, t)``."""
        check_kind(kind)
        if output.shape != x_t.shape:
            raise DifflabError(
                f"model output has shape {tuple(output.shape)} but x_t has shape "
                f"{tuple(x_t.shape)}: expected equal shapes (a learned-variance network must "
                "be wrapped with learned_variance=True)"
            )
        t = as_time(t)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a = expand_like(path.alpha(t), x_t)
        s = expand_like(path.sigma(t), x_t)
        if kind == "eps":
            eps = output
            x0 = (x_t - s * eps) / a
        elif kind == "x0":
            x0 = output
            eps = (x_t - a * x0) / s
        elif kind == "score":
            eps = -s * output
            x0 = (x_t - s * eps) / a
        elif kind == "v":
            norm = a * a + s * s
            x0 = (a * x_t - s * output) / norm
            eps = (s * x_t + a * output) / norm
        else:  # velocity: solve [a s; da ds] [x0; eps] = [x_t; u]
            da = expand_like(path.d_alpha(t), x_t)
            ds = expand_like(path.d_sigma(t), x_t)
            det = a * ds - s * da
            x0 = (ds * x_t - s * output) / det
            eps = (a * output - da * x_t) / det
        return cls(x_t=x_t, t=t, x0=x0, eps=eps, path=path, var_frac=var_frac)

    @classmethod
    def from_x0(cls, x0: torch.Tensor, x_t: torch.Tensor, t, path: GaussianPath,
                var_frac: torch.Tensor | None = None) -> Prediction:
        """A prediction given by its clean-data estimate (oracles, EDM preconditioning)."""
        return cls.from_output("x0", x0, x_t, t, path, var_frac)

    def with_x0(self, x0: torch.Tensor) -> Prediction:
        """Same ``x_t``, corrected ``x0`` (thresholding, known pixels); ``eps`` follows."""
        eps = (self.x_t - self.alpha * x0) / self.sigma
        return replace(self, x0=x0, eps=eps)

    def with_eps(self, eps: torch.Tensor) -> Prediction:
        """The same ``x_t`` with a corrected ``eps``; ``x0`` follows."""
        x0 = (self.x_t - self.sigma * eps) / self.alpha
        return replace(self, x0=x0, eps=eps)

    # ----- learned variance -----------------------------------------------------------------
    def reverse_log_var(self, t_next) -> torch.Tensor:
        """Log-variance of ``p(x_{t_next} | x_t)`` for a learned-variance model.

        Improved DDPM eq. 15: ``log var = f log beta + (1 - f) log beta_tilde`` with the
        ``beta`` (``sigma^2_{t|s}``) and ``beta_tilde`` (posterior variance) of the step
        actually taken, so respaced sampling (iDDPM Sec. 4) works on any grid.
        """
        if self.var_frac is None:
            raise DifflabError(
                "reverse_log_var needs a model that learns its variance: build the Denoiser "
                "with learned_variance=True around a network with 2x output channels"
            )
        beta, beta_tilde = step_variances(self.path, self.t, t_next)
        log_b = expand_like(torch.log(beta), self.x_t)
        log_bt = expand_like(torch.log(beta_tilde.clamp_min(1e-20)), self.x_t)
        return self.var_frac * log_b + (1 - self.var_frac) * log_bt


def step_variances(path: GaussianPath, t, s) -> tuple[torch.Tensor, torch.Tensor]:
    """``beta`` (= ``sigma^2_{t|s}``) and ``beta_tilde`` (posterior variance) of a step t -> s."""
    s = as_time(s)
    _, beta = path.transition(t, s)
    _, _, beta_tilde = path.posterior(t, s)
    return beta, beta_tilde


def var_frac_from_output(raw: torch.Tensor) -> torch.Tensor:
    """iDDPM's network output ``v in [-1, 1]`` (unconstrained) mapped to ``f = (v + 1)/2``."""
    return (raw + 1.0) * 0.5

