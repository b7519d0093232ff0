"""Small image transforms on PIL images and tensors (no torchvision), and a PNG grid writer.

Pixel convention: stored images are ``uint8`` in ``[0, 255]``; model images are ``float32`` in
``[-1, 1]`` with ``x = u / 127.5 - 1`` (:func:`from_uint8`) and ``u = round((x + 1) * 127.5)``
clamped to ``[0, 255]`` (:func:`to_uint8`); the two are exact inverses on ``uint8``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from difflab.errors import bad_value
from difflab.fileio import publish

ResizeMethod = Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]
Fit = Literal["crop", "stretch", "pad"]

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # box filter = mean over the covered source area
    "lanczos": Image.Resampling.LANCZOS,
}


def _size2(size: int | tuple[int, int], name: str = "size") -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, each positive."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise bad_value(name, size, "a positive int or (height, width) pair")
    return int(h), int(w)


def pil_filter(method: str) -> Image.Resampling:
    """The PIL resampling filter for ``method`` (``area`` is PIL's box filter)."""
    if method not in _FILTERS:
        raise bad_value("resize_method", method, " or ".join(repr(k) for k in _FILTERS))
    return _FILTERS[method]


def resize(image: Image.Image, size: int | tuple[int, int],
           method: ResizeMethod = "bicubic") -> Image.Image:
    """Resize a PIL image to ``size`` (``int`` = square, or ``(height, width)``).

    PIL's filters are antialiased when shrinking (the kernel is widened by the scale factor).
    """
    h, w = _size2(size)
    if image.size == (w, h):
        return image
    return image.resize((w, h), pil_filter(method))


def fit_square(image: Image.Image, size: int, fit: Fit = "crop",
               method: ResizeMethod = "bicubic",
               fill: int | tuple[int, ...] | None = None) -> Image.Image:
    """Make a ``size x size`` PIL image, keeping the aspect ratio unless ``fit="stretch"``.

    Args:
        image: the input image.
        size: output height and width.
        fit: ``"crop"`` scales the shorter side to ``size`` then crops the center;
            ``"pad"`` scales the longer side to ``size`` then pads the center with ``fill``;
            ``"stretch"`` resizes both sides to ``size``.
        method: resampling filter.
        fill: pad color for ``fit="pad"`` in the image's mode (default white).
    """
    w, h = image.size
    if fit == "stretch" or w == h:
        return resize(image, size, method)
    if fit not in ("crop", "pad"):
        raise bad_value("fit", fit, "'crop', 'pad' or 'stretch'")
    scale = size / (min(w, h) if fit == "crop" else max(w, h))
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    image = resize(image, (nh, nw), method)
    if fit == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))
    if fill is None:
        fill = (255,) * len(image.getbands())
    canvas = Image.new(image.mode, (size, size), fill)
    canvas.paste(image, ((size - nw) // 2, (size - nh) // 2))
    return canvas


def resize_batch(images: np.ndarray, size: int, method: ResizeMethod = "bicubic") -> np.ndarray:
    """Resize ``uint8`` images ``(N, H, W)`` or ``(N, H, W, C)`` to ``size x size`` with PIL."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, *images.shape[3:]), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(resize(Image.fromarray(img), size, method))
    return out


def from_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map ``uint8`` ``[0, 255]`` to ``float32`` ``[-1, 1]``: ``x / 127.5 - 1``."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise bad_value("x.dtype", x.dtype, "torch.uint8")
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map ``[-1, 1]`` floats to ``uint8``: ``round((x + 1) * 127.5)`` clamped to ``[0, 255]``."""
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop the center ``size`` of the last two dims of ``x`` (``(..., H, W)``)."""
    h, w = _size2(size)
    H, W = x.shape[-2:]
    if h > H or w > W:
        raise bad_value("size", size, f"at most the image size ({H}, {W}); use pad() to grow")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w]


def pad(x: torch.Tensor, padding: int | tuple[int, ...], value: float = -1.0) -> torch.Tensor:
    """Pad the last two dims of ``x`` with a constant (default -1, black in ``[-1, 1]``).

    Args:
        x: tensor ``(..., H, W)``.
        padding: ``p`` (all sides), ``(vertical, horizontal)`` or ``(left, top, right, bottom)``.
        value: fill value.
    """
    p = (padding,) if isinstance(padding, int) else tuple(padding)
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = (p[1], p[0], p[1], p[0])
    if len(p) != 4 or min(p) < 0:
        raise bad_value("padding", padding, "p, (vertical, horizontal) or (l, t, r, b), all >= 0")
    left, top, right, bottom = p
    out = x.new_full((*x.shape[:-2], x.shape[-2] + top + bottom, x.shape[-1] + left + right),
                     value)
    out[..., top:top + x.shape[-2], left:left + x.shape[-1]] = x
    return out


def center_pad(x: torch.Tensor, size: int | tuple[int, int], value: float = -1.0) -> torch.Tensor:
    """Pad the last two dims of ``x`` around the center up to ``size``."""
    h, w = _size2(size)
    H, W = x.shape[-2:]
    if h < H or w < W:
        raise bad_value("size", size, f"at least the image size ({H}, {W}); use center_crop()")
    top, left = (h - H) // 2, (w - W) // 2
    return pad(x, (left, top, w - W - left, h - H - top), value)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror the last dim (left-right)."""
    return x.flip(-1)


class RandomHorizontalFlip:
    """Flip images left-right with probability ``p``, drawing only from ``generator``.

    Works on one image ``(C, H, W)`` or a batch ``(B, C, H, W)`` (one draw per image). The same
    generator state gives the same flips; the global RNG is never used. As a dataset
    ``transform`` under a multi-worker ``DataLoader`` every worker copies the generator (same
    flips in each worker); for reproducible augmentation apply it to the collated batch.

    Args:
        p: flip probability.
        generator: the random stream (a fresh unseeded ``torch.Generator`` when None).
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise bad_value("p", p, "a probability in [0, 1]")
        self.p = p
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.seed()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            flip = torch.rand((), generator=self.generator) < self.p
            return hflip(x) if bool(flip) else x
        if x.ndim != 4:
            raise bad_value("x.ndim", x.ndim, "3 (C, H, W) or 4 (B, C, H, W)")
        flip = torch.rand(x.shape[0], generator=self.generator) < self.p
        return torch.where(flip.view(-1, 1, 1, 1).to(x.device), hflip(x), x)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile ``[-1, 1]`` images ``(B, C, H, W)`` into one ``uint8`` array ``(H', W', C)``.

    Args:
        images: batch with ``C`` in 1, 3 or 4.
        nrow: images per row.
        padding: pixels between and around images.
        pad_value: value of the padding in ``[-1, 1]`` (default white).

    Returns:
        ``uint8`` array of shape ``(rows*(H+p)+p, ncol*(W+p)+p, C)`` with
        ``ncol = min(nrow, B)`` and ``rows = ceil(B / ncol)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4) or images.shape[0] == 0:
        raise bad_value("images.shape", tuple(images.shape), "(B>0, C in {1, 3, 4}, H, W)")
    if nrow < 1 or padding < 0:
        raise bad_value("nrow, padding", (nrow, padding), "nrow >= 1 and padding >= 0")
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    rows = math.ceil(b / ncol)
    grid = torch.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding),
                      float(pad_value))
    for i in range(b):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i].detach().cpu().float()
    return to_uint8(grid).permute(1, 2, 0).numpy()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8,
                    padding: int = 2, pad_value: float = 1.0) -> Path:
    """Write ``[-1, 1]`` images ``(B, C, H, W)`` as one PNG grid, atomically.

    The PNG is written to a temporary file in the same folder and moved into place with
    ``os.replace``, so a reader never sees a half-written file. Parent folders are created.

    Args:
        images: batch with ``C`` in 1 (grayscale), 3 (RGB) or 4 (RGBA).
        path: destination ``.png`` path.
        nrow: images per row.
        padding: pixels between and around images.
        pad_value: padding value in ``[-1, 1]``.

    Returns:
        The path written.
    """
    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
