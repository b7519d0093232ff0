"""UniPC (Zhao et al. 2023): the unified predictor (UniP) and corrector (UniC), data form.

Both are exponential integrators in the half log-SNR ``lambda`` (see :mod:`dpm_solver`). With
``m_i = x0_hat`` at step ``i``, ``h = lambda_s - lambda_t``, ``r_k = (lambda_(i-k) - lambda_i) / h``
and ``D_k = m_(i-k) - m_i``, a step of order ``p`` reads

    x_s = (sigma_s / sigma_t) x_t + alpha_s [(1 - e^-h) m_i + B(h) sum_k a_k D_k / r_k].

Expanding ``D_k / r_k`` in powers of ``r_k h`` and matching the Taylor expansion of the exact
solution (DPM-Solver++ Sec. 4.1) gives the order conditions (UniPC Sec. 3, ``R_p a_p = g_p``)

    sum_k a_k r_k^(n-1) = g_n = n! h phi_(n+1)(-h) / B(h),    n = 1 .. (number of D_k).

UniP-p uses the ``p - 1`` previous outputs (order ``p``); UniC-p adds ``D_p = m(x~_s) - m_i``
at ``r_p = 1`` from the evaluation at the predicted point ``x~_s``, which the next step needs
anyway, and raises the order by one at no extra cost. With a single ``D`` the conditions are
replaced by UniPC's constant ``a_1 = 1/2`` (the B(h) variant), otherwise solved exactly.
``B1(h) = h`` (``bh1``) and ``B2(h) = e^h - 1`` (``bh2``; in the data form ``h -> -h`` up to sign,
i.e. ``1 - e^-h``); they differ only through that constant.

Warm-up: orders ``1, 2, ..`` up to ``order`` as history accumulates. The first, UniC-corrected
step is second order, so UniPC-3 converges at order 3 overall although its corrected steps are
of order 4 (from the prior, where that first step barely matters, it behaves like order 4).
The last step is not corrected (no further evaluation); a grid ending at 0 returns ``x0_hat``
at the last predicted point, whose evaluation UniC would have needed anyway.
``lower_order_final`` as in DPM-Solver++.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.samplers.base import after_step, predict, register
from difflab.samplers.exponential import (
    DATA,
    finish,
    hphi,
    nodes,
    prepare,
    step_orders,
    warn_fallback,
)

BH = {"bh1": lambda h: h, "bh2": lambda h: -math.expm1(-h)}


def unipc_weights(rs: list[float], h: float, B: float) -> list[float]:
    """``a`` solving ``sum_k a_k r_k^(n-1) = n! h phi_(n+1)(-h) / B``, ``n = 1..len(rs)``;
    ``[1/2]`` for a single ratio (UniPC with B(h))."""
    if len(rs) == 1:
        return [0.5]
    p = len(rs)
    R = np.array([[r ** (n - 1) for r in rs] for n in range(1, p + 1)], dtype=np.float64)
    g = np.array([math.factorial(n) * hphi(n + 1, h, -1.0) / (h**n * B)
                  for n in range(1, p + 1)], dtype=np.float64)
    return np.linalg.solve(R, g).tolist()


def _combine(base: torch.Tensor, coef: float, rs: list[float], ds: list[torch.Tensor],
             h: float, B: float) -> torch.Tensor:
    """``base + coef sum_k a_k D_k / r_k`` (``coef = alpha_s B(h)``)."""
    if not rs:
        return base
    out = base
    for a, r, d in zip(unipc_weights(rs, h, B), rs, ds):
        out = out + (coef * a / r) * d
    return out


def _unipc(den: DenoiserBase, x, grid, hooks, name: str, B_of: Callable[[float], float],
           order: int, corrector: bool, lower_order_final: bool) -> torch.Tensor:
    if order not in (1, 2, 3):
        raise bad_value("order", order, "1, 2 or 3")
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    n = len(knots) - 1
    if n < order:
        warn_fallback(name, total, n, order)
    orders = step_orders(order, n, lower_order_final)
    pred = predict(den, x, knots[0].t, hooks)
    hist = [(knots[0].lam, pred.x0)]  # (lambda_j, m_j), newest last
    for i in range(n):
        t, s = knots[i], knots[i + 1]
        h = s.lam - t.lam
        A, C = DATA.coefs(t, s)
        B, m_i = B_of(h), hist[-1][1]
        base = A * x + (C * hphi(1, h, -1.0)) * m_i  # DDIM / DPM-Solver++1
        older = hist[-orders[i]:-1][::-1]  # m_(i-1), ..., m_(i-p+1)
        rs = [(lam_k - t.lam) / h for lam_k, _ in older]
        ds = [m_k - m_i for _, m_k in older]
        x_pred = _combine(base, C * B, rs, ds, h, B)  # UniP-p
        if i == n - 1 and not to_zero:  # no evaluation follows: no correction
            return after_step(hooks, i, total, t.t, s.t, x_pred, pred)
        pred = predict(den, x_pred, s.t, hooks)
        x = x_pred
        if corrector and i < n - 1:  # UniC-p: one more difference, D_p at r_p = 1
            x = _combine(base, C * B, [*rs, 1.0], [*ds, pred.x0 - m_i], h, B)
        hist = [*hist[-2:], (s.lam, pred.x0)]
        x = after_step(hooks, i, total, t.t, s.t, x, pred)
    return finish(den, x, times, to_zero, hooks, pred=pred)


@register("unipc_bh1", stochastic=False, order=3)
def unipc_bh1(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
              corrector: bool = True, lower_order_final: bool = True, noise=None,
              hooks=None) -> torch.Tensor:
    """UniPC-``order`` with ``B(h) = h`` (Zhao et al. 2023, data prediction): UniP-p predictor
    plus UniC-p corrector (``corrector=False`` leaves UniP alone), one evaluation per step."""
    return _unipc(den, x, grid, hooks, "unipc_bh1", BH["bh1"], order, corrector,
                  lower_order_final)


@register("unipc_bh2", stochastic=False, order=3)
def unipc_bh2(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
              corrector: bool = True, lower_order_final: bool = True, noise=None,
              hooks=None) -> torch.Tensor:
    """UniPC-``order`` with ``B(h) = e^h - 1`` (data form: ``1 - e^-h``); see :func:`unipc_bh1`.
    The paper recommends bh2 for guided / latent sampling with few steps."""
    return _unipc(den, x, grid, hooks, "unipc_bh2", BH["bh2"], order, corrector,
                  lower_order_final)
