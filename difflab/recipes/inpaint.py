"""Training-free inpainting with any model and sampler: replacement and RePaint.

The mask is 1 where the image is to be generated and 0 where it is known (the convention of
Stable Diffusion's inpainting tools). Both methods keep the known region on the data's forward
marginal at every step:

- **replacement** (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. I.2;
  RePaint's eq. 8): after each step to time ``t``, the known region of the state is replaced
  by the known image noised to ``t``, ``alpha_t x_known + sigma_t eps`` with fresh ``eps``
  (:class:`~difflab.samplers.Hooks` ``correct_xt``).
- **RePaint** (Lugmayr et al. 2022, Alg. 1 and Sec. 4.2): the same, plus resampling: every
  ``jump_length`` steps the state is taken back up ``jump_length`` steps by the forward
  transition ``q(x_s | x_t) = N(alpha_s / alpha_t x_t, sigma_s^2 - (alpha_s / alpha_t)^2
  sigma_t^2)`` (eq. 9, for ``s > t``) and the steps are run again, ``resample`` times in all,
  so the generated part has time to agree with the known part. The descending stretches run
  the request's sampler (any of them; a multistep solver restarts its history at each
  stretch), through :class:`~difflab.SampleRequest`'s ``driver``.

In pixel space the known pixels come back exactly: the last state is pasted with them. In a
latent space the mask is taken to the latent grid (a latent is generated when any pixel of its
cell is), the known latents are the codec's encoding of the image, and the decoded result is
pasted with the known pixels.

``difflab edit inpaint RUN --image IMG --mask MASK [--method repaint] --out filled.png``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError, bad_value
from difflab.recipes.common import (
    add_sampling_arguments,
    load_for_edit,
    match_rows,
    pixel_shape,
    read_images,
    read_masks,
    request_options,
    rows,
    save_edit_grid,
)

METHODS = ("replace", "repaint")


def repaint_schedule(steps: int, jump_length: int, resample: int) -> list[int]:
    """RePaint's walk over grid indices ``0 .. steps`` (0 = the start, ``steps`` = the data):
    down one step at a time; at every multiple of ``jump_length`` below ``steps``, back up
    ``jump_length`` steps, ``resample - 1`` times (Lugmayr et al. 2022, Sec. 4.2 and the
    schedule of their code). Each stretch of ``jump_length`` steps is thus run ``resample``
    times; the network runs ``steps * resample`` times, less the stretches cut at the ends."""
    for name, v in (("steps", steps), ("jump_length", jump_length), ("resample", resample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad_value(name, v, "an int >= 1")
    walk, i, jumps = [0], 0, {}
    while i < steps:
        i += 1
        walk.append(i)
        if i < steps and i % jump_length == 0 and jumps.get(i, 0) < resample - 1:
            jumps[i] = jumps.get(i, 0) + 1
            for _ in range(min(jump_length, i)):
                i -= 1
                walk.append(i)
    return walk


def forward_jump(path, x: torch.Tensor, t: float, s: float, noise) -> torch.Tensor:
    """A draw of ``x_s ~ q(x_s | x_t)`` for ``s > t`` on a Gaussian path ``x_t = alpha_t x_0 +
    sigma_t eps`` (RePaint eq. 9, written for any path): mean ``(alpha_s / alpha_t) x_t``,
    variance ``sigma_s^2 - (alpha_s / alpha_t)^2 sigma_t^2``."""
    tt = torch.tensor([t], dtype=torch.float64)
    ss = torch.tensor([s], dtype=torch.float64)
    ratio = float(path.alpha(ss) / path.alpha(tt))
    var = float(path.sigma(ss)) ** 2 - ratio ** 2 * float(path.sigma(tt)) ** 2
    return ratio * x + max(var, 0.0) ** 0.5 * noise.randn_like(x)


class _Known:
    """The known region of each sample, in the model's space, and the hooks that impose it."""

    def __init__(self, path, known: torch.Tensor, keep: torch.Tensor) -> None:
        self.path, self.known, self.keep = path, known, keep  # keep: 1 where known

    def hooks(self, user=None):
        from difflab.samplers import Hooks

        def for_batch(lo: int, hi: int, noise):
            known = self.known[lo:hi]
            keep = self.keep[lo:hi]

            def correct_xt(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                k, m = known.to(x), keep.to(x)
                tt = t.reshape(1).expand(x.shape[0]).to(torch.float64)
                noised = self.path.add_noise(k, noise.randn_like(k), tt.to(x.device))
                x = m * noised + (1 - m) * x
                return x if user is None or user.correct_xt is None else user.correct_xt(x, t)

            return Hooks(correct_x0=getattr(user, "correct_x0", None), correct_xt=correct_xt,
                         callback=getattr(user, "callback", None))

        return Hooks(for_batch=for_batch)

    def repaint_driver(self, jump_length: int, resample: int):
        def driver(run_grid, x, grid, lo, hi, noise):
            walk = repaint_schedule(grid.numel() - 1, jump_length, resample)
            a = 0
            while a < len(walk) - 1:
                b = a
                if walk[a + 1] > walk[a]:  # a stretch down: the sampler
                    while b + 1 < len(walk) and walk[b + 1] == walk[b] + 1:
                        b += 1
                    x = run_grid(x, grid[walk[a]:walk[b] + 1])
                else:  # back up by the forward transition, one step at a time
                    while b + 1 < len(walk) and walk[b + 1] == walk[b] - 1:
                        x = forward_jump(self.path, x, float(grid[walk[b]]),
                                         float(grid[walk[b + 1]]), noise)
                        b += 1
                a = b
            return x

        return driver


def inpaint(model: Any, image: Any, mask: Any, *, method: str = "replace",
            jump_length: int = 10, resample: int = 10, n: int | None = None,
            hooks: Any = None, **request: Any):
    """Fill the masked region of ``image``.

    Args:
        model: a run / checkpoint / component folder or a :class:`~difflab.LoadedRun`.
        image: ``(N, C, H, W)`` in ``[-1, 1]`` or image files at the model's (decoded) size.
        mask: ``(N, 1, H, W)`` of 0 / 1 (1 = generate) or black-and-white image files; one
            mask serves every image and one image every mask.
        method: ``replace`` or ``repaint``.
        jump_length, resample: RePaint's ``j`` and ``r`` (the paper's 10 and 10).
        n: samples (default: one per image / mask pair, or as many as asked of one).
        hooks: further :class:`~difflab.samplers.Hooks` run after the known region's.
        request: other :class:`~difflab.SampleRequest` fields (sampler, steps, seed, ...).

    Returns:
        :class:`~difflab.sampling.Samples` with ``metadata["method"]`` and, for RePaint,
        ``jump_length`` and ``resample``.
    """
    from difflab.sampling import SampleRequest, encode_images, generate, resolve_model

    if method not in METHODS:
        raise bad_value("method", method, " or ".join(METHODS))
    if method == "repaint":
        repaint_schedule(1, jump_length, resample)  # checks them
    run = resolve_model(model, request.pop("checkpoint", None), request.pop("ema", True),
                        request.get("device"))
    for key in ("init", "t0", "strength", "driver"):
        if request.get(key) is not None:
            raise DifflabError(f"inpaint sets {key} itself; it cannot be given")
    shape = pixel_shape(run)
    x = read_images(image, shape, "image")
    m = read_masks(mask, shape[-2:])
    count = match_rows(x, m, ("image", "mask"))
    if n is None:
        n = count if count > 1 else None
    n_total = n if n is not None else run.config.sample.n
    if count not in (1, n_total):
        raise DifflabError(f"{count} image / mask pairs for n={n_total} samples: give one "
                           "pair, or one per sample")
    x, m = rows(x, n_total), rows(m, n_total)
    known_space, keep = encode_images(run, x), 1 - m
    if run.codec is not None:  # latent space: a latent is generated if any of its pixels is
        keep = 1 - F.adaptive_max_pool2d(m, tuple(run.sample_shape[-2:]))
    known = _Known(run.path, known_space, keep)
    driver = known.repaint_driver(jump_length, resample) if method == "repaint" else None
    out = generate(SampleRequest(run, n=n_total, hooks=known.hooks(hooks), driver=driver,
                                 **request))
    # the known pixels come back exactly
    out.images = m * out.images + (1 - m) * x
    out.metadata["method"] = method
    if method == "repaint":
        out.metadata.update(jump_length=jump_length, resample=resample)
    return out


# ----- masks -------------------------------------------------------------------------------------
def box_masks(n: int, size: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``n`` masks ``(n, 1, size, size)`` with one axis-aligned box each, covering about
    ``fraction`` of the area, at a random place (deterministic by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    side = max(1, round(size * fraction ** 0.5))
    m = torch.zeros(n, 1, size, size)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
        m[i, :, y:y + side, x:x + side] = 1
    return m


def free_form_masks(n: int, size: int, strokes: int = 4, width: float = 0.12,
                    seed: int = 0) -> torch.Tensor:
    """``n`` free-form masks (random thick brush strokes, as in the free-form masks of
    LaMa / RePaint's "thick" and "thin" sets): ``strokes`` random polylines of 3 segments
    each, ``width * size`` pixels wide. Deterministic by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    radius = max(0.75, width * size / 2)
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        m = torch.zeros(size, size, dtype=torch.bool)
        for _ in range(strokes):
            p = torch.rand(2, generator=g) * size
            for _ in range(3):
                q = (p + (torch.rand(2, generator=g) - 0.5) * size * 0.7).clamp(0, size)
                d = q - p
                u = (((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / d.dot(d).clamp_min(1e-6))
                u = u.clamp(0, 1)
                dist2 = (yy - p[0] - u * d[0]) ** 2 + (xx - p[1] - u * d[1]) ** 2
                m |= dist2 <= radius ** 2
                p = q
        out[i, 0] = m.float()
    return out


def seam(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, the mean absolute intensity jump across the mask's boundary: over the pixel
    pairs (horizontal and vertical neighbours) with one pixel known and one generated, the
    mean ``|x_a - x_b|``, averaged over channels. A visible seam makes it large; compare it
    with the same measure on the real image under the same mask."""
    x, m = images.float(), mask.float()
    dh = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1, keepdim=True)
    dv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(1, keepdim=True)
    bh = (m[..., :, 1:] != m[..., :, :-1]).float()
    bv = (m[..., 1:, :] != m[..., :-1, :]).float()
    total = (dh * bh).flatten(1).sum(1) + (dv * bv).flatten(1).sum(1)
    count = bh.flatten(1).sum(1) + bv.flatten(1).sum(1)
    return total / count.clamp_min(1)


# ----- the command -------------------------------------------------------------------------------
def register_cli(sub: argparse._SubParsersAction) -> None:
    from difflab.argtypes import HelpFormatter, positive_int

    p = sub.add_parser(
        "inpaint", help="fill a masked region: replacement or RePaint (Lugmayr et al. 2022)",
        description="Training-free inpainting with any model and sampler. The mask is white "
        "(255) where the image is to be generated and black (0) where it is kept; the kept "
        "pixels come back exactly. --method replace imposes the known region at every step; "
        "repaint also resamples (--jump-length, --resample).",
        epilog="example:\n  difflab edit inpaint runs/mnist --image digit.png --mask box.png "
        "--method repaint --n 8 --out filled.png", formatter_class=HelpFormatter)
    add_sampling_arguments(p)
    p.add_argument("--image", action="append", required=True, metavar="IMAGE",
                   help="image at the model's size and channels (repeat for several)")
    p.add_argument("--mask", action="append", required=True, metavar="MASK",
                   help="black-and-white mask of the image's size (white = generate)")
    p.add_argument("--method", choices=METHODS, default="replace",
                   help="replace (default) or repaint")
    p.add_argument("--jump-length", type=positive_int, default=10,
                   help="RePaint: steps per resampling jump (default 10)")
    p.add_argument("--resample", type=positive_int, default=10,
                   help="RePaint: times each stretch is run (default 10)")
    p.add_argument("--n", type=positive_int, help="samples (default: one per image)")
    p.add_argument("--out", required=True, metavar="FILE.png",
                   help="PNG grid: the masked inputs in the first row, then the results")
    p.set_defaults(func=cmd_inpaint)


def cmd_inpaint(args: argparse.Namespace) -> int:
    from difflab.argtypes import output_file

    out_file = output_file("--out", args.out, (".png",))
    if args.method == "replace" and (args.jump_length != 10 or args.resample != 10):
        raise DifflabError("--jump-length and --resample apply to --method repaint")
    run = load_for_edit(args)
    shape = pixel_shape(run)
    x = read_images(args.image, shape, "image")
    m = read_masks(args.mask, shape[-2:])
    match_rows(x, m, ("image", "mask"))
    out = inpaint(run, x, m, method=args.method, jump_length=args.jump_length,
                  resample=args.resample, n=args.n, **request_options(args))
    k = max(x.shape[0], m.shape[0])
    shown = rows(x, k) * (1 - rows(m, k))  # the masked inputs, the hole in mid grey
    where = save_edit_grid(shown, out.images, out_file)
    print(f"wrote {out.images.shape[0]} inpainted images ({args.method}, "
          f"{out.metadata['sampler']}, "
          f"{out.metadata['steps']} steps, {out.nfe} NFE, {out.seconds:.1f} s) to {where}",
          file=sys.stderr)
    return 0
