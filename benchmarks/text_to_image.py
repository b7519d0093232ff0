"""Text-to-image on the emoji set: does the model follow prompts it never saw, and skin tones?

Needs a text-conditional run (configs/t2i_emoji.toml, trained on 90% of the images) and an
alignment run (configs/clip_emoji.toml), whose ``alignment_score`` (cosine similarity between
its image and text embeddings, Liu et al. 2023) is the judge.

1. Held-out prompts: captions of the held-out 10% of images that no training image has. One
   sample per prompt with classifier-free guidance; scored against (a) its own prompt, (b) the
   same prompts for unconditional samples (null prompt, same noise), (c) a shuffled prompt
   (each sample against another sample's prompt). Real held-out images against their captions
   give the ceiling. Reported: means with standard errors and the paired differences.
2. Skin tone: for every emoji that exists in all five skin tones, prompts "<name>, light skin
   tone" and "<name>, dark skin tone" with the same noise. The "skin region" is approximated by
   the non-background pixels (any channel below 0.9 after mapping to [0, 1]; the images are
   composited on white); its mean luminance must be lower for the dark prompt. The same
   measure on the real light / dark images is printed beside.

    .venv/bin/python benchmarks/text_to_image.py --run RUN --clip-run RUN \
        [--n 200] [--guidance cfg:3] [--out benchmarks/results/t2i]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from difflab.data import build_dataset, save_image_grid
from difflab.guidance import alignment_score
from difflab.sampling import SampleRequest, generate, load_run

REPO = Path(__file__).resolve().parents[1]
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")


def mean_se(v: torch.Tensor) -> dict:
    v = v.double()
    return {"mean": v.mean().item(), "se": (v.std() / math.sqrt(len(v))).item(), "n": len(v)}


def skin_luminance(x: torch.Tensor) -> torch.Tensor:
    """Mean luminance (Rec. 601) of the non-background pixels of images in [-1, 1], per image."""
    u = (x.clamp(-1, 1) + 1) / 2
    fg = (u < 0.9).any(1)  # (B, H, W)
    lum = 0.299 * u[:, 0] + 0.587 * u[:, 1] + 0.114 * u[:, 2]
    return (lum * fg).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--clip-run", required=True)
    p.add_argument("--n", type=int, default=200, help="held-out prompts")
    p.add_argument("--guidance", default="cfg:3")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds-per-tone", type=int, default=4)
    p.add_argument("--sdg-scales", default="", help="comma list; SDG text guidance of the "
                   "unconditional branch at these scales (empty: skip)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "t2i"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run, clip = load_run(args.run), load_run(args.clip_run)
    d = run.config.data
    opts = d.options()
    test = build_dataset("emoji", root=d.root, image_size=d.image_size, split="test", **opts)
    train = build_dataset("emoji", root=d.root, image_size=d.image_size, split="train", **opts)
    seen = set(train.captions)
    held, real_idx = [], []
    for i, c in enumerate(test.captions):
        if c and c not in seen and c not in held:
            held.append(c)
            real_idx.append(i)
    held, real_idx = held[:args.n], real_idx[:args.n]
    n = len(held)
    enc = run.conditioner.encoder
    text = enc.sentence(held)
    judge = clip.denoiser

    def sample(prompts, guidance, seed=0):
        return generate(SampleRequest(run, sampler=args.sampler, steps=args.steps,
                                      n=len(prompts), seed=seed, batch_size=100,
                                      guidance=guidance or "none", prompts=prompts,
                                      clip_x0=True)).images.clamp(-1, 1)

    start = time.perf_counter()
    x_c = sample(held, args.guidance)
    x_u = sample([""] * n, "none")
    seconds = time.perf_counter() - start
    real = torch.stack([test[i][0] for i in real_idx])
    shift = torch.roll(torch.arange(n), 1)  # a derangement: sample i against prompt i - 1
    s_c = alignment_score(judge, x_c, text)
    s_u = alignment_score(judge, x_u, text)
    s_s = alignment_score(judge, x_c, text[shift])
    s_r = alignment_score(judge, real, text)
    res = {"n_prompts": n, "guidance": args.guidance, "sampler": args.sampler,
           "steps": args.steps, "run_step": run.step, "clip_step": clip.step,
           "seconds_sampling": seconds,
           "alignment": {"conditional": mean_se(s_c), "unconditional": mean_se(s_u),
                         "shuffled_prompts": mean_se(s_s), "real_heldout": mean_se(s_r),
                         "cond_minus_uncond": mean_se(s_c - s_u),
                         "cond_minus_shuffled": mean_se(s_c - s_s),
                         "win_rate_vs_uncond": (s_c > s_u).double().mean().item(),
                         "win_rate_vs_shuffled": (s_c > s_s).double().mean().item()}}
    for k, v in res["alignment"].items():
        shown = v if isinstance(v, float) else f"{v['mean']:.4f} +- {v['se']:.4f}"
        print(f"alignment {k}: {shown}")
    # SDG (Liu et al. 2023): the null-prompt branch guided by the alignment model's text energy.
    # The judge is the guide here, so this shows the mechanism works, not an unbiased gain.
    res["sdg_text"] = []
    for scale in (float(v) for v in args.sdg_scales.split(",") if v):
        from difflab.guidance import sdg

        def guide(den, c, nc, s=scale):
            return sdg(den.bind(c), judge, text_emb=text, kind="text", scale=s)

        x = generate(SampleRequest(run, sampler=args.sampler, steps=args.steps, n=n, seed=0,
                                   batch_size=n, prompts=[""] * n, guidance=guide,
                                   clip_x0=True)).images.clamp(-1, 1)
        row = {"scale": scale, "alignment": mean_se(alignment_score(judge, x, text))}
        res["sdg_text"].append(row)
        print(f"SDG text guidance of the unconditional branch, scale {scale:g}: "
              f"{row['alignment']['mean']:.4f} +- {row['alignment']['se']:.4f}")
    save_image_grid(x_c[:64], out / "heldout_prompts.png", nrow=8)
    save_image_grid(x_u[:64], out / "unconditional.png", nrow=8)
    (out / "heldout_prompts.txt").write_text("\n".join(held[:64]) + "\n")

    # ----- skin tone ------------------------------------------------------------------------
    everything = build_dataset("emoji", root=d.root, image_size=d.image_size, split="all",
                               **{k: v for k, v in opts.items() if k != "holdout_fraction"})
    by_caption = {c: i for i, c in enumerate(everything.captions) if c}
    bases = sorted({c.rsplit(", ", 1)[0] for c in by_caption if c.endswith(", light skin tone")
                    and ", " not in c.rsplit(", ", 1)[0]})
    bases = [b for b in bases if all(f"{b}, {t} skin tone" in by_caption for t in TONES)]
    m = args.seeds_per_tone
    lum = {}
    for tone in ("light", "dark"):
        prompts = [f"{b}, {tone} skin tone" for b in bases for _ in range(m)]
        x = sample(prompts, args.guidance, seed=1)
        lum[tone] = skin_luminance(x).reshape(len(bases), m).mean(1)
        save_image_grid(x[::m][:64], out / f"skin_{tone}.png", nrow=8)
    real_lum = {t: skin_luminance(torch.stack([everything[by_caption[f"{b}, {t} skin tone"]][0]
                                               for b in bases])) for t in ("light", "dark")}
    diff = lum["light"] - lum["dark"]
    res["skin_tone"] = {
        "bases": len(bases), "seeds_per_prompt": m,
        "generated_light": mean_se(lum["light"]), "generated_dark": mean_se(lum["dark"]),
        "generated_light_minus_dark": mean_se(diff),
        "share_of_bases_darker": (diff > 0).double().mean().item(),
        "real_light": mean_se(real_lum["light"]), "real_dark": mean_se(real_lum["dark"]),
        "real_share_darker": (real_lum["light"] > real_lum["dark"]).double().mean().item()}
    for k, v in res["skin_tone"].items():
        print(f"skin {k}: {v}")
    (out / "t2i.json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
