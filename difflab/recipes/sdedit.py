"""SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"): perturb a guide image to ``t0`` and solve back with any sampler.

Alg. 1 of the paper: ``x(t0) = alpha(t0) x_guide + sigma(t0) z`` (eq. 5 for the VP SDE), then
``N`` reverse steps of size ``t0 / N``. ``t0`` trades faithfulness to the guide (small ``t0``:
the output keeps the guide's colours and layout, strokes and all) against realism (large
``t0``: a realistic image that forgets the guide; ``t0 = 1`` is unconditional sampling).
Here ``t0`` is a fraction of the path's time range and :func:`difflab.sampling.start_grid`
places the ``steps`` steps in ``[t0, 0]`` on any path and grid; the sampling goes through
:class:`~difflab.SampleRequest` (``init`` + ``t0``), so every sampler, guidance and latent
models (the guide encoded by the codec) work.

Guides (:func:`stroke_painting`, :func:`digit_strokes`) turn real images into the paper's
kinds of input: colour strokes and rough hand-drawn-like strokes.

``difflab edit sdedit RUN --guide IMAGE --t0 0.5 --out edited.png``
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError, bad_value
from difflab.recipes.common import (
    add_sampling_arguments,
    load_for_edit,
    pixel_shape,
    read_images,
    request_options,
    save_edit_grid,
)


def sdedit(model: Any, guide: Any, t0: float = 0.5, *, n: int | None = None, **request: Any):
    """Edit ``guide`` images: noise them to ``t0`` and denoise (SDEdit, Alg. 1).

    Args:
        model: a run / checkpoint / component folder or a :class:`~difflab.LoadedRun`.
        guide: ``(N, C, H, W)`` images in ``[-1, 1]`` or image files at the model's (decoded)
            image size and channel count.
        t0: where to start, in ``(0, 1]``: a fraction of the path's time range.
        n: samples (default: one per guide; with one guide, as many as asked).
        request: other :class:`~difflab.SampleRequest` fields (sampler, steps, seed, guidance,
            prompts, labels, ...).

    Returns:
        :class:`~difflab.sampling.Samples`; ``metadata["t0"]`` is ``t0``.
    """
    from difflab.sampling import SampleRequest, check_t0, generate, resolve_model

    t0 = check_t0(t0)
    run = resolve_model(model, request.pop("checkpoint", None), request.pop("ema", True),
                        request.get("device"))
    x = read_images(guide, pixel_shape(run), "guide image")
    if n is None:
        n = x.shape[0] if x.shape[0] > 1 else None
    return generate(SampleRequest(run, init=x, t0=t0, n=n, **request))


# ----- guides ------------------------------------------------------------------------------------
def stroke_painting(images: torch.Tensor, colors: int = 6, block: int = 4, blur: float = 1.0,
                    seed: int = 0) -> torch.Tensor:
    """A stroke painting of each image (the paper's "stroke-based" guides): averaged over
    ``block x block`` cells, its colours quantised to ``colors`` by k-means (per image), and
    the blocky strokes softened by a Gaussian blur of ``blur`` pixels. In ``[-1, 1]``."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4:
        raise bad_value("images.shape", tuple(x.shape), "(N, C, H, W)")
    if colors < 1 or block < 1 or blur < 0:
        raise bad_value("colors / block / blur", (colors, block, blur),
                        "colors >= 1, block >= 1, blur >= 0")
    n, c, h, w = x.shape
    small = F.avg_pool2d(x, block, ceil_mode=True) if block > 1 else x
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(small)
    for i in range(n):
        pix = small[i].reshape(c, -1).T  # (P, C)
        k = min(colors, pix.shape[0])
        centres = pix[torch.randperm(pix.shape[0], generator=g)[:k]].clone()
        for _ in range(20):  # Lloyd's k-means
            assign = torch.cdist(pix, centres).argmin(1)
            for j in range(k):
                sel = pix[assign == j]
                if sel.numel():
                    centres[j] = sel.mean(0)
        out[i] = centres[torch.cdist(pix, centres).argmin(1)].T.reshape(c, *small.shape[-2:])
    big = F.interpolate(out, size=(h, w), mode="nearest")
    return gaussian_blur(big, blur).clamp(-1, 1)


def digit_strokes(images: torch.Tensor, cell: int = 4, blur: float = 0.8,
                  seed: int = 0) -> torch.Tensor:
    """A rough hand-drawn-like version of dark-background strokes (MNIST digits): the digit
    thresholded on a coarse ``cell x cell`` grid, each stroke cell shifted by up to one pixel
    at random (a shaky hand) and blurred. In ``[-1, 1]``."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4:
        raise bad_value("images.shape", tuple(x.shape), "(N, C, H, W)")
    n, c, h, w = x.shape
    coarse = (F.avg_pool2d(x, cell, ceil_mode=True) > -0.5).float()
    big = F.interpolate(coarse, size=(h, w), mode="nearest")
    g = torch.Generator().manual_seed(seed)
    shaky = torch.empty_like(big)
    for i in range(n):
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        shaky[i] = torch.roll(big[i], shifts=(dy, dx), dims=(-2, -1))
    return gaussian_blur(shaky * 2 - 1, blur).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of ``sigma`` pixels (reflect padding); ``sigma = 0`` is the
    identity."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def faithfulness(edited: torch.Tensor, guide: torch.Tensor, size: int = 8) -> torch.Tensor:
    """Per image, the root-mean-square distance between edit and guide at ``size x size``
    (SDEdit's faithfulness: the layout and colours of the guide, not its strokes' texture),
    in ``[-1, 1]`` pixel units."""
    a = F.adaptive_avg_pool2d(edited.float(), size)
    b = F.adaptive_avg_pool2d(guide.float(), size)
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


# ----- the command -------------------------------------------------------------------------------
def register_cli(sub: argparse._SubParsersAction) -> None:
    from difflab.argtypes import HelpFormatter, fraction, positive_int

    p = sub.add_parser(
        "sdedit", help="SDEdit: noise a guide image to t0 and denoise it (Meng et al. 2022)",
        description="SDEdit (Meng et al. 2022): each guide image is noised to time t0 (a "
        "fraction of the path's time range) and denoised in --steps steps with any sampler. "
        "Small t0 keeps the guide, large t0 gives realism (t0 = 1 ignores it).",
        epilog="example:\n  difflab edit sdedit runs/mnist --guide sketch.png --t0 0.5 --n 8 "
        "--out edits.png", formatter_class=HelpFormatter)
    add_sampling_arguments(p)
    p.add_argument("--guide", action="append", required=True, metavar="IMAGE",
                   help="guide image at the model's size and channels (repeat for several)")
    p.add_argument("--t0", type=fraction, default=0.5, help="start time in (0, 1] (default 0.5)")
    p.add_argument("--n", type=positive_int, help="edits (default: one per guide)")
    p.add_argument("--out", required=True, metavar="FILE.png",
                   help="PNG grid: the guides in the first row, then the edits")
    p.set_defaults(func=cmd_sdedit)


def cmd_sdedit(args: argparse.Namespace) -> int:
    from difflab.argtypes import output_file
    from difflab.sampling import check_t0

    out_file = output_file("--out", args.out, (".png",))
    check_t0(args.t0)
    run = load_for_edit(args)
    guides = read_images(args.guide, pixel_shape(run), "guide image")
    if args.n is not None and guides.shape[0] not in (1, args.n):
        raise DifflabError(f"{guides.shape[0]} guides for --n {args.n}: give one guide or "
                           "one per edit")
    out = sdedit(run, guides, args.t0, n=args.n, **request_options(args))
    where = save_edit_grid(guides, out.images, out_file)
    print(f"wrote {out.images.shape[0]} SDEdit edits (t0={args.t0:g}, {out.metadata['sampler']}, "
          f"{out.metadata['steps']} steps, {out.nfe} NFE, {out.seconds:.1f} s) to {where}",
          file=sys.stderr)
    return 0
