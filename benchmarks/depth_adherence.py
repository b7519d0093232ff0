"""Depth adherence of a depth-conditioned model (SD 2's depth model at small scale).

The judge is a small depth regressor trained here on rendered scenes (``difflab.data.shapes``:
exact depth, so no estimator is needed to make its labels): a difflab U-Net without attention,
fed a constant time, predicting log depth from the image (L1). Its own error on held-out real
scenes is the floor.

For held-out scenes, each model is asked for the scene's caption, and the depth-conditioned model
also gets the scene's depth map. The regressor reads the depth of the generated images, and the
absolute relative error ``mean |z_hat - z| / z`` against the requested depth is reported for:

- the depth model with the scene's own depth map,
- the same model with the depth maps shuffled among the scenes (the requested depth is still the
  scene's: a model that follows the map fails here),
- a text-only model of the same size and training (``task.concat = "none"``).

    .venv/bin/python benchmarks/depth_adherence.py DEPTH_RUN TEXT_RUN [--n 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def train_regressor(size: int, steps: int, seed: int = 0, file: Path | None = None):
    import difflab
    from difflab.data.shapes import Shapes

    net = difflab.build("unet", image_size=size, in_channels=3, out_channels=1,
                        model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(), num_head_channels=16, dropout=0.0)
    if file is not None and file.is_file():
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(file)))
        return net.eval()
    data = Shapes(n=4000, n_test=256, seed=seed, image_size=size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data), (32,), generator=g)
        x, z = data.images[idx], data.depths[idx]
        if torch.rand((), generator=g) < 0.5:  # flips keep depth exact
            x, z = x.flip(-1), z.flip(-1)
        pred = net(x, torch.zeros(len(idx)))
        loss = (pred - z.log()).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"regressor step {step}: L1(log z) {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if file is not None:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(net.state_dict(), str(file))
    return net.eval()


@torch.no_grad()
def predict(net, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(b, torch.zeros(len(b))).exp() for b in images.split(32)])


def abs_rel(pred: torch.Tensor, true: torch.Tensor) -> float:
    return float(((pred - true).abs() / true).mean())


def main() -> None:
    from difflab.data.shapes import Shapes
    from difflab.runs import load_run
    from difflab.sampling import SampleRequest, generate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("depth_run")
    p.add_argument("text_run")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", default="cfg:3")
    p.add_argument("--regressor-steps", type=int, default=1500)
    p.add_argument("--regressor", type=Path, default=Path("runs/depth_regressor.safetensors"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    depth_run, text_run = load_run(args.depth_run), load_run(args.text_run)
    size = depth_run.image_shape[-1]
    judge = train_regressor(size, args.regressor_steps, file=args.regressor)
    test = Shapes(split="test", n=4000, n_test=256, seed=0, image_size=size)
    idx = torch.arange(min(args.n, len(test)))
    true = test.depths[idx]
    prompts = [test.captions[i] for i in idx.tolist()]
    shuffled = true[torch.roll(idx, 1)]
    rows = {"real images (regressor floor)": abs_rel(predict(judge, test.images[idx]), true)}
    kw = dict(prompts=prompts, n=len(idx), steps=args.steps, guidance=args.guidance, seed=0,
              batch_size=32, progress=False)
    for name, run, depth in (("depth model, the scene's depth", depth_run, true),
                             ("depth model, shuffled depth", depth_run, shuffled),
                             ("text-only model", text_run, None)):
        start = time.perf_counter()
        out = generate(SampleRequest(run, depth=depth, **kw)).images.clamp(-1, 1)
        rows[name] = abs_rel(predict(judge, out), true)
        print(f"{name}: AbsRel {rows[name]:.3f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print(f"\n{len(idx)} held-out scenes, {args.steps} steps, {args.guidance}")
    print("| images | AbsRel against the requested depth |")
    print("| --- | --- |")
    for name, v in rows.items():
        print(f"| {name} | {v:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
