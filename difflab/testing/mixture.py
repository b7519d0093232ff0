"""``GaussianMixture``: a data distribution whose noisy marginals and denoiser are exact.

For data ``x0 ~ sum_k w_k N(m_k, diag(v_k))`` and ``x_t = alpha x0 + sigma eps``, every marginal
is again a mixture, ``p_t = sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2)``, and the posterior
mean is a responsibility-weighted sum of per-component Gaussian posterior means:

    E[x0 | x_t] = sum_k r_k(x_t) [m_k + alpha v_k / (alpha^2 v_k + sigma^2) (x_t - alpha m_k)].

All computations are done in float64; results come back in the input's dtype.
"""

from __future__ import annotations

import math

import torch

from difflab.cond import Cond
from difflab.denoiser import FnDenoiser
from difflab.errors import DifflabError
from difflab.paths.base import GaussianPath, as_time
from difflab.prediction import Prediction

LOG_2PI = math.log(2 * math.pi)


class GaussianMixture:
    """A mixture of diagonal Gaussians over data of any shape.

    Args:
        means: ``(K, *shape)`` component means.
        stds: ``(K, *shape)``, ``(K,)`` or a scalar: component standard deviations.
        weights: ``(K,)`` mixture weights (normalised here); default uniform.
    """

    def __init__(self, means, stds, weights=None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise DifflabError(f"means must have shape (K, *data_shape), got {tuple(means.shape)}")
        self.K = means.shape[0]
        self.shape = tuple(means.shape[1:])
        self.means = means.reshape(self.K, -1)
        self.D = self.means.shape[1]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(self.K)
        if stds.ndim == 1:
            stds = stds[:, None].expand(self.K, self.D)
        stds = stds.reshape(self.K, -1)
        if stds.shape != self.means.shape or not bool((stds > 0).all()):
            raise DifflabError(
                f"stds must be positive with shape (K,), (K, *data_shape) or scalar; "
                f"got shape {tuple(stds.shape)} for means of shape {tuple(means.shape)}"
            )
        self.vars = stds**2
        w = torch.ones(self.K, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        if w.shape != (self.K,) or not bool((w > 0).all()):
            raise DifflabError(f"weights must be {self.K} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        self.log_w = torch.log(self.weights)

    # ----- the data distribution ----------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               return_labels: bool = False, labels: torch.Tensor | None = None):
        """``n`` samples (float64) and optionally their component labels."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, dtype=torch.float64, generator=generator)
        x = self.means[labels] + self.vars[labels].sqrt() * z
        x = x.reshape(n, *self.shape)
        return (x, labels) if return_labels else x

    def _component_logp(self, xf: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
        # xf (B, D), mean (K, D) or (B, K, D), var (K, D) or (B, K, D) -> (B, K)
        diff = xf[:, None, :] - mean
        return -0.5 * (diff * diff / var + torch.log(var) + LOG_2PI).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x0)`` per sample ``(B,)``."""
        xf = x.reshape(x.shape[0], -1).double()
        return torch.logsumexp(self.log_w + self._component_logp(xf, self.means, self.vars), -1)

    # ----- noisy marginals -------------------------------------------------------------------
    def _noisy(self, x: torch.Tensor, t, path: GaussianPath):
        t = as_time(t).double().to(x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a = path.alpha(t)[:, None, None]  # (B, 1, 1)
        s = path.sigma(t)[:, None, None]
        mean_t = a * self.means  # (B, K, D)
        var_t = a * a * self.vars + s * s
        return x.reshape(x.shape[0], -1).double(), a, mean_t, var_t

    def log_responsibilities(self, x: torch.Tensor, t, path: GaussianPath) -> torch.Tensor:
        """``log p(k | x_t)`` ``(B, K)``: the exact noisy classifier (Bayes' rule)."""
        xf, _, mean_t, var_t = self._noisy(x, t, path)
        logits = self.log_w + self._component_logp(xf, mean_t, var_t)
        return torch.log_softmax(logits, -1)

    def marginal_log_prob(self, x: torch.Tensor, t, path: GaussianPath) -> torch.Tensor:
        """``log p_t(x_t)`` per sample, exact."""
        xf, _, mean_t, var_t = self._noisy(x, t, path)
        return torch.logsumexp(self.log_w + self._component_logp(xf, mean_t, var_t), -1)

    def posterior_mean(self, x: torch.Tensor, t, path: GaussianPath,
                       labels: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x0 | x_t]``, or ``E[x0 | x_t, k = label]`` per row when labels are given.

        Label ``K`` is the null class (unconditional), as for class-conditional networks.
        """
        xf, a, mean_t, var_t = self._noisy(x, t, path)
        comp = self.means + a * self.vars / var_t * (xf[:, None, :] - mean_t)  # (B, K, D)
        r = torch.softmax(self.log_w + self._component_logp(xf, mean_t, var_t), -1)
        if labels is not None:
            labels = self._check_labels(labels, x.shape[0])
            onehot = torch.nn.functional.one_hot(labels.clamp(max=self.K - 1), self.K).double()
            r = torch.where((labels == self.K)[:, None], r, onehot)
        x0 = (r[..., None] * comp).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    def _check_labels(self, labels: torch.Tensor, n: int) -> torch.Tensor:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() not in (1, n):
            raise DifflabError(
                f"labels has {labels.numel()} entries for a batch of {n}: expected 1 or {n}"
            )
        labels = labels.expand(n)
        if bool(((labels < 0) | (labels > self.K)).any()):
            raise DifflabError(
                f"labels must be component ids in [0, {self.K}] ({self.K} = unconditional), "
                f"got {labels.tolist()}"
            )
        return labels

    def denoiser(self, path: GaussianPath) -> FnDenoiser:
        """The exact denoiser on ``path``; bind ``Cond(labels=k)`` for component-conditional."""

        def fn(x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> Prediction:
            labels = None if cond is None else cond.labels
            x0 = self.posterior_mean(x_t, t, path, labels)
            return Prediction.from_x0(x0, x_t, t, path)

        return FnDenoiser(fn, path)

    # ----- closed-form statistics -------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0).reshape(self.shape)

    def covariance_diag(self) -> torch.Tensor:
        """Per-dimension variance of the mixture."""
        m = (self.weights[:, None] * self.means).sum(0)
        second = (self.weights[:, None] * (self.vars + self.means**2)).sum(0)
        return (second - m**2).reshape(self.shape)
