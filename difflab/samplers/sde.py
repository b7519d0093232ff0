"""Score-SDE samplers: reverse-SDE Euler-Maruyama, reverse diffusion, Langevin, PC, the ODE.

Song et al. 2021 ("Score-Based Generative Modeling through Stochastic Differential Equations").
Every path has an SDE ``dx = f(t) x dt + g(t) dw`` with the same marginals (``path.sde``), whose
reverse is (eq. 6)

    dx = [f x - g^2 grad log p_t(x)] dt + g dw_bar        (time running backwards),

and whose probability-flow ODE is (eq. 13)

    dx/dt = f x - g^2 grad log p_t(x) / 2.

The score is ``Prediction.score = -eps_hat / sigma``. All samplers take a descending grid; a final
``0`` means the last step returns the model's clean-data estimate ``x0_hat`` (the "denoising" step
of Song et al. 2021, App. G, and of NCSNv2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchdiffeq import odeint

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath, expand_like
from difflab.prediction import Prediction
from difflab.samplers.base import (
    Hooks,
    after_step,
    as_hooks,
    check_grid,
    check_x,
    predict,
    register,
)
from difflab.samplers.noise import as_noise

# ----- predictors: one reverse step t -> s > 0 from the prediction at (x, t) --------------------
Predictor = Callable[[GaussianPath, Prediction, torch.Tensor, torch.Tensor, object], torch.Tensor]


def _em_step(path: GaussianPath, pred: Prediction, t, s, noise) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE (eq. 6) with step ``h = t - s``.

    ``x_s = x_t - [f x_t - g^2 score] h + g sqrt(h) z``, coefficients frozen at ``t``.
    """
    f, g2 = (float(c) for c in path.sde(t))
    h = float(t - s)
    x = pred.x_t
    mean = x - (f * x - g2 * pred.score) * h
    return mean + math.sqrt(g2 * h) * noise.randn_like(x)


def _reverse_diffusion_step(path: GaussianPath, pred: Prediction, t, s, noise) -> torch.Tensor:
    """The reverse-diffusion predictor (Song et al. 2021, App. E, eq. 45-47).

    The forward step ``t <- s`` discretised as ``x_t = x_s + F(x_s) + G z`` with
    ``F(x) = (alpha_ts - 1) x`` and ``G^2 = sigma2_ts`` (``path.transition``) is reversed as
    ``x_s = x_t - F(x_t) + G^2 score + G z``; on DDPM's chain this is
    ``(2 - sqrt(1 - beta)) x + beta score + sqrt(beta) z``, on VE ``x + (sigma_t^2 - sigma_s^2)
    score + ...`` (NCSN's reverse).
    """
    a_ts, g2 = (float(c) for c in path.transition(t, s))
    x = pred.x_t
    mean = (2.0 - a_ts) * x + g2 * pred.score
    return mean + math.sqrt(g2) * noise.randn_like(x)


def _ddim_step(path: GaussianPath, pred: Prediction, t, s, noise) -> torch.Tensor:
    """Deterministic DDIM (eq. 12, eta = 0): the first-order probability-flow step."""
    return float(path.alpha(s)) * pred.x0 + float(path.sigma(s)) * pred.eps


def _no_step(path: GaussianPath, pred: Prediction, t, s, noise) -> torch.Tensor:
    return pred.x_t


PREDICTORS: dict[str, Predictor] = {
    "reverse_diffusion": _reverse_diffusion_step,
    "em": _em_step,
    "ddim": _ddim_step,
    "none": _no_step,
}
CORRECTORS = ("langevin", "none")
NORMS = ("batch", "sample")


def _norm(v: torch.Tensor, per: str) -> torch.Tensor:
    n = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    if per == "batch":
        return n.mean()
    return n.reshape(-1, *([1] * (v.ndim - 1)))


def langevin_correct(den: DenoiserBase, x: torch.Tensor, t, *, snr: float, steps: int,
                     alpha: float, noise, hooks: Hooks, step_norm: str = "sample"):
    """Langevin corrector (Song et al. 2021, Algorithm 4 (VE) / 5 (VP)) at time ``t``.

    Each of ``steps`` iterations draws ``z``, sets
    ``eps = 2 alpha (snr ||z|| / ||score||)^2`` and moves
    ``x <- x + eps score(x, t) + sqrt(2 eps) z``. ``alpha`` is ``alpha_i = 1 - beta_i`` of the
    step that reached ``t`` (1 on VE). ``step_norm='sample'`` (default) uses each row's own
    norms, so rows never depend on each other (``PerSampleNoise`` reproducibility whatever the
    batch); in high dimensions both norms concentrate and this is the paper's rule.
    ``'batch'`` uses the batch means of the per-sample norms, as the reference implementation
    does: in a few dimensions the per-row ratio ``||z|| / ||score||`` fluctuates so much that the
    step size becomes position dependent, which biases the stationary law.
    Returns the new ``x`` and the last prediction.
    """
    pred = None
    for _ in range(steps):
        pred = predict(den, x, t, hooks)
        grad = pred.score
        z = noise.randn_like(x)
        eps = 2.0 * alpha * (snr * _norm(z, step_norm) / _norm(grad, step_norm)) ** 2
        x = x + eps * grad + torch.sqrt(2.0 * eps) * z
    return x, pred


