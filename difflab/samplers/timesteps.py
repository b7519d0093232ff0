"""Time grids: descending float64 tensors of times, optionally ending at 0 (the data end).

The number of network evaluations of a one-evaluation-per-step sampler is ``len(grid) - 1``.
A final 0 means the last step returns the model's clean-data estimate (DDPM's last step,
k-diffusion's ``sigma = 0``); ``to_zero=False`` stops at ``t_end`` instead.
"""

from __future__ import annotations

import torch

from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath
from difflab.paths.vp import DiscreteVP


def _ends(path: GaussianPath, t_start, t_end) -> tuple[float, float]:
    t0 = path.t_max if t_start is None else float(t_start)
    t1 = path.t_min if t_end is None else float(t_end)
    if not t0 > t1:
        raise DifflabError(f"t_start={t0} must be greater than t_end={t1}")
    return t0, t1


def _finish(path: GaussianPath, t: torch.Tensor, to_zero: bool) -> torch.Tensor:
    t = t.double().clamp(path.t_min, path.t_max)
    t = torch.unique_consecutive(t)
    if to_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return t


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise bad_value("steps", steps, "a positive integer")


def uniform(path: GaussianPath, steps: int, t_start=None, t_end=None, to_zero=True):
    """Uniform in ``t`` (DDIM's "uniform" skip; Song et al. 2021)."""
    _check_steps(steps)
    t0, t1 = _ends(path, t_start, t_end)
    n = steps if to_zero else steps + 1
    return _finish(path, torch.linspace(t0, t1, n, dtype=torch.float64), to_zero)


def quadratic(path: GaussianPath, steps: int, t_start=None, t_end=None, to_zero=True):
    """Quadratic in ``t`` (DDIM Appendix D.2): denser near the data."""
    _check_steps(steps)
    t0, t1 = _ends(path, t_start, t_end)
    n = steps if to_zero else steps + 1
    u = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    return _finish(path, t1 + (t0 - t1) * u * u, to_zero)


def _from_finite_start(path: GaussianPath, t0: float, t1: float, n: int, spaced) -> torch.Tensor:
    """``spaced(t0, t1, n)`` (``n`` times from ``t0`` to ``t1``), except at zero terminal SNR:
    log-SNR and sigma are infinite at ``alpha(t0) = 0``, so the grid's first step goes from
    ``t0`` to the last finite time ``path.t_max_finite`` and the other ``n - 1`` are spaced from
    there (the trailing-timestep idea of Lin et al. 2024, Sec. 3.3, for continuous spacings)."""
    if t0 <= path.t_max_finite or n == 1:
        return spaced(t0, t1, n) if n > 1 or t0 <= path.t_max_finite else \
            torch.tensor([t0], dtype=torch.float64)
    t0f = path.t_max_finite
    if not t0f > t1:
        raise DifflabError(f"t_end={t1} must be below the last finite-SNR time {t0f:g}")
    rest = spaced(t0f, t1, n - 1) if n > 2 else torch.tensor([t1], dtype=torch.float64)
    return torch.cat([torch.tensor([t0], dtype=torch.float64), rest])


def log_snr(path: GaussianPath, steps: int, t_start=None, t_end=None, to_zero=True):
    """Uniform in log-SNR (DPM-Solver's recommended "logSNR" spacing, Lu et al. 2022, Sec. 3.3)."""
    _check_steps(steps)
    t0, t1 = _ends(path, t_start, t_end)
    n = steps if to_zero else steps + 1

    def spaced(a: float, b: float, m: int) -> torch.Tensor:
        lam = torch.linspace(float(path.log_snr(a)), float(path.log_snr(b)), m,
                             dtype=torch.float64)
        t = path.t_from_log_snr(lam)
        t[-1], t[0] = b, a  # in this order: a one-step grid (m = 1) must start at a
        return t

    return _finish(path, _from_finite_start(path, t0, t1, n, spaced), to_zero)


def karras(path: GaussianPath, steps: int, rho: float = 7.0, t_start=None, t_end=None,
           to_zero=True):
    """EDM's grid (Karras et al. 2022, eq. 5) in ``sigma~ = sigma / alpha``, mapped to ``t``."""
    _check_steps(steps)
    t0, t1 = _ends(path, t_start, t_end)
    n = steps if to_zero else steps + 1

    def spaced(a: float, b: float, m: int) -> torch.Tensor:
        s_max = float(path.sigma_ve(a)) ** (1 / rho)
        s_min = float(path.sigma_ve(b)) ** (1 / rho)
        u = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
        sig = (s_max + u * (s_min - s_max)) ** rho
        t = path.t_from_sigma_ve(sig)
        t[-1], t[0] = b, a  # in this order: a one-step grid (m = 1) must start at a
        return t

    return _finish(path, _from_finite_start(path, t0, t1, n, spaced), to_zero)


SPACINGS = ("leading", "trailing", "linspace")


