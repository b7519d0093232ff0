"""Any folder of images, with an optional captions file; the Noto emoji set as a preset."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from difflab.data.base import (
    CorruptDataError,
    DataError,
    DataNotFoundError,
    ImageDataset,
    Info,
    Transform,
    data_home,
    holdout_indices,
    logger,
)
from difflab.data.decode import check_channels, decode_image, verify_image
from difflab.data.transforms import Fit, ResizeMethod, from_uint8
from difflab.errors import bad_value

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_CAPTIONS = "captions.tsv"
CACHE_LIMIT_BYTES = 256 << 20  # cache=None caches decoded images when they fit in this


def list_images(root: str | os.PathLike,
                extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursively, extension case-insensitive), sorted by
    their path relative to ``root``. Hidden files and folders (``.name``) are ignored."""
    root = Path(root)
    exts = tuple(e.lower() for e in extensions)
    found = []
    for folder, dirs, names in os.walk(root):  # scandir-based: no stat per file
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found += [prefix + n for n in names if n.lower().endswith(exts) and not n.startswith(".")]
    return [root / rel for rel in sorted(found)]


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Read a UTF-8 TSV with header ``file<TAB>caption``: ``{file: caption}``.

    Empty lines are skipped; the caption is everything after the first tab (it may be empty).

    Raises:
        DataError: bad header, a line without a tab, or a file listed twice (names the line).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or lines[0].rstrip("\r").split("\t") != ["file", "caption"]:
        raise DataError(f"{path}: first line must be the header 'file<TAB>caption', "
                        f"got {lines[0]!r}" if lines else f"{path}: empty captions file")
    table: dict[str, str] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{n}: expected 'file<TAB>caption', got {line!r}")
        name, caption = line.split("\t", 1)
        if name in table:
            raise DataError(f"{path}:{n}: {name!r} is listed twice")
        table[name] = caption.strip()
    return table


