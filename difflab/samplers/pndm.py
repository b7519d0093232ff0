"""Pseudo numerical methods (Liu et al. 2022, PNDM): PLMS and PNDM.

A pseudo numerical method combines several noise estimates into one ``eps'`` with the weights
of a classical method and moves with the *transfer* ``phi``, the DDIM step (PNDM eq. 11):

    phi(x_t, eps', t, s) = alpha_s [x_t / alpha_t + (rho_s - rho_t) eps'],   rho = sigma / alpha.

``phi`` is exact when ``eps`` is constant, because DDIM's ODE is ``d(x / alpha) = eps d rho``
(DDIM eq. 14); the pseudo methods are therefore the classical methods for that ODE in
``(x / alpha, rho)``. We take midpoints and multistep weights in ``rho`` so that this holds on
any grid (on a grid uniform in ``rho`` they are exactly PNDM's: midpoint ``t - delta/2`` and
``(55, -59, 37, -9) / 24``); in ``t`` they would lose the order on non-uniform grids.

* pseudo linear multistep (eq. 12): ``eps'`` by 4-step Adams-Bashforth from the last four
  evaluations at the grid points;
* pseudo Runge-Kutta (eq. 13): ``eps' = (e1 + 2 e2 + 2 e3 + e4) / 6`` from four evaluations.

``pndm`` (F-PNDM) warms up with three pseudo Runge-Kutta steps (4 evaluations each), so every
step is fourth order. ``plms`` (the PLMS of Latent Diffusion) warms up with one pseudo improved
Euler step (2 evaluations, second order) and then Adams-Bashforth of orders 2, 3, 4: one
evaluation per step after the first, but the warm-up limits the global order to 3 (the first
two steps have local errors ``O(h^3)``).

**The final step to the data** (``final``, for grids ending at 0). In ``(x / alpha, rho)`` the
data end is the ordinary point ``rho = 0`` (``alpha = 1``), where DDIM's ODE is as smooth as
anywhere, so the step into it can be a pseudo linear multistep step like the others:

* ``"multistep"`` (default): Adams-Bashforth weights on the up to four latest evaluations to
  ``rho = 0``; diffusers' ``PNDMScheduler(set_alpha_to_one=True)`` ends this way;
* ``"denoise"``: ``x0_hat`` at the last positive time, the transfer with that time's ``eps``
  alone (a first-order step; what difflab's other solvers do and PNDM here did before).

Both evaluate the model once at the last positive time and nowhere after it: same NFE. With a
``correct_x0`` hook (thresholding, known pixels) the last step is ``"denoise"``'s: the hook has
the last word on the sample, as with every other sampler. With
the default ``set_alpha_to_one=False`` diffusers stops at ``alpha_bar_0`` instead (a grid
ending at the path's ``t_min``, where ``final`` plays no part). The default was chosen by
measurement (``benchmarks/sampler_defaults.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.samplers.base import after_step, check_grid, predict, register
from difflab.samplers.exponential import Node, finish, nodes, prepare, warn_fallback

FINALS = ("multistep", "denoise")


def transfer(x: torch.Tensor, eps: torch.Tensor, t: Node, s: Node) -> torch.Tensor:
    """PNDM eq. 11, the DDIM step from ``t`` to ``s`` with noise estimate ``eps``."""
    return (s.alpha / t.alpha) * x + (s.alpha * (s.rho - t.rho)) * eps


def adams_bashforth_weights(rhos: list[float], rho_next: float) -> list[float]:
    """Variable-step Adams-Bashforth weights: ``c_j = (1/Delta) int L_j`` over the step.

    ``rhos`` are the nodes, newest first; ``L_j`` is the Lagrange basis polynomial of node ``j``
    and the integral runs from ``rhos[0]`` to ``rho_next``. With ``u = (rho - rhos[0]) / Delta``
    this is the linear system ``sum_j c_j u_j^m = 1 / (m + 1)``, ``m = 0..k-1``.
    """
    delta = rho_next - rhos[0]
    u = np.array([(r - rhos[0]) / delta for r in rhos], dtype=np.float64)
    k = len(rhos)
    V = np.vander(u, k, increasing=True).T  # V[m, j] = u_j^m
    return np.linalg.solve(V, 1.0 / np.arange(1, k + 1)).tolist()


def _linear_multistep(x, hist: list[tuple[float, torch.Tensor]], t: Node, s: Node):
    """PNDM eq. 12 with variable-step weights; ``hist`` holds ``(rho_j, eps_j)``, newest last."""
    newest_first = hist[::-1]
    weights = adams_bashforth_weights([r for r, _ in newest_first], s.rho)
    eps = sum(w * e for w, (_, e) in zip(weights, newest_first))
    return transfer(x, eps, t, s)


def _midpoint(path, t: Node, s: Node) -> Node:
    """The node halfway between ``t`` and ``s`` in ``rho``."""
    mid = path.t_from_sigma_ve(torch.tensor(0.5 * (t.rho + s.rho), dtype=torch.float64))
    return nodes(path, mid[None])[0]


def _pseudo_runge_kutta(den, hooks, x, t: Node, s: Node):
    """PNDM eq. 13 (midpoint in ``rho``); returns ``(x_s, prediction at t)``."""
    mid = _midpoint(den.path, t, s)
    pred = predict(den, x, t.t, hooks)
    e1 = pred.eps
    e2 = predict(den, transfer(x, e1, t, mid), mid.t, hooks).eps
    e3 = predict(den, transfer(x, e2, t, mid), mid.t, hooks).eps
    e4 = predict(den, transfer(x, e3, t, s), s.t, hooks).eps
    return transfer(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, t, s), pred


def _pseudo_improved_euler(den, hooks, x, t: Node, s: Node):
    """Pseudo improved Euler (PNDM's S-PNDM warm-up, LDM's PLMS first step):
    ``eps' = (e_t + e(phi(x_t, e_t)))/2``; returns ``(x_s, prediction at t)``."""
    pred = predict(den, x, t.t, hooks)
    e2 = predict(den, transfer(x, pred.eps, t, s), s.t, hooks).eps
    return transfer(x, 0.5 * (pred.eps + e2), t, s), pred


