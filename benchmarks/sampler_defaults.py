"""The measurement behind the multistep solvers' defaults, and difflab's defaults against the
peers' (diffusers' schedulers, k-diffusion's samplers).

**Problems.** 15 exact oracles: three Gaussian mixtures of 4 components (2-D with narrow
components, std 0.05-0.15; 64-D narrow, 0.1-0.4; 64-D wide, 0.5-1.0; random means) on five
paths (DDPM's discrete linear VP, the continuous cosine VP, VE, EDM, Linear / flow matching),
each with its own starting points from the prior. Error: the RMS difference, over samples and
dimensions, from the exact probability-flow ODE solution: ``probability_flow_reference`` (scipy
DOP853 at 1e-10) down to the path's ``t_min`` and, for grids ending at 0, continued to ``t = 0``
in ``(x / alpha, rho)``, where the ODE ``d(x / alpha) / d rho = eps`` is smooth through
``rho = 0`` (the mixture's ``eps`` in closed form, DOP853 at 1e-12).

**Grids** (each ending at 0, "zero", or at ``t_min``, "t_min"): uniform in log-SNR, Karras
(rho = 7), uniform in ``t`` (all from ``t_max`` to ``t_min``, then 0 for "zero"), and
"trailing": uniform in ``t`` from ``t_max`` down to 0 (DDPM's trailing / diffusers' linspace
steps on the discrete path: a final denoising step from ``t = 1 / steps``; for "t_min" the 0 is
replaced by ``t_min``; left out on EDM, where ``t = sigma`` makes it absurd). NFE are counted
honestly: 5, 6, 8, 10, 15, 20 and 50, each cell using the most steps that fit (a grid ending
at 0 spends one evaluation on its final denoising step; PNDM 4 per Runge-Kutta step, PLMS one
extra).

**Variants.** For each method, difflab's options (``lower_order_final``, DPM-Solver++(3M)'s
``second_difference``, UniPC's ``order`` / ``corrector_order``, PNDM's ``final``), the
previous defaults, and the peers' defaults. A peer's default is the same algorithm in another
configuration, which difflab reproduces to ~1e-13 (``tests/interop/test_peer_samplers.py``),
so it is run here as that difflab configuration on the same grid (where no public option
expresses it, through the solvers' internal order schedule: ``diffusers_multistep``,
``diffusers_unipc``):

* diffusers ``DPMSolverMultistepScheduler()`` (dpmsolver++, order 2, midpoint,
  ``lower_order_final`` below 15 steps, final ``sigma = 0``): ``dpmpp_2m(lower_order_final=
  False)`` on "zero" grids (its order-1 step is the final denoising step) and
  ``lower_order_final=15`` with ``final_sigmas_type="sigma_min"`` ("t_min"); with
  ``solver_order=3``: the half weight, midpoint (Adams) second-order steps, the last solver
  step at order 2 below 15 evaluations ("zero") or the last two at 2, 1 below 15 steps
  ("t_min"); ``algorithm_type="dpmsolver"`` (noise form) only with ``sigma_min``;
* k-diffusion ``sample_dpmpp_2m``: ``lower_order_final=False``; ``sample_dpmpp_3m_sde(eta=0)``:
  ``second_difference="half"``, ``lower_order_final=False``;
* diffusers ``UniPCMultistepScheduler()`` (bh2, ``solver_order=2``, UniC-p after UniP-p,
  orders lowered at every grid length with the step to ``sigma = 0`` counted as the order-1
  step), also with ``solver_type="bh1"`` and ``solver_order=3``. (On grids ending at 0 the
  real bh1 scheduler returns NaN, ``B(h) = h`` being infinite there; its difflab equivalent
  takes difflab's final denoising step instead, so the bh1 "zero" rows flatter the peer.)

On the discrete VP path the real peers run as a spot check (``difflab.testing.peers``): each
peer default on its own default grid, the equivalent difflab configuration on the same grid
(the largest difference is printed) and difflab's defaults there.

Usage::

    .venv/bin/python benchmarks/sampler_defaults.py           # the full run (~10 min, 1 thread)
    .venv/bin/python benchmarks/sampler_defaults.py --quick   # 4 problems, 2 grids, 3 budgets
    .venv/bin/python benchmarks/sampler_defaults.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
import difflab.samplers.dpm_solver as dpm  # noqa: E402
import difflab.samplers.pndm  # noqa: E402,F401  (registers the solvers)
import difflab.samplers.unipc as unipc  # noqa: E402
from difflab.paths import EDM, VE, VP, Linear  # noqa: E402
from difflab.samplers import sample, timesteps  # noqa: E402
from difflab.samplers.exponential import DATA, NOISE  # noqa: E402
from difflab.testing import (  # noqa: E402
    CountingDenoiser,
    GaussianMixture,
    probability_flow_reference,
)

PATHS = {"vp_discrete": VP.discrete_linear, "vp_cosine": VP.cosine, "ve": VE, "edm": EDM,
         "linear": Linear}
# name: (dimension, component std range, mean scale, samples)
MIXTURES = {"2d_narrow": (2, (0.05, 0.15), 1.5, 128), "64d_narrow": (64, (0.1, 0.4), 1.0, 48),
            "64d_wide": (64, (0.5, 1.0), 1.0, 48)}
GRIDS = ["log_snr", "karras", "uniform", "trailing"]
ENDS = ["zero", "t_min"]
BUDGETS = [5, 6, 8, 10, 15, 20, 50]
CROSSOVER = [20, 25, 30, 40, 50, 65, 80]
VERDICT = [5, 6, 8, 10, 15, 20]


# ----- the oracle problems -----------------------------------------------------------------------
def eps_rho(mixture: GaussianMixture, y: torch.Tensor, rho: float) -> torch.Tensor:
    """The exact ``eps`` of the ODE ``dy / d rho = eps`` in ``y = x / alpha`` (EDM's scaled
    space): ``y = x0 + rho z``, so ``eps = sum_k r_k(y) rho (y - m_k) / (v_k + rho^2)``, which
    is 0 at ``rho = 0`` and smooth there."""
    var = mixture.vars[None] + rho * rho
    diff = y[:, None, :] - mixture.means[None]
    logp = mixture.log_w - 0.5 * (diff * diff / var + torch.log(var)).sum(-1)
    r = torch.softmax(logp, -1)
    return (r[..., None] * rho * diff / var).sum(1)


def reference_to_zero(mixture: GaussianMixture, path, x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact ODE solution at ``t = 0`` (``alpha = 1``) from state ``x`` at time ``t``."""
    a, s = float(path.alpha(t)), float(path.sigma(t))
    shape = x.shape

    def rhs(rho: float, y: np.ndarray) -> np.ndarray:
        return eps_rho(mixture, torch.from_numpy(y).reshape(shape), rho).reshape(-1).numpy()

    sol = solve_ivp(rhs, (s / a, 0.0), (x / a).reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)
    if not sol.success:  # pragma: no cover
        raise RuntimeError(sol.message)
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)


