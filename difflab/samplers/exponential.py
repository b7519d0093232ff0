"""Shared machinery of the exponential-integrator solvers (DPM-Solver, DPM-Solver++, UniPC,
PNDM): grid nodes in the half log-SNR ``lambda = log(alpha / sigma)``, the ``h phi_k`` weights of
the Taylor expansion (DPM-Solver eq. 3.6), the noise / data forms of the first-order step, the
final step to the data end, and the order schedule with lower orders at the end of short grids.
See :mod:`difflab.samplers.dpm_solver` for the derivation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.paths.base import GaussianPath
from difflab.prediction import Prediction
from difflab.samplers.base import (
    Hooks,
    after_step,
    as_hooks,
    check_grid,
    check_x,
    predict,
)

LOWER_ORDER_FINAL_BELOW = 10  # solver steps: ``lower_order_final=True`` (DPM-Solver's rule)
LONG_STEP = 1.0  # ``"long_step"``: a last solver step longer than this in lambda is lowered
LOWER_ORDER_FINAL_RULES = ("long_step", "always")


@dataclass(frozen=True)
class Node:
    """A time with its schedule values as float64 numbers (computed once per grid point)."""

    t: torch.Tensor  # 0-dim float64
    alpha: float
    sigma: float
    lam: float  # half log-SNR log(alpha / sigma)

    @property
    def rho(self) -> float:
        """``sigma / alpha`` (EDM's sigma~, DDIM's sigma-bar)."""
        return self.sigma / self.alpha


def nodes(path: GaussianPath, times: torch.Tensor) -> list[Node]:
    """:class:`Node` s for positive ``times``, with one vectorised call per schedule function."""
    cols = (path.alpha(times).tolist(), path.sigma(times).tolist(),
            (0.5 * path.log_snr(times)).tolist())
    return [Node(t, a, s, lam_t) for t, a, s, lam_t in zip(times, *cols)]


def node_at(path: GaussianPath, lam_value: float) -> Node:
    """The node with half log-SNR ``lam_value`` (``t`` from the path's exact inverse)."""
    t = path.t_from_log_snr(torch.tensor(2.0 * lam_value, dtype=torch.float64))
    return Node(t, float(path.alpha(t)), float(path.sigma(t)), lam_value)


def hphi(k: int, h, sign: float):
    """``h^k phi_k(sign h)``: the weight of ``f^(k-1)`` in the exponential integrator.

    ``z^k phi_k(z) = e^z - sum_{j<k} z^j / j!`` (computed with ``expm1``), divided by
    ``sign^k`` (``sign = +-1``). ``hphi(1, h, +1) = e^h - 1``, ``hphi(1, h, -1) = 1 - e^-h``.
    ``h`` is a float (one step for the whole batch) or a float64 tensor (one step per row).
    """
    z = sign * h
    acc = torch.expm1(z) if isinstance(z, torch.Tensor) else math.expm1(z)
    term = 1.0
    for j in range(1, k):
        term = term * z / j
        acc = acc - term
    return acc * sign**k


def per_row(v, x: torch.Tensor):
    """A step coefficient ready to multiply ``x``: a float as it is, a per-sample ``(B,)``
    tensor in ``x``'s dtype broadcast over the data dims."""
    if isinstance(v, torch.Tensor):
        return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return v


@dataclass(frozen=True)
class Form:
    """Which model output the integrator expands: ``x0`` (data form) or ``eps`` (noise form)."""

    output: Callable[[Prediction], torch.Tensor]
    sign: float  # z = sign * h in phi_k(z)
    coefs: Callable[[Node, Node], tuple[float, float]]  # (A, C) of a step t -> s


DATA = Form(lambda p: p.x0, -1.0, lambda t, s: (s.sigma / t.sigma, s.alpha))
NOISE = Form(lambda p: p.eps, 1.0, lambda t, s: (s.alpha / t.alpha, -s.sigma))


def first_order(form: Form, x: torch.Tensor, t, s, f: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-1 (eq. 3.7) / DPM-Solver++1: ``A x + C h phi_1 f``; this is DDIM.

    ``t`` and ``s`` are :class:`Node` s (the whole batch steps together) or per-sample rows with
    tensor ``alpha, sigma, lam`` (the adaptive solver, where each row has its own step).
    """
    A, C = form.coefs(t, s)
    return per_row(A, x) * x + per_row(C * hphi(1, s.lam - t.lam, form.sign), x) * f


def split_grid(grid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The positive times of a checked grid and whether it ends at the data (``t = 0``)."""
    to_zero = float(grid[-1]) == 0.0
    return (grid[:-1] if to_zero else grid), to_zero


def finish(den: DenoiserBase, x: torch.Tensor, times: torch.Tensor, to_zero: bool,
           hooks: Hooks, pred: Prediction | None = None) -> torch.Tensor:
    """The final step to ``t = 0``: ``x0_hat`` at the last positive time (one evaluation).

    ``pred`` may pass an evaluation already made at ``(x, times[-1])``.
    """
    if not to_zero:
        return x
    t = times[-1]
    if pred is None:
        pred = predict(den, x, t, hooks)
    n = times.numel()
    return after_step(hooks, n - 1, n, t, 0.0, pred.x0, pred)


def warn_fallback(name: str, grid_steps: int, solver_steps: int, order: int,
                  fallback: int | None = None) -> None:
    """Warn (once per call) that a grid is too short for a multistep solver's order."""
    fallback = max(1, solver_steps) if fallback is None else fallback
    warnings.warn(
        f"{name} was given {grid_steps} step(s) ({solver_steps} solver step(s) before any "
        f"final denoising step), fewer than its order {order}: it falls back to order "
        f"{fallback}",
        stacklevel=3,
    )


LOWER_ORDER_FINAL_DOC = """
``lower_order_final`` says when the final steps of a multistep solver drop to lower orders (the
last step to order 1, the one before to at most 2; the final denoising step of a grid ending at
0 is not one of them):

* ``False`` or ``0``: never; ``True``: on grids of fewer than 10 solver steps (the DPM-Solver
  authors' rule, difflab's default before the measured defaults); an int ``N``: on grids of
  fewer than ``N`` solver steps (diffusers' ``lower_order_final`` is ``N = 15`` counted in
  evaluations, i.e. 15 solver steps on a grid ending at ``t_min``, 14 before a final 0);
* ``"always"``: on every grid (diffusers' UniPC does this);
* ``"long_step"``: when the last solver step is longer than 1 in ``lambda`` (``alpha / sigma``
  grows more than e-fold). Near the data ``x0_hat`` settles like ``e^(-2 lambda)`` (one Gaussian
  component: ``x0_hat = m + var / (var + rho^2) (y - m)``, ``rho = e^-lambda``), which a
  polynomial in ``lambda`` extrapolates well only over steps short against that scale; a long
  last step (grids uniform in ``t`` or Karras' near ``t_min``, short grids) is better taken at
  low order, a short one (a grid whose final denoising step from ``t = 1 / steps`` is the long
  one, as diffusers' and DDPM's trailing grids) at full order.

"Solver steps" are the steps between positive times, i.e. the grid's steps less the final
denoising step when it ends at 0. The defaults were chosen by measurement against the exact ODE
on Gaussian-mixture oracles (``benchmarks/sampler_defaults.py``).
"""


def check_lower_order_final(value) -> None:
    """Refuse a ``lower_order_final`` that is not a bool, an int >= 0 or a named rule."""
    if isinstance(value, bool) or value in LOWER_ORDER_FINAL_RULES:
        return
    if isinstance(value, int) and value >= 0:
        return
    raise bad_value("lower_order_final", value,
                    "true, false, an int >= 0 (lower the final steps' order below that many "
                    "solver steps), 'long_step' or 'always'")


def lowers_final(lower_order_final, lams: list[float]) -> bool:
    """Whether a grid whose solver steps join the half log-SNRs ``lams`` (``n + 1`` nodes for
    ``n`` steps) lowers the order of its final steps; see ``LOWER_ORDER_FINAL_DOC``."""
    check_lower_order_final(lower_order_final)
    n = len(lams) - 1
    if lower_order_final is True:
        return n < LOWER_ORDER_FINAL_BELOW
    if lower_order_final is False:
        return False
    if lower_order_final == "always":
        return True
    if lower_order_final == "long_step":
        return n >= 1 and lams[-1] - lams[-2] > LONG_STEP
    return n < lower_order_final


def step_orders(order: int, n: int, lower_order_final=True,
                lams: list[float] | None = None) -> list[int]:
    """Order of each of ``n`` multistep steps: warm-up ``min(order, i + 1)`` and, where
    :func:`lowers_final` says so, ``min(., n - i)`` at the end (the last step order 1, the one
    before at most 2). ``lams`` (the ``n + 1`` nodes' half log-SNRs) is needed by
    ``"long_step"`` only."""
    orders = [min(order, i + 1) for i in range(n)]
    if lams is None:
        if lower_order_final == "long_step":
            raise ValueError("step_orders needs the nodes' lams for lower_order_final='long_step'")
        lams = [0.0] * (n + 1)
    if lowers_final(lower_order_final, lams):
        orders = [min(k, n - i) for i, k in enumerate(orders)]
    return orders


def prepare(den: DenoiserBase, x, grid, hooks):
    """Validate the inputs; return ``hooks, grid, x, positive times, ends at 0``."""
    hooks = as_hooks(hooks)
    grid, x = check_grid(grid, den.path), check_x(x)
    times, to_zero = split_grid(grid)
    return hooks, grid, x, times, to_zero
