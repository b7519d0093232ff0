"""Throughput of difflab's U-Net against diffusers' ``UNet2DModel`` with the same layout.

Both networks are built from one :class:`difflab.networks.UNetConfig` preset (diffusers
gets the same widths, blocks, attention levels, head width, scale-shift norm and dropout,
so the parameter counts agree to within the attention biases) and are fed the same batch:

- training: forward, MSE loss, backward and an AdamW step (fused where available),
- sampling: forward under ``torch.inference_mode``.

The models are timed in alternation, round after round, so a background load hits
all of them alike; each model's best round is reported. diffusers runs in both memory
formats by default and the faster one is the reference.

Usage::

    python benchmarks/unet_throughput.py                      # preset base, batch 64, 32x32
    python benchmarks/unet_throughput.py --quick              # smoke run (small, batch 16)
    python benchmarks/unet_throughput.py --json results.json  # also append the results

diffusers is only needed here: ``pip install diffusers`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
from difflab.networks import UNet, UNetConfig  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
Step = Callable[[], None]


def diffusers_twin(cfg: UNetConfig) -> nn.Module:
    """diffusers' ``UNet2DModel`` with the layout of ``cfg`` (unconditional configs only)."""
    from diffusers import UNet2DModel

    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    sizes = [cfg.image_size // 2**i for i in range(len(widths))]
    attn = [s in cfg.attention_resolutions for s in sizes]
    head_dims = {cfg.heads(w)[1] for w, a in zip(widths, attn) if a} | {cfg.heads(widths[-1])[1]}
    if len(head_dims) != 1:
        raise SystemExit(f"diffusers needs one head width for all levels, got {head_dims}")
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels * (2 if cfg.learn_sigma else 1),
        block_out_channels=widths,
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=head_dims.pop(),
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
        dropout=cfg.dropout,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def make_steps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, is_diffusers: bool):
    """A training step and a sampling forward of ``model`` on the fixed batch."""
    target = torch.randn_like(x)
    try:  # fused AdamW runs on CPU since torch 2.4; else the multi-tensor one
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def forward() -> torch.Tensor:
        return model(x, t).sample if is_diffusers else model(x, t)

    def train_step() -> None:
        model.train()
        F.mse_loss(forward(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_step() -> None:
        model.eval()
        with torch.inference_mode():
            forward()

    return {"train": train_step, "sample": sample_step}


def measure(
    steps: dict[str, Step], warmup: int, rounds: int, iters: int, clock: Callable[[], float]
) -> dict[str, list]:
    """Seconds per iteration of each step, per round, the steps alternating."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            for _ in range(iters):
                step()
            times[name].append((clock() - start) / iters)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32, help="image size (also the config's)")
    ap.add_argument("--iters", type=int, default=1, help="timed iterations per round")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds; best kept")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="preset small, batch 16, 1 iter")
    ap.add_argument("--ours-format", choices=list(FORMATS), default="channels_last")
    ap.add_argument(
        "--diffusers-format",
        choices=["best", *FORMATS],
        default="best",
        help="diffusers' memory format (best: time both, compare with the faster)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall clock, or this process's CPU time (robust on a shared machine with "
        "--threads 1; with more threads it also counts OpenMP spin-waits)",
    )
    ap.add_argument("--json", type=Path, default=None, help="append the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.iters, args.rounds = "small", 16, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import diffusers
    except ImportError:
        sys.exit(
            "diffusers is not installed, and this benchmark compares against it: "
            "pip install diffusers  (or: pip install -e '.[bench]')"
        )

    torch.manual_seed(0)
    cfg = UNetConfig.preset(args.preset, image_size=args.size)
    x = torch.randn(args.batch, cfg.in_channels, args.size, args.size)
    t = torch.rand(args.batch) * 999
    d_formats = list(FORMATS) if args.diffusers_format == "best" else [args.diffusers_format]
    models: dict[str, tuple[nn.Module, str]] = {
        f"difflab/{args.ours_format}": (UNet(cfg), args.ours_format)
    }
    for fmt in d_formats:
        models[f"diffusers/{fmt}"] = (diffusers_twin(cfg), fmt)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()}
    steps = {
        k: make_steps(
            m.to(memory_format=FORMATS[fmt]),
            x.to(memory_format=FORMATS[fmt]),
            t,
            k.startswith("diffusers"),
        )
        for k, (m, fmt) in models.items()
    }
    clock = time.perf_counter if args.timer == "wall" else time.process_time
    load_before = os.getloadavg()[0]
    times = {
        task: measure(
            {k: s[task] for k, s in steps.items()}, args.warmup, args.rounds, args.iters, clock
        )
        for task in ("train", "sample")
    }
    load_after = os.getloadavg()[0]

    ours = next(iter(models))
    print(
        f"\nU-Net preset `{args.preset}`, batch {args.batch} at {args.size}x{args.size}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs "
        f"({platform.machine()}), {args.timer} time, best of {args.rounds} rounds x "
        f"{args.iters} iterations, "
        f"load average {load_before:.1f} -> {load_after:.1f}\n"
    )
    print(
        "| task | difflab params | diffusers params | difflab img/s | diffusers img/s "
        "| ratio ours/diffusers |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    results = []
    for task, tt in times.items():
        ips = {k: args.batch / min(v) for k, v in tt.items()}
        ref = max((k for k in tt if k != ours), key=ips.__getitem__)
        paired = statistics.median(b / a for a, b in zip(tt[ours], tt[ref]))
        print(
            f"| {task} ({ours.split('/')[1]} vs {ref.split('/')[1]}) | {n_params[ours]:,} "
            f"| {n_params[ref]:,} | {ips[ours]:.1f} | {ips[ref]:.1f} | {ips[ours] / ips[ref]:.2f} |"
        )
        results.append(
            {
                "task": task,
                "preset": args.preset,
                "batch": args.batch,
                "size": args.size,
                "threads": torch.get_num_threads(),
                "timer": args.timer,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "params": n_params,
                "img_per_s": ips,
                "ratio": ips[ours] / ips[ref],
                "ratio_paired_median": paired,
                "rounds_s_per_iter": tt,
                "load_average": [load_before, load_after],
            }
        )
    print("\nall runs (img/s, best round; ratio: median over rounds of the paired ratio):")
    for r in results:
        runs = ", ".join(f"{k} {v:.1f}" for k, v in r["img_per_s"].items())
        print(f"  {r['task']:6s} {runs}; paired ratio {r['ratio_paired_median']:.2f}")
    if args.json is not None:
        old = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(old + results, indent=2) + "\n")


if __name__ == "__main__":
    main()