@dataclass
class Problem:
    mixture_name: str
    path_name: str
    samples: int | None = None
    path: object = field(init=False)
    den: object = field(init=False)
    x: torch.Tensor = field(init=False)
    ref: dict = field(init=False)

    def __post_init__(self) -> None:
        dim, (lo, hi), scale, n = MIXTURES[self.mixture_name]
        n = self.samples or n
        g = torch.Generator().manual_seed(0)
        means = scale * torch.randn(4, dim, generator=g, dtype=torch.float64)
        stds = lo + (hi - lo) * torch.rand(4, generator=g, dtype=torch.float64)
        self.mixture = GaussianMixture(means, stds)
        self.path = PATHS[self.path_name]()
        self.den = self.mixture.denoiser(self.path)
        g = torch.Generator().manual_seed(1 + list(PATHS).index(self.path_name))
        self.x = torch.randn(n, dim, generator=g, dtype=torch.float64) * self.path.prior_std
        ref_min = probability_flow_reference(self.den, self.x, self.path.t_max, self.path.t_min)
        self.ref = {"t_min": ref_min,
                    "zero": reference_to_zero(self.mixture, self.path, ref_min,
                                              self.path.t_min)}

    @property
    def name(self) -> str:
        return f"{self.mixture_name}/{self.path_name}"

    def grid(self, kind: str, steps: int, end: str) -> torch.Tensor:
        to_zero = end == "zero"
        if kind == "trailing":
            g = torch.linspace(self.path.t_max, 0.0, steps + 1, dtype=torch.float64)
            if not to_zero:
                g[-1] = self.path.t_min
            return g
        fn = {"log_snr": timesteps.log_snr, "karras": timesteps.karras,
              "uniform": timesteps.uniform}[kind]
        return fn(self.path, steps, to_zero=to_zero)

    def has(self, kind: str) -> bool:
        return not (kind == "trailing" and self.path_name == "edm")

    def error(self, out: torch.Tensor, end: str) -> float:
        return float((out - self.ref[end]).pow(2).mean().sqrt())


