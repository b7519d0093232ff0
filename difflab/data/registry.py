"""``build_dataset``: datasets by name, for configs and the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from difflab.data.base import ImageDataset, data_home
from difflab.data.cifar import CIFAR10
from difflab.data.digits import Digits
from difflab.data.folder import Emoji, ImageFolder
from difflab.data.idx import MNIST, FashionMNIST
from difflab.errors import DifflabError, bad_value


def _digits(root, image_size, split, **kw) -> ImageDataset:
    if root is not None:
        raise bad_value("root", root, "None: digits ship with scikit-learn (no files needed)")
    return Digits(split=split, image_size=image_size or 8, **kw)


def _mnist(root, image_size, split, **kw) -> ImageDataset:
    return MNIST(root or data_home() / "mnist", split=split, image_size=image_size or 28, **kw)


def _fashion(root, image_size, split, **kw) -> ImageDataset:
    return FashionMNIST(root or data_home() / "fashion_mnist", split=split,
                        image_size=image_size or 28, **kw)


def _folder(root, image_size, split, **kw) -> ImageDataset:
    if root is None:
        raise bad_value("root", root, "the path of a folder of images (required for 'folder')")
    return ImageFolder(root, image_size or 64, split=split, **kw)


def _emoji(root, image_size, split, **kw) -> ImageDataset:
    return Emoji(root or data_home() / "emoji", image_size or 32, split=split, **kw)


def _shapes(root, image_size, split, **kw) -> ImageDataset:
    from difflab.data.shapes import Shapes

    if root is not None:
        raise bad_value("root", root, "None: shapes are rendered by difflab (no files needed)")
    return Shapes(split=split, image_size=image_size or 64, **kw)


def _cifar10(root, image_size, split, **kw) -> ImageDataset:
    return CIFAR10(root or data_home() / "cifar10", split=split, image_size=image_size or 32, **kw)


DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": _digits,
    "mnist": _mnist,
    "fashion_mnist": _fashion,
    "folder": _folder,
    "emoji": _emoji,
    "cifar10": _cifar10,
    "shapes": _shapes,
}
"""Registry name -> builder ``(root, image_size, split, **kwargs) -> dataset``."""

DEFAULT_IMAGE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "folder": 64, "emoji": 32,
                      "cifar10": 32, "shapes": 64}


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    split: str = "train",
    **kwargs,
) -> ImageDataset:
    """Build a dataset by registry name.

    - ``digits``: :class:`Digits` (scikit-learn, no root), size 8; ``holdout_fraction``, ``seed``.
    - ``mnist``: :class:`MNIST`, root ``$DIFFLAB_DATA/mnist``, size 28; ``download``, ``mirrors``.
    - ``fashion_mnist``: :class:`FashionMNIST`, root ``$DIFFLAB_DATA/fashion_mnist``, size 28.
    - ``folder``: :class:`ImageFolder`, root required, size 64; ``channels``, ``captions``,
      ``skip_corrupt``, ``cache``, ``limit``, ``files``, ``fit``, ``labels_from_folders``...
    - ``emoji``: :class:`Emoji`, root ``$DIFFLAB_DATA/emoji``, size 32; as ``folder``.
    - ``cifar10``: :class:`CIFAR10`, root ``$DIFFLAB_DATA/cifar10``, size 32; ``download``.
    - ``shapes``: :class:`~difflab.data.shapes.Shapes`, rendered (no root), size 64, with exact
      depth maps and captions; ``n``, ``n_test``, ``seed``, ``max_shapes``.

    ``$DIFFLAB_DATA`` defaults to ``data`` (relative to the working directory). Names are
    case-insensitive and ``-`` counts as ``_`` (``fashion-mnist``). Every dataset also takes
    ``transform`` and (except folders) ``resize_method``.

    Args:
        name: one of :data:`DATASETS`.
        root: data folder (None: the default above).
        image_size: output size (None: the dataset's native / default size above).
        split: ``"train"``, ``"test"`` or ``"all"``.
        **kwargs: passed to the dataset class.

    Returns:
        The dataset; its items are ``(image in [-1, 1] (C, H, W), info dict)``.
    """
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise bad_value("dataset name", name, f"one of {sorted(DATASETS)}")
    try:
        return DATASETS[key](None if root is None else Path(root), image_size, split, **kwargs)
    except TypeError as e:  # an unknown keyword for this dataset
        if "unexpected keyword" not in str(e):
            raise
        raise DifflabError(f"build_dataset({key!r}): {e}") from None
