"""The item format shared by every dataset, the batch collate, errors and split helpers.

Every dataset in :mod:`difflab.data` is a :class:`torch.utils.data.Dataset` whose items are
``(image, info)``:

- ``image``: ``float32`` tensor ``(C, H, W)`` scaled to ``[-1, 1]``;
- ``info``: a dict with ``"label"`` (``int``) and/or ``"caption"`` (``str``) when the dataset
  has them (an empty dict otherwise).

:func:`collate` turns a list of items into ``(images (B, C, H, W), Cond)``, with labels in
``Cond.labels`` (``int64``) and captions in ``Cond.extra["captions"]`` (list of ``str``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value

logger = logging.getLogger("difflab.data")

Info = dict[str, Any]
Item = tuple[torch.Tensor, Info]
Transform = Callable[[torch.Tensor], torch.Tensor]

SPLITS = ("train", "test", "all")


class DataError(DifflabError):
    """A dataset could not be read or built (a ``ValueError``, like every difflab input error)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data files are not where the dataset looked; the message says how to get them."""


class CorruptDataError(DataError):
    """A data file exists but cannot be decoded; the message names the file."""


def data_home() -> Path:
    """The folder that holds the default dataset roots: ``$DIFFLAB_DATA`` or ``./data``."""
    return Path(os.environ.get("DIFFLAB_DATA", "data"))


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise a :class:`DifflabError`."""
    if split not in allowed:
        raise bad_value("split", split, " or ".join(repr(s) for s in allowed))
    return split


def holdout_indices(
    n: int,
    split: str,
    holdout_fraction: float,
    seed: int,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Deterministic train / held-out split of ``range(n)``.

    With ``labels`` the split is stratified: each class gives ``round(fraction * count)`` of its
    items to the held-out part, so both parts see every class. The permutation comes from a
    ``numpy.random.default_rng(seed)``; no global RNG is touched. ``train`` and ``test`` are
    disjoint and together cover ``range(n)``; ``all`` returns every index.

    Args:
        n: number of items.
        split: ``"train"``, ``"test"`` (the held-out part) or ``"all"``.
        holdout_fraction: fraction in ``[0, 1)`` that goes to ``"test"``.
        seed: seed of the permutation.
        labels: optional ``(n,)`` class ids for a stratified split.

    Returns:
        Sorted ``int64`` indices of the requested part.
    """
    check_split(split)
    if not 0.0 <= holdout_fraction < 1.0:
        raise bad_value("holdout_fraction", holdout_fraction, "a fraction in [0, 1)")
    if split == "all":
        return np.arange(n, dtype=np.int64)
    if split == "test" and holdout_fraction == 0.0:
        raise bad_value("holdout_fraction", holdout_fraction, "> 0 when split='test'")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c)
                                                    for c in np.unique(labels)]
    held = []
    for group in groups:
        perm = rng.permutation(group)
        held.append(perm[: int(round(holdout_fraction * len(group)))])
    mask = np.zeros(n, dtype=bool)
    mask[np.concatenate(held).astype(np.int64)] = True
    return np.flatnonzero(mask if split == "test" else ~mask).astype(np.int64)


class ImageDataset(Dataset):
    """Base class: items ``(image, info)`` as described in the module docstring.

    Subclasses implement ``__len__``, :meth:`_image` and :meth:`_info`. ``transform`` (if any)
    is applied to the ``[-1, 1]`` float image of each item (e.g.
    :class:`~difflab.data.transforms.RandomHorizontalFlip`).

    Attributes:
        name: registry name of the dataset.
        channels: number of image channels (1 or 3).
        image_size: height and width of every image.
        num_classes: number of classes, or None when the dataset has no labels.
        class_names: human-readable class names, or None.
    """

    name: str = "images"
    channels: int
    image_size: int
    num_classes: int | None = None
    class_names: list[str] | None = None
    transform: Transform | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _image(self, index: int) -> torch.Tensor:
        """The ``float32`` image ``(C, H, W)`` in ``[-1, 1]`` of item ``index``."""
        raise NotImplementedError

    def _info(self, index: int) -> Info:
        """The info dict of item ``index``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> Item:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} items")
        image = self._image(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._info(i)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
                f"channels={self.channels}, image_size={self.image_size}, "
                f"num_classes={self.num_classes})")