def discrete(path: GaussianPath, steps: int, spacing: str = "leading", to_zero=True,
             steps_offset: int = 0, final: str = "zero"):
    """A subset of a discrete path's own steps (DDIM respacing; Lin et al. 2024, Table 2).

    ``leading``: ``0, k, 2k, ...`` with ``k = N // steps`` (DDIM's original code);
    ``trailing``: ``N-1, N-1-N/steps, ...`` (starts at the last step: zero terminal SNR fix);
    ``linspace``: ``round(linspace(0, N-1, steps))``.

    ``steps_offset`` shifts every step up (Stable Diffusion's schedulers use 1 with
    ``leading``: ``981, 961, ..., 1`` for 50 steps). ``final``: where the last step lands:
    ``"zero"`` (t = 0, alpha = 1: clean data) or ``"first"`` (the path's first step,
    ``alpha_bar_0``: diffusers' ``set_alpha_to_one=False``, as SD's DDIM and PNDM configs set).
    """
    _check_steps(steps)
    if not isinstance(path, DiscreteVP):
        raise DifflabError(
            f"timesteps.discrete needs a discrete path (VP.discrete*), got {path!r}: "
            "use uniform, log_snr or karras for continuous paths"
        )
    if final not in FINALS:
        raise bad_value("final", final, " or ".join(FINALS))
    N = path.N
    if steps > N:
        raise bad_value("steps", steps, f"at most the path's {N} steps")
    if spacing == "leading":
        idx = torch.arange(steps, dtype=torch.float64) * (N // steps)
    elif spacing == "trailing":
        idx = torch.round(torch.arange(N, 0, -N / steps, dtype=torch.float64)) - 1
    elif spacing == "linspace":
        idx = torch.round(torch.linspace(0, N - 1, steps, dtype=torch.float64))
    else:
        raise bad_value("spacing", spacing, "one of " + ", ".join(SPACINGS))
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise bad_value("steps_offset", steps_offset, "an int >= 0")
    idx = torch.sort(idx, descending=True).values + steps_offset
    if float(idx[0]) > N - 1:
        raise bad_value("steps_offset", steps_offset, f"an offset that keeps the first step "
                        f"within the path's {N} steps (it reaches {int(idx[0])})")
    t = (idx + 1) / N
    if final == "first" and to_zero:
        return torch.unique_consecutive(torch.cat([_finish(path, t, False),
                                                   t.new_tensor([1.0 / N])]))
    return _finish(path, t, to_zero)


FINALS = ("zero", "first")


def grid_from(grid: torch.Tensor, t0: float) -> torch.Tensor:
    """Truncate a grid to start at ``t0`` (SDEdit, DiffPure): ``[t0] + [t in grid if t < t0]``."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if not float(grid[-1]) < t0:
        raise DifflabError(f"t0={t0} must be above the grid's last time {float(grid[-1])}")
    return torch.cat([grid.new_tensor([t0]), grid[grid < t0]])


def custom(path: GaussianPath, steps: int | None = None, times=None) -> torch.Tensor:
    """A grid given time by time (``times``: descending, within ``[t_min, t_max]``, optionally
    ending at 0), as ``difflab tune-grid`` saves them; ``steps``, when given, must be
    ``len(times) - 1``."""
    if times is None:
        raise DifflabError("the custom grid needs its times: grid_options={'times': [...]} "
                           "(--grid-option times=[1.0,0.5,0.0])")
    try:
        t = torch.as_tensor(times, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise bad_value("times", times, "a list of numbers") from e
    if t.numel() < 2:
        raise bad_value("times", times, "at least two times (one step)")
    if steps is not None and steps != t.numel() - 1:
        raise DifflabError(f"the custom grid has {t.numel() - 1} steps, but steps={steps} was "
                           "asked for")
    if not bool(torch.isfinite(t).all()) or not bool((t[1:] < t[:-1]).all()):
        raise bad_value("times", times, "finite, strictly descending times")
    pos = t[:-1] if float(t[-1]) == 0.0 else t
    lo, hi = float(pos.min()), float(pos.max())
    eps = 1e-12
    if lo < path.t_min - eps or hi > path.t_max + eps:
        raise bad_value("times", times, f"times within the path's [{path.t_min}, {path.t_max}] "
                        "(and optionally a final 0)")
    return t


TUNED = "tuned"  # a run's own grid from difflab tune-grid (difflab.grid_tuning), not a formula

GRIDS = {"uniform": uniform, "quadratic": quadratic, "log_snr": log_snr, "karras": karras,
         "discrete": discrete, "custom": custom}


def make_grid(name: str, path: GaussianPath, steps: int, **kwargs) -> torch.Tensor:
    """Build a grid by name (for configs and the CLI)."""
    if name not in GRIDS:
        raise bad_value("grid", name, "one of " + ", ".join(GRIDS))
    return GRIDS[name](path, steps, **kwargs)
