"""Feature extractors: held-out quality, training time, and the FID floor / orderings they give.

Trains every built-in extractor from scratch in a temporary cache (never touching
``~/.cache/difflab``) on the shared data, single-threaded unless ``--threads`` says otherwise,
and prints one line per extractor, plus FID of real-vs-real / mildly noised / uniform noise
images under ``mnist-lenet``, and our FID against torchmetrics' on the same features.

    .venv/bin/python benchmarks/extractor.py [--data ../shared/data] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from difflab.data import build_dataset
from difflab.evaluation import RealReference, fid_from_features, get_extractor


def train_all(data_root: Path, cache: Path) -> dict:
    sets = {
        "mnist-lenet": lambda: build_dataset("mnist", root=data_root / "mnist", split="test"),
        "digits-mlp": lambda: build_dataset("digits", split="all"),
        "emoji-ae": lambda: build_dataset("emoji", root=data_root / "emoji", image_size=32,
                                          split="all"),
    }
    out = {}
    for name, make in sets.items():
        data = make()
        start = time.perf_counter()
        ext = get_extractor(name, data, train=True, root=cache)
        m = ext.meta
        print(f"{name:12s} n_train={m['n_train']:5d} n_holdout={m['n_holdout']:5d} "
              f"{m['score_kind']}={m['score']:.4f} train={m['train_seconds']:.1f}s "
              f"(total {time.perf_counter() - start:.1f}s)", flush=True)
        out[name] = (ext, data)
    return out


def orderings(ext, data) -> None:
    x, _ = data.as_tensors()
    g = torch.Generator().manual_seed(0)
    ref = RealReference(ext, x, generator=g)
    n = ref.holdout.shape[0]
    held = ref.holdout_images
    mild = (held + 0.25 * torch.randn(held.shape, generator=g)).clamp(-1, 1)
    noise = torch.rand(held.shape, generator=g) * 2 - 1
    print(ref.floor(n, ("fid",))["fid"])
    print(ref.evaluate(mild, ("fid",))["fid"], "(real + N(0, 0.25^2), clamped)")
    print(ref.evaluate(noise, ("fid",))["fid"], "(uniform noise)")


def versus_torchmetrics(ext, data) -> None:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        print("torchmetrics not installed: skipped the comparison")
        return

    class Identity(torch.nn.Module):
        num_features = ext.dim

        def forward(self, f):
            return f

    x, _ = data.as_tensors()
    f = ext.features(x)
    real, fake = f[:5000], (f[5000:] + 0.1 * torch.randn_like(f[5000:])).clamp_min(0)
    metric = FrechetInceptionDistance(feature=Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs, ours = float(metric.compute()), fid_from_features(real, fake).value
    rel = abs(ours - theirs) / theirs
    print(f"FID ours {ours:.6f} torchmetrics {theirs:.6f} rel. diff {rel:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." /
                                              "shared" / "data"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trained = train_all(Path(args.data), Path(tmp))
        orderings(*trained["mnist-lenet"])
        versus_torchmetrics(*trained["mnist-lenet"])


if __name__ == "__main__":
    main()
