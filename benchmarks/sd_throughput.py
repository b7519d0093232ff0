"""Stable Diffusion's U-Net and VAE in difflab against diffusers, the same weights, one process.

diffusers' ``UNet2DConditionModel`` with SD v1's config (4 levels of 320 / 640 / 1280 / 1280
channels, 2 residual blocks per level, 8 heads, 768-wide text context, 1x1-convolution
projections; ``--width-scale 0.5`` halves every width) and ``AutoencoderKL`` with SD's VAE config
(128 / 256 / 512 / 512, 2 blocks per level) get random weights, are saved and read back by
``difflab.load`` (so the benchmark also checks, at SD's real structure, that both give the same
outputs), and are timed on the same inputs under ``torch.inference_mode``: the U-Net forward at
``--latent`` x ``--latent`` latents, the VAE's encode and decode at 8x that size.

The models are timed in alternation, round after round, so a background load hits both alike;
each model's best round is reported, and each runs in its faster memory format. Ratios are what
to quote; absolute times depend on the machine.

    .venv/bin/python benchmarks/sd_throughput.py [--latent 32] [--batch 2] [--rounds 5]

diffusers is only needed here (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def best_of(fns: dict, rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import difflab
    from difflab.cond import Cond

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width-scale", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [int(round(w * args.width_scale / 32)) * 32 for w in (320, 640, 1280, 1280)]
    peer_unet = UNet2DConditionModel(block_out_channels=widths, sample_size=args.latent,
                                     cross_attention_dim=768, attention_head_dim=8).eval()
    peer_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                             latent_channels=4, sample_size=8 * args.latent,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4).eval()
    with tempfile.TemporaryDirectory() as tmp:
        peer_unet.save_pretrained(Path(tmp) / "unet")
        peer_vae.save_pretrained(Path(tmp) / "vae")
        unet, vae = difflab.load(Path(tmp) / "unet"), difflab.load(Path(tmp) / "vae")
    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(b, 4, s, s, generator=g), torch.randn(b, 77, 768, generator=g)
    t = torch.tensor([500.0] * b)
    images = torch.rand(b, 3, 8 * s, 8 * s, generator=g) * 2 - 1
    cl = torch.channels_last
    with torch.inference_mode():
        diff = (unet(x, t, Cond(context=ctx)) - peer_unet(x, t, encoder_hidden_states=ctx)
                .sample).abs().max().item()
        z = peer_vae.encode(images).latent_dist.mean
        vdiff = (vae.decode(z) - peer_vae.decode(z).sample).abs().max().item()
    print(f"U-Net {sum(q.numel() for q in unet.parameters()) / 1e6:.0f} M params, max |diff| "
          f"{diff:.1e}; VAE max |diff| {vdiff:.1e}")

    def runner(fn, model, fmt, *inputs):
        model.to(memory_format=fmt)
        ins = [i.contiguous(memory_format=fmt) if i.ndim == 4 else i for i in inputs]

        def go():
            model.to(memory_format=fmt)
            with torch.inference_mode():
                fn(*ins)
        return go

    tasks = {
        "U-Net forward": (
            lambda fmt: runner(lambda a, c: unet(a, t, Cond(context=c)), unet, fmt, x, ctx),
            lambda fmt: runner(lambda a, c: peer_unet(a, t, encoder_hidden_states=c), peer_unet,
                               fmt, x, ctx), b),
        "VAE encode": (
            lambda fmt: runner(lambda a: vae.encode(a).mean, vae, fmt, images),
            lambda fmt: runner(lambda a: peer_vae.encode(a).latent_dist.mean, peer_vae, fmt,
                               images), b),
        "VAE decode": (
            lambda fmt: runner(lambda a: vae.decode(a), vae, fmt, z),
            lambda fmt: runner(lambda a: peer_vae.decode(a).sample, peer_vae, fmt, z), b),
    }
    print(f"batch {b}, latents {s}x{s} (images {8 * s}x{8 * s}), {args.threads} threads, "
          f"best of {args.rounds} alternating rounds, each model in its faster memory format")
    print("| task | difflab img/s | diffusers img/s | ratio |")
    print("| --- | --- | --- | --- |")
    for name, (ours, peer, n) in tasks.items():
        fns = {}
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("nhwc", cl)):
            fns[f"ours-{fmt_name}"] = ours(fmt)
            fns[f"peer-{fmt_name}"] = peer(fmt)
        best = best_of(fns, args.rounds)
        o = min(best["ours-nchw"], best["ours-nhwc"])
        q = min(best["peer-nchw"], best["peer-nhwc"])
        print(f"| {name} | {n / o:.2f} | {n / q:.2f} | {q / o:.2f} |")


if __name__ == "__main__":
    main()
