"""Karras et al. 2022 (EDM) samplers: Euler, Heun (Alg. 1 / Alg. 2) and Euler ancestral.

EDM writes the probability-flow ODE for ``x~ = x / alpha`` with noise level
``sigma~ = sigma / alpha`` (``path.sigma_ve``; EDM Sec. 4 "change of variables", Table 1):

    dx~ / dsigma~ = (x~ - D(x~; sigma~)) / sigma~ = eps_hat        (EDM eq. 4 with s = 1),

so one implementation serves VE, EDM, VP, sub-VP and the interpolants alike: the samplers take
and return ``x`` on the path's own scale, convert with ``alpha`` at each grid point and evaluate
the denoiser at ``t(sigma~)``. The last step to ``sigma~ = 0`` (a grid ending at 0) is an Euler
step, which returns ``D`` exactly (Alg. 1, line 9 skips the correction there).
"""

from __future__ import annotations

import math

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.samplers.base import after_step, as_hooks, check_grid, check_x, predict, register
from difflab.samplers.noise import as_noise


def _setup(den, x, grid, hooks):
    path = den.path
    grid, x = check_grid(grid, path), check_x(x)
    sig = path.sigma_ve(grid).tolist()  # 0 at t = 0 on every path
    alpha = path.alpha(grid).tolist()
    return as_hooks(hooks), grid, x, sig, alpha


@register("euler", stochastic=False, order=1)
def euler(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None, hooks=None) -> torch.Tensor:
    """Euler's method in ``sigma~`` (EDM Alg. 1 without the second-order correction):
    ``x~_(i+1) = x~_i + (sigma~_(i+1) - sigma~_i) eps_hat``. Equal to deterministic DDIM."""
    hooks, grid, x, sig, alpha = _setup(den, x, grid, hooks)
    n = grid.numel() - 1
    for i in range(n):
        pred = predict(den, x, grid[i], hooks)
        xt = x / alpha[i] + (sig[i + 1] - sig[i]) * pred.eps
        x = pred.x0 if sig[i + 1] == 0 else alpha[i + 1] * xt
        x = after_step(hooks, i, n, grid[i], grid[i + 1], x, pred)
    return x


def _check_churn(S_churn, S_tmin, S_tmax, S_noise) -> None:
    if not S_churn >= 0:
        raise bad_value("S_churn", S_churn, "a number >= 0")
    if not 0 <= S_tmin <= S_tmax:
        raise bad_value("S_tmin/S_tmax", (S_tmin, S_tmax), "0 <= S_tmin <= S_tmax")
    if not S_noise > 0:
        raise bad_value("S_noise", S_noise, "a positive number")


def heun_step(den: DenoiserBase, hooks, xt: torch.Tensor, t, sig_t: float, s, sig_s: float,
              alpha_s: float):
    """One deterministic step of EDM's Heun method (Alg. 2, lines 5-8) from ``x~ = x / alpha``
    at noise level ``sig_t`` (time ``t``) to time ``s`` (noise level ``sig_s``, signal
    ``alpha_s``): the Euler step in ``sigma~``, then, unless ``sig_s = 0``, the trapezoidal
    correction. Returns ``x_s`` on the path's scale and the prediction at ``t``."""
    pred = predict(den, float(den.path.alpha(t)) * xt, t, hooks)
    if sig_s == 0:
        return pred.x0, pred
    d = pred.eps
    x_next = alpha_s * (xt + (sig_s - sig_t) * d)
    d2 = predict(den, x_next, s, hooks).eps
    return alpha_s * (xt + (sig_s - sig_t) * 0.5 * (d + d2)), pred


