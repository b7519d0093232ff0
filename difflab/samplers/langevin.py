"""NCSN's annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1; NCSNv2, Song & Ermon 2020).

The noise levels are the grid's ``sigma~_i = path.sigma_ve(t_i) = sigma_i / alpha_i``. On a path
with ``alpha != 1`` the chain runs on ``y = x / alpha``, whose marginal at level ``i`` is the data
convolved with ``N(0, sigma~_i^2 I)`` exactly as in NCSN, with score
``grad_y log p = -eps_hat(alpha_i y, t_i) / sigma~_i``; on VE and EDM paths ``y = x``.
"""

from __future__ import annotations

import math

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import bad_value
from difflab.samplers.base import after_step, as_hooks, check_grid, check_x, predict, register
from difflab.samplers.noise import as_noise

# NCSNv2's CIFAR-10 setting: step_lr = 6.2e-6 with sigma_L = 0.01, i.e. eps / sigma_L^2 = 0.062.
DEFAULT_STEP_RATIO = 6.2e-6 / 0.01**2


def _check(n_steps_each: int, step_lr: float | None) -> None:
    if not isinstance(n_steps_each, int) or n_steps_each < 1:
        raise bad_value("n_steps_each", n_steps_each, "a positive integer")
    if step_lr is not None and not step_lr > 0:
        raise bad_value("step_lr", step_lr, "a positive step size epsilon, or None")


@register("annealed_langevin", stochastic=True, order=1, evals_per_step=5)
def annealed_langevin(den: DenoiserBase, x: torch.Tensor, grid, *, n_steps_each: int = 5,
                      step_lr: float | None = None, noise=None, hooks=None) -> torch.Tensor:
    """Annealed Langevin dynamics over the grid's noise levels.

    Song & Ermon 2019, Algorithm 1. Step ``i`` of the grid (``t_i -> t_{i+1}``) hands the state
    to the next level ``sigma~_{i+1}`` and runs ``n_steps_each`` Langevin steps there,

        y <- y + (alpha_i / 2) s(y, sigma~) + sqrt(alpha_i) z,

    ``alpha_i = step_lr sigma~^2 / sigma~_L^2`` with ``sigma~_L`` the smallest positive level.
    ``x_init`` is a sample of the prior at ``t_0 = t_max``, so the first level needs no Langevin
    steps (NCSN starts from uniform noise instead). A final step to ``t = 0`` is NCSNv2's
    denoising step (Song & Ermon 2020, Sec. 4 / App. C): ``y + sigma~_L^2 s(y, sigma~_L)``,
    which is Tweedie's ``x0_hat`` at the last level. Without it the state is returned at the last
    grid time (``x = alpha y``).

    Args:
        n_steps_each: Langevin steps per level (NCSN: 100; NCSNv2: 5). Evaluations per grid
            step: ``n_steps_each`` (1 for the denoising step).
        step_lr: ``epsilon``; ``None`` uses ``0.062 sigma~_L^2`` (NCSNv2's CIFAR-10 ratio
            ``6.2e-6 / 0.01^2``), a fixed fraction of each level's variance on any path.
    """
    _check(n_steps_each, step_lr)
    path, hooks, noise = den.path, as_hooks(hooks), as_noise(noise)
    grid, x = check_grid(grid, path), check_x(x)
    sig = path.sigma_ve(grid[grid > 0])  # float64, the levels
    sig_last = float(sig[-1])
    eps = DEFAULT_STEP_RATIO * sig_last**2 if step_lr is None else float(step_lr)
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        if s == 0:  # the denoising step at the last level
            pred = predict(den, x, t, hooks)
            x = after_step(hooks, i, n, t, s, pred.x0, pred)
            continue
        a_t, a_s, s_i = float(path.alpha(t)), float(path.alpha(s)), float(sig[i + 1])
        y = x / a_t
        step = eps * s_i * s_i / (sig_last * sig_last)
        for _ in range(n_steps_each):
            pred = predict(den, a_s * y, s, hooks)
            score_y = -pred.eps / s_i
            y = y + 0.5 * step * score_y + math.sqrt(step) * noise.randn_like(y)
        x = after_step(hooks, i, n, t, s, a_s * y, pred)
    return x
