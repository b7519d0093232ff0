"""Adaptive-step DPM-Solver-12 / DPM-Solver-23 (Lu et al. 2022, Sec. 3.3 and App. C).

The step controller around the singlestep solvers of :mod:`difflab.samplers.dpm_solver`: each
trial step computes an embedded pair of orders (1, 2) or (2, 3) from the same evaluations, and
the difference between them, measured against a mixed tolerance, accepts or rejects the step
and sets the next step size in ``lambda``.
"""

from __future__ import annotations

import math

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.samplers.base import StepInfo, after_step, predict, register
from difflab.samplers.dpm_solver import R1, Rows, dpm_solver_ladder
from difflab.samplers.exponential import prepare


@register("dpm_adaptive", stochastic=False, order=3, evals_per_step=3)
def dpm_adaptive(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 theta: float = 0.9, controller: str = "dpm", pcoeff: float = 0.4,
                 icoeff: float = 0.3, dcoeff: float = 0.0, accept_safety: float = 0.81,
                 norm: str = "sample", max_evals: int = 10_000, noise=None,
                 hooks=None) -> torch.Tensor:
    """Adaptive DPM-Solver-12 (``order=2``) / DPM-Solver-23 (``order=3``) (Lu et al. 2022,
    Sec. 3.3 and App. C, the adaptive-step algorithms).

    Only ``grid[0]`` and the grid's final time are used: the solver integrates from ``grid[0]``
    to ``grid[-1]`` or, when the grid ends at 0, to the path's ``t_min`` followed by the final
    denoising step. Each trial step of size ``h`` (in ``lambda``) computes an embedded pair
    ``x_low, x_high`` (DPM-Solver-1/2 with ``r1 = 1/2``, or -2/3 with ``r1 = 1/3``); with
    ``delta = max(atol, rtol max(|x_low|, |x_t|))`` the error is
    ``E = || (x_high - x_low) / delta ||_2 / sqrt(D)``. An accepted step keeps ``x_high``.

    ``controller`` picks the step-size rule (``k = order``, the order of ``E``):

    * ``"dpm"`` (Lu et al. 2022, App. C): ``E <= 1`` accepts; either way
      ``h <- theta h E^(-1/k)``.
    * ``"pid"`` (Gustafsson 1991/1994; Soederlind 2003, the digital-filter form): with
      ``e_n = 1/(E_n + 1e-8)``, ``factor = e_n^b1 e_(n-1)^b2 e_(n-2)^b3`` for
      ``b1 = (kP + kI + kD)/k``, ``b2 = -(kP + 2 kD)/k``, ``b3 = kD/k`` (``pcoeff, icoeff,
      dcoeff``), smoothly limited to ``1 + atan(factor - 1)``; the step is accepted when that
      is ``>= accept_safety`` and either way ``h <- h factor``. ``e_(n-1), e_(n-2)`` are the
      last two *accepted* steps' (a sample's first trial fills them with its own error).
      The default gains are Gustafsson's PI.3.4 (``kP = 0.4, kI = 0.3, kD = 0``);
      ``pcoeff=0, icoeff=1`` is the pure integral controller that k-diffusion defaults to
      (which accepts ``E <= 0.81^-k`` and steers ``E`` towards 1). ``theta`` is not used.
      Why PI.3.4 and why per-sample control costs more batched calls: see ``_PidControl``.

    In both, ``h`` is then cut to what remains of the interval. With ``norm="sample"`` (the
    default) every sample controls its own step size with its own controller state (the rows
    still share each batched evaluation), so a sample's path does not depend on the rest of the
    batch. ``norm="batch"`` takes ``E`` over the whole batch instead (as k-diffusion's
    ``sample_dpm_adaptive`` does): the samples step together, which needs fewer batched calls
    but makes each sample's path depend on the batch it is in. ``eps`` at a sample's current
    point is reused across its rejected trials. Callbacks see one step from ``grid[0]`` to the
    final time (plus the denoising step). Raises if more than ``max_evals`` batched evaluations
    would be needed.
    """
    _check_adaptive(order, rtol, atol, h_init, theta)
    if norm not in NORMS:
        raise bad_value("norm", norm, " or ".join(map(repr, NORMS)))
    path = den.path
    hooks, grid, x, _, to_zero = prepare(den, x, grid, hooks)
    x, n = x.clone(), x.shape[0]  # rows are updated in place
    control = _controller(controller, n, order, theta, pcoeff, icoeff, dcoeff, accept_safety)
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
        sq = ((x_high - x_low) / delta).flatten(1).pow(2).mean(1).double()
        err = (sq.mean().expand_as(sq) if norm == "batch" else sq).sqrt()
        err = torch.nan_to_num(err, nan=float("inf"))
        accept, h_next = control(rows, err, h[rows])
        x[rows[accept]] = x_high[accept]
        t.move(rows[accept], s, accept)
        fresh[rows[accept]] = False
        h[rows] = torch.minimum(h_next, end.lam[rows] - t.lam[rows])
    return _adaptive_finish(den, hooks, x, grid, end, to_zero)


CONTROLLERS = ("dpm", "pid")
NORMS = ("sample", "batch")