def _pseudo(den: DenoiserBase, x, grid, hooks, warmup, warmup_steps: int,
            final: str = "multistep") -> torch.Tensor:
    if final not in FINALS:
        raise bad_value("final", final, " or ".join(repr(f) for f in FINALS))
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    hist: list[tuple[float, torch.Tensor]] = []
    for i in range(len(knots) - 1):
        t, s = knots[i], knots[i + 1]
        if i < warmup_steps:
            x_next, pred = warmup(den, hooks, x, t, s)
            hist.append((t.rho, pred.eps))
        else:
            pred = predict(den, x, t.t, hooks)
            hist = [*hist[-3:], (t.rho, pred.eps)]
            x_next = _linear_multistep(x, hist, t, s)
        x = after_step(hooks, i, total, t.t, s.t, x_next, pred)
    if to_zero and final == "multistep" and hooks.correct_x0 is None:
        t, data = knots[-1], Node(grid[-1], 1.0, 0.0, math.inf)  # alpha = 1, rho = 0
        pred = predict(den, x, t.t, hooks)
        hist = [*hist[-3:], (t.rho, pred.eps)]
        n = times.numel()
        return after_step(hooks, n - 1, n, t.t, 0.0, _linear_multistep(x, hist, t, data), pred)
    return finish(den, x, times, to_zero, hooks)


@register("pndm", stochastic=False, order=4)
def pndm(den: DenoiserBase, x: torch.Tensor, grid, *, final: str = "multistep", noise=None,
         hooks=None) -> torch.Tensor:
    """F-PNDM (Liu et al. 2022, Alg. 2): three pseudo Runge-Kutta steps (eq. 13, 4 evaluations
    each), then the pseudo linear multistep method (eq. 12, 1 evaluation per step); fourth order
    throughout. Evaluations: ``4 min(n, 3) + max(n - 3, 0)`` for ``n`` steps between positive
    times, plus one for a final step to 0 (``final``: ``"multistep"`` or ``"denoise"``, see the
    module docstring)."""
    return _pseudo(den, x, grid, hooks, _pseudo_runge_kutta, 3, final)


@register("plms", stochastic=False, order=4)
def plms(den: DenoiserBase, x: torch.Tensor, grid, *, final: str = "multistep", noise=None,
         hooks=None) -> torch.Tensor:
    """PLMS (Liu et al. 2022 eq. 12, as used by Latent Diffusion): one pseudo improved Euler step
    (2 evaluations), then Adams-Bashforth of orders 2, 3 and 4 from the growing history (the
    lower-order warm start; 1 evaluation per step, ``n + 1`` in all, one more for a final step
    to 0). The 4-step formula is fourth order; the warm start makes the global order 3.
    ``final``: the step to 0 (``"multistep"`` or ``"denoise"``, see the module docstring)."""
    grid = check_grid(grid, den.path)
    n = grid.numel() - 1 - int(float(grid[-1]) == 0.0)
    if n < 4:
        warn_fallback("plms", grid.numel() - 1, n, 4, fallback=max(2, n))
    return _pseudo(den, x, grid, hooks, _pseudo_improved_euler, 1, final)
