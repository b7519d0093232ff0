"""SiT's samplers (Ma et al. 2024, Sec. 2; Albergo & Vanden-Eijnden 2023, stochastic
interpolants): the interpolant's probability-flow ODE and its one-parameter family of SDEs.

On a difflab path ``x_t = alpha_t x0 + sigma_t eps`` (data at ``t = 0``; SiT's code runs its time
the other way, ``tau = 1 - t``) the interpolant's velocity and score are

    v(x, t) = E[d_alpha x0 + d_sigma eps | x_t = x],
    s(x, t) = grad log p_t(x) = -E[eps | x_t = x] / sigma_t,

both read off a denoiser of any parameterization by ``Prediction.velocity`` and
``Prediction.score`` (``difflab/prediction.py`` holds every conversion; SiT's "score from
velocity" and "noise from velocity" are its 2x2 inverse). The marginals solve the continuity
equation ``d p_t / dt = -div(v p_t)``, so

* the ODE ``dx/dt = v(x, t)`` transports ``p_{t_max}`` to the data (SiT's deterministic sampler);
* for every ``w_t >= 0`` the SDE below has the same marginals (SiT's stochastic sampler), and
  ``w_t = g^2(t)`` makes it the score-SDE reverse SDE (Song et al. 2021, eq. 6).

No function here is ever evaluated at ``t = 0``, where the score diverges: grid times other than
the last are ``>= t_min``, and a step that ends at 0 is the last-step rule (or ``x0_hat``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath
from difflab.prediction import Prediction
from difflab.samplers.base import (
    after_step,
    as_hooks,
    check_grid,
    check_x,
    predict,
    register,
)
from difflab.samplers.noise import as_noise
from difflab.samplers.sde import ADAPTIVE_METHODS, solve_flow

# ----- the diffusion coefficient w_t --------------------------------------------------------------
# SiT's reference code parameterises its SDE (in its time tau = 1 - t, noise -> data) as
# dX = [v + D s] dtau + sqrt(2 D) dW, i.e. D = w / 2 in the form used here; each entry below is
# ``w_t = 2 D_t`` for SiT's ``compute_diffusion(form, norm)``, written in difflab's time, so the
# same option values give the same SDE as SiT's sampler.
WForm = Callable[[GaussianPath, float, float], float]
DIFFUSIONS: dict[str, WForm] = {
    "constant": lambda path, t, norm: 2.0 * norm,
    # g^2 = d sigma^2/dt - 2 f sigma^2 (path.sde): the reverse SDE of the score-based model (SBDM)
    "SBDM": lambda path, t, norm: norm * float(path.sde(t)[1]),
    "sigma": lambda path, t, norm: 2.0 * norm * float(path.sigma(t)),
    "linear": lambda path, t, norm: 2.0 * norm * t,  # SiT's norm (1 - tau)
    # SiT's 0.25 (norm cos(pi tau) + 1)^2 with cos(pi tau) = -cos(pi t): 0 at the data end
    "decreasing": lambda path, t, norm: 0.5 * (1.0 - norm * math.cos(math.pi * t)) ** 2,
    "increasing-decreasing": lambda path, t, norm: 2.0 * norm * math.sin(math.pi * t) ** 2,
}
UNIT_TIME_FORMS = ("linear", "decreasing", "increasing-decreasing")  # defined on t in [0, 1]
LAST_STEPS = ("mean", "tweedie", "euler", "none")
FIXED = ("heun", "euler")


def _canonical(value, choices, name: str) -> str:
    if isinstance(value, str):
        for c in choices:
            if value.lower() == c.lower():
                return c
    raise bad_value(name, value, "one of " + ", ".join(repr(c) for c in choices))


def diffusion_fn(path: GaussianPath, diffusion: str = "SBDM",
                 diffusion_norm: float = 1.0) -> Callable[[float], float]:
    """``t -> w_t`` for one of SiT's diffusion forms (validated once, outside the loop).

    ``w_t`` is the coefficient of ``dx = [v - w s / 2] dt + sqrt(w) dW_bar``: ``constant``
    ``2 n``; ``SBDM`` ``n g^2(t)`` (the score-based model's own, making the SDE Song et al.'s
    reverse SDE); ``sigma`` ``2 n sigma_t``; ``linear`` ``2 n t``; ``decreasing``
    ``(1 - n cos(pi t))^2 / 2``; ``increasing-decreasing`` ``2 n sin^2(pi t)``, with
    ``n = diffusion_norm`` (SiT's ``diffusion_norm``; its code's ``D = w / 2``).
    """
    form = _canonical(diffusion, tuple(DIFFUSIONS), "diffusion")
    if isinstance(diffusion_norm, bool) or not isinstance(diffusion_norm, int | float) or \
            not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
        raise bad_value("diffusion_norm", diffusion_norm,
                        "a finite number >= 0 (the scale of w_t; 0 gives the ODE)")
    if form in UNIT_TIME_FORMS and path.t_max > 1.0:
        raise DifflabError(
            f"diffusion={form!r} is defined on SiT's time range t in [0, 1], but {path!r} runs "
            f"to t_max={path.t_max:g}: use diffusion='SBDM', 'sigma' or 'constant' on this path"
        )
    fn, norm = DIFFUSIONS[form], float(diffusion_norm)
    return lambda t: fn(path, float(t), norm)


def sde_drift(pred: Prediction, w: float) -> torch.Tensor:
    """``v(x, t) - w_t s(x, t) / 2``: the drift of SiT's SDE in difflab's time."""
    return pred.velocity - (0.5 * w) * pred.score


# ----- the probability-flow ODE -------------------------------------------------------------------
def _fixed_step(den, hooks, x, t, s, method: str):
    """Euler, or Heun's trapezoidal rule (SiT's fixed-step ODE sampler) from ``t`` to ``s > 0``:
    ``x' = x + (s - t) v(x, t)``, then ``x_s = x + (s - t) (v(x, t) + v(x', s)) / 2``."""
    pred = predict(den, x, t, hooks)
    d = pred.velocity
    x_euler = x + float(s - t) * d
    if method == "euler":
        return x_euler, pred
    d2 = predict(den, x_euler, s, hooks).velocity
    return x + float(s - t) * 0.5 * (d + d2), pred


@register("sit_ode", stochastic=False, order=2, evals_per_step=2)
def sit_ode(den: DenoiserBase, x: torch.Tensor, grid, *, method: str = "heun",
            rtol: float = 1e-3, atol: float = 1e-6, noise=None, hooks=None) -> torch.Tensor:
    """SiT's ODE sampler: ``dx/dt = v(x, t)`` (Ma et al. 2024, Sec. 2.2) with Heun's method.

    ``method='heun'`` (default, second order, 2 evaluations per step) or ``'euler'`` take one
    step per grid interval; an adaptive torchdiffeq method (``'dopri5'``, SiT's reference default,
    or ``dopri8``, ``bosh3``, ``adaptive_heun``, ``fehlberg2``) integrates each interval to
    ``rtol``/``atol`` (SiT's defaults 1e-3 / 1e-6), with steps shared by the batch. The velocity
    comes from any parameterization through ``Prediction.velocity``. A step to ``t = 0`` returns
    ``x0_hat`` (on the Linear path this is exactly the Euler step). ``noise`` is ignored.
    """
    method = _canonical(method, FIXED + ADAPTIVE_METHODS, "method")
    if not (isinstance(rtol, int | float) and isinstance(atol, int | float) and rtol > 0
            and atol > 0):
        raise bad_value("rtol/atol", (rtol, atol), "positive tolerances")
    path, hooks = den.path, as_hooks(hooks)
    grid, x = check_grid(grid, path), check_x(x)
    n_batch, n = x.shape[0], grid.numel() - 1

    def func(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = u.double().clamp(path.t_min, path.t_max).expand(n_batch)
        return predict(den, y, t, hooks).velocity

    for i in range(n):
        t, s = grid[i], grid[i + 1]
        if s == 0:
            pred = predict(den, x, t, hooks)
            x = pred.x0
        elif method in FIXED:
            x, pred = _fixed_step(den, hooks, x, t, s, method)
        else:
            x = solve_flow(func, x, float(t), float(s), method, float(rtol), float(atol))[-1]
            pred = predict(den, x, s, hooks) if hooks.callback is not None else None
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


# ----- the SDE ------------------------------------------------------------------------------------
def _last_rule(last_step) -> str:
    if last_step is None:
        return "none"
    return _canonical(last_step, LAST_STEPS, "last_step")


def _split_last(grid: torch.Tensor, path: GaussianPath, h) -> torch.Tensor:
    """The grid with its last step replaced by one of size ``h``: nodes in ``(end, end + h]`` are
    dropped and ``end + h`` inserted (SiT's ``last_step_size``)."""
    end = float(grid[-1])
    cut = end + float(h)
    if not cut < float(grid[0]):
        raise DifflabError(
            f"last_step_size={h:g} does not fit the grid: its last step would start at "
            f"t={cut:g}, at or above the grid's first time {float(grid[0]):g}"
        )
    if cut < path.t_min:
        raise DifflabError(
            f"last_step_size={h:g} makes the last step start at t={cut:g}, below t_min="
            f"{path.t_min:g} of {path!r}: use a last_step_size of at least {path.t_min - end:g}"
        )
    head = grid[:-1][grid[:-1] > cut]
    return torch.cat([head, torch.tensor([cut, end], dtype=torch.float64)])


def _check_last_step_size(rule: str, h) -> None:
    if h is None:
        return
    if isinstance(h, bool) or not isinstance(h, int | float) or not 0 < h < 1:
        raise bad_value("last_step_size", h,
                        "None (the grid's own last step) or a step size in (0, 1)")
    if rule == "none":
        raise DifflabError(
            f"last_step_size={h:g} needs a last-step rule: set last_step to 'mean', 'tweedie' "
            "or 'euler', or leave last_step_size=None"
        )


@register("sit_sde", stochastic=True, order=1)
def sit_sde(den: DenoiserBase, x: torch.Tensor, grid, *, diffusion: str = "SBDM",
            diffusion_norm: float = 1.0, last_step: str | None = "mean",
            last_step_size: float | None = None, noise=None, hooks=None) -> torch.Tensor:
    """SiT's SDE sampler: Euler-Maruyama on ``dx = [v - w_t s / 2] dt + sqrt(w_t) dW_bar``.

    Derivation (Ma et al. 2024, Sec. 2.2-2.3; Albergo & Vanden-Eijnden 2023). Since
    ``div(s p) = Laplacian p``, the continuity equation ``dp/dt = -div(v p)`` can be written
    ``dp/dt = -div((v + w s / 2) p) + (w / 2) Laplacian p`` for any ``w_t >= 0``: the
    Fokker-Planck equation of the forward (data -> noise) SDE
    ``dx = [v + w s / 2] dt + sqrt(w) dW``, whose generator has diffusion matrix ``w I``. Its
    time reversal (Anderson 1982) keeps the diffusion and subtracts ``w s`` from the drift:
    ``dx = [v - w s / 2] dt + sqrt(w) dW_bar`` with ``dt < 0``. A step from ``t`` to ``s < t``,
    ``h = t - s``, moves ``dt = -h`` and adds a reverse Brownian increment of variance ``h``:

        x_s = x_t - h [v(x_t, t) - w_t s(x_t, t) / 2] + sqrt(w_t h) z,     z ~ N(0, I).

    The noise is ``sqrt(w h)``, not ``sqrt(2 w h)``: the ``sqrt(2 D dt)`` of SiT's code goes with
    its drift ``v + D s``, i.e. ``D = w / 2`` (one step's variance is checked exactly in the
    tests). With ``w = g^2`` (``diffusion='SBDM'``) the drift is ``f x - g^2 s``, the reverse SDE
    of Song et al. 2021 (eq. 6), and this equals the ``em`` sampler.

    ``diffusion``/``diffusion_norm`` choose ``w_t`` (:func:`diffusion_fn`; SiT's forms, default
    SBDM). The grid's last step uses ``last_step`` (SiT's last-step rule, default ``'mean'``):
    ``'mean'`` the noiseless step ``x - h [v - w s / 2]``, ``'euler'`` the ODE step ``x - h v``,
    ``'tweedie'`` Tweedie's ``x0_hat = (x + sigma^2 s) / alpha``, ``'none'`` (or None) an
    ordinary step, ``x0_hat`` on a step to ``t = 0``. ``last_step_size`` (in (0, 1)) makes that
    last step end at the grid's last time and start ``last_step_size`` above it (grid nodes in
    between are dropped; default None: the grid's own last step). One evaluation per step.
    """
    rule = _last_rule(last_step)
    _check_last_step_size(rule, last_step_size)
    path, hooks, noise = den.path, as_hooks(hooks), as_noise(noise)
    grid, x = check_grid(grid, path), check_x(x)
    w_of = diffusion_fn(path, diffusion, diffusion_norm)
    if last_step_size is not None:
        grid = _split_last(grid, path, last_step_size)
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        pred = predict(den, x, t, hooks)
        h, w = float(t - s), w_of(t)
        if i == n - 1 and rule != "none":
            x = _LAST[rule](pred, h, w)
        elif s == 0:
            x = pred.x0
        else:
            x = x - h * sde_drift(pred, w) + math.sqrt(w * h) * noise.randn_like(x)
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


_LAST: dict[str, Callable[[Prediction, float, float], torch.Tensor]] = {
    "mean": lambda pred, h, w: pred.x_t - h * sde_drift(pred, w),
    "euler": lambda pred, h, w: pred.x_t - h * pred.velocity,
    "tweedie": lambda pred, h, w: pred.x0,
}
