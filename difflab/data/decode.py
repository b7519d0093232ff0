"""Decode one image file to a square ``uint8`` array with a chosen channel count.

Conversions (all done by :func:`decode_image`):

- any alpha (RGBA, LA, PA, palette with a transparent color) is composited over an opaque
  white background, so a fully transparent pixel becomes white (``+1`` in ``[-1, 1]``);
- grayscale -> 3 channels replicates the gray value; color -> 1 channel uses PIL's ITU-R 601-2
  luma ``L = 0.299 R + 0.587 G + 0.114 B``; palette, CMYK and YCbCr images go through RGB;
- 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits by ``round(v / 257)``;
- JPEG / WebP EXIF orientation is applied.

Only 1 and 3 output channels exist. With ``strict_channels=True`` an image whose own channel
count (alpha not counted) differs from the requested one raises instead of being converted.
Floating-point (``F``) and unknown modes raise.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from difflab.data.base import CorruptDataError, DataError
from difflab.data.transforms import Fit, ResizeMethod, fit_square
from difflab.errors import bad_value

_GRAY = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"}
_COLOR = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_channels(channels: int) -> int:
    """Return ``channels`` if it is 1 or 3, else raise naming the accepted values."""
    if channels not in (1, 3):
        raise bad_value("channels", channels, "1 (grayscale) or 3 (RGB); alpha is composited "
                        "on white, other channel counts cannot be produced from images")
    return channels


def native_channels(image: Image.Image) -> int:
    """Channels of ``image`` not counting alpha: 1 for grayscale modes, 3 for color modes."""
    if image.mode in _GRAY:
        return 1
    if image.mode in _COLOR:
        return 3
    raise bad_value("image mode", image.mode, f"one of {sorted(_GRAY | _COLOR)}")


def _flatten(image: Image.Image, channels: int) -> Image.Image:
    """Composite alpha on white and convert to ``L`` or ``RGB``."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode.startswith("I"):  # 16-bit (or 32-bit) gray: scale, PIL's convert would clip
        v = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8))
    elif image.mode in _ALPHA or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == mode else image.convert(mode)


def decode_image(
    path: str | os.PathLike,
    image_size: int,
    channels: int = 3,
    fit: Fit = "crop",
    resize_method: ResizeMethod = "bicubic",
    strict_channels: bool = False,
) -> np.ndarray:
    """Read ``path`` and return a ``uint8`` array ``(image_size, image_size, channels)``.

    Alpha is composited on white *before* resizing (no dark fringes). See the module docstring
    for the channel conversions.

    Args:
        path: image file (PNG, JPEG, WebP or any format PIL reads).
        image_size: output height and width.
        channels: 1 or 3.
        fit: ``"crop"``, ``"pad"`` (white) or ``"stretch"``; see
            :func:`~difflab.data.transforms.fit_square`.
        resize_method: PIL filter.
        strict_channels: raise if the image's own channel count differs from ``channels``.

    Raises:
        CorruptDataError: the file cannot be decoded (message names it).
        DataError: unsupported mode, or a channel mismatch with ``strict_channels``.
    """
    check_channels(channels)
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if im.format in ("JPEG", "MPO", "WEBP"):
                    im = ImageOps.exif_transpose(im)
                image = im
    except _DECODE_ERRORS as e:
        raise CorruptDataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    try:
        native = native_channels(image)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if strict_channels and native != channels:
        raise DataError(f"{path}: image has {native} channel(s) ({image.mode}) but channels="
                        f"{channels} was asked with strict_channels=True; pass "
                        f"channels={native} or strict_channels=False to convert")
    try:
        image = fit_square(_flatten(image, channels), image_size, fit, resize_method)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot convert {image.mode} image to {channels} channel(s) "
                        f"of size {image_size} ({e})") from e
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return array[..., None] if array.ndim == 2 else array


def verify_image(path: str | os.PathLike) -> None:
    """Cheap integrity check without decoding pixels (PIL ``verify``: headers, PNG CRCs).

    Raises:
        CorruptDataError: the file is not a readable image (message names it).
    """
    try:
        with Image.open(path) as im:
            im.verify()
    except _DECODE_ERRORS as e:
        raise CorruptDataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