class ImageFolder(ImageDataset):
    """Every PNG / JPEG / WebP image under ``root`` (recursively), optionally captioned.

    Each image is decoded by :func:`~difflab.data.decode.decode_image` (alpha composited on
    white; grayscale / RGB converted to ``channels``; see that module for every conversion),
    fitted to ``image_size`` and mapped to ``[-1, 1]``.

    Captions come from a TSV with header ``file<TAB>caption`` whose ``file`` is the image's
    path relative to ``root`` or, when that name is unique in the folder, its bare file name.
    When a captions file is used every item has ``info["caption"]``; **images it does not list
    get the empty caption ``""``** (``num_captioned`` counts the others).

    Corrupt files never vanish silently: by default the first one raises
    :class:`CorruptDataError` naming it. With ``skip_corrupt=True`` each is logged on the
    ``difflab.data`` logger, listed in :attr:`skipped`, and a summary warning gives the count.
    With caching, images are decoded once at construction (so all errors surface there);
    without it they are decoded per item and ``skip_corrupt`` runs a PIL ``verify`` pass
    (headers and PNG checksums) at construction; a file that still fails later raises.

    Args:
        root: the folder.
        image_size: output height and width.
        channels: 1 (grayscale) or 3 (RGB).
        captions: captions file, relative to ``root`` or absolute; None ignores captions. The
            default name is optional (used when present); any other name must exist.
        skip_corrupt: skip undecodable images (logged and counted) instead of raising.
        cache: keep decoded ``uint8`` images in memory; None caches when they fit in 256 MiB.
        limit: keep only the first ``limit`` images (sorted by path), e.g. for quick tests.
        files: keep only these files (paths relative to ``root``), in this order.
        fit: ``"crop"`` (center), ``"pad"`` (white) or ``"stretch"`` for non-square images.
        resize_method: PIL filter: ``bicubic``, ``bilinear``, ``area``, ``nearest``, ``lanczos``.
        strict_channels: raise on an image whose own channel count differs from ``channels``.
        labels_from_folders: label each image by its top-level subfolder (sorted names).
        split: ``"train"``, ``"test"`` or ``"all"``; with ``holdout_fraction=0`` train = all.
        holdout_fraction: fraction held out as ``"test"`` (stratified when labelled).
        seed: seed of the split.
        transform: optional function applied to each ``[-1, 1]`` image.
        num_workers: decoding threads when caching (default: CPU count, at most 8).
    """

    name = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        captions: str | os.PathLike | None = DEFAULT_CAPTIONS,
        skip_corrupt: bool = False,
        cache: bool | None = None,
        limit: int | None = None,
        files: Sequence[str | os.PathLike] | None = None,
        fit: Fit = "crop",
        resize_method: ResizeMethod = "bicubic",
        strict_channels: bool = False,
        labels_from_folders: bool = False,
        split: str = "train",
        holdout_fraction: float = 0.0,
        seed: int = 0,
        transform: Transform | None = None,
        num_workers: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataNotFoundError(f"{type(self).__name__}: image folder {self.root} does not "
                                    f"exist (absolute: {self.root.absolute()}); pass the folder "
                                    "that holds the images as root")
        if image_size < 1:
            raise bad_value("image_size", image_size, "a positive int")
        if fit not in ("crop", "pad", "stretch"):
            raise bad_value("fit", fit, "'crop', 'pad' or 'stretch'")
        self.channels, self.image_size = check_channels(channels), int(image_size)
        self.decode_args = dict(image_size=self.image_size, channels=self.channels, fit=fit,
                                resize_method=resize_method, strict_channels=strict_channels)
        self.transform = transform
        all_files = list_images(self.root)
        paths = self._select(all_files, files, limit)
        self.class_names = self._classes(all_files) if labels_from_folders else None
        self.num_classes = None if self.class_names is None else len(self.class_names)
        labels = None if self.class_names is None else np.array(
            [self.class_names.index(self._rel(p).split("/")[0]) for p in paths])
        keep = holdout_indices(len(paths), split, holdout_fraction, seed, labels)
        self.files = [paths[i] for i in keep]
        self.labels = None if labels is None else torch.from_numpy(labels[keep])
        self.num_captioned = 0
        self.captions = self._captions(captions, all_files)
        self.skipped: list[Path] = []
        if cache is None:
            cache = len(self.files) * self.image_size**2 * self.channels <= CACHE_LIMIT_BYTES
        self.cached = bool(cache)
        self.images: torch.Tensor | None = None
        if self.cached:
            self._decode_all(skip_corrupt, num_workers)
        elif skip_corrupt:
            self._drop([i for i, p in enumerate(self.files) if not self._verifies(p)])

    def _select(self, all_files: list[Path], files, limit: int | None) -> list[Path]:
        if files is not None:
            present = set(all_files)
            paths = [p if Path(p).is_absolute() else self.root / p for p in files]
            missing = [str(p) for p in paths if Path(p) not in present]
            if missing:
                raise DataNotFoundError(f"{self.root}: files not found among its images: "
                                        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
            all_files = [Path(p) for p in paths]
        if not all_files:
            raise DataNotFoundError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                    "in this folder or its subfolders")
        if limit is not None:
            if limit < 1:
                raise bad_value("limit", limit, "a positive int or None")
            all_files = all_files[:limit]
        return all_files

    def _classes(self, all_files: list[Path]) -> list[str]:
        top = [self._rel(p).split("/") for p in all_files]
        loose = [p for p, parts in zip(all_files, top) if len(parts) < 2]
        if loose:
            raise DataError(f"labels_from_folders=True needs every image in a class subfolder "
                            f"of {self.root}, but {loose[0]} is directly in it")
        return sorted({parts[0] for parts in top})

    def _captions(self, captions, all_files: list[Path]) -> list[str] | None:
        if captions is None:
            return None
        path = Path(captions) if Path(captions).is_absolute() else self.root / captions
        if not path.is_file():
            if str(captions) == DEFAULT_CAPTIONS:
                return None
            raise DataNotFoundError(f"captions file {path} does not exist (pass captions=None "
                                    "to load the images without captions)")
        table = read_captions(path)
        names = Counter(p.name for p in all_files)
        rels = {self._rel(p) for p in all_files}
        unknown = [k for k in table if k not in rels and names[k] != 1]
        if unknown:
            logger.warning("%s: %d caption(s) name no image in %s (e.g. %r)", path,
                           len(unknown), self.root, unknown[0])
        keys = [self._rel(p) if self._rel(p) in table else p.name if names[p.name] == 1 else None
                for p in self.files]
        self.num_captioned = sum(k in table for k in keys)
        return [table.get(k, "") if k is not None else "" for k in keys]

    def _rel(self, path: Path) -> str:
        """``path`` relative to ``root`` in POSIX form (paths here are ``root / rel``)."""
        root = self.root.as_posix()
        prefix = "" if root == "." else root.rstrip("/") + "/"
        return path.as_posix()[len(prefix):]

    def _verifies(self, path: Path) -> bool:
        try:
            verify_image(path)
            return True
        except CorruptDataError as e:
            logger.warning("skipping corrupt image: %s", e)
            return False

    def _decode_one(self, path: Path, skip_corrupt: bool) -> np.ndarray | None:
        try:
            return decode_image(path, **self.decode_args)
        except CorruptDataError as e:
            if not skip_corrupt:
                raise
            logger.warning("skipping corrupt image: %s", e)
            return None

    def _decode_all(self, skip_corrupt: bool, num_workers: int | None) -> None:
        workers = num_workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
            arrays = list(pool.map(lambda p: self._decode_one(p, skip_corrupt), self.files))
        self._drop([i for i, a in enumerate(arrays) if a is None])
        arrays = [a for a in arrays if a is not None]
        if not arrays:
            raise DataError(f"{self.root}: every image was corrupt ({len(self.skipped)} skipped)")
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def _drop(self, bad: list[int]) -> None:
        """Remove items ``bad`` (corrupt files) from every per-item list and record them."""
        if not bad:
            return
        drop = set(bad)
        self.skipped = [self.files[i] for i in bad]
        keep = [i for i in range(len(self.files)) if i not in drop]
        self.files = [self.files[i] for i in keep]
        if self.labels is not None:
            self.labels = self.labels[keep]
        if self.captions is not None:
            self.captions = [self.captions[i] for i in keep]
        logger.warning("%s: skipped %d corrupt image(s) of %d (skip_corrupt=True); see the "
                       "`skipped` attribute", self.root, len(bad), len(bad) + len(keep))

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> torch.Tensor:
        if self.images is not None:
            return from_uint8(self.images[index])
        array = decode_image(self.files[index], **self.decode_args)
        return from_uint8(torch.from_numpy(array).permute(2, 0, 1))

    def _info(self, index: int) -> Info:
        info: Info = {}
        if self.labels is not None:
            info["label"] = int(self.labels[index])
        if self.captions is not None:
            info["caption"] = self.captions[index]
        return info


class Emoji(ImageFolder):
    """The Noto color emoji set (72x72 RGBA PNGs under ``root``, ``captions.tsv`` beside them).

    A thin preset of :class:`ImageFolder`: RGB, transparent background composited on white,
    bicubic (antialiased) downscaling to ``image_size``. Items are ``(image, {"caption": str})``;
    the images ``captions.tsv`` does not list (39 of the 3,583 in the shared copy) get ``""``.

    Args:
        root: the emoji folder (default ``$DIFFLAB_DATA/emoji`` or ``data/emoji``).
        image_size: output size (default 32).
        **kwargs: any other :class:`ImageFolder` argument.
    """

    name = "emoji"

    def __init__(self, root: str | os.PathLike | None = None, image_size: int = 32,
                 **kwargs) -> None:
        root = Path(root) if root is not None else data_home() / "emoji"
        if not root.is_dir():
            raise DataNotFoundError(
                f"Emoji: folder {root} does not exist. Get the 72x72 PNGs of "
                "https://github.com/googlefonts/noto-emoji (folder png/72) into it, with an "
                "optional captions.tsv (header file<TAB>caption), or pass root=")
        kwargs.setdefault("captions", DEFAULT_CAPTIONS)
        super().__init__(root, image_size, **kwargs)
