"""SDEdit's trade-off at small scale (Meng et al. 2022, Fig. 3 / Table 1): faithfulness to a
guide against realism as ``t0`` sweeps from 0.1 to 1.0.

Guides are made from real images that are *not* in the KID reference (the held-out half of a
:class:`~difflab.evaluation.evaluate.RealReference` split): rough hand-drawn-like strokes of
MNIST digits (:func:`difflab.recipes.sdedit.digit_strokes`) for an MNIST run, colour stroke
paintings (:func:`~difflab.recipes.sdedit.stroke_painting`) of emoji for an emoji run (a text
run is prompted with each source image's own caption). Each guide is edited once per ``t0``
with the same seeds and the same number of sampler steps from ``t0`` (SDEdit Alg. 1: ``N``
steps of size ``t0 / N``), so the cost per edit is the same at every ``t0``.

Per ``t0``: faithfulness (:func:`~difflab.recipes.sdedit.faithfulness`, RMS distance to the
guide at 8x8, lower = more faithful), KID against the reference half on the dataset's
extractor features (``mnist-lenet`` / ``emoji-ae``, lower = more realistic), and the same for
the guides themselves and for the real floor. Writes ``OUT/NAME.json``, ``OUT/NAME.md``, the
plot ``OUT/NAME.png`` and an example grid ``OUT/NAME_grid.png`` (rows: source, guide, edits
at increasing ``t0``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sdedit_tradeoff.py --run /work/runs/ddpm45 \\
        --name mnist [--n 200] [--sampler ddim --steps 20]
    .venv/bin/python benchmarks/sdedit_tradeoff.py --run /work/runs/ldm_emoji --name emoji \\
        --guidance cfg:3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "sdedit"
T0S = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--name", required=True, help="output name (mnist, emoji, ...)")
    p.add_argument("--n", type=int, default=200, help="guides (one edit each per t0)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", default=None, help="e.g. cfg:3 for a text run")
    p.add_argument("--t0s", default=",".join(map(str, T0S)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--machine", default="2-core CPU")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from difflab.builders import build_dataset
    from difflab.data import save_image_grid
    from difflab.evaluation.command import _native_data
    from difflab.evaluation.evaluate import RealReference
    from difflab.evaluation.features import (
        dataset_tensors,
        extractor_for_dataset,
        get_extractor,
    )
    from difflab.recipes.sdedit import digit_strokes, faithfulness, sdedit, stroke_painting
    from difflab.sampling import load_run

    run = load_run(args.run)
    cfg = run.config
    data = build_dataset(cfg)
    real, _ = dataset_tensors(data)
    name = extractor_for_dataset(cfg.data.name)
    ext = get_extractor(name, _native_data(name, cfg, data), train=True)
    ext.resize_inputs = True
    ref = RealReference(ext, real, torch.Generator().manual_seed(args.seed))
    # the guides' sources: held-out half images (not in the KID reference), a seeded choice
    g = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(ref.holdout_images.shape[0], generator=g)[:args.n]
    source = ref.holdout_images[pick]
    text = run.conditioner.kind == "text"
    if source.shape[1] == 1:
        guide = digit_strokes(source, seed=args.seed)
        kind = "digit_strokes (4x4 cells, shaky shift, blur 0.8)"
    else:
        guide = stroke_painting(source, seed=args.seed)
        kind = "stroke_painting (6 colours, 4x4 blocks, blur 1)"
    extra = {}
    if text:
        # the captions of the picked sources: find each held-out image's index in the dataset
        from difflab.evaluation.metrics import split_halves

        _, b = split_halves(real.shape[0], torch.Generator().manual_seed(args.seed))
        extra["prompts"] = [data.captions[int(b[int(i)])] for i in pick]
    if args.guidance:
        extra["guidance"] = args.guidance
    floor = ref.floor(args.n, ["kid"], kid_subsets=100)["kid"]
    guide_kid = ref.evaluate(guide, ["kid"], kid_subsets=100)["kid"]
    res = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sdedit_tradeoff.py "
           + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "machine": args.machine, "date": args.date, "torch": torch.__version__,
           "python": platform.python_version(), "run": str(args.run), "step": run.step,
           "extractor": name, "n": args.n, "guide": kind, "sampler": args.sampler,
           "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
           "kid_floor": floor.value, "guide_kid": guide_kid.value,
           "guide_faithfulness_to_source": float(faithfulness(source, guide).mean()),
           "rows": []}
    start = time.perf_counter()
    grid = [source[:8], guide[:8]]
    for t0 in (float(t) for t in args.t0s.split(",")):
        out = sdedit(run, guide, t0, sampler=args.sampler, steps=args.steps, seed=args.seed,
                     batch_size=args.batch, **extra)
        x = out.images.float().clamp(-1, 1)
        kid = ref.evaluate(x, ["kid"], kid_subsets=100)["kid"]
        f = faithfulness(x, guide)
        row = {"t0": t0, "faithfulness": float(f.mean()),
               "faithfulness_stderr": float(f.std() / len(f) ** 0.5), "kid": kid.value,
               "kid_std": kid.std, "nfe": out.nfe, "seconds": out.seconds}
        res["rows"].append(row)
        grid.append(x[:8])
        print(f"t0={t0:g}: faithfulness {row['faithfulness']:.4f}, KID {kid.value:.1f}, "
              f"{out.seconds:.1f} s", flush=True)
    res["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(table(res))
    save_image_grid(torch.cat(grid), args.out / f"{args.name}_grid.png", nrow=8)
    plot(res, args.out / f"{args.name}.png")
    print(table(res))
    return 0


def table(res: dict) -> str:
    lines = [f"SDEdit trade-off on `{res['run']}` (step {res['step']}), {res['n']} guides "
             f"({res['guide']}), {res['sampler']} {res['steps']} steps from t0"
             + (f", guidance {res['guidance']}" if res["guidance"] else "")
             + f"; KID on `{res['extractor']}` features (floor {res['kid_floor']:.1f}; "
             f"the guides themselves {res['guide_kid']:.1f}).", "",
             "| t0 | faithfulness (RMS at 8x8, lower = closer) | KID (lower = realer) |",
             "|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['t0']:g} | {r['faithfulness']:.4f} ± {r['faithfulness_stderr']:.4f}"
                     f" | {r['kid']:.1f} ± {r['kid_std'] or 0:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["faithfulness"] for r in rows], [r["kid"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{r['t0']:g}", (r["faithfulness"], r["kid"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.axhline(res["kid_floor"], color="grey", ls="--", lw=1, label="real floor")
    ax.set_xlabel("faithfulness: RMS distance to the guide at 8x8 (lower = more faithful)")
    ax.set_ylabel("KID on the extractor features (lower = more realistic)")
    ax.set_title(f"SDEdit trade-off as t0 sweeps ({Path(res['run']).name})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