# ----- NFE ---------------------------------------------------------------------------------------
def nfe_of(method: str, steps: int, end: str) -> int:
    """Evaluations of ``steps`` grid steps (the last one to 0 for ``end="zero"``)."""
    z = int(end == "zero")
    n = steps - z  # steps between positive times
    if method == "pndm":
        return 4 * min(n, 3) + max(n - 3, 0) + z
    if method == "plms":
        return n + 1 + z
    return n + z


def steps_for(method: str, budget: int, end: str) -> int:
    steps = 1 + int(end == "zero")
    if nfe_of(method, steps, end) > budget:
        return 0
    while nfe_of(method, steps + 1, end) <= budget:
        steps += 1
    return steps


# ----- the peers' defaults as difflab configurations ---------------------------------------------
def diffusers_dpm_orders(order: int, end: str) -> Callable[[int], list[int]]:
    """diffusers' order schedule (``lower_order_final=True``) for ``n`` solver steps: warm-up,
    then below 15 evaluations the last step (to ``sigma = 0`` or ``sigma_min``) at order 1 and
    the one before at 2. Before a final 0 that order-1 step is difflab's denoising step, so the
    solver steps see only the order-2 cap, and the count of 15 includes it."""
    def orders(n: int) -> list[int]:
        out = [min(order, i + 1) for i in range(n)]
        if end == "zero":
            return [min(k, n + 1 - i) for i, k in enumerate(out)] if n + 1 < 15 else out
        return [min(k, n - i) for i, k in enumerate(out)] if n < 15 else out

    return orders


@dataclass(frozen=True)
class DiffusersThird:
    """diffusers' ``solver_order=3`` step: half weight, and the default ``solver_type=
    "midpoint"`` (DPM-Solver++(2M)'s Adams form) for its second-order steps."""

    form: object

    def __call__(self, x, t, s, hist):
        step = dpm._Adams2(self.form) if len(hist) == 2 else dpm._Taylor(self.form, 0.5)
        return step(x, t, s, hist)


def diffusers_multistep(form, order: int, end: str):
    make = (lambda n: dpm._Adams2(form)) if order == 2 else (lambda n: DiffusersThird(form))

    def run(den, x, grid):
        return dpm._multistep(den, x, grid, None, "peer", order, False, make,
                              orders=diffusers_dpm_orders(order, end))

    return run


def diffusers_unipc(bh: str, order: int, end: str):
    """diffusers' UniPC: ``this_order = min(order, steps left)`` at every grid length, the step
    to ``sigma = 0`` counted; UniC-p after UniP-p."""
    def orders(n: int):
        left = n + 1 if end == "zero" else n
        p = [min(order, i + 1, left - i) for i in range(n)]
        return p, p

    def run(den, x, grid):
        return unipc._unipc(den, x, grid, None, "peer", unipc.BH[bh], order, True, order,
                            False, orders=orders)

    return run


def option_run(name: str, **opts):
    return lambda den, x, grid: sample(name, den, x, grid, **opts)


@dataclass
class Variant:
    label: str
    method: str  # the NFE rule and the table it belongs to
    run: Callable[[str], Callable | None]  # end -> runner (None: not defined for that end)
    role: str = "option"  # "default", "old default", "option", "peer"
    budgets: list[int] = field(default_factory=lambda: BUDGETS)


def same(runner) -> Callable[[str], Callable]:
    return lambda end: runner


LOFS = [("long_step", "long_step"), ("always", "always"), ("False", False), ("True (<10)", True),
        ("15", 15), ("20", 20)]


