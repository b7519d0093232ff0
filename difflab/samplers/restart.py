"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes").

Restart alternates a deterministic ODE solver with large jumps of the *forward* process: the
main trajectory is solved with EDM's Heun method (Karras et al. 2022, Alg. 1) on the grid; when
it reaches ``t_min``, noise takes it forward to ``t_max > t_min`` and the ODE is solved back from
``t_max`` to ``t_min`` on its own grid, ``K`` times, before the main solve goes on. The forward
jumps contract the accumulated error (the paper's main result) while the ODE keeps the per-step
error small.

The forward jump for a general path ``x_t = alpha(t) x0 + sigma(t) eps``. In ``x~ = x / alpha``
the path is ``x~_t = x0 + rho(t) eps`` with ``rho = sigma / alpha`` (EDM's sigma, VE form), so
its forward transition from ``t_min`` to ``t_max`` adds independent noise of variance
``rho_max^2 - rho_min^2`` (Gaussian variances add along the VE process):

    x~_(t_max) = x~_(t_min) + sqrt(rho_max^2 - rho_min^2) z,   z ~ N(0, I),
    x_(t_max)  = alpha_max [x_(t_min) / alpha_min + sqrt(rho_max^2 - rho_min^2) z].

This is the path's own transition kernel ``q(x_(t_max) | x_(t_min))``: its mean coefficient is
``alpha_max / alpha_min`` and its variance ``alpha_max^2 (rho_max^2 - rho_min^2) = sigma_max^2 -
(alpha_max / alpha_min)^2 sigma_min^2`` (VDM eq. 4, :meth:`GaussianPath.transition`), so if
``x_(t_min)`` has the marginal ``p_(t_min)``, ``x_(t_max)`` has ``p_(t_max)`` on any path.

The interval is given in EDM's noise level ``sigma~ = sigma / alpha`` (``restart_sigma_min``,
``restart_sigma_max``), as in the paper and as EDM's ``S_tmin`` / ``S_tmax``, so one setting
means the same on every path; the paper's code also snaps ``t_min`` to the main-grid point
nearest it and spaces the restart grid as EDM (``rho = 7``), which we do too.
"""

from __future__ import annotations

import math

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.samplers.base import Hooks, after_step, register
from difflab.samplers.edm import _setup, heun_step
from difflab.samplers.noise import as_noise

KARRAS_RHO = 7.0


def _restart_index(sig: list[float], to_zero: bool, lo: float | None, hi: float | None,
                   k: int, steps: int) -> int | None:
    """Check the options; return the main-grid index of ``t_min`` (None: no restart)."""
    if not k >= 0:
        raise bad_value("restart_k", k, "an integer >= 0 (option of sampler 'restart')")
    if not steps >= 1:
        raise bad_value("restart_steps", steps, "an integer >= 1 (option of sampler 'restart')")
    if lo is None and hi is None:
        return None
    if lo is None or hi is None:
        missing = "restart_sigma_min" if lo is None else "restart_sigma_max"
        raise DifflabError(f"{missing} is missing: a restart interval needs both "
                           "restart_sigma_min and restart_sigma_max (EDM sigma, sigma / alpha)")
    if not 0 < lo < hi:
        raise bad_value("restart_sigma_min/restart_sigma_max", (lo, hi),
                        "0 < restart_sigma_min < restart_sigma_max")
    positive = sig[:-1] if to_zero else sig
    if not (positive[-1] <= lo and hi <= positive[0]):
        raise bad_value("restart_sigma_min/restart_sigma_max", (lo, hi),
                        f"an interval inside the grid's noise levels [{positive[-1]:.6g}, "
                        f"{positive[0]:.6g}] (sigma~ = sigma / alpha of its positive times)")
    j = min(range(len(positive)), key=lambda i: abs(positive[i] - lo))
    if not positive[j] < hi:
        raise bad_value("restart_sigma_max", hi,
                        f"a noise level above {positive[j]:.6g}, the grid's level nearest "
                        f"restart_sigma_min={lo:g} where the restarts begin")
    return j


def _restart_grid(path, t_min: torch.Tensor, sig_min: float, sig_max: float, steps: int):
    """``steps + 1`` times from ``sigma~ = sig_max`` down to ``t_min`` spaced as EDM (eq. 5,
    ``rho = 7``), with their ``sigma~`` and ``alpha``; the last time is ``t_min`` itself."""
    i = torch.arange(steps + 1, dtype=torch.float64) / steps
    a, b = sig_max ** (1 / KARRAS_RHO), sig_min ** (1 / KARRAS_RHO)
    times = path.t_from_sigma_ve((a + i * (b - a)) ** KARRAS_RHO)
    times[-1] = t_min
    return times, path.sigma_ve(times).tolist(), path.alpha(times).tolist()


@register("restart", stochastic=True, order=2, evals_per_step=2,
          noise_when="restart_k > 0 and a restart interval is given")
def restart(den: DenoiserBase, x: torch.Tensor, grid, *, restart_sigma_min: float | None = None,
            restart_sigma_max: float | None = None, restart_k: int = 2, restart_steps: int = 2,
            noise=None, hooks=None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, NeurIPS, arXiv 2306.14878) with EDM's Heun as its ODE
    solver.

    The main grid is solved with EDM's Heun (``heun`` with ``S_churn = 0``). At the grid time
    ``t_min`` whose ``sigma~ = sigma / alpha`` is nearest ``restart_sigma_min``, ``restart_k``
    times: jump forward to ``t_max`` (``sigma~ = restart_sigma_max``) with the path's transition
    kernel, ``x <- alpha_max [x / alpha_min + sqrt(sigma~_max^2 - sigma~_min^2) z]``, then solve
    back to ``t_min`` with ``restart_steps`` Heun steps spaced as EDM (``rho = 7``). Both bounds
    are EDM noise levels inside the grid's positive ones; they have no default (they depend on
    the data's scale), and without them no restart happens (plain Heun). Evaluations:
    Heun's (``2 N - 1`` on a grid of ``N`` steps ending at 0, ``2 N`` otherwise) plus
    ``2 restart_k restart_steps``. ``hooks.correct_x0`` acts on every evaluation; ``correct_xt``
    and ``callback`` only after the main steps (the step reaching ``t_min`` after its restarts).
    """
    hooks, grid, x, sig, alpha = _setup(den, x, grid, hooks)
    path, n = den.path, grid.numel() - 1
    to_zero = sig[-1] == 0
    j = _restart_index(sig, to_zero, restart_sigma_min, restart_sigma_max, restart_k,
                       restart_steps)
    if j is not None and restart_k > 0:
        noise = as_noise(noise)
        inner = Hooks(correct_x0=hooks.correct_x0)  # restart steps are not the grid's steps
        times, rsig, ralpha = _restart_grid(path, grid[j], sig[j], restart_sigma_max,
                                            restart_steps)
        jump = math.sqrt(rsig[0] ** 2 - sig[j] ** 2)
    for i in range(n):
        x, pred = heun_step(den, hooks, x / alpha[i], grid[i], sig[i], grid[i + 1], sig[i + 1],
                            alpha[i + 1])
        if i + 1 == j:
            for _ in range(restart_k):
                xt = x / alpha[j] + jump * noise.randn_like(x)  # x~ at t_max (see above)
                for r in range(restart_steps):
                    x, _ = heun_step(den, inner, xt, times[r], rsig[r], times[r + 1],
                                     rsig[r + 1], ralpha[r + 1])
                    xt = x / ralpha[r + 1]  # x is back on the path's scale at t_min
        x = after_step(hooks, i, n, grid[i], grid[i + 1], x, pred)
    return x
