"""Datasets returning ``(image in [-1, 1] (C, H, W), info)``, a collate to ``(images, Cond)``,
checksummed downloads and small image transforms (Pillow + numpy, no torchvision).

Quick start::

    from torch.utils.data import DataLoader
    from difflab.data import build_dataset, collate

    ds = build_dataset("digits", image_size=16)
    x, cond = next(iter(DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate)))
    # x: (64, 1, 16, 16) float32 in [-1, 1]; cond.labels: (64,) int64
"""

from difflab.data.base import (
    ArrayDataset,
    CorruptDataError,
    DataError,
    DataNotFoundError,
    ImageDataset,
    Info,
    Item,
    collate,
    data_home,
    holdout_indices,
    logger,
)
from difflab.data.cifar import CIFAR10, read_cifar_batch
from difflab.data.decode import decode_image
from difflab.data.digits import Digits
from difflab.data.download import DownloadError, download_file, md5sum
from difflab.data.folder import Emoji, ImageFolder, list_images, read_captions
from difflab.data.idx import MNIST, FashionMNIST, read_idx
from difflab.data.registry import DATASETS, build_dataset
from difflab.data.transforms import (
    RandomHorizontalFlip,
    center_crop,
    center_pad,
    from_uint8,
    hflip,
    make_grid,
    pad,
    resize,
    save_image_grid,
    to_uint8,
)

__all__ = [
    "ArrayDataset", "CIFAR10", "CorruptDataError", "DATASETS", "DataError", "DataNotFoundError",
    "Digits", "DownloadError", "Emoji", "FashionMNIST", "ImageDataset", "ImageFolder", "Info",
    "Item", "MNIST", "RandomHorizontalFlip", "build_dataset", "center_crop", "center_pad",
    "collate", "data_home", "decode_image", "download_file", "from_uint8", "hflip",
    "holdout_indices", "list_images", "logger", "make_grid", "md5sum", "pad", "read_captions",
    "read_cifar_batch", "read_idx", "resize", "save_image_grid", "to_uint8",
]
