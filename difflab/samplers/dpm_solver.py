"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b): exponential integrators.

Both solve the probability-flow ODE in the half log-SNR ``lambda = log(alpha / sigma)``
(``path.log_snr / 2``). From ``t`` to ``s < t`` with ``h = lambda_s - lambda_t > 0`` the linear part
is solved exactly (variation of constants) and only the model output ``f`` is approximated:

* noise form (DPM-Solver eq. 3.4): ``x_s = (alpha_s/alpha_t) x_t - alpha_s int e^-lambda eps``;
* data form (DPM-Solver++ Sec. 4.1): ``x_s = (sigma_s/sigma_t) x_t + sigma_s int e^lambda x0``.

Taylor-expanding ``f`` (``eps`` or ``x0``) in ``lambda`` around ``lambda_t`` gives
(DPM-Solver eq. 3.6; DPM-Solver++ Sec. 4.1)::

    x_s = A x_t + C sum_k h^(k+1) phi_(k+1)(z) f^(k)(lambda_t),

with ``(A, C, z) = (alpha_s/alpha_t, -sigma_s, h)`` (noise) or ``(sigma_s/sigma_t, alpha_s, -h)``
(data) and ``phi_k(z) = int_0^1 e^((1-u) z) u^(k-1)/(k-1)! du`` (so ``h phi_1 = e^z - 1`` up to
sign). Every solver below truncates this sum and estimates the derivatives from extra evaluations
(singlestep) or from the history (multistep). Only ``Prediction.x0 / .eps`` and the path's
``alpha, sigma, log_snr`` are used, so the solvers run on every path and parameterization.

