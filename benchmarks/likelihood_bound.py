"""How loose is the strided discrete VLB, and does Analytic-DPM's variance fix it?

The discrete variational bound (Ho et al. 2020, eq. 5) over a k-step respacing of a trained
run's path is an upper bound on the NLL of its held-out images; with DDPM's fixed variances it
blows up as k falls (issue 18 measured 1,501 bits/dim at 50 steps of ddpm_mnist). Analytic-DPM
(Bao et al. 2022a, Thm. 1-2 and their Table 1) replaces the variance by the one that is optimal
for the trained mean, estimated from the run's training data (``Gamma_t``), which should keep
few-step bounds close to the full-step one. This script evaluates the bound exactly as
``difflab eval RUN --metrics nll --nll-steps K --nll-variance V`` does, for every K and V, on
the same images:

    .venv/bin/python benchmarks/likelihood_bound.py RUN [--n 256] [--steps 10,50,200,1000]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from difflab.builders import build_dataset, build_held_out
    from difflab.evaluation.command import likelihood, load_run
    from difflab.evaluation.features import dataset_tensors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=256, help="held-out images (default 256)")
    p.add_argument("--steps", default="10,50,200,1000")
    p.add_argument("--variances", default="small,large,analytic")
    p.add_argument("--clip", default="both", choices=["both", "on", "off"],
                   help="x0_hat clipped to [-1, 1] in the means (on), not (off) or both tables")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    held = build_held_out(run.config)
    data = dataset_tensors(held if held is not None else build_dataset(run.config))[0]
    steps = [int(s) for s in args.steps.split(",")]
    variances = args.variances.split(",")
    print(f"run {args.run} (step {run.step}), {min(args.n, data.shape[0])} "
          f"{'held-out' if held is not None else 'training'} images, bits/dim (lower is "
          "tighter; every entry is an upper bound on the same NLL)\n")
    clips = {"both": (False, True), "on": (True,), "off": (False,)}[args.clip]
    print("| steps | " + " | ".join(f"{v}, {'clipped' if c else 'unclipped'}" for c in clips
                                    for v in variances) + " |")
    print("| --- |" + " --- |" * (len(variances) * len(clips)))
    for k in steps:
        cells = []
        for clip in clips:
            for v in variances:
                start = time.perf_counter()
                res = likelihood(run, data, args.n, k, v, clip_x0=clip)
                cells.append(f"{res['value']:.3f} ± {res['stderr']:.3f} "
                             f"({time.perf_counter() - start:.0f} s)")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
