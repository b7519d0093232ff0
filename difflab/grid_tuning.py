"""``difflab tune-grid``: a time grid tuned to one run, sampler and budget, saved in the run.

The search is :func:`difflab.samplers.tuning.tune_grid`; this module feeds it the run. The
reference is the probability-flow ODE solved from the same noises with ``ref_sampler`` at
``ref_steps`` steps on the log-SNR grid, and again at half the steps: their difference says
how exact the reference is (it must be well below the errors being compared). Every trial
grid goes through :func:`difflab.sampling.generate` with the run's own settings (clipping,
guidance, conditioning, sampler options), so the tuned grid is tuned for what ``difflab
sample`` will run. The errors reported are measured on held-out noises (another seed).

Saved grids live in ``RUN/tuned_grids.json`` (a component or pipeline folder: inside it), one
entry per ``(sampler, steps)``; ``--grid tuned`` (``SampleRequest(grid="tuned")``,
``difflab eval --samplers NAME:STEPS:tuned``) looks the entry up.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from difflab.errors import DifflabError, bad_value
from difflab.runs import LoadedRun
from difflab.tuned_grids import TUNED_FILE, lookup_tuned, read_tuned, save_tuned, tuned_file

__all__ = ["TUNED_FILE", "lookup_tuned", "read_tuned", "save_tuned", "tune_run", "tuned_file"]

logger = logging.getLogger("difflab.grid_tuning")

# the fixed grids a search starts from and is compared with: name -> (grid, grid options)
START_GRIDS = {"uniform": ("uniform", {}), "quadratic": ("quadratic", {}),
               "log_snr": ("log_snr", {}), "karras": ("karras", {}),
               **{f"karras[rho={r}]": ("karras", {"rho": float(r)}) for r in (3, 5, 10)},
               "discrete[trailing]": ("discrete", {"spacing": "trailing"})}


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """The most steps of ``sampler`` whose network calls fit ``nfe``."""
    from difflab.samplers import get_sampler

    per = get_sampler(sampler).evals_per_step
    steps = nfe // per
    if steps < 1:
        raise DifflabError(f"{sampler} takes {per} network calls per step: --nfe {nfe} fits no "
                           "step")
    return steps


def start_grids(path, steps: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The fixed grids the search starts from: every grid kind whose first time is the path's
    ``t_max`` (the reference's start), ending at 0; and the names left out, with why."""
    from difflab.samplers.timesteps import make_grid

    grids, skipped = {}, []
    for label, (name, opts) in START_GRIDS.items():
        try:
            g = make_grid(name, path, steps, **opts)
        except DifflabError as e:
            skipped.append(f"{label} ({e})")
            continue
        if g.numel() != steps + 1:
            skipped.append(f"{label} (collapses to {g.numel() - 1} steps)")
        elif abs(float(g[0]) - path.t_max) > 1e-12:
            skipped.append(f"{label} (starts at t={float(g[0]):.4g}, not t_max)")
        else:
            grids[label] = g
    return grids, skipped


def draws_noise(spec, options: dict[str, Any]) -> bool:
    """Whether a sampler with these options draws noise: always for a stochastic sampler
    without a ``noise_when`` condition; else when the condition's option (``eta > 0``,
    ``S_churn > 0``, ``restart_k > 0 ...``) is positive."""
    if not spec.stochastic:
        return False
    if not spec.noise_when:
        return True
    key = spec.noise_when.split()[0]
    value = options.get(key, 0)
    return isinstance(value, int | float) and value > 0


