"""CIFAR-10 from its official python pickle batches, read without executing pickle code."""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data.base import (
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    Transform,
    check_split,
    data_home,
)
from difflab.data.download import download_file, extract_tar, join_url
from difflab.data.transforms import ResizeMethod, resize_batch

# The only globals a CIFAR batch pickle needs: numpy arrays (protocols 0-4 rebuild them with
# _reconstruct, protocol 5 with _frombuffer), and bytes (protocol 2 spells them _codecs.encode).
# Each maps to the modules tried in order (numpy 2 renamed numpy.core to numpy._core).
_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _MULTIARRAY,
    ("numpy._core.multiarray", "_reconstruct"): _MULTIARRAY,
    ("numpy.core.numeric", "_frombuffer"): _NUMERIC,
    ("numpy._core.numeric", "_frombuffer"): _NUMERIC,
    ("numpy", "ndarray"): ("numpy",),
    ("numpy", "dtype"): ("numpy",),
    ("_codecs", "encode"): ("_codecs",),
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few numpy globals of a data batch."""

    def find_class(self, module: str, name: str) -> Any:
        for candidate in _ALLOWED.get((module, name), ()):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a CIFAR batch "
                                     "holds only numpy arrays, lists and bytes)")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file: ``uint8`` images ``(N, 32, 32, 3)`` and labels ``(N,)``.

    The file is a pickled dict with ``data`` (``uint8`` ``(N, 3072)``, each row the red, green
    then blue 32x32 planes) and ``labels`` (``N`` ints in 0-9); keys may be ``bytes`` (Python 3
    pickles) or ``str`` (the official Python 2 pickles, decoded as latin-1). Only numpy
    globals are allowed, so a malicious file cannot run code.

    Raises:
        CorruptDataError: unreadable file or unexpected content (message names the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise CorruptDataError(f"{path}: not a CIFAR batch pickle ({e})") from e
    if not isinstance(batch, dict):
        raise CorruptDataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise CorruptDataError(f"{path}: missing 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} "
                               f"{data.shape}")
    if labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max()
                                            <= 9):
        raise CorruptDataError(f"{path}: 'labels' must be {data.shape[0]} ints in 0-9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CIFAR10(ArrayDataset):
    """CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50,000 train + 10,000 test.

    Reads ``data_batch_1`` ... ``data_batch_5`` (train) and ``test_batch`` (test) from
    ``root/cifar-10-batches-py/`` or ``root`` itself. ``download=True`` fetches the official
    ``cifar-10-python.tar.gz`` (md5-checked) and extracts it into ``root``.

    Items: ``(image (3, S, S) in [-1, 1], {"label": int})``.

    Args:
        root: the folder (default ``$DIFFLAB_DATA/cifar10`` or ``data/cifar10``).
        split: ``"train"``, ``"test"`` or ``"all"`` (the present splits, train first).
        image_size: output size; other than 32 resizes every image once at load time.
        download: fetch and extract the archive when batches are missing.
        mirrors: base URLs of the archive (default :attr:`MIRRORS`).
        resize_method: PIL filter used when ``image_size != 32``.
        transform: optional function applied to each ``[-1, 1]`` image.
    """

    name = "cifar10"
    MIRRORS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/",)
    ARCHIVE = "cifar-10-python.tar.gz"
    ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
    FOLDER = "cifar-10-batches-py"
    FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 32,
        download: bool = False,
        mirrors: Sequence[str] | None = None,
        resize_method: ResizeMethod = "bicubic",
        transform: Transform | None = None,
    ) -> None:
        check_split(split)
        self.root = Path(root) if root is not None else data_home() / self.name
        self.split = split
        self.mirrors = tuple(mirrors) if mirrors is not None else self.MIRRORS
        wanted = ["train", "test"] if split == "all" else [split]
        if download and not all(self._find(s) for s in wanted):
            self._download()
        present = [s for s in wanted if self._find(s)]
        if not present:
            raise self._missing(wanted)
        images, labels = [], []
        for s in present:
            for path in self._find(s) or []:
                x, y = read_cifar_batch(path)
                images.append(x)
                labels.append(y)
        self.splits = present
        x = resize_batch(np.concatenate(images), image_size, resize_method)
        super().__init__(torch.from_numpy(x).permute(0, 3, 1, 2), np.concatenate(labels),
                         num_classes=10, transform=transform, name=self.name)
        self.class_names = list(self.CLASS_NAMES)

    def _folder(self) -> Path:
        nested = self.root / self.FOLDER
        return nested if nested.is_dir() else self.root

    def _find(self, split: str) -> list[Path] | None:
        """The split's batch files, or None unless all of them are present."""
        paths = [self._folder() / n for n in self.FILES[split]]
        return paths if all(p.is_file() for p in paths) else None

    def _missing(self, splits: list[str]) -> DataNotFoundError:
        names = [n for s in splits for n in self.FILES[s]]
        url = join_url(self.mirrors[0], self.ARCHIVE) if self.mirrors else self.ARCHIVE
        root = self.root.resolve()
        gone = "" if root.is_dir() else " (folder does not exist)"
        return DataNotFoundError(
            f"CIFAR10 split {self.split!r}: batches missing in {root / self.FOLDER} and "
            f"{root}{gone} (looked for {', '.join(names)}). To fetch {url} (md5-checked) add "
            "--set data.download=true to difflab train (download=True in Python), or extract "
            "that archive into the folder.")

    def _download(self) -> None:
        archive = download_file([join_url(m, self.ARCHIVE) for m in self.mirrors],
                                self.root / self.ARCHIVE, self.ARCHIVE_MD5)
        extract_tar(archive, self.root)