def _check_pc_options(predictor: str, corrector: str, n_corrector: int, snr: float,
                      step_norm: str) -> None:
    if predictor not in PREDICTORS:
        raise bad_value("predictor", predictor, "one of " + ", ".join(PREDICTORS))
    if corrector not in CORRECTORS:
        raise bad_value("corrector", corrector, "one of " + ", ".join(CORRECTORS))
    if not isinstance(n_corrector, int) or n_corrector < 0:
        raise bad_value("n_corrector", n_corrector, "an integer >= 0")
    if not snr > 0:
        raise bad_value("snr", snr, "a positive signal-to-noise ratio (0.16 for VE, 0.01-0.17)")
    if step_norm not in NORMS:
        raise bad_value("step_norm", step_norm, "one of " + ", ".join(NORMS))
    if predictor == "none" and (corrector == "none" or n_corrector == 0):
        raise DifflabError(
            "predictor='none' with no corrector steps leaves x unchanged: set corrector="
            "'langevin' and n_corrector >= 1, or choose a predictor"
        )


@register("pc", stochastic=True, order=1, evals_per_step=2)
def pc(den: DenoiserBase, x: torch.Tensor, grid, *, predictor: str = "reverse_diffusion",
       corrector: str = "langevin", n_corrector: int = 1, snr: float = 0.16,
       step_norm: str = "sample", noise=None, hooks=None) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Algorithm 1 / App. G).

    For each step ``t -> s`` of the grid: one predictor step (``reverse_diffusion``, ``em``,
    ``ddim`` or ``none``), then ``n_corrector`` Langevin steps at ``s`` (Algorithm 4/5). The step
    to ``s = 0`` returns ``x0_hat`` instead. ``predictor='none'`` is the corrector-only sampler
    (annealed Langevin dynamics over the grid's levels); ``corrector='none'`` the predictor-only
    one. Evaluations per step: ``1 + n_corrector``.
    """
    _check_pc_options(predictor, corrector, n_corrector, snr, step_norm)
    path, hooks, noise = den.path, as_hooks(hooks), as_noise(noise)
    grid, x = check_grid(grid, path), check_x(x)
    step = PREDICTORS[predictor]
    m = n_corrector if corrector == "langevin" else 0
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        pred = None
        if s == 0:
            pred = predict(den, x, t, hooks)
            x = pred.x0
        else:
            if predictor != "none":  # the corrector-only sampler needs no prediction at t
                pred = predict(den, x, t, hooks)
                x = step(path, pred, t, s, noise)
            if m > 0:
                alpha = float(path.transition(t, s)[0]) ** 2
                x, last = langevin_correct(den, x, s, snr=snr, steps=m, alpha=alpha,
                                           noise=noise, hooks=hooks, step_norm=step_norm)
                pred = last
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


@register("em", stochastic=True, order=1)
def em(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None, hooks=None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6; App. D "Euler-Maruyama").

    ``x_s = x_t + [g^2 score - f x_t] (t - s) + g sqrt(t - s) z``; the step to 0 returns
    ``x0_hat``. Weak order 1 in the step size.
    """
    return pc(den, x, grid, predictor="em", corrector="none", noise=noise, hooks=hooks)


@register("reverse_diffusion", stochastic=True, order=1)
def reverse_diffusion(den: DenoiserBase, x: torch.Tensor, grid, *, noise=None,
                      hooks=None) -> torch.Tensor:
    """The reverse-diffusion predictor alone (Song et al. 2021, App. E, eq. 46-47)."""
    return pc(den, x, grid, predictor="reverse_diffusion", corrector="none", noise=noise,
              hooks=hooks)


@register("langevin", stochastic=True, order=1)
def langevin(den: DenoiserBase, x: torch.Tensor, grid, *, n_corrector: int = 1,
             snr: float = 0.16, step_norm: str = "sample", noise=None,
             hooks=None) -> torch.Tensor:
    """Corrector-only sampling: ``pc`` with ``predictor='none'`` (Song et al. 2021, Table 1 "C").

    ``n_corrector`` Langevin steps at every grid level below the first, then ``x0_hat``.
    """
    return pc(den, x, grid, predictor="none", corrector="langevin", n_corrector=n_corrector,
              snr=snr, step_norm=step_norm, noise=noise, hooks=hooks)


# ----- the probability-flow ODE -----------------------------------------------------------------
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
VARIABLES = ("log_snr", "t")


def flow_drift(pred: Prediction) -> torch.Tensor:
    """Probability-flow drift ``f x - g^2 score / 2`` (Song et al. 2021, eq. 13).

    Equal to ``pred.velocity = d_alpha x0_hat + d_sigma eps_hat`` on every path.
    """
    f, g2 = pred.path.sde(pred.t)
    f = expand_like(f, pred.x_t)
    g2 = expand_like(g2, pred.x_t)
    return f * pred.x_t - 0.5 * g2 * pred.score


class FlowVariable:
    """The integration variable ``u`` of the probability-flow ODE and ``dx/du``.

    ``'t'``: eq. 13 as written. ``'log_snr'``: ``u = lambda = log(alpha / sigma)``, where
    ``dx/dlambda = (d_alpha x0_hat + d_sigma eps_hat) / (dlambda/dt)`` is the same ODE with time
    reparameterised (Kingma et al. 2021, Sec. 4: the flow depends on the schedule only through
    the SNR). On VP paths ``dx/dlambda = alpha sigma^2 x0_hat - sigma alpha^2 eps_hat`` is
    smooth even on DDPM's discrete chain, whose ``beta(t)`` jumps at every step and would force an
    adaptive ``t``-solver into tiny steps.
    """

    def __init__(self, path: GaussianPath, variable: str = "log_snr") -> None:
        if variable not in VARIABLES:
            raise bad_value("variable", variable, "one of " + ", ".join(VARIABLES))
        self.path, self.variable = path, variable

    def u(self, t) -> float:
        return float(t) if self.variable == "t" else 0.5 * float(self.path.log_snr(float(t)))

    def t(self, u: torch.Tensor) -> torch.Tensor:
        u = u.double()
        t = u if self.variable == "t" else self.path.t_from_log_snr(2.0 * u)
        return t.clamp(self.path.t_min, self.path.t_max)

    def drift(self, pred: Prediction) -> torch.Tensor:
        if self.variable == "t":
            return flow_drift(pred)
        path, t = self.path, pred.t
        dlam_dt = path.d_alpha(t) / path.alpha(t) - path.d_sigma(t) / path.sigma(t)
        return pred.velocity / expand_like(dlam_dt, pred.x_t)


def check_method(method: str) -> str:
    """Validate an ODE method name (torchdiffeq's solvers; stochastic samplers are not ODEs)."""
    if method in FIXED_METHODS or method in ADAPTIVE_METHODS:
        return method
    raise bad_value(
        "method", method,
        "a deterministic ODE solver: adaptive " + ", ".join(ADAPTIVE_METHODS)
        + " or fixed-step " + ", ".join(FIXED_METHODS) + " (stochastic samplers such as 'em' "
        "or 'pc' do not define an invertible map)",
    )


def solve_flow(func, y0, u0: float, u1: float, method: str, rtol: float, atol: float):
    """``odeint`` from ``u0`` to ``u1``: one step for fixed-step methods, adaptive otherwise."""
    times = torch.tensor([u0, u1], dtype=torch.float64)
    if method in FIXED_METHODS:
        return odeint(func, y0, times, method=method)
    return odeint(func, y0, times, method=method, rtol=rtol, atol=atol)


@register("ode", stochastic=False, order=4, evals_per_step=4)
def ode(den: DenoiserBase, x: torch.Tensor, grid, *, method: str = "rk4", rtol: float = 1e-5,
        atol: float = 1e-5, variable: str = "log_snr", noise=None, hooks=None) -> torch.Tensor:
    """Probability-flow ODE (Song et al. 2021, eq. 13) solved with ``torchdiffeq.odeint``.

    Fixed-step methods (``rk4``, default; ``euler``, ``midpoint``, ...) take exactly one step
    per grid interval, in ``variable`` (``log_snr``, default, or ``t``: see
    :class:`FlowVariable`): order 4 with 4 evaluations per step for ``rk4``. Adaptive methods
    (``dopri5`` as in Song et al., App. D) integrate each grid interval to ``rtol``/``atol``, so
    ``[t_max, t_min]`` (plus an optional 0) is one adaptive solve; their step sizes are shared by
    the whole batch, so a row's result depends on the other rows at the level of the tolerance.
    The step to ``s = 0`` returns ``x0_hat``. ``noise`` is ignored (deterministic).
    """
    method = check_method(method)
    if not (rtol > 0 and atol > 0):
        raise bad_value("rtol/atol", (rtol, atol), "positive tolerances")
    path, hooks = den.path, as_hooks(hooks)
    grid, x = check_grid(grid, path), check_x(x)
    flow = FlowVariable(path, variable)
    n_batch = x.shape[0]

    def func(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return flow.drift(predict(den, y, flow.t(u).expand(n_batch), hooks))

    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        if s == 0:
            pred = predict(den, x, t, hooks)
            x = pred.x0
        else:
            x = solve_flow(func, x, flow.u(t), flow.u(s), method, rtol, atol)[-1]
            pred = predict(den, x, s, hooks) if hooks.callback is not None else None
        x = after_step(hooks, i, n, t, s, x, pred)
    return x