def variants() -> dict[str, list[Variant]]:
    v: dict[str, list[Variant]] = {}
    m = "dpmpp_2m"
    v[m] = [Variant("lower_order_final=long_step", m, same(option_run(m)), "default")]
    v[m] += [Variant(f"lower_order_final={lab}", m, same(option_run(m, lower_order_final=val)),
                     "old default" if val is True else "option") for lab, val in LOFS[1:]]
    v[m] += [Variant("diffusers DPMSolverMultistep()", m,
                     lambda end: diffusers_multistep(DATA, 2, end), "peer"),
             Variant("k-diffusion sample_dpmpp_2m", m,
                     same(option_run(m, lower_order_final=False)), "peer")]
    m = "dpmpp_3m"
    v[m] = [Variant("second_difference=auto, lof=long_step", m, same(option_run(m)), "default")]
    for sd in ("half", "taylor"):
        v[m].append(Variant(f"second_difference={sd}", m,
                            same(option_run(m, second_difference=sd))))
    for lab, val in LOFS[1:4]:
        v[m].append(Variant(f"auto, lower_order_final={lab}", m,
                            same(option_run(m, lower_order_final=val))))
    v[m] += [Variant("taylor, lower_order_final=True (old)", m,
                     same(option_run(m, lower_order_final=True, second_difference="taylor")),
                     "old default"),
             Variant("diffusers DPMSolverMultistep(solver_order=3)", m,
                     lambda end: diffusers_multistep(DATA, 3, end), "peer"),
             Variant("k-diffusion sample_dpmpp_3m_sde(eta=0)", m,
                     same(option_run(m, second_difference="half", lower_order_final=False)),
                     "peer")]
    m = "dpm_solver_2m"
    v[m] = [Variant("lower_order_final=long_step", m, same(option_run(m)), "default")]
    v[m] += [Variant(f"lower_order_final={lab}", m, same(option_run(m, lower_order_final=val)),
                     "old default" if val is True else "option") for lab, val in LOFS[1:4]]
    v[m].append(Variant("diffusers DPMSolverMultistep(dpmsolver, sigma_min)", m,
                        lambda end: diffusers_multistep(NOISE, 2, end) if end == "t_min"
                        else None, "peer"))
    m = "dpm_solver_3m"
    v[m] = [Variant("taylor, lof=long_step", m, same(option_run(m)), "default"),
            Variant("second_difference=half", m, same(option_run(m, second_difference="half")))]
    v[m] += [Variant(f"taylor, lower_order_final={lab}", m,
                     same(option_run(m, lower_order_final=val)),
                     "old default" if val is True else "option") for lab, val in LOFS[1:4]]
    v[m].append(Variant("diffusers DPMSolverMultistep(dpmsolver, order 3, sigma_min)", m,
                        lambda end: diffusers_multistep(NOISE, 3, end) if end == "t_min"
                        else None, "peer"))
    for bh in ("bh1", "bh2"):
        m = f"unipc_{bh}"
        v[m] = [Variant("defaults", m, same(option_run(m)), "default")]
        for p in (2, 3):
            for q in (1, 2, 3):
                v[m].append(Variant(f"order={p}, corrector_order={q}", m,
                                    same(option_run(m, order=p, corrector_order=q))))
        for lab, val in LOFS[1:4]:
            v[m].append(Variant(f"default orders, lower_order_final={lab}", m,
                                same(option_run(m, lower_order_final=val))))
        v[m].append(Variant("order=3, corrector_order=3, lof=True (old)", m,
                            same(option_run(m, order=3, corrector_order=3,
                                            lower_order_final=True)), "old default"))
        for p in (2, 3):
            v[m].append(Variant(f"diffusers UniPCMultistep({bh}, solver_order={p})", m,
                                lambda end, bh=bh, p=p: diffusers_unipc(bh, p, end), "peer"))
    for m in ("pndm", "plms"):
        v[m] = [Variant("final=multistep", m, same(option_run(m)), "default"),
                Variant("final=denoise (old)", m, same(option_run(m, final="denoise")),
                        "old default")]
    return v


def crossover_variants() -> dict[str, list[Variant]]:
    """Beyond 20 NFE: where DPM-Solver++(3M)'s half weight and UniPC-bh2's order 2 stop
    paying."""
    return {
        "dpmpp_3m": [Variant(f"second_difference={sd}", "dpmpp_3m",
                             same(option_run("dpmpp_3m", second_difference=sd)), "option",
                             CROSSOVER) for sd in ("half", "taylor")],
        "unipc_bh2": [Variant(f"order={p}, corrector_order={p - 1}", "unipc_bh2",
                              same(option_run("unipc_bh2", order=p, corrector_order=p - 1)),
                              "option", CROSSOVER) for p in (2, 3)],
    }


