"""Guidance on MNIST: requested-class accuracy and sample quality against the guidance scale.

For a class-conditional run trained with condition dropout (configs/cfg_mnist.toml) this draws
``--n`` samples per scale with classifier-free guidance (Ho & Salimans 2022) and, given a
noise-aware classifier run (configs/classifier_mnist.toml), with classifier guidance (Dhariwal &
Nichol 2021) on the same run's null-class (unconditional) branch. Sample ``i`` asks for class
``i mod 10`` and uses the same noise at every scale.

The judge is the ``mnist-lenet`` extractor (trained by difflab on the shared MNIST images, 28x28):
accuracy = share of samples it assigns to the requested class; FID is computed on its features
against the real images. Runs at another resolution (16x16 on CPU) are resized bilinearly to
28x28 for the judge, and the real images go through the same down-and-up resize, so the
"real" row is the ceiling the samples are compared with.

    .venv/bin/python benchmarks/guidance.py --cfg-run RUN [--classifier-run RUN] \
        [--n 500] [--sampler dpmpp_2m --steps 20] [--out benchmarks/results/guidance]

Writes ``guidance.json``, ``guidance.md`` and ``guidance.png`` (accuracy and FID against scale:
the paper's trade-off curve) plus one sample grid per setting.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data import build_dataset, save_image_grid
from difflab.evaluation import fid_from_features, get_extractor
from difflab.sampling import SampleRequest, generate, load_run

REPO = Path(__file__).resolve().parents[1]


def to_judge(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    x = x.float().clamp(-1, 1)
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def judge(ext, x: torch.Tensor, want: torch.Tensor, real_feats: torch.Tensor) -> dict:
    xj = to_judge(x)
    acc = (ext.logits(xj).argmax(1) == want).double().mean().item()
    fid = fid_from_features(real_feats, ext.features(xj))
    return {"accuracy": acc, "fid": float(fid)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg-run", required=True)
    p.add_argument("--classifier-run")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scales", default="0,1,2,3,5")
    p.add_argument("--classifier-scales", default="0,1,2,4,8")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "guidance"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    run = load_run(args.cfg_run)
    size = run.config.model.image_size
    ext = get_extractor("mnist-lenet", build_dataset("mnist", root=args.data, split="all"),
                        train=True, progress=True)
    real_small = build_dataset("mnist", root=args.data, split="all", image_size=size)
    xr = torch.stack([real_small[i][0] for i in range(len(real_small))])
    yr = torch.tensor([real_small[i][1]["label"] for i in range(len(real_small))])
    real_feats = ext.features(to_judge(xr))
    n = args.n
    want = torch.arange(n) % 10
    results: dict = {"n": n, "sampler": args.sampler, "steps": args.steps, "image_size": size,
                     "cfg_run": args.cfg_run, "cfg_step": run.step, "cfg": [], "classifier": []}
    half = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))[:n]
    results["real"] = judge(ext, xr[half], yr[half], real_feats)
    print(f"real (resized as the samples, n={n}): {results['real']}", flush=True)

    def one(kind: str, scale: float, guidance: str) -> None:
        start = time.perf_counter()
        x = generate(SampleRequest(run, sampler=args.sampler, steps=args.steps, n=n, seed=0,
                                   batch_size=250, guidance=guidance or "none", labels=want,
                                   clip_x0=True)).images
        row = {"scale": scale, **judge(ext, x, want, real_feats),
               "seconds": time.perf_counter() - start}
        results[kind].append(row)
        save_image_grid(x[:100].clamp(-1, 1), out / f"{kind}_{scale:g}.png", nrow=10)
        print(f"{kind} scale {scale:g}: accuracy {row['accuracy']:.3f}  FID {row['fid']:.2f}  "
              f"({row['seconds']:.0f} s)", flush=True)

    for s in (float(v) for v in args.cfg_scales.split(",")):
        one("cfg", s, f"cfg:{s:g}")
    if args.classifier_run:
        results["classifier_run"] = args.classifier_run
        for s in (float(v) for v in args.classifier_scales.split(",")):
            one("classifier", s, f"classifier:{args.classifier_run}:{s:g}")
    (out / "guidance.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "guidance.md")
    plot(results, out / "guidance.png")
    print(f"wrote {out}")


def write_markdown(r: dict, file: Path) -> None:
    lines = [f"n = {r['n']} samples per row, {r['sampler']} {r['steps']} steps, judge "
             "mnist-lenet (FID on its features against the real images)", "",
             "| guidance | scale | requested-class accuracy | FID |", "| --- | --- | --- | --- |",
             f"| real images | - | {r['real']['accuracy']:.3f} | {r['real']['fid']:.2f} |"]
    for kind in ("cfg", "classifier"):
        for row in r[kind]:
            lines.append(f"| {kind} | {row['scale']:g} | {row['accuracy']:.3f} | "
                         f"{row['fid']:.2f} |")
    file.write_text("\n".join(lines) + "\n")


def plot(r: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind, style in (("cfg", "o-"), ("classifier", "s--")):
        rows = r[kind]
        if not rows:
            continue
        s = [row["scale"] for row in rows]
        axes[0].plot(s, [row["accuracy"] for row in rows], style, label=kind)
        axes[1].plot(s, [row["fid"] for row in rows], style, label=kind)
    axes[0].axhline(r["real"]["accuracy"], color="gray", lw=0.8, label="real")
    axes[1].axhline(r["real"]["fid"], color="gray", lw=0.8, label="real (n-sample floor)")
    axes[0].set(xlabel="guidance scale", ylabel="requested-class accuracy")
    axes[1].set(xlabel="guidance scale", ylabel="FID (mnist-lenet)")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


if __name__ == "__main__":
    main()
