"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
tAB-DEIS, rhoAB-DEIS and iPNDM.

All three integrate DDIM's ODE in the noise form (DDIM eq. 14, with ``rho = sigma / alpha``;
DEIS writes it with its own time variable),

    d(x / alpha) = eps(x, t) d rho,

exactly against ``d rho`` for a polynomial extrapolation of ``eps`` through the last ``k``
evaluations (Adams-Bashforth), and differ only in the variable the polynomial is written in:

* ``deis`` (tAB-DEIS, eq. 15): a Lagrange polynomial in the path's own time ``t``. Step ``i``
  is ``x_(i+1) / alpha_(i+1) = x_i / alpha_i + sum_j C_ij eps_(i-j)`` with
  ``C_ij = int_(t_i)^(t_(i+1)) L_j(tau) rho'(tau) d tau``. We integrate by parts,
  ``C_ij = [L_j rho]_(t_i)^(t_(i+1)) - int L_j'(tau) rho(tau) d tau``, and use 16-point
  Gauss-Legendre for the remaining integral: only ``rho = path.sigma_ve`` is needed (no
  derivative of the schedule), the integrand stays continuous on discrete-time paths whose
  ``rho'`` jumps at every knot, and order 1 (``L_0 = 1``) is DDIM exactly. tAB depends on how the
  path is parameterised in time: on EDM's path (``t = sigma = rho``) it is rhoAB.
* ``deis`` with ``mode="rhoab"`` (rhoAB-DEIS): the polynomial in ``rho``, whose
  integral is the classical variable-step Adams-Bashforth rule; with order 4 this is ``ipndm_v``.