**The data end.** ``lambda = +inf`` at ``t = 0``. A grid ending at 0 is solved down to its last
positive time ``t_min``; the last step then returns ``x0_hat`` there (one evaluation: the limit
``h -> inf`` of the first-order step, and what DDIM, DDPM and EDM's last Euler step do).
Multistep solvers on grids of fewer than 10 steps also lower their order at the final steps
(``lower_order_final``, the DPM-Solver++ authors' recommendation: high orders are unstable for
the large final steps of short grids).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath
from difflab.prediction import Prediction
from difflab.samplers.base import (
    Hooks,
    StepInfo,
    after_step,
    as_hooks,
    check_grid,
    check_x,
    predict,
    register,
)
from difflab.samplers.noise import as_noise

LOWER_ORDER_FINAL_BELOW = 10  # solver steps


# ----- shared helpers (also used by unipc, pndm) ---------------------------------------------
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


def hphi(k: int, h: float, sign: float) -> float:
    """``h^k phi_k(sign h)``: the weight of ``f^(k-1)`` in the exponential integrator.

    ``z^k phi_k(z) = e^z - sum_{j<k} z^j / j!`` (computed with ``expm1``), divided by
    ``sign^k`` (``sign = +-1``). ``hphi(1, h, +1) = e^h - 1``, ``hphi(1, h, -1) = 1 - e^-h``.
    """
    z = sign * h
    acc, term = math.expm1(z), 1.0
    for j in range(1, k):
        term *= z / j
        acc -= term
    return acc * sign**k


@dataclass(frozen=True)
class Form:
    """Which model output the integrator expands: ``x0`` (data form) or ``eps`` (noise form)."""

    output: Callable[[Prediction], torch.Tensor]
    sign: float  # z = sign * h in phi_k(z)
    coefs: Callable[[Node, Node], tuple[float, float]]  # (A, C) of a step t -> s


DATA = Form(lambda p: p.x0, -1.0, lambda t, s: (s.sigma / t.sigma, s.alpha))
NOISE = Form(lambda p: p.eps, 1.0, lambda t, s: (s.alpha / t.alpha, -s.sigma))


def first_order(form: Form, x: torch.Tensor, t: Node, s: Node, f: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-1 (eq. 3.7) / DPM-Solver++1: ``A x + C h phi_1 f``; this is DDIM."""
    A, C = form.coefs(t, s)
    return A * x + (C * hphi(1, s.lam - t.lam, form.sign)) * f


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


def step_orders(order: int, n: int, lower_order_final: bool) -> list[int]:
    """Order of each of ``n`` multistep steps: warm-up ``min(order, i + 1)`` and, for grids
    shorter than 10 steps with ``lower_order_final``, ``min(., n - i)`` at the end."""
    orders = [min(order, i + 1) for i in range(n)]
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
        orders = [min(k, n - i) for i, k in enumerate(orders)]
    return orders


def prepare(den: DenoiserBase, x, grid, hooks):
    """Validate the inputs; return ``hooks, grid, x, positive times, ends at 0``."""
    hooks = as_hooks(hooks)
    grid, x = check_grid(grid, den.path), check_x(x)
    times, to_zero = split_grid(grid)
    return hooks, grid, x, times, to_zero


def _check_r(name: str, r: float) -> None:
    if not 0.0 < r < 1.0:
        raise bad_value(name, r, "a number in (0, 1)")


# ----- singlestep, noise form (Lu et al. 2022) ---------------------------------------------------
StepFn = Callable[[DenoiserBase, Hooks, torch.Tensor, Prediction, Node, Node], torch.Tensor]


def _singlestep(den: DenoiserBase, x, grid, hooks, step: StepFn) -> torch.Tensor:
    """Run a one-step method ``step(den, hooks, x, pred_t, node_t, node_s)`` over the grid."""
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    for i in range(len(knots) - 1):
        t, s = knots[i], knots[i + 1]
        pred = predict(den, x, t.t, hooks)
        x = step(den, hooks, x, pred, t, s)
        x = after_step(hooks, i, total, t.t, s.t, x, pred)
    return finish(den, x, times, to_zero, hooks)


def _dpm1_step(den, hooks, x, pred, t: Node, s: Node) -> torch.Tensor:
    return first_order(NOISE, x, t, s, pred.eps)


R1, R2 = 1.0 / 3.0, 2.0 / 3.0  # DPM-Solver-3's intermediate points


def _stage(den, hooks, x, eps, t: Node, rh: float) -> torch.Tensor:
    """``eps(u) - eps_t`` at ``u``, the first-order step from ``t`` to ``lambda_t + r h``."""
    s1 = node_at(den.path, t.lam + rh)
    u = first_order(NOISE, x, t, s1, eps)
    return predict(den, u, s1.t, hooks).eps - eps


def _dpm2_combine(x, eps, d1, t: Node, s: Node, r1: float) -> torch.Tensor:
    """Alg. 1's update: ``A x - sigma_s (e^h - 1) [eps_t + D1 / (2 r1)]``."""
    A, C = NOISE.coefs(t, s)
    e1 = hphi(1, s.lam - t.lam, 1.0)  # e^h - 1
    return A * x + C * (e1 * eps + (e1 / (2 * r1)) * d1)


def _dpm3_rest(den, hooks, x, eps, d1, t: Node, s: Node) -> torch.Tensor:
    """Alg. 2 after the first stage: a second-order step to ``lambda_t + r2 h`` using
    ``D1``, then ``x_s = A x - sigma_s [(e^h - 1) eps_t + ((e^h - 1)/h - 1) D2 / r2]``."""
    h = s.lam - t.lam
    s2 = node_at(den.path, t.lam + R2 * h)
    A2, C2 = NOISE.coefs(t, s2)
    u2 = A2 * x + C2 * (hphi(1, R2 * h, 1.0) * eps + (hphi(2, R2 * h, 1.0) / (R1 * h)) * d1)
    d2 = predict(den, u2, s2.t, hooks).eps - eps
    A, C = NOISE.coefs(t, s)
    return A * x + C * (hphi(1, h, 1.0) * eps + (hphi(2, h, 1.0) / (R2 * h)) * d2)


def _dpm2_step(r1: float) -> StepFn:
    def step(den, hooks, x, pred, t: Node, s: Node) -> torch.Tensor:
        """DPM-Solver-2 (Lu et al. 2022, Alg. 1)."""
        d1 = _stage(den, hooks, x, pred.eps, t, r1 * (s.lam - t.lam))
        return _dpm2_combine(x, pred.eps, d1, t, s, r1)

    return step


def _dpm3_step(den, hooks, x, pred, t: Node, s: Node) -> torch.Tensor:
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2) with ``r1 = 1/3, r2 = 2/3``."""
    d1 = _stage(den, hooks, x, pred.eps, t, R1 * (s.lam - t.lam))
    return _dpm3_rest(den, hooks, x, pred.eps, d1, t, s)


@register("dpm_solver_1", stochastic=False, order=1)
def dpm_solver_1(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None,
                 hooks=None) -> torch.Tensor:
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7): ``x_s = (alpha_s/alpha_t) x_t - sigma_s (e^h - 1)
    eps_hat``. Identical to deterministic DDIM (their Sec. 4.1), one evaluation per step."""
    return _singlestep(den, x, grid, hooks, _dpm1_step)


@register("dpm_solver_2", stochastic=False, order=2, evals_per_step=2)
def dpm_solver_2(den: DenoiserBase, x: torch.Tensor, grid, *, r1: float = 0.5, noise=None,
                 hooks=None) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1), two evaluations per step.

    A first-order step to ``lambda_t + r1 h`` gives ``u``; then
    ``x_s = (alpha_s/alpha_t) x_t - sigma_s (e^h - 1) [eps_t + (eps(u) - eps_t) / (2 r1)]``.
    """
    _check_r("r1", r1)
    return _singlestep(den, x, grid, hooks, _dpm2_step(r1))


@register("dpm_solver_3", stochastic=False, order=3, evals_per_step=3)
def dpm_solver_3(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None,
                 hooks=None) -> torch.Tensor:
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2; ``r1 = 1/3, r2 = 2/3``), three evaluations per step:
    ``x_s = A x_t - sigma_s [(e^h - 1) eps_t + ((e^h - 1)/h - 1) D2 / r2]`` with ``D2`` the
    change of ``eps`` at ``lambda_t + 2h/3`` (reached by a second-order step through 1/3)."""
    return _singlestep(den, x, grid, hooks, _dpm3_step)


