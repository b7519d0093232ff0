"""Tuned grids against the best fixed grid on the exact oracle (`difflab.samplers.tuning`).

Problems: Gaussian mixtures (4 components, unit-scale random means) in 16 or 64 dimensions,
with narrow (std 0.1-0.4) or wide (std 0.5-1.0) components, on four paths: DDPM's discrete
linear VP, VE, EDM and the Linear (rectified-flow) path. For each sampler and budget the
search tunes on 512 noises and every grid is then scored on 512 other noises, against
``probability_flow_reference`` (scipy DOP853 at 1e-10 on the exact denoiser). Grids stop at
the path's ``t_min`` (``to_zero=False``): the last step to the data is the same denoising for
every grid. The fixed grids: uniform in t, quadratic in t, uniform in log-SNR, Karras with
rho 3, 5, 7 and 10. The error is the mean over samples of each sample's RMS difference
(`sample_error`, the search's objective); the plain RMS over the batch is also recorded in
the JSON.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_grid.py --json out.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_grid.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
import difflab.samplers.deis  # noqa: E402,F401  (registers the solvers)
import difflab.samplers.dpm_solver  # noqa: E402,F401
import difflab.samplers.unipc  # noqa: E402,F401
from difflab.paths import EDM, VE, VP, Linear  # noqa: E402
from difflab.samplers import sample, timesteps  # noqa: E402
from difflab.samplers.tuning import rms, sample_error, tune_grid  # noqa: E402
from difflab.testing import GaussianMixture, probability_flow_reference  # noqa: E402

PATHS = {"vp_discrete": VP.discrete_linear, "ve": VE, "edm": EDM, "linear": Linear}
SAMPLERS = ["ddim", "dpmpp_2m", "unipc_bh2", "deis", "ipndm_v"]


def fixed_grids(path, steps: int) -> dict[str, torch.Tensor]:
    out = {k: timesteps.make_grid(k, path, steps, to_zero=False)
           for k in ("uniform", "quadratic", "log_snr")}
    out.update({f"karras[{r}]": timesteps.karras(path, steps, rho=r, to_zero=False)
                for r in (3, 5, 7, 10)})
    return out


def problem(dim: int, width: str, path_name: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, dim, generator=g, dtype=torch.float64)
    lo, hi = (0.1, 0.4) if width == "narrow" else (0.5, 1.0)
    stds = lo + (hi - lo) * torch.rand(4, generator=g, dtype=torch.float64)
    path = PATHS[path_name]()
    den = GaussianMixture(means, stds).denoiser(path)
    x = torch.randn(2 * n, dim, generator=g, dtype=torch.float64) * path.prior_std
    tune, held = x[:n], x[n:]
    refs = [probability_flow_reference(den, z, path.t_max, path.t_min) for z in (tune, held)]
    return den, path, tune, held, refs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one problem per path, NFE 10 only")
    ap.add_argument("--n", type=int, default=512, help="tuning (and held-out) noises")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    budgets = [10] if args.quick else [5, 10, 20]
    cases = [(16, "narrow"), (64, "narrow"), (64, "wide")]
    if args.quick:
        cases = [(16, "narrow")]
    rows = []
    print("| problem | sampler | NFE | best fixed grid | its error | tuned | gain | "
          "solves | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path_name in PATHS:
        for dim, width in cases:
            den, path, tune, held, (ref_t, ref_h) = problem(dim, width, path_name, args.n)
            for name in SAMPLERS:
                for nfe in budgets:
                    grids = fixed_grids(path, nfe)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = tune_grid(
                            lambda g, name=name, den=den, tune=tune: sample(name, den, tune, g),
                            grids, ref_t, path)
                        outs = {k: sample(name, den, held, g) for k, g in grids.items()}
                        outs["tuned"] = sample(name, den, held, res.grid)
                    err = {k: sample_error(o, ref_h) for k, o in outs.items()}
                    plain = {k: rms(o, ref_h) for k, o in outs.items()}
                    best = min((k for k in err if k != "tuned"), key=err.get)
                    gain = err[best] / err["tuned"] if err["tuned"] > 0 else math.inf
                    label = f"{path_name} d{dim} {width}"
                    rows.append({"problem": label, "sampler": name, "nfe": nfe,
                                 "best_fixed": best, "error": err, "rms": plain, "gain": gain,
                                 "solves": res.solves, "seconds": res.seconds,
                                 "grid": res.grid.tolist()})
                    print(f"| {label} | {name} | {nfe} | {best} | {err[best]:.2e} | "
                          f"{err['tuned']:.2e} | {gain:.2f}x | {res.solves} | "
                          f"{res.seconds:.1f} |", flush=True)
    print("\ngeometric-mean gain per sampler and NFE (over problems):")
    for name in SAMPLERS:
        for nfe in budgets:
            g = [r["gain"] for r in rows if r["sampler"] == name and r["nfe"] == nfe]
            mean = math.exp(sum(math.log(x) for x in g) / len(g))
            print(f"  {name:10s} NFE {nfe:2d}: {mean:.2f}x (min {min(g):.2f}, max {max(g):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