* ``ipndm`` (iPNDM, the "improved PNDM" of the DEIS paper): PNDM's pseudo linear multistep
  method (PNDM eq. 12) with a lower-order multistep warm start instead of PNDM's Runge-Kutta
  warm-up: Adams-Bashforth of orders 1, 2, 3 and then 4 with the fixed uniform-step weights
  ``1; (3, -1)/2; (23, -16, 5)/12; (55, -59, 37, -9)/24``, one evaluation per step (as
  ``sample_ipndm`` in ComfyUI's k-diffusion, from zju-pi/diff-sampler). These weights are exact
  only on a grid uniform in ``rho``; ``ipndm_v`` uses the exact variable-step weights in ``rho``
  (:func:`difflab.samplers.pndm.adams_bashforth_weights`) and equals ``ipndm`` on such a grid.
  (The ``sample_ipndm_v`` of those peers has the same order-2 weights, but its order-3 and 4
  weights do not integrate quadratics exactly on non-uniform grids, so it differs from ours.)

diffusers' ``DEISMultistepScheduler`` (``solver_type="logrho"``) is the same construction with
the polynomial in ``log rho``: on a path whose ``log rho`` is affine in ``t`` it is tAB.

Every step moves with PNDM's transfer (:func:`difflab.samplers.pndm.transfer`, the DDIM step)
with the effective noise ``eps' = sum_j C_ij eps_(i-j) / (rho_(i+1) - rho_i)``. The warm start
(order ``min(i + 1, order)`` at step ``i``) has local errors ``O(h^2), O(h^3), ...``: from the
prior they are negligible (``eps`` hardly moves at high noise) and the observed order is the main
formula's; started inside the trajectory the first-order first step caps the global order at 2
(``tests/samplers/test_solver_orders.py``). A grid ending at 0 returns ``x0_hat`` at its
last positive time (one more evaluation), so ``n`` positive steps cost ``n`` evaluations plus 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.paths.base import GaussianPath
from difflab.samplers.base import after_step, predict, register
from difflab.samplers.exponential import Node, finish, nodes, prepare, warn_fallback
from difflab.samplers.pndm import _linear_multistep, transfer

# iPNDM's fixed Adams-Bashforth weights, newest evaluation first (PNDM eq. 12 for order 4)
IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
QUADRATURE_POINTS = 16
_gl_nodes, _gl_weights = np.polynomial.legendre.leggauss(QUADRATURE_POINTS)
_GL_U, _GL_W = 0.5 * (_gl_nodes + 1.0), 0.5 * _gl_weights  # Gauss-Legendre on [0, 1]
DEIS_MODES = ("tab", "rhoab")

History = list[tuple[Node, torch.Tensor]]  # (node, eps at that node), newest last
Step = Callable[[torch.Tensor, History, Node, Node], torch.Tensor]


def tab_coefficients(path: GaussianPath, ts: list[float], t_next: float, rho_t: float,
                     rho_next: float) -> list[float]:
    """tAB-DEIS's ``C_ij`` (DEIS eq. 15) for the step from ``ts[0]`` to ``t_next``.

    ``ts`` are the times of the last evaluations, newest first; ``C_j`` is the integral of the
    Lagrange basis polynomial ``L_j`` (in ``t``, through ``ts``) against ``d rho`` over the step,
    ``rho_t = rho(ts[0])`` and ``rho_next = rho(t_next)``. With ``u = (tau - ts[0]) / (t_next -
    ts[0])`` and integration by parts, ``C_j = L_j(u=1) rho_next - [j = 0] rho_t -
    int_0^1 (dL_j/du) rho(tau(u)) du``; the integral by Gauss-Legendre.
    """
    delta = t_next - ts[0]
    if len(ts) == 1:  # L_0 = 1: C_0 = rho_next - rho_t, DDIM's step, without quadrature
        return [rho_next - rho_t]
    u = (np.asarray(ts, dtype=np.float64) - ts[0]) / delta
    k = len(ts)
    # power coefficients of the Lagrange basis: V A = I with V[i, p] = u_i^p, so column j of A
    # holds L_j's coefficients (increasing powers)
    a = np.linalg.inv(np.vander(u, k, increasing=True))
    powers = np.arange(1, k)
    dbasis = (_GL_U[:, None] ** (powers - 1)[None, :] * powers) @ a[1:]  # L_j'(u_q), (Q, k)
    rho_q = path.sigma_ve(torch.as_tensor(ts[0] + delta * _GL_U, dtype=torch.float64)).numpy()
    integrals = _GL_W @ (dbasis * rho_q[:, None])  # int_0^1 L_j'(u) rho(tau(u)) du
    at_one = a.sum(0)  # L_j(1)
    return [float(at_one[j] * rho_next - (rho_t if j == 0 else 0.0) - integrals[j])
            for j in range(k)]


def _weighted(hist: History, weights) -> torch.Tensor:
    """``sum_j w_j eps_j`` with ``weights`` newest first."""
    return sum(w * e for w, (_, e) in zip(weights, hist[::-1]))


def _ipndm_step(x, hist: History, t: Node, s: Node):
    return transfer(x, _weighted(hist, IPNDM_WEIGHTS[len(hist)]), t, s)


def _rho_ab_step(x, hist: History, t: Node, s: Node):
    return _linear_multistep(x, [(n.rho, e) for n, e in hist], t, s)


def _t_ab_step(path: GaussianPath) -> Step:
    def step(x, hist: History, t: Node, s: Node):
        ts = [float(n.t) for n, _ in hist[::-1]]
        coefs = tab_coefficients(path, ts, float(s.t), t.rho, s.rho)
        return transfer(x, _weighted(hist, [c / (s.rho - t.rho) for c in coefs]), t, s)

    return step


def _noise_multistep(den: DenoiserBase, x, grid, hooks, name: str, order: int,
                     step: Step) -> torch.Tensor:
    """The shared loop: one evaluation per step, Adams-Bashforth of order ``min(i + 1, order)``
    at step ``i`` from the history of noise estimates (the lower-order warm start)."""
    hooks, grid, x, times, to_zero = prepare(den, x, grid, hooks)
    knots, total = nodes(den.path, times), grid.numel() - 1
    n = len(knots) - 1
    if n < order:
        warn_fallback(name, total, n, order)
    hist: History = []
    for i in range(n):
        t, s = knots[i], knots[i + 1]
        pred = predict(den, x, t.t, hooks)
        hist = [*hist, (t, pred.eps)][-order:]
        x = after_step(hooks, i, total, t.t, s.t, step(x, hist, t, s), pred)
    return finish(den, x, times, to_zero, hooks)


@register("ipndm", stochastic=False, order=4)
def ipndm(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None, hooks=None) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023, the "improved PNDM" of the DEIS paper): PNDM's pseudo linear
    multistep method (PNDM eq. 12) with the fixed Adams-Bashforth weights of orders 1, 2, 3, then
    4 as a warm start; one evaluation per step (``n + 1`` on a grid ending at 0).

    The fixed weights are the uniform-step ones: fourth order on grids uniform in ``rho =
    sigma / alpha``; on grids whose step ratios tend to 1 but are not 1 (log-SNR, Karras) they
    miss the second-order condition by ``O(h)`` and the method is second order (``ipndm_v``
    keeps the fourth). At few steps it is often the more accurate of the two."""
    return _noise_multistep(den, x, grid, hooks, "ipndm", 4, _ipndm_step)


@register("ipndm_v", stochastic=False, order=4)
def ipndm_v(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None,
            hooks=None) -> torch.Tensor:
    """iPNDM with variable-step weights (Zhang & Chen 2023): Adams-Bashforth of orders 1, 2, 3,
    then 4 in ``rho = sigma / alpha`` on any grid (rhoAB-DEIS of order 4; equal to ``ipndm`` on
    a grid uniform in ``rho``); one evaluation per step (``n + 1`` on a grid ending at 0)."""
    return _noise_multistep(den, x, grid, hooks, "ipndm_v", 4, _rho_ab_step)


@register("deis", stochastic=False, order=3)
def deis(den: DenoiserBase, x: torch.Tensor, grid, *, order: int = 3, mode: str = "tab",
         noise=None, hooks=None) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023, ICLR): the exponential integrator of ``d(x / alpha) = eps d rho``
    with ``eps`` extrapolated by the Lagrange polynomial through the last ``order`` evaluations.

    ``mode="tab"`` (tAB-DEIS, eq. 15): the polynomial in the path's time ``t``, integrated against
    ``d rho`` by parts and 16-point Gauss-Legendre; ``mode="rhoab"``: the polynomial in ``rho``
    (exact Adams-Bashforth weights). ``order`` 1 to 3 with a lower-order warm start; order 1 is
    DDIM. One evaluation per step (``n + 1`` on a grid ending at 0)."""
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise bad_value("order", order, "1, 2 or 3 (option of sampler 'deis')")
    if mode not in DEIS_MODES:
        raise bad_value("mode", mode, "one of " + ", ".join(DEIS_MODES)
                        + " (option of sampler 'deis')")
    step = _t_ab_step(den.path) if mode == "tab" else _rho_ab_step
    return _noise_multistep(den, x, grid, hooks, "deis", order, step)
