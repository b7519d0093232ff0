"""scikit-learn's 8x8 handwritten digits: 1,797 images, always installed, no download."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from difflab.data.base import ArrayDataset, Transform, holdout_indices
from difflab.data.transforms import ResizeMethod, pil_filter
from difflab.errors import bad_value


class Digits(ArrayDataset):
    """The UCI optical digits from :func:`sklearn.datasets.load_digits` as 1-channel images.

    Pixels are counts ``0..16``, mapped exactly to ``[-1, 1]`` by ``x / 8 - 1``. With
    ``image_size > 8`` each image is upscaled in float32 with PIL (``resize_method``) and
    clamped to ``[-1, 1]`` (bicubic can overshoot). Labels are the digits 0-9.

    The split is deterministic: stratified by class, ``round(holdout_fraction * count)`` images
    of each class (picked by a ``numpy.random.default_rng(seed)`` permutation) form
    ``"test"``; the rest form ``"train"``. The two are disjoint and cover all 1,797 images.

    Args:
        split: ``"train"``, ``"test"`` (held-out) or ``"all"``.
        image_size: 8 (native) or larger (e.g. 16 or 32).
        holdout_fraction: fraction of each class held out for ``"test"``.
        seed: seed of the split.
        resize_method: PIL filter used when ``image_size != 8``.
        transform: optional function applied to each ``[-1, 1]`` image.
    """

    name = "digits"

    def __init__(
        self,
        split: str = "train",
        image_size: int = 8,
        holdout_fraction: float = 0.2,
        seed: int = 0,
        resize_method: ResizeMethod = "bicubic",
        transform: Transform | None = None,
    ) -> None:
        from sklearn.datasets import load_digits  # local: sklearn import costs ~0.5 s

        if image_size < 1:
            raise bad_value("image_size", image_size, "a positive int (8 is native)")
        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 8.0 - 1.0  # (1797, 8, 8), exact
        labels = bunch.target.astype(np.int64)
        idx = holdout_indices(len(labels), split, holdout_fraction, seed, labels)
        images, labels = images[idx], labels[idx]
        if image_size != 8:
            f = pil_filter(resize_method)
            images = np.stack([np.asarray(Image.fromarray(im)
                                          .resize((image_size, image_size), f)) for im in images])
            images = np.clip(images, -1.0, 1.0)
        super().__init__(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), labels,
                         num_classes=10, transform=transform, name=self.name)
        self.split = split
        self.indices = idx
        self.class_names = [str(d) for d in range(10)]