# ----- running -----------------------------------------------------------------------------------
def measure(problems: list[Problem], table: dict[str, list[Variant]], grids: list[str],
            budgets_cap: list[int] | None = None, log=print) -> dict:
    """``errors[method][label][end][grid][budget][problem] = RMS error``."""
    out: dict = {}
    for method, vs in table.items():
        t0 = time.perf_counter()
        for var in vs:
            for end in ENDS:
                runner = var.run(end)
                if runner is None:
                    continue
                for kind in grids:
                    for budget in var.budgets:
                        if budgets_cap is not None and budget not in budgets_cap:
                            continue
                        steps = steps_for(method, budget, end)
                        if steps == 0:
                            continue
                        for prob in problems:
                            if not prob.has(kind):
                                continue
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")  # short grids fall back
                                x = runner(prob.den, prob.x, prob.grid(kind, steps, end))
                            err = prob.error(x, end) if bool(torch.isfinite(x).all()) \
                                else math.inf
                            (out.setdefault(method, {}).setdefault(var.label, {})
                             .setdefault(end, {}).setdefault(kind, {})
                             .setdefault(budget, {}))[prob.name] = err
        log(f"  {method}: {time.perf_counter() - t0:.0f} s")
    return out


def gmean(values) -> float:
    values = list(values)
    if not values:
        return math.nan
    if any(not math.isfinite(v) for v in values):
        return math.inf
    return float(np.exp(np.mean(np.log(values))))


def cells(errors: dict, end: str, grids: list[str], budget: int) -> dict:
    """``{(grid, problem): error}`` of one variant at one budget."""
    by_grid = errors.get(end, {})
    return {(g, p): e for g in grids for p, e in by_grid.get(g, {}).get(budget, {}).items()}


# ----- the real peers on the discrete VP path ----------------------------------------------------
def error_from(prob: Problem, out: torch.Tensor, end: str, t_start: float, x: torch.Tensor):
    """The RMS error against the exact solution from ``x`` at ``t_start``."""
    key = ("start", t_start)
    cache = prob.__dict__.setdefault("_refs", {})
    if key not in cache:
        ref_min = probability_flow_reference(prob.den, x, t_start, prob.path.t_min)
        cache[key] = {"t_min": ref_min, "zero": reference_to_zero(prob.mixture, prob.path,
                                                                  ref_min, prob.path.t_min)}
    return float((out - cache[key][end]).pow(2).mean().sqrt())


