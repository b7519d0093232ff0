"""DiffPure (Nie et al. 2022) on trained MNIST: clean and robust accuracy against ``t*``.

The defended model is ``mnist-lenet`` (the classifier ``difflab eval`` trains on the run's
training images) behind the purifier of :mod:`difflab.recipes.diffpure`: diffuse to ``t*``
(DiffPure eq. 4), then ``--steps`` ancestral steps of the reverse SDE (DDPM Alg. 2 on the
path's own steps below ``t*``, trailing-spaced; eq. 5). ``t* = 0`` is the undefended
classifier. The images are the run's held-out digits (neither the DDPM nor the classifier
trained on them), ``--n`` of them drawn with a seeded permutation.

Attacks (all written in difflab, :mod:`difflab.recipes.attacks`; budgets in ``[0, 1]`` pixel
units, i.e. twice that on difflab's ``[-1, 1]`` images):

* ``pgd_linf`` (eps 0.3) and ``pgd_l2`` (eps 1.5): PGD (Madry et al. 2018) on the undefended
  classifier, the adversarial images then purified (transfer: the attack never sees the
  purifier);
* ``bpda``: PGD L-inf 0.3 through the purifier with its backward pass replaced by the
  identity (Athalye et al. 2018, Sec. 4.1), one fresh purifier draw per step;
* ``full``: PGD L-inf 0.3 with the full gradient through the purifier's sampler
  (checkpointed per step), one fresh draw per step;
* ``eot``: the same gradient averaged over ``--eot`` draws per step (Athalye et al. 2018,
  Sec. 4.3).

Every attack takes ``--attack-steps`` steps of ``2.5 eps / steps`` from a random start; the
robust accuracy scores each adversarial image with a purifier draw the attack never used.
At ``t* = 0`` the adaptive attacks are white-box PGD on the classifier itself::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffpure_mnist.py --run /work/runs/ddpm45 \\
        [--n 48] [--steps 8] [--attack-steps 10] [--eot 4] [--t-stars 0,0.05,0.1,0.2,0.3]

Writes ``OUT/diffpure_mnist.json`` after every cell and ``OUT/diffpure_mnist.md`` (default OUT:
benchmarks/results/diffpure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "diffpure"
ATTACKS = ("none", "pgd_linf", "pgd_l2", "bpda", "full", "eot")
HEAD = {"none": "clean", "pgd_linf": "PGD-Linf 0.3 transfer", "pgd_l2": "PGD-L2 1.5 transfer",
        "bpda": "BPDA Linf 0.3", "full": "full gradient Linf 0.3", "eot": "EOT-{k} Linf 0.3"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="/work/runs/ddpm45")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=8, help="reverse steps from t*")
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--eot", type=int, default=4)
    p.add_argument("--t-stars", default="0,0.05,0.1,0.2,0.3")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--machine", default="2-core CPU, 1 thread")
    p.add_argument("--date", default="2026-12-07")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from tqdm.auto import tqdm

    from difflab.fileio import write_text_atomic
    from difflab.recipes.diffpure import Purifier
    from difflab.recipes.robustness import Attack, evaluate, held_out_images, judge_for_run, pick
    from difflab.runs import load_run

    run = load_run(args.run)
    ext = judge_for_run(run, train=True)
    x, y, what = held_out_images(run, ext.name)
    x, y, _ = pick(x, y, args.n, args.seed)
    t_stars = [float(t) for t in args.t_stars.split(",")]
    names = args.attacks.split(",")
    out_json = args.out / "diffpure_mnist.json"
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diffpure_mnist.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results = {"command": command, "machine": args.machine, "date": args.date,
               "torch": torch.__version__, "python": platform.python_version(),
               "run": str(args.run), "step": run.step, "classifier": ext.name,
               "classifier_meta": {k: ext.meta.get(k) for k in ("key", "score", "n_train")},
               "images": what, "n": args.n, "steps": args.steps,
               "attack_steps": args.attack_steps, "eot": args.eot, "seed": args.seed,
               "cells": []}
    start = time.perf_counter()
    cells = [(t, a) for t in t_stars for a in names]
    for t, name in tqdm(cells, desc="diffpure cells", unit="cell"):
        purifier = None if t == 0 else Purifier(
            run.denoiser, t, "ddpm", args.steps, clip_x0=run.config.sample.clip_x0,
            checkpoint=name in ("full", "eot"), seed=args.seed)
        attack = Attack(name, steps=args.attack_steps,
                        eot=args.eot if name == "eot" else None)
        r = evaluate(ext.net.logits, x, y, purifier, attack, seed=args.seed,
                     batch_size=args.n, progress=True, desc=f"t*={t:g} {name}")
        results["cells"].append(r)
        results["seconds"] = time.perf_counter() - start
        write_text_atomic(out_json, json.dumps(results, indent=2) + "\n")
        (args.out / "diffpure_mnist.md").write_text(table(results))
        tqdm.write(f"t*={t:g} {name}: clean {r['clean_accuracy']:.3f} robust "
                   f"{r['robust_accuracy']:.3f} ({r['seconds']:.0f} s)")
    print(table(results))
    return 0


def table(results: dict) -> str:
    """The markdown table: robust accuracy (defended) per t* and attack."""
    cells = results["cells"]
    t_stars = list(dict.fromkeys(c["t_star"] for c in cells))
    names = list(dict.fromkeys(c["attack"] for c in cells))
    by = {(c["t_star"], c["attack"]): c for c in cells}
    k = results["eot"]
    heads = [HEAD[a].format(k=k) for a in names]
    lines = [
        "# DiffPure on MNIST (difflab)", "",
        f"- command: `{results['command']}`",
        f"- machine: {results['machine']}; date {results['date']}; torch {results['torch']}; "
        f"total {results.get('seconds', 0) / 60:.1f} min",
        f"- diffusion model: `{results['run']}` (step {results['step']}); classifier: "
        f"`{results['classifier']}` (held-out accuracy "
        f"{results['classifier_meta'].get('score') or float('nan'):.4f})",
        f"- images: n = {results['n']} of {results['images']}",
        f"- purifier: diffuse to t* (DiffPure eq. 4), then {results['steps']} ancestral "
        "`ddpm` steps of the reverse SDE from t* (eq. 5), clip_x0; t* = 0: no purifier",
        f"- attacks: {results['attack_steps']} PGD steps of 2.5 eps / steps from a random "
        f"start; EOT: {k} purifier draws per step; BPDA and full gradient: 1 fresh draw per "
        "step; full / EOT gradients checkpointed per reverse step. Budgets in [0, 1] pixel "
        "units (x2 on difflab's [-1, 1] images): L-inf 0.3, L2 1.5. Robust accuracy scores "
        "each adversarial image with a purifier draw the attack never used.",
        "",
        "Accuracy of purifier + classifier (clean column: clean images; the others: under "
        "that attack):", "",
        "| t* | " + " | ".join(heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for t in t_stars:
        row = []
        for a in names:
            c = by.get((t, a))
            if c is None:
                row.append("")
            else:
                key = "clean_accuracy" if a == "none" else "robust_accuracy"
                row.append(f"{c[key]:.3f}")
        lines.append(f"| {t:g} | " + " | ".join(row) + " |")
    lines += ["", "The same adversarial images fed to the undefended classifier (does the attack "
              "fool the classifier itself?), and seconds per cell:", "",
              "| t* | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for t in t_stars:
        row = []
        for a in names:
            c = by.get((t, a))
            row.append("" if c is None else
                       f"{c['undefended_robust_accuracy']:.3f} ({c['seconds']:.0f} s)")
        lines.append(f"| {t:g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
