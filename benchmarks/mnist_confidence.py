"""Recognisable digits: the confident fraction of a trained MNIST run against held-out real digits.

The product issue's measure (the same one `make demo` reports on 8x8 digits): the fraction of
images that a digit classifier assigns to some class with probability above 0.9, for samples of
the run's EMA model and for real digits the run never trained on. The ratio of the two is the
figure of merit (1.0 = as recognisable as real digits).

- The real digits are the run's own hold-out: the MNIST images its config set aside with
  ``data.holdout_fraction`` (configs/ddpm_mnist.toml holds out 10% of each class).
- The classifier is the ``mnist-lenet`` extractor (difflab trains it on 80% of the same MNIST
  images, seed 0). Its 20% hold-out contains the run's 10% hold-out (same seed, nested
  stratified split), so neither network has seen the real digits scored here.
- Runs at another resolution are resized (bilinear, antialiased) to 28x28 for the classifier,
  and the real digits go through the same down-and-up resize.

    .venv/bin/python benchmarks/mnist_confidence.py --run RUN \
        [--samplers ddim:50,dpmpp_2m:20,ddpm:1000] [--n 500] [--out benchmarks/results/ddpm_mnist]
    .venv/bin/python benchmarks/mnist_confidence.py --run RUN --eval-dir RUN/eval

The second form scores the samples ``difflab eval`` saved (``RUN/eval/samples/*.npy``) instead
of drawing new ones.

Writes ``confidence.json``, ``confidence.md`` and one 10x10 sample grid per sampler.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from difflab.data import build_dataset, save_image_grid
from difflab.demo import CONFIDENCE
from difflab.evaluation import get_extractor
from difflab.sampling import SampleRequest, generate, load_run

REPO = Path(__file__).resolve().parents[1]


def confident(ext, x: torch.Tensor) -> dict:
    """Share of images with max class probability > CONFIDENCE, and the classes given."""
    p = torch.softmax(ext.logits(x.float().clamp(-1, 1)), dim=1)
    conf, cls = p.max(1)
    sure = conf > CONFIDENCE
    return {"confident": float(sure.double().mean()),
            "classes": torch.bincount(cls[sure], minlength=10).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--samplers", default="ddim:50,dpmpp_2m:20",
                   help="comma-separated NAME:STEPS")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eval-dir", help="score the samples difflab eval saved in DIR/samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddpm_mnist"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    run = load_run(args.run)
    data = run.config.data
    opts = data.options()
    if data.name != "mnist" or not opts.get("holdout_fraction"):
        raise SystemExit(f"{args.run}: needs an MNIST run with data.holdout_fraction > 0 (the "
                         "real digits it never trained on); configs/ddpm_mnist.toml has one")
    held = build_dataset("mnist", root=data.root, image_size=data.image_size, split=data.split,
                         **{**opts, "held_out": True})
    full = build_dataset("mnist", root=data.root, split="all")
    ext = get_extractor("mnist-lenet", full, train=True, progress=True)
    ext.resize_inputs = True  # a 16x16 run: samples and real digits alike, up to 28x28
    xr = torch.stack([held[i][0] for i in range(len(held))])
    results: dict = {"run": args.run, "step": run.step, "image_size": run.sample_shape[-1],
                     "n": args.n, "threshold": CONFIDENCE, "extractor_accuracy":
                     ext.meta.get("score"), "real": {"n": len(xr), **confident(ext, xr)},
                     "samplers": []}
    print(f"held-out real digits (n={len(xr)}): confident {results['real']['confident']:.3f}",
          flush=True)
    save_image_grid(xr[:100], out / "real.png", nrow=10)
    clip = bool(run.config.sample.clip_x0)

    def score(name: str, steps: str, x: torch.Tensor, seconds: float) -> None:
        row = {"sampler": name, "steps": steps, "n": int(x.shape[0]), **confident(ext, x),
               "seconds": seconds}
        row["ratio"] = row["confident"] / max(results["real"]["confident"], 1e-9)
        results["samplers"].append(row)
        save_image_grid(x[:100].clamp(-1, 1), out / f"{name}_{steps}.png", nrow=10)
        print(f"{name} {steps}: confident {row['confident']:.3f} ({row['ratio']:.2f} x real, "
              f"n={row['n']}) classes {row['classes']}  ({seconds:.0f} s)", flush=True)

    if args.eval_dir:
        for file in sorted(Path(args.eval_dir, "samples").glob("*.npy")):
            name, _, steps = file.stem.partition("-")
            score(name, steps, torch.from_numpy(np.load(file)), 0.0)
    else:
        for spec in args.samplers.split(","):
            name, steps = spec.split(":")
            start = time.perf_counter()
            x = generate(SampleRequest(run, sampler=name, steps=int(steps), n=args.n,
                                       seed=args.seed, batch_size=250, clip_x0=clip,
                                       guidance="none", progress=f"{name} {steps}")).images
            score(name, steps, x, time.perf_counter() - start)
    (out / "confidence.json").write_text(json.dumps(results, indent=2))
    lines = [f"Run {args.run} (step {run.step}); judge mnist-lenet "
             f"(held-out accuracy {results['extractor_accuracy']}), threshold p > {CONFIDENCE}.",
             "", "| images | confident fraction | ratio to real |", "| --- | --- | --- |",
             f"| held-out real (n={len(xr)}) | {results['real']['confident']:.3f} | 1.00 |"]
    lines += [f"| {r['sampler']} {r['steps']} (n={r['n']}) | {r['confident']:.3f} | "
              f"{r['ratio']:.2f} |"
              for r in results["samplers"]]
    (out / "confidence.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