def peer_spot_check(problems: list[Problem], budgets: list[int], log=print) -> list[dict]:
    """Each peer default on its own default grid, against its difflab equivalent and difflab's
    defaults on the same grid (DDPM's linear betas; the problems on ``vp_discrete``)."""
    try:
        import diffusers as d

        from difflab.testing.peers import (
            difflab_grid_for,
            difflab_grid_for_sigmas,
            load_k_diffusion_sampling,
            run_diffusers,
            run_k_diffusion,
        )
        kd = load_k_diffusion_sampling()
    except Exception as err:  # pragma: no cover - optional peers
        log(f"  peers unavailable: {err}")
        return []
    ddpm = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                beta_schedule="linear")
    cases = [  # (label, scheduler, emulation(end) or None, difflab default sampler, end)
        ("diffusers DPMSolverMultistep()", d.DPMSolverMultistepScheduler(**ddpm),
         diffusers_multistep(DATA, 2, "zero"), "dpmpp_2m", "zero"),
        ("diffusers DPMSolverMultistep(final_sigmas_type=sigma_min)",
         d.DPMSolverMultistepScheduler(**ddpm, final_sigmas_type="sigma_min"),
         diffusers_multistep(DATA, 2, "t_min"), "dpmpp_2m", "t_min"),
        ("diffusers DPMSolverMultistep(solver_order=3)",
         d.DPMSolverMultistepScheduler(**ddpm, solver_order=3),
         diffusers_multistep(DATA, 3, "zero"), "dpmpp_3m", "zero"),
        ("diffusers DPMSolverMultistep(solver_order=3, sigma_min)",
         d.DPMSolverMultistepScheduler(**ddpm, solver_order=3, final_sigmas_type="sigma_min"),
         diffusers_multistep(DATA, 3, "t_min"), "dpmpp_3m", "t_min"),
        ("diffusers DPMSolverMultistep(dpmsolver, sigma_min)",
         d.DPMSolverMultistepScheduler(**ddpm, algorithm_type="dpmsolver",
                                       final_sigmas_type="sigma_min"),
         diffusers_multistep(NOISE, 2, "t_min"), "dpm_solver_2m", "t_min"),
        ("diffusers DPMSolverMultistep(dpmsolver, order 3, sigma_min)",
         d.DPMSolverMultistepScheduler(**ddpm, algorithm_type="dpmsolver", solver_order=3,
                                       final_sigmas_type="sigma_min"),
         diffusers_multistep(NOISE, 3, "t_min"), "dpm_solver_3m", "t_min"),
        ("diffusers UniPCMultistep()", d.UniPCMultistepScheduler(**ddpm),
         diffusers_unipc("bh2", 2, "zero"), "unipc_bh2", "zero"),
        ("diffusers UniPCMultistep(solver_order=3)",
         d.UniPCMultistepScheduler(**ddpm, solver_order=3),
         diffusers_unipc("bh2", 3, "zero"), "unipc_bh2", "zero"),
        ("diffusers UniPCMultistep(bh1)", d.UniPCMultistepScheduler(**ddpm, solver_type="bh1"),
         diffusers_unipc("bh1", 2, "zero"), "unipc_bh1", "zero"),
        ("diffusers UniPCMultistep(bh1, sigma_min)",
         d.UniPCMultistepScheduler(**ddpm, solver_type="bh1", final_sigmas_type="sigma_min"),
         diffusers_unipc("bh1", 2, "t_min"), "unipc_bh1", "t_min"),
        ("diffusers PNDM()", d.PNDMScheduler(**ddpm), None, "pndm", "t_min"),
        ("diffusers PNDM(skip_prk_steps=True)", d.PNDMScheduler(**ddpm, skip_prk_steps=True),
         None, "plms", "t_min"),
        ("diffusers PNDM(skip_prk_steps=True, set_alpha_to_one=True)",
         d.PNDMScheduler(**ddpm, skip_prk_steps=True, set_alpha_to_one=True), None, "plms",
         "zero"),
    ]
    rows = []
    probs = [p for p in problems if p.path_name == "vp_discrete"]
    for label, sched, emulate, ours, end in cases:
        for budget in budgets:
            # the most steps whose evaluations fit the budget (PNDM: N + 9, PLMS: N + 1)
            steps = budget if ours not in ("pndm", "plms") else budget - (9 if ours == "pndm"
                                                                          else 1)
            if steps < 2:
                continue
            row = {"peer": label, "nfe": budget, "ours": ours, "end": end, "peer_err": [],
                   "emul_diff": 0.0, "ours_err": [], "peer_nfe": 0, "ours_nfe": 0}
            for prob in probs:
                grid = difflab_grid_for(sched, prob.path, steps)
                t0 = float(grid[0])
                x = prob.x * (prob.path.sigma(t0) / prob.path.prior_std)  # a start at grid[0]
                peer_den, our_den = CountingDenoiser(prob.den), CountingDenoiser(prob.den)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    peer = run_diffusers(sched, peer_den, x, steps)
                    mine = sample(ours, our_den, x, grid)
                    finite = bool(torch.isfinite(peer).all())
                    if emulate is not None and finite:
                        emu = emulate(prob.den, x, grid)
                        row["emul_diff"] = max(row["emul_diff"], float((emu - peer).abs().max()))
                row["peer_nfe"], row["ours_nfe"] = peer_den.calls, our_den.calls
                row["peer_err"].append(error_from(prob, peer, end, t0, x) if finite
                                       else math.inf)
                row["ours_err"].append(error_from(prob, mine, end, t0, x))
            rows.append(row)
    for fn, ours, opts in (("sample_dpmpp_2m", "dpmpp_2m", {"lower_order_final": False}),
                           ("sample_dpmpp_3m_sde", "dpmpp_3m",
                            {"lower_order_final": False, "second_difference": "half"})):
        for kind in ("karras", "log_snr"):
            for budget in budgets:
                row = {"peer": f"k-diffusion {fn} ({kind} sigmas to 0)", "nfe": budget,
                       "ours": ours, "end": "zero", "peer_err": [], "emul_diff": 0.0,
                       "ours_err": []}
                for prob in probs:
                    grid = prob.grid(kind, budget, "zero")
                    sigmas = prob.path.sigma_ve(grid[:-1]).tolist() + [0.0]
                    kw = {"eta": 0.0, "noise_sampler": lambda a, b: 0.0} \
                        if fn.endswith("_sde") else {}
                    peer = run_k_diffusion(getattr(kd, fn), prob.den, prob.x, sigmas, **kw)
                    grid_k = difflab_grid_for_sigmas(prob.path, sigmas)
                    emu = sample(ours, prob.den, prob.x, grid_k, **opts)
                    row["emul_diff"] = max(row["emul_diff"], float((emu - peer).abs().max()))
                    row["peer_err"].append(prob.error(peer, "zero"))
                    row["ours_err"].append(prob.error(sample(ours, prob.den, prob.x, grid_k),
                                                      "zero"))
                rows.append(row)
    return rows


