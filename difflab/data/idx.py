"""MNIST and Fashion-MNIST from their IDX files (``.gz`` or raw), parsed with numpy.

IDX format (LeCun et al.): two zero bytes, a type code (``0x08`` = ``uint8``, ``0x09`` = ``int8``,
``0x0B`` = ``int16``, ``0x0C`` = ``int32``, ``0x0D`` = ``float32``, ``0x0E`` = ``float64``), the
number of dimensions, then each dimension as a big-endian ``int32``, then the data in
big-endian C order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from difflab.data.base import (
    ArrayDataset,
    CorruptDataError,
    DataNotFoundError,
    Transform,
    check_split,
    data_home,
    holdout_indices,
)
from difflab.data.download import download_files
from difflab.data.transforms import ResizeMethod, resize_batch
from difflab.errors import bad_value

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its bytes start with the gzip magic).

    Args:
        path: the ``.gz`` or raw IDX file.

    Returns:
        The array, in native byte order, with the shape given by the header.

    Raises:
        CorruptDataError: bad magic number, unknown type, or truncated / overlong data; the
            message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorruptDataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise CorruptDataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'none'};"
                               f" expected 00 00, a type in {sorted(_IDX_TYPES)}, ndim)")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise CorruptDataError(f"{path}: IDX data {what}: {len(raw)} bytes, header shape {shape} "
                               f"of {dtype.str} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


class MNIST(ArrayDataset):
    """MNIST digits (28x28 grayscale, labels 0-9) read from the official IDX files in ``root``.

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with or without ``.gz``. A
    folder holding only one split is fine (``split="all"`` loads whatever splits are present);
    asking for a split that is absent raises :class:`DataNotFoundError` naming the folder, the
    files looked for and how to fetch them. With ``download=True`` the ``.gz`` files that are
    missing (or present with a wrong md5) are fetched from the mirrors and checked against
    their md5; a raw decompressed file counts as present.

    Items: ``(image (1, S, S) in [-1, 1], {"label": int})``; pixels map ``u / 127.5 - 1``.

    Args:
        root: folder with the IDX files (default ``$DIFFLAB_DATA/mnist`` or ``data/mnist``).
        split: ``"train"`` (60,000), ``"test"`` (10,000) or ``"all"`` (the present splits,
            train first).
        image_size: output size; other than 28 resizes every image once at load time.
        download: fetch missing files (the ``.gz`` archives) into ``root``.
        mirrors: base URLs tried in order (default :attr:`MIRRORS`).
        resize_method: PIL filter used when ``image_size != 28``.
        transform: optional function applied to each ``[-1, 1]`` image.
        holdout_fraction: fraction of the loaded images (stratified by class, seeded by
            ``seed``) set aside, e.g. to score a model on digits it never saw when only one
            official split is present. ``0`` keeps everything.
        held_out: return the held-out part instead of the rest.
        seed: seed of the hold-out permutation. With the same seed a smaller fraction's
            held-out part lies inside a larger one's (so the ``mnist-lenet`` judge, which holds
            out 0.2 with seed 0, never trained on the part a 0.1 hold-out keeps for scoring).
    """

    name = "mnist"
    MIRRORS: tuple[str, ...] = (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    )
    MD5: dict[str, str] = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
    PREFIX = {"train": "train", "test": "t10k"}

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 28,
        download: bool = False,
        mirrors: Sequence[str] | None = None,
        resize_method: ResizeMethod = "bicubic",
        transform: Transform | None = None,
        holdout_fraction: float = 0.0,
        held_out: bool = False,
        seed: int = 0,
        classes: Sequence[int] | None = None,
    ) -> None:
        check_split(split)
        self.root = Path(root) if root is not None else data_home() / self.name
        self.split = split
        self.mirrors = tuple(mirrors) if mirrors is not None else self.MIRRORS
        wanted = ["train", "test"] if split == "all" else [split]
        if download:
            self._download(wanted)
        present = [s for s in wanted if self._find(s) is not None]
        if not present:
            raise self._missing(wanted)
        images, labels = zip(*(self._read_split(s) for s in present))
        self.splits = present
        images, labels = np.concatenate(images), np.concatenate(labels)
        if holdout_fraction or held_out:
            keep = holdout_indices(len(labels), "test" if held_out else "train",
                                   holdout_fraction, seed, labels)
            images, labels = images[keep], labels[keep]
        self.holdout_fraction, self.held_out = holdout_fraction, held_out
        self.classes = None
        if classes is not None:
            wanted_classes = sorted({int(c) for c in classes})
            if not wanted_classes or wanted_classes[0] < 0 or wanted_classes[-1] > 9:
                raise bad_value("classes", list(classes), "a non-empty list of labels 0-9")
            keep = np.isin(labels, wanted_classes)
            images, labels = images[keep], labels[keep]
            self.classes = wanted_classes
        x = resize_batch(images, image_size, resize_method)
        super().__init__(torch.from_numpy(x).unsqueeze(1), labels,
                         num_classes=10, transform=transform, name=self.name)
        self.class_names = list(self.CLASS_NAMES)

    @classmethod
    def filenames(cls, split: str) -> tuple[str, str]:
        """The two file names (without ``.gz``) of ``split``: images, then labels."""
        p = cls.PREFIX[split]
        return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"

    def _find(self, split: str) -> tuple[Path, Path] | None:
        """Paths of the split's images and labels (``.gz`` preferred), or None if absent."""
        found = []
        for name in self.filenames(split):
            path = next((p for p in (self.root / f"{name}.gz", self.root / name) if p.is_file()),
                        None)
            if path is None:
                return None
            found.append(path)
        return found[0], found[1]

    def _missing(self, splits: list[str]) -> DataNotFoundError:
        names = [f"{n}[.gz]" for s in splits for n in self.filenames(s)]
        root = self.root.resolve()
        where = root if root.is_dir() else f"{root} (folder does not exist)"
        return DataNotFoundError(
            f"{type(self).__name__} split {self.split!r}: no {' / '.join(splits)} files in "
            f"{where} (looked for {', '.join(names)}). To fetch them from "
            f"{self.mirrors[0] if self.mirrors else 'a mirror'} (md5-checked) add "
            "--set data.download=true to difflab train (download=True in Python), point "
            "data.root at a folder holding them, or copy them there.")

    def _download(self, splits: list[str]) -> None:
        # a raw (decompressed) copy counts as present; a .gz with a wrong md5 is fetched again
        names = [n for s in splits for n in self.filenames(s)]
        files = {f"{n}.gz": self.MD5[f"{n}.gz"] for n in names
                 if (self.root / f"{n}.gz").is_file() or not (self.root / n).is_file()}
        if files:
            download_files(self.root, files, self.mirrors)

    def _read_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        paths = self._find(split)
        assert paths is not None
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise CorruptDataError(f"{paths[0]}: expected uint8 images (N, 28, 28), got "
                                   f"{images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8 or labels.shape[0] != images.shape[0]:
            raise CorruptDataError(f"{paths[1]}: expected {images.shape[0]} uint8 labels (one per "
                                   f"image in {paths[0].name}), got {labels.dtype} {labels.shape}")
        if labels.size and labels.max() > 9:
            raise CorruptDataError(f"{paths[1]}: label {labels.max()} outside 0-9")
        return images, labels.astype(np.int64)


class FashionMNIST(MNIST):
    """Fashion-MNIST (Zalando; 28x28 grayscale clothing, 10 classes), same files as MNIST.

    Arguments as :class:`MNIST`; default root ``$DIFFLAB_DATA/fashion_mnist``. Checksums from
    the official repository ``zalandoresearch/fashion-mnist``.
    """

    name = "fashion_mnist"
    MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    MD5 = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
