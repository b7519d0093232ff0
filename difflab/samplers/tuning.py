"""Time grids tuned to one model, sampler and budget.

Every fixed grid (uniform, log-SNR, Karras, DDPM's steps) is a guess about where a solver's
error is made. For a given network the answer can be measured: solve the probability-flow ODE
for a batch of starting noises very accurately once (the reference), then move the grid's
interior times so that the sampler's outputs, with that budget, land as close to the
reference as possible. This is what :func:`tune_grid` does.

Why this objective, and not Align Your Steps' or GITS': Align Your Steps (Sabour et al. 2024)
minimises an upper bound on the KL divergence between the discretised and the exact SDE,
derived for stochastic first-order solvers, and applies the grid to other solvers unchanged.
GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling") runs a
dynamic programme over the local errors of one-step moves between teacher-trajectory points,
which decomposes only for single-step solvers: a multistep solver's step depends on the
history that the rest of the grid produced. Here the quantity minimised is the one the
sampler is judged by (its end-to-end deviation from the exact ODE solution), for any sampler
including multistep and corrector ones, at the cost of one sampler run per trial grid.

The search. The grid's first time (the prior) and its end (``t_end``, or the final step to 0)
stay fixed; each interior time is a coordinate in half log-SNR ``lambda``, so a move keeps the
grid ordered by construction: a trial moves one time a fraction ``f`` of the way towards a
neighbour, repeated while it lowers the error. Passes over all interior times repeat at one
``f`` until a pass gains nothing, then ``f`` halves (``1/2, 1/4, ...``): a pattern search
(Hooke & Jeeves 1961) that keeps the grid ordered. It starts
from the best of the fixed grids, so the result is never worse than the best fixed grid on the
tuning noises; the reported numbers are measured on held-out noises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath

Solve = Callable[[torch.Tensor], torch.Tensor]
MAX_PASSES = 4  # passes over the grid at one step size
MAX_REPEATS = 4  # successive moves of one time in one direction within a pass


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over every element (float64)."""
    return float(torch.sqrt(torch.mean((a.double() - b.double()) ** 2)))


def sample_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean over samples (rows) of each sample's RMS difference (float64): what the search
    minimises. Unlike the RMS over the whole batch it is not dominated by the rare sample
    whose exact trajectory runs along a boundary between two modes, and which a small error
    sends to the other mode (its error is then the distance between the modes); such samples
    still count, in proportion to their number."""
    per = ((a.double() - b.double()) ** 2).reshape(a.shape[0], -1).mean(1).sqrt()
    return float(per.mean())


@dataclass
class TuneResult:
    """What :func:`tune_grid` found.

    Attributes:
        grid: the tuned grid (descending float64, the same ends as the starting grid).
        start: the name of the fixed grid the search started from (the best on the tuning
            noises).
        error: the tuned grid's error (:func:`sample_error`) against the reference on the
            tuning noises.
        fixed: each fixed grid's error on the tuning noises.
        solves: sampler runs the search used (the fixed grids included).
        seconds: wall time of the search.
        history: the error after each step size.
        interrupted: the search was stopped (Ctrl-C) and ``grid`` is the best found so far.
    """

    grid: torch.Tensor
    start: str
    error: float
    fixed: dict[str, float]
    solves: int
    seconds: float
    history: list[float] = field(default_factory=list)
    interrupted: bool = False


def _coords(path: GaussianPath, grid: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Half log-SNR of the grid's positive times (``-inf`` / ``+inf`` clipped to the path's
    finite range) and how many of them there are."""
    pos = grid[grid > 0]
    lam = 0.5 * path.log_snr(pos.clamp(path.t_min, path.t_max)).double()
    lo = 0.5 * float(path.log_snr(torch.tensor(path.t_max_finite, dtype=torch.float64)))
    hi = 0.5 * float(path.log_snr(torch.tensor(path.t_min, dtype=torch.float64)))
    return lam.clamp(lo, hi), pos.numel()


def _times(path: GaussianPath, grid: torch.Tensor, lam: torch.Tensor, idx: int) -> torch.Tensor:
    """``grid`` with its ``idx``-th time replaced by the time of half log-SNR ``lam[idx]``."""
    out = grid.clone()
    out[idx] = path.t_from_log_snr(2.0 * lam[idx : idx + 1].double()).double()[0]
    return out