# ----- reports -----------------------------------------------------------------------------------
def fmt(x: float) -> str:
    return "NaN/inf" if not math.isfinite(x) else f"{x:.2e}"


def report_method(method: str, vs: list[Variant], errors: dict, grids: list[str],
                  budgets: list[int]) -> tuple[list[str], dict]:
    """Markdown for one method: for each end, the default's geometric-mean error over problems
    and grids, every variant's ratio to it (>1: worse than the default) with the worst
    per-path ratio, and the verdict against the peers."""
    lines, verdict = [f"\n### {method}\n"], {}
    default = next(v for v in vs if v.role == "default")
    for end in ENDS:
        base = errors[method][default.label].get(end)
        if not base:
            continue
        head = "| variant | " + " | ".join(f"NFE {b}" for b in budgets) + " |"
        lines += [f"\n{end} grids (" + ", ".join(grids) + ")\n", head,
                  "|---|" + "---|" * len(budgets)]
        cells_base = {b: cells(errors[method][default.label], end, grids, b) for b in budgets}
        lines.append(f"| **{default.label}** (default): gm error | "
                     + " | ".join(fmt(gmean(cells_base[b].values())) for b in budgets) + " |")
        for var in vs:
            if var is default or end not in errors[method].get(var.label, {}):
                continue
            row = []
            for b in budgets:
                c = cells(errors[method][var.label], end, grids, b)
                keys = [k for k in c if k in cells_base[b]]
                if not keys:
                    row.append("-")
                    continue
                ratios = [c[k] / cells_base[b][k] for k in keys]
                worst = max(gmean(c[k] / cells_base[b][k] for k in keys if k[1].endswith(p))
                            for p in PATHS if any(k[1].endswith(p) for k in keys))
                row.append(f"{gmean(ratios):.2f} ({worst:.2f})")
            tag = {"peer": " [peer]", "old default": " [old default]"}.get(var.role, "")
            lines.append(f"| {var.label}{tag} | " + " | ".join(row) + " |")
        peers = [v for v in vs if v.role == "peer" and end in errors[method].get(v.label, {})]
        if peers:
            verdict[end] = judge(errors[method], default, peers, end, grids,
                                 [b for b in budgets if b in VERDICT])
    return lines, verdict


def judge(errs: dict, default: Variant, peers: list[Variant], end: str, grids: list[str],
          budgets: list[int]) -> dict:
    """Per grid kind and budget: gm over problems of the best peer default's error / difflab's
    default's (>= 1: difflab's default is no worse); also the worst single problem."""
    out = {"by_grid": {}, "all_grids": {}}
    for b in budgets:
        base_all = cells(errs[default.label], end, grids, b)
        best_all = None
        for kind in grids:
            base = cells(errs[default.label], end, [kind], b)
            if not base:
                continue
            best = min((gmean(cells(errs[p.label], end, [kind], b)[k] for k in base), p.label)
                       for p in peers)
            ratio = best[0] / gmean(base.values())
            per_problem = min(min(cells(errs[p.label], end, [kind], b)[k] for p in peers)
                              / base[k] for k in base)
            out["by_grid"].setdefault(kind, {})[b] = {"ratio": ratio, "peer": best[1],
                                                      "worst_problem": per_problem}
        best_all = min((gmean(cells(errs[p.label], end, grids, b)[k] for k in base_all), p.label)
                       for p in peers)
        out["all_grids"][b] = {"ratio": best_all[0] / gmean(base_all.values()),
                               "peer": best_all[1]}
    return out


def verdict_lines(verdicts: dict) -> list[str]:
    lines = ["\n## Verdict: best peer default / difflab default (gm over problems; >= 1 means "
             "difflab's default is at least as accurate), NFE " + ", ".join(map(str, VERDICT)),
             ""]
    for method, by_end in verdicts.items():
        for end, v in by_end.items():
            budgets = sorted(v["all_grids"])
            lines.append(f"- **{method}**, {end}: all grids "
                         + ", ".join(f"{v['all_grids'][b]['ratio']:.2f}" for b in budgets))
            for kind, row in v["by_grid"].items():
                low = [b for b in budgets if row[b]["ratio"] < 1]
                worst = min(r["worst_problem"] for r in row.values())
                lines.append(f"  - {kind}: " + ", ".join(f"{row[b]['ratio']:.2f}" for b in budgets)
                             + (f" (below 1 at NFE {low})" if low else "")
                             + f"; worst single problem {worst:.2f}")
    return lines