# ----- singlestep, data form (Lu et al. 2022b) ---------------------------------------------------
def _dpmpp_2s_step(r: float) -> StepFn:
    def step(den, hooks, x, pred, t: Node, s: Node) -> torch.Tensor:
        """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1)."""
        s1 = node_at(den.path, t.lam + r * (s.lam - t.lam))
        u = first_order(DATA, x, t, s1, pred.x0)
        x0_u = predict(den, u, s1.t, hooks).x0
        D = (1 - 1 / (2 * r)) * pred.x0 + (1 / (2 * r)) * x0_u
        return first_order(DATA, x, t, s, D)

    return step


@register("dpmpp_2s", stochastic=False, order=2, evals_per_step=2)
def dpmpp_2s(den: DenoiserBase, x: torch.Tensor, grid, *, r: float = 0.5, noise=None,
             hooks=None) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1): the data-form singlestep second-order solver,
    ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^-h) [(1 - 1/2r) x0_t + x0(u)/2r]``."""
    _check_r("r", r)
    return _singlestep(den, x, grid, hooks, _dpmpp_2s_step(r))


# ----- multistep -----------------------------------------------------------------------------
def _multistep(den: DenoiserBase, x, grid, hooks, name: str, order: int, lower_order_final: bool,
               update: Callable) -> torch.Tensor:
    """Shared loop: one evaluation per step, history ``[(lambda_j, f_j)]`` newest last."""
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    n = len(knots) - 1
    if n < order:
        warn_fallback(name, total, n, order)
    orders = step_orders(order, n, lower_order_final)
    hist: list[tuple[float, torch.Tensor]] = []
    for i in range(n):
        t, s = knots[i], knots[i + 1]
        pred = predict(den, x, t.t, hooks)
        hist = [*hist[-2:], (t.lam, update.form.output(pred))]
        x = update(x, t, s, hist[-orders[i]:])
        x = after_step(hooks, i, total, t.t, s.t, x, pred)
    return finish(den, x, times, to_zero, hooks)


@dataclass(frozen=True)
class _Adams2:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in either form.

    ``r = h_prev / h``, ``D = (1 + 1/2r) f_t - f_prev / 2r``, ``x_s = A x_t + C h phi_1 D``.
    """

    form: Form

    def __call__(self, x, t: Node, s: Node, hist):
        D = hist[-1][1]
        if len(hist) > 1:
            (lam_p, f_p), (_, f_t) = hist[-2], hist[-1]
            r = (t.lam - lam_p) / (s.lam - t.lam)
            D = (1 + 1 / (2 * r)) * f_t - (1 / (2 * r)) * f_p
        return first_order(self.form, x, t, s, D)


def newton_derivatives(hist: list[tuple[float, torch.Tensor]]) -> list[torch.Tensor]:
    """``[f, f', f'']`` at the newest ``lambda`` from the interpolating polynomial through up to
    three ``(lambda, f)`` points (divided differences; exact for quadratics)."""
    (l0, f0) = hist[-1]
    if len(hist) == 1:
        return [f0]
    (l1, f1) = hist[-2]
    d01 = (f0 - f1) / (l0 - l1)
    if len(hist) == 2:
        return [f0, d01]
    (l2, f2) = hist[-3]
    d012 = (d01 - (f1 - f2) / (l1 - l2)) / (l0 - l2)
    return [f0, d01 + (l0 - l1) * d012, 2 * d012]