class _DpmControl:
    """Lu et al. 2022, App. C: accept ``E <= 1``; ``h <- theta h E^(-1/k)``."""

    def __init__(self, order: int, theta: float) -> None:
        self.order, self.theta = order, theta

    def __call__(self, rows: torch.Tensor, err: torch.Tensor, h: torch.Tensor):
        return err <= 1.0, self.theta * h * err.clamp_min(1e-10) ** (-1.0 / self.order)


class _PidControl:
    """A PID step-size controller in Soederlind's digital-filter form, one state per sample.

    Gustafsson, "Control theoretic techniques for stepsize selection in explicit Runge-Kutta
    methods", ACM TOMS 17 (1991) and "Control-theoretic techniques for stepsize selection in
    implicit Runge-Kutta methods", ACM TOMS 20 (1994); Soederlind, "Digital filters in adaptive
    time-stepping", ACM TOMS 29 (2003); the smooth limiter ``1 + atan(x - 1)`` is Soederlind &
    Wang (2006, J. Comput. Appl. Math. 185) with ``kappa = 1``. The ratio ``h_(n+1)/h_n`` is
    ``e_n^b1 e_(n-1)^b2 e_(n-2)^b3`` in the inverse errors ``e = 1/E``; the integral gain
    ``kI/k = b1 + b2 + b3`` is what drives ``E`` to 1, the proportional and derivative parts
    react to the change of ``log E`` over the last accepted steps.

    Measured (benchmarks/adaptive_pid.py, the exact mixture oracle on EDM's path):

    * the accepted value stays ``x_high`` (local extrapolation): accepting ``x_low`` is 3-35
      times less accurate at the same NFE;
    * the error norm stays per sample. k-diffusion takes one norm over the whole batch, which
      couples the samples' paths; run on one sample at a time, k-diffusion's own solver is as
      inaccurate at a tolerance as this one (order 3, rtol 1e-3: 7.1e-4 against 7.2e-4 RMS).
      A single sample's estimate ``x_high - x_low`` is rank-one-like on a mixture (every
      coordinate follows the same change of the posterior weights), so it passes through ~0
      where that change inflects; a pure integral controller then grows ``h`` by the limiter's
      2.57 per step straight past the spot. The proportional term of PI.3.4 (it damps a
      sudden fall of ``E``) avoids most of that: 2-6 times more accurate than ``kP = 0,
      kI = 1`` at order 3 for the same evaluations per sample, on par with or better than
      k-diffusion per evaluation per sample;
    * per-sample control still needs more *batched* calls than one batch-wide step: each
      round waits for the slowest sample, and a round in which some rows accepted needs a
      separate evaluation at their new points before the trial's stages.
    """

    EPS = 1e-8

    def __init__(self, n: int, order: int, kp: float, ki: float, kd: float,
                 accept_safety: float) -> None:
        self.b = ((kp + ki + kd) / order, -(kp + 2 * kd) / order, kd / order)
        self.accept_safety = accept_safety
        # inverse errors of each sample's last two accepted steps; NaN until its first trial
        self.history = torch.full((n, 2), float("nan"), dtype=torch.float64)

    def __call__(self, rows: torch.Tensor, err: torch.Tensor, h: torch.Tensor):
        e = 1.0 / (err + self.EPS)  # err = inf (a non-finite trial) gives e = 0
        finite = e > 0
        past = self.history[rows]
        past = torch.where(past.isnan() & finite[:, None], e[:, None], past)
        b1, b2, b3 = self.b
        raw = e.pow(b1) * past[:, 0].pow(b2) * past[:, 1].pow(b3)
        # the floor of the limiter for a non-finite trial (its history stays as it was)
        raw = torch.where(finite, torch.nan_to_num(raw, nan=0.0), torch.zeros_like(raw))
        factor = 1.0 + torch.atan(raw - 1.0)
        accept = factor >= self.accept_safety
        shifted = torch.stack([e, past[:, 0]], 1)
        self.history[rows] = torch.where(accept[:, None], shifted, past)
        return accept, h * factor


def _controller(name, n, order, theta, pcoeff, icoeff, dcoeff, accept_safety):
    if name not in CONTROLLERS:
        raise bad_value("controller", name, " or ".join(map(repr, CONTROLLERS)))
    for arg, v in (("pcoeff", pcoeff), ("dcoeff", dcoeff)):
        if not math.isfinite(v):
            raise bad_value(arg, v, "a finite number")
    if not (math.isfinite(icoeff) and icoeff > 0):
        raise bad_value("icoeff", icoeff, "a positive number (the integral gain steers E to 1)")
    if not pcoeff + icoeff + dcoeff > 0:
        raise bad_value("pcoeff + icoeff + dcoeff", pcoeff + icoeff + dcoeff,
                        "a positive sum (a larger error must shrink the step)")
    if not 0 < accept_safety <= 1:
        raise bad_value("accept_safety", accept_safety, "a number in (0, 1]")
    if name == "dpm":
        return _DpmControl(order, theta)
    return _PidControl(n, order, pcoeff, icoeff, dcoeff, accept_safety)


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
