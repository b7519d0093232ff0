"""Adaptive-step DPM-Solver-12 / DPM-Solver-23 (Lu et al. 2022, Sec. 3.3 and App. C).

The step controller around the singlestep solvers of :mod:`difflab.samplers.dpm_solver`: each
trial step computes an embedded pair of orders (1, 2) or (2, 3) from the same evaluations, and
the difference between them, measured against a mixed tolerance, accepts or rejects the step
and sets the next step size in ``lambda``.
"""

from __future__ import annotations

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.samplers.base import StepInfo, after_step, predict, register
from difflab.samplers.dpm_solver import R1, Rows, dpm_solver_ladder
from difflab.samplers.exponential import prepare


@register("dpm_adaptive", stochastic=False, order=3, evals_per_step=3)
def dpm_adaptive(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 theta: float = 0.9, max_evals: int = 10_000, noise=None,
                 hooks=None) -> torch.Tensor:
    """Adaptive DPM-Solver-12 (``order=2``) / DPM-Solver-23 (``order=3``) (Lu et al. 2022,
    Sec. 3.3 and App. C, the adaptive-step algorithms).

    Only ``grid[0]`` and the grid's final time are used: the solver integrates from ``grid[0]``
    to ``grid[-1]`` or, when the grid ends at 0, to the path's ``t_min`` followed by the final
    denoising step. Each trial step of size ``h`` (in ``lambda``) computes an embedded pair
    ``x_low, x_high`` (DPM-Solver-1/2 with ``r1 = 1/2``, or -2/3 with ``r1 = 1/3``); with
    ``delta = max(atol, rtol max(|x_low|, |x_t|))`` the error is
    ``E = || (x_high - x_low) / delta ||_2 / sqrt(D)``. ``E <= 1`` accepts ``x_high``; either way
    ``h <- min(theta h E^(-1/order), remaining)``. Every sample controls its own step size (the
    rows still share each batched evaluation), so a sample's path does not depend on the rest
    of the batch; ``eps`` at a sample's current point is reused across its rejected trials.
    Callbacks see one step from ``grid[0]`` to the final time (plus the denoising step).
    Raises if more than ``max_evals`` batched evaluations would be needed.
    """
    _check_adaptive(order, rtol, atol, h_init, theta)
    path = den.path
    hooks, grid, x, _, to_zero = prepare(den, x, grid, hooks)
    x, n = x.clone(), x.shape[0]  # rows are updated in place
    t_end = torch.full((n,), path.t_min if to_zero else float(grid[-1]), dtype=torch.float64)
    end, t = Rows.at(path, t_end), Rows.at(path, grid[0].expand(n).clone())
    h = (end.lam - t.lam).clamp(max=h_init)
    eps, fresh, evals = torch.empty_like(x), torch.zeros(n, dtype=torch.bool), 0
    while bool((active := t.lam < end.lam).any()):
        rows = torch.nonzero(active).squeeze(1)
        stale = rows[~fresh[rows]]
        if stale.numel():
            eps[stale], fresh[stale] = predict(den, x[stale], t.t[stale], hooks).eps, True
        last = h[rows] >= end.lam[rows] - t.lam[rows]
        lam_s = torch.where(last, end.lam[rows], t.lam[rows] + h[rows])
        s = Rows.at_lam(path, lam_s)
        s.t = torch.where(last, end.t[rows], s.t)
        x_low, x_high = _embedded_pair(den, hooks, x[rows], eps[rows], t[rows], s, order)
        evals += 1 + (stale.numel() > 0) + (order == 3)
        if evals > max_evals:
            raise DifflabError(f"dpm_adaptive needed more than max_evals={max_evals} "
                               f"evaluations: loosen rtol={rtol} / atol={atol}")
        delta = torch.maximum(x_low.abs(), x[rows].abs()).mul(rtol).clamp_min(atol)
        err = ((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().double()
        err = torch.nan_to_num(err, nan=float("inf"))
        accept = err <= 1.0
        x[rows[accept]] = x_high[accept]
        t.move(rows[accept], s, accept)
        fresh[rows[accept]] = False
        h[rows] = torch.minimum(theta * h[rows] * err.clamp_min(1e-10) ** (-1.0 / order),
                                end.lam[rows] - t.lam[rows])
    return _adaptive_finish(den, hooks, x, grid, end, to_zero)


def _embedded_pair(den, hooks, x, eps, t: Rows, s: Rows, order: int):
    """``(x_low, x_high)``: DPM-Solver-1 and -2 (``r1 = 1/2``), or -2 (``r1 = 1/3``) and -3."""
    x_1, x_2, x_3 = dpm_solver_ladder(den, hooks, x, eps, t, s, 0.5 if order == 2 else R1,
                                      third=order == 3)
    return (x_1, x_2) if order == 2 else (x_2, x_3)


def _check_adaptive(order, rtol, atol, h_init, theta) -> None:
    if order not in (2, 3):
        raise bad_value("order", order, "2 (DPM-Solver-12) or 3 (DPM-Solver-23)")
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init)):
        if not v > 0:
            raise bad_value(name, v, "a positive number")
    if not 0 < theta <= 1:
        raise bad_value("theta", theta, "a number in (0, 1]")


def _adaptive_finish(den, hooks, x, grid, end: Rows, to_zero: bool) -> torch.Tensor:
    """``correct_xt`` and the callback for the whole adaptive solve, then the denoising step.

    Without a final denoising step, a callback costs one evaluation (for its ``x0`` preview).
    """
    total, t_end = 1 + int(to_zero), end.t[0]
    if hooks.correct_xt is not None:
        x = hooks.correct_xt(x, t_end)
    if not to_zero and hooks.callback is None:
        return x
    pred = predict(den, x, end.t, hooks)
    if hooks.callback is not None:
        hooks.callback(StepInfo(0, total, float(grid[0]), float(t_end), x, pred.x0))
    return after_step(hooks, 1, total, t_end, 0.0, pred.x0, pred) if to_zero else x
