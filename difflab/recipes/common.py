"""What the recipes share: reading and checking images and masks, the sampling options of
their commands, and writing outputs only once everything has worked."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError


# ----- images and masks --------------------------------------------------------------------------
def _native_size(path: Path) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an image file as stored (alpha not counted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
    except (OSError, UnidentifiedImageError) as e:
        raise DifflabError(f"{path} cannot be read as an image ({e})") from None
    channels = 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return channels, h, w


def read_images(images: Any, shape: tuple[int, ...], what: str = "image") -> torch.Tensor:
    """Images ``(N, C, H, W)`` in ``[-1, 1]`` from a tensor or image files, which must have
    exactly the model's channels and size ``shape`` (no silent resizing or colour conversion:
    an edit of a resized image is not an edit of the image)."""
    channels, height, width = shape
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise DifflabError(f"the {what} tensor has shape {tuple(x.shape)}: expected "
                               "(N, C, H, W)")
    else:
        from difflab.data.decode import decode_image

        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if not paths:
            raise DifflabError(f"no {what} given")
        rows = []
        for p in map(Path, paths):
            if not p.is_file():
                raise DifflabError(f"{what} {p} does not exist (expected an image file)")
            c, h, w = _native_size(p)
            if (c, h, w) != (channels, height, width):
                raise DifflabError(
                    f"{what} {p} is {c}-channel {h}x{w}, but the model makes {channels}-channel "
                    f"{height}x{width} images: give an image of that size and channel count")
            a = decode_image(p, height, channels)
            rows.append(torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1.0)
        x = torch.stack(rows)
    if tuple(x.shape[1:]) != tuple(shape):
        raise DifflabError(f"the {what} has shape {tuple(x.shape[1:])}, but the model makes "
                           f"images of shape {tuple(shape)} (channels, height, width)")
    if not bool(torch.isfinite(x).all()):
        raise DifflabError(f"the {what} holds NaN or infinite values")
    if float(x.min()) < -1 - 1e-6 or float(x.max()) > 1 + 1e-6:
        raise DifflabError(f"the {what} has values in [{float(x.min()):.3g}, "
                           f"{float(x.max()):.3g}]: expected images in [-1, 1]")
    return x


def read_masks(masks: Any, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks ``(N, 1, H, W)`` (1 = the region to generate) from a tensor of 0 / 1 or
    from image files holding only black (0) and white (255) pixels."""
    height, width = size
    if isinstance(masks, torch.Tensor):
        m = masks.detach().float().cpu()
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[1] != 1:
            raise DifflabError(f"the mask tensor has shape {tuple(masks.shape)}: expected "
                               "(N, 1, H, W), (N, H, W) or (H, W)")
        values = torch.unique(m)
        if not bool(((values == 0) | (values == 1)).all()):
            raise DifflabError(f"the mask is not binary: it holds values other than 0 and 1 "
                               f"(e.g. {float(values[(values != 0) & (values != 1)][0]):.3g}); "
                               "threshold it first, e.g. (mask > 0.5).float()")
    else:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        paths = [masks] if isinstance(masks, (str, os.PathLike)) else list(masks)
        rows = []
        for p in map(Path, paths):
            if not p.is_file():
                raise DifflabError(f"mask {p} does not exist (expected an image file)")
            try:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("L"))
            except (OSError, UnidentifiedImageError) as e:
                raise DifflabError(f"mask {p} cannot be read as an image ({e})") from None
            other = np.setdiff1d(np.unique(a), [0, 255])
            if other.size:
                raise DifflabError(f"mask {p} is not binary: it holds grey levels such as "
                                   f"{int(other[0])} besides black (0, keep) and white (255, "
                                   "generate); threshold it first")
            rows.append(torch.from_numpy((a == 255).astype("float32"))[None])
        if not rows:
            raise DifflabError("no mask given")
        m = torch.stack(rows)
    if tuple(m.shape[-2:]) != (height, width):
        raise DifflabError(f"the mask is {m.shape[-2]}x{m.shape[-1]} but the image is "
                           f"{height}x{width}: give a mask of the image's size")
    return m


