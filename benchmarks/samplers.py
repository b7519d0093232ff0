"""Sampler accuracy against the exact probability-flow ODE, and the samplers' own overhead.

**Accuracy (the oracle table).** Data: a 64-dimensional mixture of 4 Gaussians with unit-scale
random means (``torch.randn``) and component standard deviations uniform in [0.1, 0.4], on
DDPM's discrete linear path (``VP.discrete_linear()``). A few hundred samples start from the
prior; the answer is ``probability_flow_reference`` (scipy DOP853 at 1e-10 on the exact
denoiser). Every grid runs from ``t_max`` to the path's ``t_min`` (``to_zero=False``) and is
compared with the reference at ``t_min``: the step from ``t_min`` to the data would be the same
denoising evaluation for every solver, so it is left out. Grids: uniform in time, uniform in
log-SNR, Karras (rho = 7), and DDPM's discrete "trailing" steps (with ``t_min`` appended in
place of the data end). NFE are counted honestly: a singlestep order-k solver uses k
evaluations per step, Heun 2 (every step here, none ends at sigma = 0), PNDM 4 in each of its 3
Runge-Kutta warm-up steps, PLMS one extra in its first step; each cell uses the most steps that
fit the NFE budget and shows the NFE actually used when it differs.

**Overhead.** Time per network evaluation spent outside the network (the sampler's loop plus the
``Denoiser`` wrapper, with a network that returns zeros) against one call of the ``tiny``
U-Net at batch 16 (3x16x16), both with the same number of threads.

Usage::

    .venv/bin/python benchmarks/samplers.py                  # full table (a few minutes)
    .venv/bin/python benchmarks/samplers.py --quick          # fewer samples and budgets
    .venv/bin/python benchmarks/samplers.py --json out.json  # also write the results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
import difflab.samplers.deis  # noqa: E402,F401  (registers the solvers)
import difflab.samplers.dpm_solver  # noqa: E402,F401
import difflab.samplers.edm  # noqa: E402,F401
import difflab.samplers.pndm  # noqa: E402,F401
import difflab.samplers.unipc  # noqa: E402,F401
from difflab.denoiser import Denoiser  # noqa: E402
from difflab.paths import VP  # noqa: E402
from difflab.samplers import sample, timesteps  # noqa: E402
from difflab.testing import GaussianMixture, probability_flow_reference  # noqa: E402

# evaluations used by ``steps`` steps on a grid that does not end at 0
NFE_OF = {
    "ddim": lambda s: s, "euler": lambda s: s, "heun": lambda s: 2 * s,
    "dpm_solver_2": lambda s: 2 * s, "dpm_solver_3": lambda s: 3 * s,
    "dpmpp_2s": lambda s: 2 * s, "dpmpp_2m": lambda s: s, "dpmpp_3m": lambda s: s,
    "dpm_solver_2m": lambda s: s, "dpm_solver_3m": lambda s: s,
    "unipc_bh1": lambda s: s, "unipc_bh2": lambda s: s,
    "pndm": lambda s: 4 * min(s, 3) + max(s - 3, 0), "plms": lambda s: s + 1,
    "ipndm": lambda s: s, "ipndm_v": lambda s: s, "deis": lambda s: s,
}
SOLVERS = list(NFE_OF)


def steps_for(name: str, budget: int) -> int:
    """The most steps whose NFE fits the budget (0 if not even one step does)."""
    steps = 0
    while NFE_OF[name](steps + 1) <= budget:
        steps += 1
    return steps


def make_grid(kind: str, path, steps: int) -> torch.Tensor:
    if kind == "trailing":  # DDPM's own steps; t_min takes the place of the data end
        grid = timesteps.discrete(path, steps, "trailing", to_zero=False)
        return torch.cat([grid, grid.new_tensor([path.t_min])])
    fn = {"uniform": timesteps.uniform, "log_snr": timesteps.log_snr,
          "karras": timesteps.karras}[kind]
    return fn(path, steps, to_zero=False)


GRIDS = ["uniform", "log_snr", "karras", "trailing"]


def mixture_problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 64, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.3 * torch.rand(4, generator=g, dtype=torch.float64)
    mixture = GaussianMixture(means, stds)
    path = VP.discrete_linear()
    den = mixture.denoiser(path)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64) * path.prior_std
    t0 = time.perf_counter()
    ref = probability_flow_reference(den, x, path.t_max, path.t_min)
    return mixture, den, x, ref, time.perf_counter() - t0, stds.tolist()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def scores(mixture: GaussianMixture, out: torch.Tensor, ref: torch.Tensor) -> dict:
    """RMS error, the median per-sample RMS error, and the samples that ended in another
    component than the exact solution (their error is the distance between two means)."""
    per_sample = (out - ref).pow(2).mean(1).sqrt()
    path = VP.discrete_linear()
    comp = [mixture.log_responsibilities(y, path.t_min, path).argmax(1) for y in (out, ref)]
    return {"rms": rms(out, ref), "median": float(per_sample.median()),
            "flips": int((comp[0] != comp[1]).sum())}


def accuracy_table(mixture, den, x, ref, budgets: list[int]) -> dict:
    path = den.path
    table: dict = {}
    for name in SOLVERS:
        for kind in GRIDS:
            for budget in budgets:
                steps = steps_for(name, budget)
                if steps == 0:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # too-short grids fall back, on purpose
                    out = sample(name, den, x, make_grid(kind, path, steps))
                table.setdefault(name, {}).setdefault(kind, {})[budget] = {
                    "steps": steps, "nfe": NFE_OF[name](steps), **scores(mixture, out, ref)}
    return table


def adaptive_rows(den, x, ref) -> list[dict]:
    from difflab.denoiser import DenoiserBase

    class Counting(DenoiserBase):
        def __init__(self, inner):
            self.inner, self.path, self.calls = inner, inner.path, 0

        def predict(self, x_t, t):
            self.calls += 1
            return self.inner.predict(x_t, t)

    rows = []
    grid = torch.tensor([den.path.t_max, den.path.t_min], dtype=torch.float64)
    for order in (2, 3):
        for rtol, atol in ((0.05, 0.0078), (1e-3, 1e-4)):
            counted = Counting(den)
            out = sample("dpm_adaptive", counted, x, grid, order=order, rtol=rtol, atol=atol)
            rows.append({"order": order, "rtol": rtol, "atol": atol, "nfe": counted.calls,
                         "rms": rms(out, ref)})
    return rows


def best_grids(table: dict, budgets: list[int], metric: str = "rms") -> dict:
    best: dict = {}
    for name, by_grid in table.items():
        for budget in budgets:
            cells = [(v[budget][metric], kind) for kind, v in by_grid.items() if budget in v]
            if cells:
                err, kind = min(cells)
                best.setdefault(name, {})[budget] = {"grid": kind, metric: err}
    return best


def ratios(table: dict, budgets: list[int]) -> dict:
    """DDIM's error over DPM-Solver++(2M)'s and UniPC's, each on its best grid, for the RMS
    error and for the median per-sample error."""
    out: dict = {}
    for metric in ("rms", "median"):
        best = best_grids(table, budgets, metric)
        for name in ("dpmpp_2m", "unipc_bh1", "unipc_bh2"):
            for budget in budgets:
                if budget in best.get("ddim", {}) and budget in best.get(name, {}):
                    ddim, solver = best["ddim"][budget], best[name][budget]
                    out.setdefault(metric, {})[f"{name}@{budget}"] = {
                        "ratio": ddim[metric] / solver[metric], "solver_grid": solver["grid"],
                        "ddim_grid": ddim["grid"]}
    return out


def overhead(steps: int = 20, repeats: int = 5) -> dict:
    """Time per evaluation outside the network, against one tiny U-Net call (batch 16)."""
    try:
        from difflab.networks import UNet, UNetConfig
    except ImportError as err:  # pragma: no cover - networks may not exist yet
        return {"skipped": f"difflab.networks unavailable ({err})"}
    path = VP.discrete_linear()
    x = torch.randn(16, 3, 16, 16)
    net = UNet(UNetConfig.preset("tiny")).eval()
    t_in = path.time_input(torch.full((16,), 0.5))
    with torch.inference_mode():
        unet = median_time(lambda: net(x, t_in, None), repeats * 4)
        null = Denoiser(lambda x_in, t, cond: torch.zeros_like(x_in), path, prediction="eps")
        t_half = torch.tensor(0.5, dtype=torch.float64)
        wrapper = median_time(lambda: null(x, t_half), repeats * 20)
        rows = {}
        grid = timesteps.log_snr(path, steps)
        for name in [*SOLVERS, "dpmpp_2m_sde", "euler_ancestral"]:
            nfe = NFE_OF.get(name, lambda s: s)(steps - 1) + 1  # steps - 1 solver steps, then 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = median_time(lambda name=name: sample(name, null, x, grid, noise=0), repeats)
            loop = t / nfe - wrapper
            rows[name] = {"us_per_eval": 1e6 * loop, "percent_of_unet": 100 * loop / unet}
    return {"unet_ms": 1e3 * unet, "wrapper_us": 1e6 * wrapper,
            "threads": torch.get_num_threads(), "samplers": rows}


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----- printing ---------------------------------------------------------------------------------
def print_tables(res: dict) -> None:
    budgets, table, best = res["budgets"], res["table"], res["best"]
    head = "| solver | grid | " + " | ".join(f"NFE {b}" for b in budgets) + " |"
    rule = "|---|---|" + "---|" * len(budgets)
    print(f"\n### RMS error to the exact ODE solution at t_min ({res['samples']} samples, "
          f"64-D mixture of 4, VP.discrete_linear)\n\n{head}\n{rule}")
    for name, by_grid in table.items():
        for kind in GRIDS:
            cells = []
            for b in budgets:
                c = by_grid.get(kind, {}).get(b)
                if c is None:
                    cells.append("-")
                    continue
                star = "**" if best[name][b]["grid"] == kind else ""
                extra = "" if c["nfe"] == b else f" ({c['nfe']})"
                cells.append(f"{star}{c['rms']:.2e}{star}{extra}")
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    print("\nBold: the solver's best grid at that budget; (n): NFE actually used.")
    print("\n### Median per-sample error [samples in another component than the exact "
          "solution], log-SNR grid\n")
    print("| solver | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, by_grid in table.items():
        cells = [f"{c['median']:.2e} [{c['flips']}]" if (c := by_grid["log_snr"].get(b)) else "-"
                 for b in budgets]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### Best grid per solver (RMS)\n")
    print("| solver | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name, by_budget in best.items():
        cells = [by_budget[b]["grid"] if b in by_budget else "-" for b in budgets]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### DDIM's error / the solver's, each on its best grid\n")
    print("| solver @ NFE | RMS ratio | median ratio |\n|---|---|---|")
    for key, r in res["ratios"]["rms"].items():
        m = res["ratios"]["median"][key]
        print(f"| {key} | {r['ratio']:.1f}x ({r['solver_grid']} vs {r['ddim_grid']}) | "
              f"{m['ratio']:.1f}x ({m['solver_grid']} vs {m['ddim_grid']}) |")
    print("\n### Adaptive DPM-Solver (dpm_adaptive, t_max to t_min)\n")
    print("| order | rtol | atol | NFE | RMS error |\n|---|---|---|---|---|")
    for row in res["adaptive"]:
        print(f"| {row['order']} | {row['rtol']} | {row['atol']} | {row['nfe']} | "
              f"{row['rms']:.2e} |")
    print_overhead(res["overhead"])


def print_overhead(ov: dict) -> None:
    if "skipped" in ov:
        print(f"\nOverhead: skipped ({ov['skipped']})")
        return
    print(f"\n### Sampler overhead per evaluation (tiny U-Net at batch 16: {ov['unet_ms']:.1f} ms;"
          f" Denoiser wrapper: {ov['wrapper_us']:.0f} us; {ov['threads']} thread(s))\n")
    print("| sampler | us / evaluation in the sampler loop | % of a U-Net call |\n|---|---|---|")
    for name, row in ov["samplers"].items():
        print(f"| {name} | {row['us_per_eval']:.0f} | {row['percent_of_unet']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, NFE 10 and 20")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (the oracle's small tensors gain nothing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = args.samples or (64 if args.quick else 256)
    budgets = [10, 20] if args.quick else [5, 10, 20, 50]
    t0 = time.perf_counter()
    mixture, den, x, ref, t_ref, stds = mixture_problem(samples)
    table = accuracy_table(mixture, den, x, ref, budgets)
    best = best_grids(table, budgets)
    res = {
        "command": " ".join(["benchmarks/samplers.py", *sys.argv[1:]]),
        "samples": samples, "budgets": budgets, "component_stds": stds,
        "compare_at": "t_min (grids end there, to_zero=False)", "reference_seconds": t_ref,
        "table": table, "best": best, "ratios": ratios(table, budgets),
        "adaptive": adaptive_rows(den, x, ref),
        "overhead": overhead(repeats=3 if args.quick else 5),
        "torch": torch.__version__, "platform": platform.platform(),
    }
    res["seconds"] = time.perf_counter() - t0
    print_tables(res)
    print(f"\n(total {res['seconds']:.0f} s, reference {t_ref:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
