"""Adaptive DPM-Solver-12/23: difflab's step controllers against k-diffusion's PID controller.

Both solve the identical probability-flow ODE on the exact oracle (``difflab.testing``'s
64-dimensional mixture of 4 Gaussians, ``benchmarks/samplers.py``'s data) on EDM's path
(``x = x0 + sigma noise``) from ``sigma_max = 80`` to ``sigma_min = 0.002``, in float64; the
answer is ``probability_flow_reference`` (DOP853 at 1e-10). k-diffusion's
``sample_dpm_adaptive`` gets difflab's exact EDM denoiser as its ``model(x, sigma) -> x0``.

NFE: batched denoiser calls (what k-diffusion's ``info['nfe']`` counts too). difflab controls
every sample separately and evaluates only the rows that need it, so it also reports
evaluations per sample (rows evaluated / batch size), the compute when a call costs in
proportion to its rows. ``kd_per_sample`` runs k-diffusion on one sample at a time (its norm
then is per sample, like difflab's): its NFE cell is the mean over samples with the max
in brackets; the equal-cost table uses the max as its NFE (what a batch waits for).
``pid_x_low`` is a measurement only (the embedded pair swapped so ``x_low`` is kept).
``*_batch``: difflab with ``norm="batch"``, one error norm over the batch as k-diffusion takes
it (the samples step together); ``pid_integral_batch`` is k-diffusion's own configuration.

k-diffusion is installed without its dependencies by ``make install`` (or by hand:
``pip install --no-deps k-diffusion==0.1.1.post1``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive_pid.py

Its ``sampling.py`` is loaded alone by ``difflab.testing.peers.load_k_diffusion_sampling``,
with stand-ins for ``utils`` (only ``append_dims``) and for ``torchsde`` / ``torchdiffeq`` when
missing (the adaptive solver calls neither).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
import difflab.samplers.dpm_adaptive as dpm_adaptive  # noqa: E402
from difflab.denoiser import DenoiserBase  # noqa: E402
from difflab.paths import EDM  # noqa: E402
from difflab.samplers import sample  # noqa: E402
from difflab.testing import GaussianMixture, probability_flow_reference  # noqa: E402
from difflab.testing.peers import load_k_diffusion_sampling  # noqa: E402

TOLS = [(0.05, 0.0078), (0.02, 0.003), (0.01, 0.002), (3e-3, 5e-4), (1e-3, 1e-4), (3e-4, 3e-5)]


class Counting(DenoiserBase):
    def __init__(self, inner: DenoiserBase) -> None:
        self.inner, self.path, self.calls, self.rows = inner, inner.path, 0, 0

    def predict(self, x, t):
        self.calls, self.rows = self.calls + 1, self.rows + x.shape[0]
        return self.inner.predict(x, t)


def problem(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 64, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.3 * torch.rand(4, generator=g, dtype=torch.float64)
    path = EDM()
    den = GaussianMixture(means, stds).denoiser(path)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64) * path.sigma_max
    return den, x, probability_flow_reference(den, x, path.sigma_max, path.sigma_min)


def run_kd(kd, den, x, order, rtol, atol):
    calls = [0]

    def model(x_in, sigma):
        calls[0] += 1
        return den(x_in, sigma).x0

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its torch.tensor(sigma) would be float32
    try:
        out = kd.sample_dpm_adaptive(model, x.clone(), 0.002, 80.0, order=order, rtol=rtol,
                                     atol=atol, disable=True)
    finally:
        torch.set_default_dtype(before)
    return out, calls[0]


def methods(kd, den, x):
    grid = torch.tensor([80.0, 0.002], dtype=torch.float64)

    def difflab(**kw):
        def run(order, rtol, atol):
            counted = Counting(den)
            out = sample("dpm_adaptive", counted, x, grid, order=order, rtol=rtol, atol=atol,
                         **kw)
            return out, counted.calls, counted.rows / x.shape[0]
        return run

    def kd_batch(order, rtol, atol):
        out, nfe = run_kd(kd, den, x, order, rtol, atol)
        return out, nfe, nfe

    def kd_rows(order, rtol, atol):
        runs = [run_kd(kd, den, x[i:i + 1], order, rtol, atol) for i in range(x.shape[0])]
        nfes = [n for _, n in runs]
        return torch.cat([o for o, _ in runs]), max(nfes), sum(nfes) / len(nfes)

    def x_low(order, rtol, atol):
        pair = dpm_adaptive._embedded_pair
        dpm_adaptive._embedded_pair = lambda *a: pair(*a)[::-1]
        try:
            return difflab(controller="pid")(order, rtol, atol)
        finally:
            dpm_adaptive._embedded_pair = pair

    return {"kd": kd_batch, "kd_per_sample": kd_rows, "dpm": difflab(),
            "pid_integral": difflab(controller="pid", pcoeff=0.0, icoeff=1.0),
            "pid": difflab(controller="pid"), "pid_x_low": x_low,
            "pid_batch": difflab(controller="pid", norm="batch"),
            "pid_integral_batch": difflab(controller="pid", pcoeff=0.0, icoeff=1.0,
                                          norm="batch")}


def at_nfe(points, nfe):
    """log-log interpolation of the error at ``nfe`` (NaN outside the measured range)."""
    pts = sorted((math.log(n), math.log(e)) for n, e in points)
    for (a, ea), (b, eb) in zip(pts, pts[1:]):
        if a <= math.log(nfe) <= b and b > a:
            return math.exp(ea + (eb - ea) * (math.log(nfe) - a) / (b - a))
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    kd = load_k_diffusion_sampling()
    den, x, ref = problem(args.samples, args.seed)
    print(f"`{' '.join(['benchmarks/adaptive_pid.py', *sys.argv[1:]])}`: {args.samples} samples,"
          f" seed {args.seed}; NFE = batched calls, evals/sample = rows evaluated / batch\n")
    print("| order | rtol | atol | method | NFE | evals/sample | RMS error |\n"
          "|---|---|---|---|---|---|---|")
    curves: dict = {}
    for order in (2, 3):
        for name, fn in methods(kd, den, x).items():
            for rtol, atol in TOLS:
                out, nfe, per = fn(order, rtol, atol)
                err = float((out - ref).pow(2).mean().sqrt())
                curves.setdefault((order, name), []).append((nfe, per, err))
                nfe_text = f"{per:.0f} (max {nfe})" if name == "kd_per_sample" else f"{nfe}"
                print(f"| {order} | {rtol:g} | {atol:g} | {name} | {nfe_text} | {per:.1f} | "
                      f"{err:.2e} |")
    print("\nRMS error at equal cost (log-log interpolation; NaN: outside the measured range)\n")
    print("| order | method | @60 NFE | @100 NFE | @60 evals/sample | @100 evals/sample |\n"
          "|---|---|---|---|---|---|")
    for (order, name), pts in curves.items():
        cells = [at_nfe([(n, e) for n, _, e in pts], c) for c in (60, 100)]
        cells += [at_nfe([(p, e) for _, p, e in pts], c) for c in (60, 100)]
        print(f"| {order} | {name} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
    print(f"\n{time.perf_counter() - t0:.0f} s, torch {torch.__version__}")


if __name__ == "__main__":
    main()
