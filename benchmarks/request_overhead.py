"""What one sampling request costs beyond the sampler, and how fast the CLI starts.

1. ``difflab.generate(SampleRequest(...))`` against calling the sampler directly
   (``difflab.samplers.sample`` on the same denoiser, prior noise and grid): a tiny random-weight
   U-Net (preset ``tiny``, 16x16x1), batch 16, DDIM 20 steps, one thread. The two are timed in
   alternation, ``--repeats`` times each, after a warm-up; the medians are compared. The request
   resolves its settings, builds per-sample noise streams, counts network calls with a forward
   hook and moves the result to the CPU; the direct call does none of that.
2. ``difflab --help`` and ``difflab sample --help``: wall time of a fresh process, median of 5.

    .venv/bin/python benchmarks/request_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def sampler_overhead(repeats: int) -> dict:
    from difflab.config import load_config
    from difflab.samplers import PerSampleNoise, sample
    from difflab.sampling import LoadedRun, SampleRequest, generate, sample_seeds, sampling_grid
    from difflab.tasks import make_task

    class Data:
        image_size, channels, num_classes = 16, 1, None

        def __len__(self) -> int:
            return 16

    cfg = load_config(None, ["model.preset='tiny'", "sample.sampler='ddim'", "sample.steps=20"])
    task = make_task(cfg, dataset=Data())
    torch.manual_seed(0)
    net = task.build_model().eval().requires_grad_(False)
    run = LoadedRun.from_task(task, net)
    n, steps = 16, 20
    request = SampleRequest(run, sampler="ddim", steps=steps, n=n, batch_size=n, seed=0,
                            guidance="none")
    grid = sampling_grid(run.path, steps)
    seeds = sample_seeds(0, n)

    @torch.no_grad()
    def direct():
        noise = PerSampleNoise(seeds)
        x = run.path.prior_sample((n, *run.sample_shape), noise=noise)
        return sample("ddim", run.denoiser, x, grid, noise=noise)

    def via_request():
        return generate(request).images

    assert torch.equal(direct(), via_request())  # the same computation
    for f in (direct, via_request):
        f()
    times = {"direct": [], "request": []}
    for _ in range(repeats):
        for name, f in (("direct", direct), ("request", via_request)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"direct_s": med["direct"], "request_s": med["request"],
            "overhead_pct": 100 * (med["request"] / med["direct"] - 1), "repeats": repeats}


def startup(args: list[str], runs: int = 5) -> float:
    exe = Path(sys.executable).with_name("difflab")
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([str(exe), *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    res = sampler_overhead(args.repeats)
    res["help_s"] = startup(["--help"])
    res["sample_help_s"] = startup(["sample", "--help"])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