def match_rows(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> int:
    """The number of samples two inputs make: equal counts, or one of them holds one row."""
    na, nb = a.shape[0], b.shape[0]
    if na != nb and 1 not in (na, nb):
        raise DifflabError(f"{na} {names[0]}(s) and {nb} {names[1]}(s): give one of each, one "
                           "for all, or as many of each")
    return max(na, nb)


def rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with ``n`` rows (a single row repeated)."""
    return x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x


def save_edit_grid(inputs: torch.Tensor, results: torch.Tensor, path) -> Path:
    """One PNG: the inputs in the first row (padded with white), then the results, at least
    as many per row as there are inputs."""
    from difflab.data import save_image_grid

    k = inputs.shape[0]
    nrow = max(k, min(8, results.shape[0]))
    pad = torch.full((nrow - k, *inputs.shape[1:]), 1.0)
    return save_image_grid(torch.cat([inputs, pad, results.clamp(-1, 1)]), path, nrow=nrow)


# ----- the commands ------------------------------------------------------------------------------
def add_sampling_arguments(p: argparse.ArgumentParser, *, default_steps: str = "the run's"
                           ) -> None:
    """The sampling options every recipe command takes."""
    from difflab.argtypes import count_from_zero, device_name, positive_int

    p.add_argument("run", metavar="RUN", help="a run folder, checkpoint folder or component "
                   "folder (difflab export)")
    p.add_argument("--sampler", help="a registered sampler (difflab samplers lists them; "
                   "default: the run's)")
    p.add_argument("--steps", type=positive_int, help=f"sampling steps (default: {default_steps})")
    p.add_argument("--grid", help="time grid (auto, uniform, karras, discrete, ...)")
    p.add_argument("--option", dest="options", action="append", default=[],
                   metavar="KEY=VALUE", help="a sampler option, e.g. eta=0.5 (repeatable)")
    p.add_argument("--seed", type=count_from_zero, default=0, help="base seed (default 0)")
    p.add_argument("--class", "--label", dest="label", type=count_from_zero, action="append",
                   help="class id for a class-conditional model (repeat to cycle)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt for a text-conditional model (repeat to cycle)")
    p.add_argument("--guidance", metavar="SPEC", help="none | cfg:SCALE | classifier:RUN:SCALE")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip clean-data estimates to [-1, 1] (default: the run's)")
    p.add_argument("--batch-size", type=positive_int, help="samples per network batch")
    p.add_argument("--checkpoint", metavar="step_N", help="which checkpoint (default: latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA weights (default) or raw")
    p.add_argument("--device", default="cpu", type=device_name, help="torch device")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~difflab.SampleRequest` fields of :func:`add_sampling_arguments`."""
    import sys

    from difflab.argtypes import key_value

    if args.sampler is not None:
        from difflab.samplers import get_sampler

        get_sampler(args.sampler)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return {"sampler": args.sampler, "steps": args.steps, "grid": args.grid,
            "options": dict(key_value(o) for o in args.options), "seed": args.seed,
            "labels": args.label, "prompts": args.prompt, "guidance": args.guidance,
            "clip_x0": args.clip_x0, "batch_size": args.batch_size, "device": args.device,
            "progress": progress or None}


def load_for_edit(args: argparse.Namespace):
    """The run a recipe command edits with (a generative one)."""
    from difflab.argtypes import set_threads
    from difflab.sampling import load_run, not_generative

    set_threads(args.threads)
    run = load_run(args.run, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
    if not run.generative:
        raise DifflabError(not_generative(run, args.run))
    return run


def pixel_shape(run) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a run makes (decoded ones for a latent run)."""
    return tuple(run.image_shape)