@register("heun", stochastic=True, order=2, evals_per_step=2, noise_when="S_churn > 0")
def heun(den: DenoiserBase, x: torch.Tensor, grid, *, S_churn: float = 0.0, S_tmin: float = 0.0,
         S_tmax: float = float("inf"), S_noise: float = 1.0, noise=None,
         hooks=None) -> torch.Tensor:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2; Alg. 1 when ``S_churn = 0``).

    For ``S_tmin <= sigma~_i <= S_tmax`` the noise level is first raised to
    ``sigma^ = (1 + gamma) sigma~_i``, ``gamma = min(S_churn / N, sqrt(2) - 1)``, by adding
    ``N(0, S_noise^2 (sigma^2 - sigma~_i^2))`` (``sigma^`` is capped at the path's largest level).
    Then ``d = eps_hat(x^, sigma^)``, the Euler step ``x_(i+1) = x^ + (sigma~_(i+1) - sigma^) d``,
    and, unless ``sigma~_(i+1) = 0``, the trapezoidal correction with ``d' = eps_hat(x_(i+1))``:
    ``x_(i+1) = x^ + (sigma~_(i+1) - sigma^) (d + d') / 2``. Evaluations: ``2 N - 1`` on a grid
    ending at 0, ``2 N`` otherwise. Deterministic (second order) when ``S_churn = 0``.
    """
    _check_churn(S_churn, S_tmin, S_tmax, S_noise)
    hooks, grid, x, sig, alpha = _setup(den, x, grid, hooks)
    path, n = den.path, grid.numel() - 1
    noise = as_noise(noise) if S_churn > 0 else None
    gamma = min(S_churn / n, math.sqrt(2) - 1)
    sig_top = float(path.sigma_ve(path.t_max))
    for i in range(n):
        t, xt, sig_hat = grid[i], x / alpha[i], sig[i]
        if gamma > 0 and S_tmin <= sig[i] <= S_tmax:
            sig_hat = min(sig[i] * (1 + gamma), sig_top)
            t = path.t_from_sigma_ve(torch.tensor(sig_hat, dtype=torch.float64))
            xt = xt + (S_noise * math.sqrt(sig_hat**2 - sig[i] ** 2)) * noise.randn_like(xt)
        x, pred = heun_step(den, hooks, xt, t, sig_hat, grid[i + 1], sig[i + 1], alpha[i + 1])
        x = after_step(hooks, i, n, grid[i], grid[i + 1], x, pred)
    return x


@register("euler_ancestral", stochastic=True, order=1)
def euler_ancestral(den: DenoiserBase, x: torch.Tensor, grid, *, eta: float = 1.0,
                    s_noise: float = 1.0, noise=None, hooks=None) -> torch.Tensor:
    """Ancestral sampling with an Euler step in ``sigma~``.

    Each step splits ``sigma~_(i+1)`` into ``sigma_up = min(sigma~_(i+1), eta sqrt(
    sigma~_(i+1)^2 (sigma~_i^2 - sigma~_(i+1)^2) / sigma~_i^2))``, the standard deviation of
    DDPM's posterior ``q(x_(i+1) | x_i, x0)`` in ``x~`` (DDIM eq. 16 for ``eta = 1``), and
    ``sigma_down = sqrt(sigma~_(i+1)^2 - sigma_up^2)``; then
    ``x~ <- x~ + (sigma_down - sigma~_i) eps_hat + s_noise sigma_up z``. With ``eta = 1`` this is
    DDPM's ancestral step, with ``eta = 0`` Euler (= DDIM).
    """
    if not eta >= 0:
        raise bad_value("eta", eta, "a number >= 0")
    if not s_noise >= 0:
        raise bad_value("s_noise", s_noise, "a number >= 0")
    hooks, grid, x, sig, alpha = _setup(den, x, grid, hooks)
    noise = as_noise(noise) if eta > 0 else None
    n = grid.numel() - 1
    for i in range(n):
        pred = predict(den, x, grid[i], hooks)
        s0, s1 = sig[i], sig[i + 1]
        up = min(s1, eta * math.sqrt(s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0)))
        down = math.sqrt(s1 * s1 - up * up)
        if s1 == 0:
            x = pred.x0
        else:
            xt = x / alpha[i] + (down - s0) * pred.eps
            if up > 0:
                xt = xt + (s_noise * up) * noise.randn_like(xt)
            x = alpha[i + 1] * xt
        x = after_step(hooks, i, n, grid[i], grid[i + 1], x, pred)
    return x