def spot_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return ["\n(peer spot check skipped: diffusers / k-diffusion unavailable)"]
    lines = ["\n## Real peers on DDPM's discrete VP path, on their own default grids\n",
             "gm RMS error over the 3 mixtures; `emul.`: max |difflab equivalent - peer| on the "
             "same grid; `ours`: difflab's default sampler on the same grid.\n",
             "| peer default | NFE (peer / ours) | peer error | emul. | difflab default | "
             "ours / peer |", "|---|---|---|---|---|---|"]
    for r in rows:
        pe, oe = gmean(r["peer_err"]), gmean(r["ours_err"])
        emu = "-" if r["peer"].startswith("diffusers PNDM") else f"{r['emul_diff']:.1e}"
        ratio = "-" if not math.isfinite(pe) else f"{oe / pe:.2f}"
        nfe = f"{r.get('peer_nfe', r['nfe'])} / {r.get('ours_nfe', r['nfe'])}"
        lines.append(f"| {r['peer']} | {nfe} | {fmt(pe)} | {emu} | {r['ours']}: {fmt(oe)} "
                     f"| {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 problems, log-SNR and trailing grids, NFE 5, 10, 20")
    parser.add_argument("--json", type=Path, help="write every error here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.quick:
        names = [(m, p) for m in ("2d_narrow", "64d_narrow") for p in ("vp_discrete", "edm")]
        grids, budgets, cross = ["log_snr", "trailing"], [5, 10, 20], []
        spot_budgets = [10]
    else:
        names = [(m, p) for m in MIXTURES for p in PATHS]
        grids, budgets, cross = GRIDS, BUDGETS, CROSSOVER
        spot_budgets = [5, 10, 15, 20]
    problems = [Problem(m, p, 24 if args.quick else None) for m, p in names]
    log(f"references: {time.perf_counter() - t0:.0f} s")
    table = variants()
    errors = measure(problems, table, grids, budgets, log)
    cross_errors = measure(problems, crossover_variants(), grids, None, log) if cross else {}
    rows = peer_spot_check(problems, spot_budgets, log)
    quick = " --quick" if args.quick else ""
    lines = [f"# Sampler defaults (benchmarks/sampler_defaults.py{quick})",
             f"\n{len(problems)} problems: " + ", ".join(p.name for p in problems),
             "\nCells: geometric mean over problems and grids of the variant's RMS error / the "
             "default's (> 1: less accurate than the default); in parentheses the worst path "
             "(the gm over that path's problems and grids)."]
    verdicts = {}
    for method, vs in table.items():
        text, verdict = report_method(method, vs, errors, grids, budgets)
        lines += text
        if verdict:
            verdicts[method] = verdict
    if cross_errors:
        lines.append("\n## Beyond 20 NFE (ratio to the first row's error)")
        for method, vs in crossover_variants().items():
            base = cross_errors[method][vs[0].label]
            for end in ENDS:
                head = "| variant | " + " | ".join(f"NFE {b}" for b in CROSSOVER) + " |"
                lines += [f"\n{method}, {end}\n", head, "|---|" + "---|" * len(CROSSOVER)]
                for var in vs:
                    c = [gmean(cells(cross_errors[method][var.label], end, grids, b)[k]
                               / cells(base, end, grids, b)[k]
                               for k in cells(base, end, grids, b)) for b in CROSSOVER]
                    lines.append(f"| {var.label} | " + " | ".join(f"{r:.2f}" for r in c) + " |")
    lines += verdict_lines(verdicts)
    lines += spot_lines(rows)
    seconds = time.perf_counter() - t0
    lines.append(f"\n(total {seconds:.0f} s, {torch.get_num_threads()} thread, torch "
                 f"{torch.__version__}, {platform.platform()})")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"errors": errors, "crossover": cross_errors,
                                         "verdicts": verdicts, "peers": rows,
                                         "seconds": seconds}, indent=1, default=str))


if __name__ == "__main__":
    main()
