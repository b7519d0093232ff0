"""LDM's headline at small scale: a latent text-to-image model against a pixel one trained for
the same CPU minutes on the same emoji (Rombach et al. 2022, Sec. 4.1 and Fig. 6).

Needs two text-conditional runs on the 64x64 emoji: ``configs/ldm_emoji.toml`` (16x16x4 latents
of ``ae_kl_emoji.toml``) and ``configs/pixel_emoji64.toml`` (the same U-Net on 64x64x3 pixels),
trained with the same ``--minutes`` and ``--threads``. Both are sampled with the same sampler,
guidance, seeds and prompts: ``--n`` captions drawn (fixed seed) from the runs' training images,
the distribution FID compares against. Reported per run: FID and KID on the ``emoji-ae``
features (32 px, as ``difflab eval``) against one half of the training images, the
real-versus-real floor (the other half, at the same n), training images/s (the mean over the
runs' logs), and sampling seconds per image measured side by side in this process.

    .venv/bin/python benchmarks/ldm_headline.py --latent RUN --pixel RUN [--n 300] \
        [--sampler dpmpp_2m --steps 20 --guidance cfg:3] [--out benchmarks/results/ldm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difflab.builders import build_dataset
from difflab.data import save_image_grid
from difflab.evaluation.command import _native_data
from difflab.evaluation.evaluate import RealReference
from difflab.evaluation.features import dataset_tensors, get_extractor
from difflab.sampling import SampleRequest, generate, load_run

REPO = Path(__file__).resolve().parents[1]


def training_rate(run_dir: Path, run) -> dict:
    """Steps, batch and the mean training images/s of a run's metrics log."""
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return {"steps": int(rows[-1]["step"]), "batch_size": run.config.train.batch_size,
            "images_per_s": sum(rates) / len(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", required=True, help="the latent run (ldm_emoji.toml)")
    p.add_argument("--pixel", required=True, help="the pixel run (pixel_emoji64.toml)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", default="cfg:3")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ldm"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {"latent": Path(args.latent), "pixel": Path(args.pixel)}
    runs = {k: load_run(v) for k, v in dirs.items()}
    for name, run in runs.items():
        if run.conditioner.kind != "text" or tuple(run.image_shape) != (3, 64, 64):
            raise SystemExit(f"--{name} {dirs[name]}: needs a text run on 64x64 RGB images, "
                             f"got {run.conditioner.kind} {tuple(run.image_shape)}")
    cfg = runs["latent"].config
    data = build_dataset(cfg)
    real, _ = dataset_tensors(data)
    ext = get_extractor("emoji-ae", _native_data("emoji-ae", cfg, data), train=True)
    ext.resize_inputs = True
    g = torch.Generator().manual_seed(args.seed)
    ref = RealReference(ext, real, g)
    floor = ref.floor(args.n, ["fid", "kid"], kid_subsets=100)
    pick = torch.randperm(len(data.captions), generator=torch.Generator().manual_seed(1))
    prompts = [data.captions[int(i)] for i in pick[:args.n]]
    res = {"n": args.n, "n_reference": int(ref.reference.shape[0]), "sampler": args.sampler,
           "steps": args.steps, "guidance": args.guidance, "threads": args.threads,
           "floor": {k: v.to_dict() for k, v in floor.items()}, "runs": {}}
    print(f"floor (n={min(args.n, ref.holdout.shape[0])}): "
          + ", ".join(f"{k} {v}" for k, v in floor.items()))
    for name, run in runs.items():
        start = time.perf_counter()
        x = generate(SampleRequest(run, sampler=args.sampler, steps=args.steps, n=args.n,
                                   seed=args.seed, batch_size=args.batch, prompts=prompts,
                                   guidance=args.guidance)).images
        seconds = time.perf_counter() - start
        x = x.float().clamp(-1, 1)
        scores = ref.evaluate(x, ["fid", "kid"], kid_subsets=100)
        save_image_grid(x[:64], out / f"{name}.png", nrow=8)
        row = {"run": str(dirs[name]), "step": run.step,
               "scores": {k: v.to_dict() for k, v in scores.items()},
               "sampling_seconds_per_image": seconds / args.n,
               "training": training_rate(dirs[name], run)}
        res["runs"][name] = row
        print(f"{name}: step {run.step}, " + ", ".join(f"{k} {v}" for k, v in scores.items())
              + f", {seconds / args.n:.3f} s/image, training {row['training']}")
    (out / "prompts.txt").write_text("\n".join(prompts[:64]) + "\n")
    lat, pix = res["runs"]["latent"], res["runs"]["pixel"]
    res["sampling_speedup"] = (pix["sampling_seconds_per_image"]
                               / lat["sampling_seconds_per_image"])
    print(f"sampling speed-up of the latent model: {res['sampling_speedup']:.2f}x")
    (out / "ldm_headline.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