def check_start_grids(grids: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixed grids as float64, all with one length and one end (else a clear error)."""
    if not grids:
        raise DifflabError("tune_grid needs at least one starting grid")
    out = {k: torch.as_tensor(g, dtype=torch.float64) for k, g in grids.items()}
    lengths = {k: g.numel() for k, g in out.items()}
    if len(set(lengths.values())) != 1:
        raise DifflabError(f"the starting grids differ in length: {lengths}")
    for k, g in out.items():
        if g.ndim != 1 or g.numel() < 2 or not bool((g[1:] < g[:-1]).all()):
            raise DifflabError(f"starting grid {k!r} is not a descending 1-D grid")
    return out


def tune_grid(solve: Solve, grids: Mapping[str, torch.Tensor], reference: torch.Tensor,
              path: GaussianPath, *, sweeps: int = 5, min_gain: float = 1e-4,
              progress: Callable[[float], None] | None = None) -> TuneResult:
    """Search the interior times of a grid so that ``solve(grid)`` lands on ``reference``.

    Args:
        solve: runs the sampler on the fixed tuning noises along a grid and returns its output
            (the same shape as ``reference``).
        grids: named fixed grids of one length to start from (the best is the start).
        reference: the exact (very accurate) ODE solution from the same noises.
        path: the noise path (for the log-SNR coordinates).
        sweeps: how many step sizes (fractions ``1/2, 1/4, ...`` of the gap to a neighbour)
            the search goes through; at each, passes repeat until one gains nothing.
        min_gain: a move is kept only when it lowers the error by this relative amount.
        progress: called with the current best error after every solve.
    """
    if not isinstance(sweeps, int) or isinstance(sweeps, bool) or sweeps < 1:
        raise bad_value("sweeps", sweeps, "a positive int")
    grids = check_start_grids(grids)
    start = time.perf_counter()
    solves = 0

    def error(g: torch.Tensor) -> float:
        nonlocal solves
        out = solve(g)
        solves += 1
        if out.shape != reference.shape:
            raise DifflabError(f"solve returned {tuple(out.shape)}, the reference is "
                               f"{tuple(reference.shape)}")
        e = sample_error(out, reference)
        e = e if math.isfinite(e) else math.inf
        if progress is not None:
            progress(min(e, best))
        return e

    fixed: dict[str, float] = {}
    interrupted = False
    best_name, grid, best = "", None, math.inf
    history: list[float] = []
    try:
        for name, g in grids.items():
            fixed[name] = error(g)
            if fixed[name] < best:
                best_name, grid, best = name, g, fixed[name]
        if grid is None:
            raise DifflabError("the sampler returned NaN / inf on every starting grid")
        lam, n_pos = _coords(path, grid)
        # interior times: all positive ones except the first (the prior); the last positive
        # one moves too when the grid ends with a step to 0, else it is the fixed t_end
        last = n_pos - 1 if grid[-1] == 0 else n_pos - 2
        free = list(range(1, last + 1))
        hi_end = 0.5 * float(path.log_snr(torch.tensor(path.t_min, dtype=torch.float64)))

        def trial_at(i: int, f: float, towards_data: bool):
            here = float(lam[i])
            if towards_data:
                target = float(lam[i + 1]) if i + 1 < n_pos else hi_end
            else:
                target = float(lam[i - 1])
            trial = lam.clone()
            trial[i] = here + f * (target - here)
            g = _times(path, grid, trial, i)
            if not bool((g[1:] < g[:-1]).all()):
                return None  # two times met in t (a flat stretch of the path)
            return trial, g

        for level in range(sweeps):
            f = 0.5 ** (level + 1)
            for _ in range(MAX_PASSES):  # passes at this step size until one gains nothing
                gained = False
                for i in free:
                    for towards_data in (True, False):
                        moved = 0
                        while moved < MAX_REPEATS:  # keep going while it pays
                            t = trial_at(i, f, towards_data)
                            if t is None:
                                break
                            e = error(t[1])
                            if not e < best * (1 - min_gain):
                                break
                            lam, grid, best = t[0], t[1], e
                            moved += 1
                        if moved:
                            gained = True
                            break
                if not gained:
                    break
            history.append(best)
    except KeyboardInterrupt:
        if grid is None:
            raise
        interrupted = True
    return TuneResult(grid=grid, start=best_name, error=best, fixed=fixed, solves=solves,
                      seconds=time.perf_counter() - start, history=history,
                      interrupted=interrupted)
