"""LDM's compute claim at small scale: the same U-Net trains and samples faster on a codec's
latents than on pixels (Rombach et al. 2022, Sec. 4.1: f = 4 to 16 "strike a good balance";
the diffusion model sees (H/f)^2 positions instead of H^2).

For 64x64 RGB emoji, measured side by side in one process on random inputs of the right shape
(speed does not depend on the weights): a training step (forward + backward + AdamW) of the
text-conditional U-Net of ``configs/ldm_emoji.toml`` on 16x16x4 latents against the same U-Net
on 64x64x3 pixels, and a 20-step DPM-Solver++ sample including the latent run's decoder pass
(the KL autoencoder of ``configs/ae_kl_emoji.toml``) and, for training, the encoder pass when
latents are not cached. Ratios are what to quote; absolute times depend on the machine.

    .venv/bin/python benchmarks/latent_speed.py [--batch 16] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    import difflab
    from difflab.cond import Cond
    from difflab.denoiser import Denoiser
    from difflab.paths import VP
    from difflab.samplers import sample as run_sampler
    from difflab.samplers.timesteps import make_grid

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = dict(preset="small", model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                num_head_channels=32, transformer_depth=1, context_dim=384)
    nets = {"pixels 64x64x3": difflab.build("unet", in_channels=3, out_channels=3,
                                           image_size=64, attention_resolutions=[32], **unet),
            "latents 16x16x4": difflab.build("unet", in_channels=4, out_channels=4,
                                            image_size=16, attention_resolutions=[8], **unet)}
    ae = difflab.build("autoencoder_kl", preset="small", image_size=64).eval()
    path = VP.discrete_scaled_linear()
    b = args.batch
    ctx = torch.randn(b, 8, 384)
    images = torch.rand(b, 3, 64, 64) * 2 - 1
    rows = []
    for name, net in nets.items():
        c, s = (3, 64) if name.startswith("pixels") else (4, 16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(b, c, s, s)

        def step(net=net, opt=opt, x=x):
            t = torch.rand(b)
            loss = net(x, t * 999, Cond(context=ctx)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_s = timed(step, args.repeats)
        encode_s = 0.0
        if name.startswith("latents"):
            with torch.no_grad():
                encode_s = timed(lambda: ae.encode(images).sample(), args.repeats)
        den = Denoiser(net.eval(), path, prediction="eps")
        grid = make_grid("discrete", path, 20)

        def sample(den=den, c=c, s=s, grid=grid):
            with torch.no_grad():
                z = run_sampler("dpmpp_2m", den.bind(Cond(context=ctx)),
                                torch.randn(b, c, s, s), grid)
                if c == 4:
                    ae.decode(z)

        sample_s = timed(sample, max(1, args.repeats // 2))
        net.train()
        params = sum(q.numel() for q in net.parameters())
        rows.append((name, params, train_s, encode_s, sample_s))
    base = rows[0]
    print(f"batch {b}, {args.threads} threads, medians of {args.repeats} repeats")
    print("| input | U-Net params | train step | + encoder (uncached) | 20-step sample "
          "(+ decode) | train speed-up | sample speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, params, tr, enc, sa in rows:
        print(f"| {name} | {params / 1e6:.2f} M | {tr * 1e3:.0f} ms | {(tr + enc) * 1e3:.0f} ms "
              f"| {sa:.2f} s | {base[2] / tr:.1f}x ({base[2] / (tr + enc):.1f}x uncached) "
              f"| {base[4] / sa:.1f}x |")


if __name__ == "__main__":
    main()