@dataclass(frozen=True)
class _Taylor:
    """The truncated expansion ``x_s = A x_t + C sum_k h^(k+1) phi_(k+1) f^(k)`` (DPM-Solver
    eq. 3.6 / DPM-Solver++ Sec. 4.1) with derivatives from :func:`newton_derivatives`."""

    form: Form

    def __call__(self, x, t: Node, s: Node, hist):
        A, C = self.form.coefs(t, s)
        h, out = s.lam - t.lam, A * x
        for k, d in enumerate(newton_derivatives(hist)):
            out = out + (C * hphi(k + 1, h, self.form.sign)) * d
        return out


@register("dpmpp_2m", stochastic=False, order=2)
def dpmpp_2m(den: DenoiserBase, x: torch.Tensor, grid, *, lower_order_final: bool = True,
             noise=None, hooks=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): data-form multistep, one evaluation per step;
    the first step is first order (DPM-Solver++1 = DDIM)."""
    return _multistep(den, x, grid, hooks, "dpmpp_2m", 2, lower_order_final, _Adams2(DATA))


@register("dpmpp_3m", stochastic=False, order=3)
def dpmpp_3m(den: DenoiserBase, x: torch.Tensor, grid, *, lower_order_final: bool = True,
             noise=None, hooks=None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b, Sec. 4 / App.): data-form multistep of order 3, the
    derivatives ``x0', x0''`` from the last three evaluations; warm-up at orders 1, 2.

    The first-order first step caps the asymptotic order at 2 on a trajectory started where
    ``x0_hat`` moves (SDEdit-style starts); from the prior, where it barely does, the method
    shows its order 3 (see ``tests/samplers/test_solver_orders.py``)."""
    return _multistep(den, x, grid, hooks, "dpmpp_3m", 3, lower_order_final, _Taylor(DATA))


@register("dpm_solver_2m", stochastic=False, order=2)
def dpm_solver_2m(den: DenoiserBase, x: torch.Tensor, grid, *, lower_order_final: bool = True,
                  noise=None, hooks=None) -> torch.Tensor:
    """Multistep DPM-Solver-2 in noise form: Alg. 2 of Lu et al. 2022b applied to ``eps``."""
    return _multistep(den, x, grid, hooks, "dpm_solver_2m", 2, lower_order_final,
                      _Adams2(NOISE))


@register("dpm_solver_3m", stochastic=False, order=3)
def dpm_solver_3m(den: DenoiserBase, x: torch.Tensor, grid, *, lower_order_final: bool = True,
                  noise=None, hooks=None) -> torch.Tensor:
    """Multistep DPM-Solver-3 in noise form: eq. 3.6 truncated at ``k = 2`` with ``eps', eps''``
    from the last three evaluations (warm-up as in :func:`dpmpp_3m`)."""
    return _multistep(den, x, grid, hooks, "dpm_solver_3m", 3, lower_order_final,
                      _Taylor(NOISE))


