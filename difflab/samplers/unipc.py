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

Warm-up: orders ``1, 2, ..`` up to ``order`` as history accumulates. The last step is not
corrected (no further evaluation); a grid ending at 0 returns ``x0_hat`` at the last predicted
point, whose evaluation UniC would have needed anyway (a UniP step into ``lambda = inf`` would
be ``x0_hat`` as well, except that ``B1(inf) * 0`` is NaN: diffusers' bh1 returns NaN there).

**Predictor and corrector orders.** UniPC pairs UniP-p with UniC-p (order ``p + 1``); here the
corrector's order is its own option, ``corrector_order = q``: UniC-q uses the ``q - 1`` previous
outputs besides the new one, and the corrected state has order ``min(p, q) + 1``. The defaults
were chosen by measurement against the exact ODE (``benchmarks/sampler_defaults.py``):

* ``corrector_order = order - 1`` (at least 1). UniC one order below the predictor was within
  1 % of, or up to 8 % more accurate than, ``q = p`` (averaged over the oracle problems and
  grids) at every budget where that order is the default (bh2: order 2 up to 20 evaluations,
  3 at 50; bh1: 3), although ``q = p`` has the higher formal order;
* ``order``: 3 for ``unipc_bh1``; for ``unipc_bh2`` 2 on grids of fewer than 30 solver steps and
  3 from 30 (UniP-2 + UniC-1 was the more accurate up to about 30 evaluations, UniP-3 + UniC-2
  beyond). diffusers' ``UniPCMultistepScheduler`` defaults to bh2, ``solver_order=2`` with
  UniC-2;
* ``lower_order_final="long_step"`` (diffusers lowers always, and on a grid ending at 0 counts
  the final denoising step as the order-1 step, so it lowers one solver step less); see
  :mod:`difflab.samplers.exponential` for the option's values.

With UniC-p the first, UniC-1 corrected step is second order, so UniPC-3 converges at order 3
overall although its corrected steps are of order 4 (from the prior, where that first step
barely matters, it behaves like order 4).
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
    LOWER_ORDER_FINAL_DOC,
    check_lower_order_final,
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


def _differences(hist, k: int, lam_i: float, h: float):
    """``r_j, D_j`` of the ``k - 1`` outputs before the newest ``m_i``, newest first."""
    older = hist[-k:-1][::-1] if k > 1 else []
    m_i = hist[-1][1]
    return [(lam_j - lam_i) / h for lam_j, _ in older], [m_j - m_i for _, m_j in older]


BH2_ORDER_3_FROM = 30  # solver steps: unipc_bh2's default order is 2 below, 3 from here


def _check_order(name: str, value) -> None:
    if isinstance(value, bool) or value not in (1, 2, 3):
        raise bad_value(name, value, "1, 2 or 3")


def _unipc(den: DenoiserBase, x, grid, hooks, name: str, B_of: Callable[[float], float],
           order: int | Callable[[int], int], corrector: bool, corrector_order: int | None,
           lower_order_final, orders: Callable[[int], tuple[list[int], list[int]]] | None = None
           ) -> torch.Tensor:
    """The UniPC loop. ``order`` is an int or ``n -> order`` for a grid of ``n`` solver steps;
    ``orders(n)`` replaces both order schedules (predictor, corrector) for comparisons with
    other libraries' schedules."""
    if not callable(order):
        _check_order("order", order)
    if corrector_order is not None:
        _check_order("corrector_order", corrector_order)
    if not isinstance(corrector, bool):
        raise bad_value("corrector", corrector, "true or false")
    check_lower_order_final(lower_order_final)
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    n = len(knots) - 1
    p = order(n) if callable(order) else order
    q = max(1, p - 1) if corrector_order is None else corrector_order
    if n < p:
        warn_fallback(name, total, n, p)
    lams = [k.lam for k in knots]
    if orders is None:
        p_orders, q_orders = (step_orders(k, n, lower_order_final, lams) for k in (p, q))
    else:
        p_orders, q_orders = orders(n)
    pred = predict(den, x, knots[0].t, hooks)
    hist = [(knots[0].lam, pred.x0)]  # (lambda_j, m_j), newest last
    for i in range(n):
        t, s = knots[i], knots[i + 1]
        h = s.lam - t.lam
        A, C = DATA.coefs(t, s)
        B, m_i = B_of(h), hist[-1][1]
        base = A * x + (C * hphi(1, h, -1.0)) * m_i  # DDIM / DPM-Solver++1
        x_pred = _combine(base, C * B, *_differences(hist, p_orders[i], t.lam, h), h, B)  # UniP
        if i == n - 1 and not to_zero:  # no evaluation follows: no correction
            return after_step(hooks, i, total, t.t, s.t, x_pred, pred)
        pred = predict(den, x_pred, s.t, hooks)
        x = x_pred
        if corrector and i < n - 1:  # UniC-q: one more difference, D_q at r_q = 1
            rs, ds = _differences(hist, q_orders[i], t.lam, h)
            x = _combine(base, C * B, [*rs, 1.0], [*ds, pred.x0 - m_i], h, B)
        hist = [*hist[-2:], (s.lam, pred.x0)]
        x = after_step(hooks, i, total, t.t, s.t, x, pred)
    return finish(den, x, times, to_zero, hooks, pred=pred)


def _bh2_order(n: int) -> int:
    return 2 if n < BH2_ORDER_3_FROM else 3


@register("unipc_bh1", stochastic=False, order=3)
def unipc_bh1(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
              corrector: bool = True, corrector_order: int | None = None,
              lower_order_final: bool | int | str = "long_step", noise=None,
              hooks=None) -> torch.Tensor:
    """UniPC with ``B(h) = h`` (Zhao et al. 2023, data prediction): UniP-``order`` predictor
    plus UniC-``corrector_order`` corrector (default ``order - 1``; ``corrector=False`` leaves
    UniP alone), one evaluation per step. Defaults: ``order=3``, ``lower_order_final="long_step"``.
    """
    return _unipc(den, x, grid, hooks, "unipc_bh1", BH["bh1"], order, corrector,
                  corrector_order, lower_order_final)


@register("unipc_bh2", stochastic=False, order=3)
def unipc_bh2(den: DenoiserBase, x: torch.Tensor, grid, *, order: int | None = None,
              corrector: bool = True, corrector_order: int | None = None,
              lower_order_final: bool | int | str = "long_step", noise=None,
              hooks=None) -> torch.Tensor:
    """UniPC with ``B(h) = e^h - 1`` (data form: ``1 - e^-h``); see :func:`unipc_bh1`.
    The paper recommends bh2 for guided / latent sampling with few steps. Default ``order``:
    2 on grids of fewer than 30 solver steps, 3 from 30 (``corrector_order``: ``order - 1``)."""
    return _unipc(den, x, grid, hooks, "unipc_bh2", BH["bh2"],
                  _bh2_order if order is None else order, corrector, corrector_order,
                  lower_order_final)


for _fn in (unipc_bh1, unipc_bh2):
    _fn.__doc__ += "\n" + LOWER_ORDER_FINAL_DOC
