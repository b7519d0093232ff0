"""DDPM ancestral sampling and DDIM (any eta), plus deterministic DDIM inversion.

Both work on any grid over any path: every step ``t -> s`` uses the exact Gaussian posterior
``q(x_s | x_t, x0)`` of :meth:`GaussianPath.posterior`, so respacing (iDDPM Sec. 4; DDIM Sec. 4.2)
needs no special case.
"""

from __future__ import annotations

import math

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.samplers.base import after_step, as_hooks, check_grid, check_x, predict, register
from difflab.samplers.noise import as_noise

VARIANCES = ("small", "large", "learned")


def _std_small(path, pred, t, s, var):
    """``beta_tilde``: the posterior variance (DDPM Sec. 3.2, sigma_t^2 = beta_tilde_t)."""
    return math.sqrt(float(var))


def _std_large(path, pred, t, s, var):
    """``beta``: the forward transition variance ``sigma^2_{t|s}`` (DDPM Sec. 3.2)."""
    return math.sqrt(float(path.transition(t, s)[1]))


def _std_learned(path, pred, t, s, var):
    """iDDPM eq. 15: the model's interpolation between ``log beta`` and ``log beta_tilde``."""
    return torch.exp(0.5 * pred.reverse_log_var(s))


_STD = {"small": _std_small, "large": _std_large, "learned": _std_learned}


@register("ddpm", stochastic=True, order=1, zero_snr_native=True)
def ddpm(den: DenoiserBase, x: torch.Tensor, grid, *, variance: str = "small", noise=None,
         hooks=None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2; respaced as in iDDPM Sec. 4).

    Each step draws ``x_s ~ N(c_xt x_t + c_x0 x0_hat, var)`` with the posterior coefficients of
    DDPM eq. 7 and ``var`` one of: ``small`` = ``beta_tilde`` (posterior variance), ``large`` =
    ``beta`` (= ``sigma^2_{t|s}``), ``learned`` = iDDPM eq. 15's interpolation from the model.
    The step to ``s = 0`` returns the mean (``x0_hat``) without noise.
    """
    if variance not in VARIANCES:
        raise bad_value("variance", variance, "one of " + ", ".join(VARIANCES))
    path, hooks, noise = den.path, as_hooks(hooks), as_noise(noise)
    grid, x = check_grid(grid, path), check_x(x)
    if variance == "learned" and not getattr(den, "learned_variance", False):
        raise bad_value("variance", variance,
                        "'small' or 'large': this denoiser does not learn its variance "
                        "(build it with learned_variance=True)")
    std_of = _STD[variance]  # chosen once, not per step
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        pred = predict(den, x, t, hooks)
        if s == 0:
            x = pred.x0
        else:
            c_xt, c_x0, var = path.posterior(t, s)
            mean = float(c_xt) * x + float(c_x0) * pred.x0
            x = mean + std_of(path, pred, t, s, var) * noise.randn_like(x)
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


@register("ddim", stochastic=True, order=1, noise_when="eta > 0", zero_snr_native=True)
def ddim(den: DenoiserBase, x: torch.Tensor, grid, *, eta: float = 0.0, noise=None,
         hooks=None) -> torch.Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) for any ``eta``.

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
    ``c^2 = eta^2 beta_tilde`` (eq. 16); ``eta = 0`` is the deterministic first-order solver of
    the probability-flow ODE, ``eta = 1`` matches DDPM's small variance.
    """
    if not eta >= 0:
        raise bad_value("eta", eta, "a number >= 0")
    path, hooks = den.path, as_hooks(hooks)
    noise = as_noise(noise) if eta > 0 else None
    grid, x = check_grid(grid, path), check_x(x)
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        pred = predict(den, x, t, hooks)
        if s == 0:
            x = pred.x0
        else:
            a_s, sig_s = float(path.alpha(s)), float(path.sigma(s))
            c2 = eta * eta * float(path.posterior(t, s)[2])
            x = a_s * pred.x0 + math.sqrt(max(sig_s * sig_s - c2, 0.0)) * pred.eps
            if c2 > 0:
                x = x + math.sqrt(c2) * noise.randn_like(x)
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


def ddim_invert(den: DenoiserBase, x: torch.Tensor, grid, *, fixed_point_iters: int = 0,
                hooks=None) -> torch.Tensor:
    """Deterministic DDIM inversion: data to noise along the reversed ``grid``.

    Runs eq. 12 (``eta = 0``) backwards. The explicit step takes the prediction at the current,
    lower time, ``x_t = alpha_t x0_hat(x_s) + sigma_t eps_hat(x_s)`` (Song et al. 2021, Sec. 4.3;
    Dhariwal & Nichol 2021, App. F); from the data (``s = 0``) it is taken at the first positive
    time. ``fixed_point_iters > 0`` then refines ``x_t`` so that the DDIM *sampling* step maps it
    back to ``x_s``: writing that step with ``eps``, ``x_t = (alpha_t / alpha_s) x_s +
    (sigma_t - alpha_t sigma_s / alpha_s) eps_hat(x_t, t)``, iterated (one network call each).
    Use the same grid with :func:`ddim` to map the result back.
    """
    path, hooks = den.path, as_hooks(hooks)
    grid, x = check_grid(grid, path), check_x(x)
    times = torch.flip(grid, [0])
    n = times.numel() - 1
    for i in range(n):
        s, t = times[i], times[i + 1]
        pred = predict(den, x, s if s > 0 else t, hooks)
        x_s = x
        x = float(path.alpha(t)) * pred.x0 + float(path.sigma(t)) * pred.eps
        if fixed_point_iters > 0:
            ratio = float(path.alpha(t) / path.alpha(s))
            c_eps = float(path.sigma(t)) - ratio * float(path.sigma(s))
            for _ in range(fixed_point_iters):
                pred = predict(den, x, t, hooks)
                x = ratio * x_s + c_eps * pred.eps
        x = after_step(hooks, i, n, s, t, x, pred)
    return x
