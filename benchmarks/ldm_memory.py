"""Peak memory and step time of training ``configs/ldm_emoji.toml`` at batch 32, with the latents
cached (posterior moments encoded once) and without (the frozen encoder runs on every batch).

Each case trains in its own process (so its peak resident memory, ``ru_maxrss``, is its own) on
the real emoji, with a KL autoencoder of ``ae_kl_emoji.toml``'s architecture given random
weights (memory and speed do not depend on the weights). The cached case's one-time encoding is
timed apart from its steps.

    .venv/bin/python benchmarks/ldm_memory.py [--steps 20] [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
from pathlib import Path
torch.set_num_threads({threads})
from difflab.config import load_config
from difflab.training import train
cfg = load_config({config!r}, {overrides!r})
start = time.perf_counter()
train(cfg, Path({out!r}), progress=False)
total = time.perf_counter() - start
rows = [json.loads(l) for l in open(Path({out!r}) / "metrics.jsonl") if '"loss"' in l]
rates = [r["images_per_s"] for r in rows[1:]] or [rows[-1]["images_per_s"]]
print(json.dumps({{"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images_per_s": sorted(rates)[len(rates) // 2], "total_s": total}}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        import difflab

        torch.manual_seed(0)
        codec = difflab.build("autoencoder_kl", preset="small", image_size=64,
                              block_channels=(32, 64, 64), latent_channels=4, groups=8)
        difflab.save(codec, Path(tmp) / "codec")
        results = {}
        for name, cache in (("latents cached", True), ("encoder every step", False)):
            out = Path(tmp) / name.replace(" ", "_")
            overrides = [f"codec.run={str(Path(tmp) / 'codec')!r}",
                         f"codec.cache={str(cache).lower()}",
                         f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                         "train.log_every=2", "train.sample_every=0", "train.tensorboard=false",
                         f"train.checkpoint_every={args.steps}"]
            code = CHILD.format(threads=args.threads, config=str(REPO / "configs/ldm_emoji.toml"),
                                overrides=overrides, out=str(out))
            env_cache = Path(tmp) / f"cache-{cache}"
            proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                  text=True, env={**__import__("os").environ,
                                                  "DIFFLAB_CACHE": str(env_cache)})
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"ldm_emoji, batch {args.batch}, {args.steps} steps, {args.threads} threads")
    print("| case | peak RSS | train img/s (median of logged windows) | whole run |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['maxrss_mib']:.0f} MiB | {r['images_per_s']:.1f} | "
              f"{r['total_s']:.0f} s |")


if __name__ == "__main__":
    main()