def tune_run(run: LoadedRun, sampler: str, steps: int, *, n: int = 64, val_n: int = 64,
             seed: int = 0, ref_sampler: str = "dpmpp_3m", ref_steps: int = 200,
             guidance: str | None = None, options: dict[str, Any] | None = None,
             batch_size: int | None = None, sweeps: int = 5,
             progress: bool = True) -> dict[str, Any]:
    """Tune ``sampler``'s grid at ``steps`` steps for ``run``; returns the entry to save (the
    tuned times, every fixed grid's held-out error, the reference's own error, the cost)."""
    from tqdm.auto import tqdm

    from difflab.samplers import SAMPLERS
    from difflab.samplers.tuning import rms, sample_error, tune_grid
    from difflab.sampling import SampleRequest, generate

    for key, value, low in (("n", n, 1), ("val_n", val_n, 1), ("ref_steps", ref_steps, 2),
                            ("steps", steps, 1), ("sweeps", sweeps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad_value(key, value, f"an int >= {low}")
    for name, opts in ((sampler, options), (ref_sampler, None)):
        if name not in SAMPLERS:
            raise bad_value("sampler", name, f"one of {', '.join(sorted(SAMPLERS))}")
        if name == run.config.sample.sampler:
            opts = {**run.config.sample.options, **(opts or {})}
        if draws_noise(SAMPLERS[name], opts or {}):
            raise DifflabError(f"{name} is stochastic with these options: a grid is tuned "
                               "against the exact probability-flow ODE, so tune a "
                               "deterministic sampler (DDIM with eta=0, Heun without churn)")
    if ref_steps <= 2 * steps:
        raise DifflabError(f"ref_steps={ref_steps} must be well above the tuned steps ({steps})")
    grids, skipped = start_grids(run.path, steps)
    if not grids:
        raise DifflabError(f"no fixed grid with {steps} steps starts at the path's t_max: "
                           + "; ".join(skipped))
    base = dict(model=run, guidance=guidance, batch_size=batch_size, decode=False,
                clip_x0=None)

    resolved: dict[str, Any] = {}  # the sampler options generate ran with (the run's too)

    def draw(name: str, k: int, grid: str, grid_options: dict, count: int, s: int,
             opts: dict | None) -> torch.Tensor:
        req = SampleRequest(sampler=name, steps=k, grid=grid, grid_options=grid_options,
                            options=opts, n=count, seed=s, **base)
        out = generate(req)
        if name == sampler:
            resolved.update(out.metadata["options"])
        return out.images.double()

    val_seed = seed + 1
    t0 = time.perf_counter()
    refs = {}
    for label, s, count in (("tune", seed, n), ("held-out", val_seed, val_n)):
        refs[label] = draw(ref_sampler, ref_steps, "log_snr", {}, count, s, None)
    half = draw(ref_sampler, ref_steps // 2, "log_snr", {}, val_n, val_seed, None)
    ref_error = sample_error(half, refs["held-out"])
    ref_seconds = time.perf_counter() - t0

    bar = tqdm(desc=f"tuning {sampler} at {steps} steps", unit="solve", disable=not progress,
               leave=False)

    def solve(g: torch.Tensor) -> torch.Tensor:
        bar.update(1)
        return draw(sampler, steps, "custom", {"times": g.tolist()}, n, seed, options)

    def show(best: float) -> None:
        bar.set_postfix(error=f"{best:.3e}")

    try:
        res = tune_grid(solve, grids, refs["tune"], run.path, sweeps=sweeps, progress=show)
    finally:
        bar.close()
    held = {}
    for label, g in [*grids.items(), ("tuned", res.grid)]:
        out = draw(sampler, steps, "custom", {"times": g.tolist()}, val_n, val_seed, options)
        held[label] = {"error": sample_error(out, refs["held-out"]),
                       "rms": rms(out, refs["held-out"])}
    fixed_best = min((k for k in held if k != "tuned"), key=lambda k: held[k]["error"])
    if ref_error > 0.1 * held["tuned"]["error"]:
        logger.warning("the reference is not much more exact than the tuned sampler (its own "
                       "error %.2e against the tuned grid's %.2e): raise --ref-steps",
                       ref_error, held["tuned"]["error"])
    return {
        "sampler": sampler, "steps": steps, "times": res.grid.tolist(),
        "nfe": steps * SAMPLERS[sampler].evals_per_step, "options": resolved,
        "guidance": guidance, "step": run.step,
        "error": {"metric": "mean over samples of each sample's RMS difference from the "
                            "reference (rms: over the whole batch)",
                  "held_out": held, "best_fixed": fixed_best,
                  "gain": (held[fixed_best]["error"] / held["tuned"]["error"]
                           if held["tuned"]["error"] > 0 else math.inf),
                  "tuning": res.error, "fixed_tuning": res.fixed, "start": res.start,
                  "reference": ref_error},
        "reference": {"sampler": ref_sampler, "steps": ref_steps, "grid": "log_snr"},
        "search": {"n": n, "val_n": val_n, "seed": seed, "val_seed": val_seed,
                   "sweeps": sweeps, "solves": res.solves,
                   "history": res.history, "skipped": skipped,
                   "interrupted": res.interrupted},
        "seconds": {"reference": ref_seconds, "search": res.seconds,
                    "total": time.perf_counter() - t0},
    }