# ----- DPM-Solver++(2M) SDE ----------------------------------------------------------------------
@register("dpmpp_2m_sde", stochastic=True, order=2)
def dpmpp_2m_sde(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None,
                 hooks=None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, App. / Sec. 6): the reverse SDE in data form.

    Variation of constants on ``dx = [f x - g^2 score] dt + g dw`` in ``lambda`` gives the exact
    ``x_s = (sigma_s/sigma_t) e^-h x_t + 2 alpha_s int e^(-2(lambda_s - lambda)) x0 dlambda
    + sigma_s sqrt(1 - e^-2h) z``. With ``x0`` linear in ``lambda`` (slope from the previous
    evaluation) the integral is ``(1 - e^-2h) x0_t + (h - (1 - e^-2h)/2) x0'``. The first-order
    part is DDPM's posterior step (DDIM with ``eta = 1``); the last step to ``t = 0`` returns
    ``x0_hat``.
    """
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    noise = as_noise(noise)
    knots, total = nodes(den.path, times), grid.numel() - 1
    x0_prev = None
    for i in range(len(knots) - 1):
        t, s = knots[i], knots[i + 1]
        h = s.lam - t.lam
        pred = predict(den, x, t.t, hooks)
        one_m = -math.expm1(-2 * h)  # 1 - e^-2h
        drift = (s.alpha * one_m) * pred.x0
        if x0_prev is not None:
            slope = (pred.x0 - x0_prev) / (t.lam - knots[i - 1].lam)
            drift = drift + (s.alpha * (h - 0.5 * one_m)) * slope
        z = noise.randn_like(x)
        x = (s.sigma / t.sigma * math.exp(-h)) * x + drift + (s.sigma * math.sqrt(one_m)) * z
        x0_prev = pred.x0
        x = after_step(hooks, i, total, t.t, s.t, x, pred)
    return finish(den, x, times, to_zero, hooks)


# ----- adaptive step size (Lu et al. 2022, Sec. 3.3 / App. C) ---------------------------------
def _embedded_pair(den, hooks, x, eps, t: Node, s: Node, order: int):
    """Lower- and higher-order results sharing evaluations: DPM-Solver-1 and -2 (``r1 = 1/2``),
    or DPM-Solver-2 (``r1 = 1/3``) and -3. Returns ``(x_low, x_high, evaluations used)``."""
    h = s.lam - t.lam
    if order == 2:
        d1 = _stage(den, hooks, x, eps, t, 0.5 * h)
        return first_order(NOISE, x, t, s, eps), _dpm2_combine(x, eps, d1, t, s, 0.5), 1
    d1 = _stage(den, hooks, x, eps, t, R1 * h)
    x_low = _dpm2_combine(x, eps, d1, t, s, R1)
    return x_low, _dpm3_rest(den, hooks, x, eps, d1, t, s), 2


@register("dpm_adaptive", stochastic=False, order=3, evals_per_step=3)
def dpm_adaptive(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 theta: float = 0.9, max_evals: int = 10_000, noise=None,
                 hooks=None) -> torch.Tensor:
    """Adaptive DPM-Solver-12 (``order=2``) / DPM-Solver-23 (``order=3``) (Lu et al. 2022,
    Sec. 3.3 and App. C, the adaptive-step algorithms).

    Only ``grid[0]`` and the grid's final time are used: the solver integrates from ``grid[0]``
    to ``grid[-1]`` or, when the grid ends at 0, to the path's ``t_min`` followed by the final
    denoising step. Each trial step of size ``h`` (in
    ``lambda``) computes an embedded pair ``x_low, x_high``; with
    ``delta = max(atol, rtol max(|x_low|, |x_t|))`` the error is
    ``E = || (x_high - x_low) / delta ||_2 / sqrt(D)`` (per sample; the batch shares one step
    size, so its largest ``E`` decides). ``E <= 1`` accepts ``x_high``; either way
    ``h <- min(theta h E^(-1/order), remaining)``. ``eps`` at the current point is reused across
    rejected trials. Raises if more than ``max_evals`` evaluations would be needed.
    """
    if order not in (2, 3):
        raise bad_value("order", order, "2 (DPM-Solver-12) or 3 (DPM-Solver-23)")
    for name, v in (("rtol", rtol), ("atol", atol), ("h_init", h_init)):
        if not v > 0:
            raise bad_value(name, v, "a positive number")
    if not 0 < theta <= 1:
        raise bad_value("theta", theta, "a number in (0, 1]")
    path = den.path
    hooks, grid, x, _, to_zero = prepare(den, x, grid, hooks)
    t_end = torch.tensor(path.t_min if to_zero else float(grid[-1]), dtype=torch.float64)
    t, end = nodes(path, grid[:1])[0], nodes(path, t_end[None])[0]
    h, evals, step, pred = min(h_init, end.lam - t.lam), 0, 0, None
    while t.lam < end.lam and h > 0:
        if pred is None:
            pred, evals = predict(den, x, t.t, hooks), evals + 1
        s = end if h >= end.lam - t.lam else node_at(path, t.lam + h)
        x_low, x_high, used = _embedded_pair(den, hooks, x, pred.eps, t, s, order)
        evals += used
        if evals > max_evals:
            raise DifflabError(f"dpm_adaptive needed more than max_evals={max_evals} "
                               f"evaluations: loosen rtol={rtol} / atol={atol}")
        delta = torch.maximum(x_low.abs(), x.abs()).mul(rtol).clamp_min(atol)
        err = float(((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().max())
        if err <= 1.0:
            x, t = _adaptive_step_hook(hooks, step, s.t, x_high, pred), s
            step, pred = step + 1, None
        h = min(theta * h * max(err, 1e-10) ** (-1.0 / order), end.lam - t.lam)
    if to_zero:
        pred = predict(den, x, end.t, hooks)
        x = _adaptive_step_hook(hooks, step, torch.zeros((), dtype=torch.float64), pred.x0, pred)
    return x


def _adaptive_step_hook(hooks: Hooks, i: int, t_next, x, pred: Prediction) -> torch.Tensor:
    """``after_step`` for a solver whose number of steps is unknown in advance (``total=0``)."""
    if hooks.correct_xt is not None and float(t_next) > 0:
        x = hooks.correct_xt(x, torch.as_tensor(t_next, dtype=torch.float64))
    if hooks.callback is not None:
        hooks.callback(StepInfo(i, 0, float(pred.t[0]), float(t_next), x, pred.x0))
    return x