class ArrayDataset(ImageDataset):
    """A dataset held in memory: images, optional labels, optional captions.

    Args:
        images: ``uint8`` ``(N, C, H, W)`` in ``[0, 255]`` (mapped by ``x / 127.5 - 1``) or
            floating ``(N, C, H, W)`` already in ``[-1, 1]``.
        labels: optional ``(N,)`` integer class ids.
        captions: optional list of ``N`` strings.
        num_classes: number of classes (default: ``max(labels) + 1`` when labels are given).
        transform: optional function applied to each ``[-1, 1]`` image.
        name: registry name.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | np.ndarray | None = None,
        captions: Sequence[str] | None = None,
        num_classes: int | None = None,
        transform: Transform | None = None,
        name: str = "arrays",
    ) -> None:
        if images.ndim != 4:
            raise bad_value("images.shape", tuple(images.shape), "(N, C, H, W)")
        if images.shape[-1] != images.shape[-2]:
            raise bad_value("images.shape", tuple(images.shape), "square images (H == W)")
        n = images.shape[0]
        self.images = images.contiguous()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if self.labels is not None and self.labels.shape != (n,):
            raise bad_value("labels.shape", tuple(self.labels.shape), f"({n},), one per image")
        self.captions = None if captions is None else list(captions)
        if self.captions is not None and len(self.captions) != n:
            raise bad_value("len(captions)", len(self.captions), f"{n}, one per image")
        if num_classes is None and self.labels is not None:
            num_classes = int(self.labels.max()) + 1 if n else 0
        self.num_classes = num_classes
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[-1])
        self.transform = transform
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def _image(self, index: int) -> torch.Tensor:
        x = self.images[index]
        if x.dtype == torch.uint8:
            return x.to(torch.float32) / 127.5 - 1.0
        return x.to(torch.float32)

    def _info(self, index: int) -> Info:
        info: Info = {}
        if self.labels is not None:
            info["label"] = int(self.labels[index])
        if self.captions is not None:
            info["caption"] = self.captions[index]
        return info

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All images as one ``float32`` ``(N, C, H, W)`` tensor in ``[-1, 1]``, and the labels.

        The ``transform`` is not applied (use this for full-batch work such as a classifier).
        """
        x = self.images
        x = x.to(torch.float32) / 127.5 - 1.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return x, self.labels


def collate(batch: Sequence[Item]) -> tuple[torch.Tensor, Cond]:
    """Stack items ``(image, info)`` into ``(images (B, C, H, W), Cond)``.

    ``"label"`` goes to ``Cond.labels`` (``int64`` ``(B,)``), ``"caption"`` to
    ``Cond.extra["captions"]`` (list of ``str``); any other info key ``k`` goes to
    ``Cond.extra[k]`` as a list. A key must be present in every item or in none.

    Args:
        batch: the items, as returned by a dataset's ``__getitem__``.

    Returns:
        The stacked images and their conditioning.
    """
    if not batch:
        raise bad_value("batch", batch, "a non-empty list of (image, info) items")
    images = torch.stack([item[0] for item in batch])
    keys = set(batch[0][1])
    for i, (_, info) in enumerate(batch):
        if set(info) != keys:
            raise DataError(f"collate: item {i} has info keys {sorted(info)} but item 0 has "
                            f"{sorted(keys)}; every item must carry the same keys")
    cond = Cond()
    for key in sorted(keys):
        values = [info[key] for _, info in batch]
        if key == "label":
            cond.labels = torch.tensor(values, dtype=torch.int64)
        elif key == "caption":
            cond.extra["captions"] = [str(v) for v in values]
        else:
            cond.extra[key] = values
    return images, cond
