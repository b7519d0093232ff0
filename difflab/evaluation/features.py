"""Feature extractors by name, trained by difflab on the dataset and cached on disk.

==================  ===========  ==================================================  =====
name                dataset      network (features = penultimate layer)              D
==================  ===========  ==================================================  =====
``mnist-lenet``     mnist        :class:`~.nets.ConvNet` classifier, 28x28           128
``fashion-lenet``   fashion      :class:`~.nets.ConvNet` classifier, 28x28           128
``digits-mlp``      digits       :class:`~.nets.MLPNet` classifier, 8x8              64
``emoji-ae``        emoji        :class:`~.nets.ConvAutoencoder` bottleneck, 32x32   64
``inception``       any          Inception-v3 pool3 (torchmetrics / torch-fidelity)  2048
==================  ===========  ==================================================  =====

A trained extractor is stored as ``<cache>/extractors/<name>-<key>.safetensors`` (+ ``.json``
with its held-out score and training time), where ``<cache>`` is ``$DIFFLAB_CACHE`` or
``~/.cache/difflab`` and ``key`` hashes the training images, labels and the training config:
the same data and config always give the same file, and training is deterministic given the
seed. :func:`get_extractor` loads it, or trains it when ``train=True``; otherwise it raises
:class:`ExtractorNotTrainedError` saying how to train one. The emoji set has no labels, so its
extractor is an autoencoder (documented choice; it has no ``logits`` and so no IS).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from difflab.data.base import ImageDataset, holdout_indices
from difflab.errors import DifflabError, bad_value
from difflab.evaluation.extractor import FeatureExtractor, cache_dir
from difflab.evaluation.nets import (
    ConvAutoencoder,
    ConvNet,
    FeatureNet,
    MLPNet,
    TrainConfig,
    train_net,
)
from difflab.fileio import publish, save_safetensors

FORMAT_VERSION = 1  # bump when a network or the training loop changes: new cache keys


class ExtractorNotTrainedError(DifflabError):
    """No trained extractor for this data in the cache; the message says how to train one."""


@dataclass(frozen=True)
class ExtractorSpec:
    """A named extractor: which data it is for, its network and how it is trained.

    Attributes:
        name: registry name.
        dataset: :func:`difflab.data.build_dataset` name of the data it is trained on.
        channels, image_size: the images it accepts.
        build: ``(num_classes) -> FeatureNet``.
        train: training config (epochs, batch, lr, shift augmentation, seed).
        holdout_fraction: part of the data held out (stratified by label) to score it.
        labelled: trained as a classifier (needs labels) rather than as an autoencoder.
        min_score: the held-out score a healthy training run reaches (accuracy or PSNR dB);
            below it the extractor is still saved, with a warning in its metadata.
    """

    name: str
    dataset: str
    channels: int
    image_size: int
    build: Callable[[int], FeatureNet]
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout_fraction: float = 0.2
    labelled: bool = True
    min_score: float = 0.0

    def config_dict(self) -> dict:
        """Everything that determines the trained weights except the data (for the key)."""
        return {"name": self.name, "channels": self.channels, "image_size": self.image_size,
                "train": asdict(self.train), "holdout_fraction": self.holdout_fraction,
                "labelled": self.labelled, "format": FORMAT_VERSION}


EXTRACTORS: dict[str, ExtractorSpec] = {
    s.name: s for s in (
        ExtractorSpec("mnist-lenet", "mnist", 1, 28, lambda c: ConvNet(1, 28, c),
                      TrainConfig(epochs=5), min_score=0.97),
        ExtractorSpec("fashion-lenet", "fashion_mnist", 1, 28, lambda c: ConvNet(1, 28, c),
                      TrainConfig(epochs=5, shift=1), min_score=0.80),
        ExtractorSpec("digits-mlp", "digits", 1, 8, lambda c: MLPNet(1, 8, c),
                      TrainConfig(epochs=60, batch_size=64, lr=3e-3, shift=0), min_score=0.93),
        ExtractorSpec("emoji-ae", "emoji", 3, 32, lambda c: ConvAutoencoder(3, 32),
                      TrainConfig(epochs=8, batch_size=64, lr=2e-3, shift=0), labelled=False,
                      min_score=15.0),
        # perceptual-loss networks of the autoencoder objective: the same designs trained
        # with another seed (and, for MNIST, no shift augmentation), so a first stage trained
        # on them does not optimise the features its rFID is measured on
        ExtractorSpec("mnist-perceptual", "mnist", 1, 28, lambda c: ConvNet(1, 28, c),
                      TrainConfig(epochs=3, shift=0, seed=1), min_score=0.95),
        ExtractorSpec("emoji-perceptual", "emoji", 3, 32, lambda c: ConvAutoencoder(3, 32),
                      TrainConfig(epochs=8, batch_size=64, lr=2e-3, shift=0, seed=1),
                      labelled=False, min_score=15.0),
    )
}
"""Registry of the extractors difflab trains itself (``inception`` is separate)."""

DEFAULT_EXTRACTOR = {"mnist": "mnist-lenet", "fashion_mnist": "fashion-lenet",
                     "digits": "digits-mlp", "emoji": "emoji-ae"}
"""The extractor used for a run whose config names this dataset."""


def extractor_for_dataset(dataset: str) -> str:
    """The default extractor name of a dataset, or an error listing the known ones."""
    key = str(dataset).lower().replace("-", "_")
    if key not in DEFAULT_EXTRACTOR:
        raise bad_value("dataset", dataset, f"one with a built-in extractor {DEFAULT_EXTRACTOR}"
                        " (or pass an extractor name explicitly, e.g. 'inception')")
    return DEFAULT_EXTRACTOR[key]


def dataset_tensors(data: ImageDataset | tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images ``(N, C, H, W)`` in ``[-1, 1]`` and labels (or None) of a dataset or of an
    ``(images, labels)`` pair."""
    if isinstance(data, tuple):
        x, y = data
        return torch.as_tensor(x, dtype=torch.float32), None if y is None else torch.as_tensor(y)
    if hasattr(data, "as_tensors"):
        return data.as_tensors()
    items = [data[i] for i in range(len(data))]
    x = torch.stack([im for im, _ in items])
    labels = [info.get("label") for _, info in items]
    y = torch.tensor(labels, dtype=torch.int64) if all(v is not None for v in labels) else None
    return x, y


def data_key(spec: ExtractorSpec, x: torch.Tensor, y: torch.Tensor | None) -> str:
    """SHA-256 (first 16 hex digits) of the images, labels and ``spec.config_dict()``."""
    h = hashlib.sha256(json.dumps(spec.config_dict(), sort_keys=True).encode())
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to(torch.float32).contiguous().numpy().tobytes())
    if y is not None:
        h.update(y.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _paths(name: str, key: str, root: Path | None) -> tuple[Path, Path]:
    base = (root or cache_dir()) / "extractors" / f"{name}-{key}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _get_spec(name: str, train_config: TrainConfig | None = None) -> ExtractorSpec:
    if name not in EXTRACTORS:
        raise bad_value("extractor", name, f"one of {sorted(EXTRACTORS) + ['inception']}")
    spec = EXTRACTORS[name]
    return spec if train_config is None else replace(spec, train=train_config)


def _num_classes(spec: ExtractorSpec, y: torch.Tensor | None) -> int:
    if not spec.labelled:
        return 0
    if y is None:
        raise DifflabError(f"extractor {spec.name!r} is a classifier and needs labelled data")
    return int(y.max()) + 1


def train_extractor(name: str, data: ImageDataset | tuple | None = None,
                    root: Path | None = None, progress: bool = False,
                    train_config: TrainConfig | None = None) -> FeatureExtractor:
    """Train extractor ``name`` on ``data`` (default: its dataset, ``split="all"``), save it
    in the cache and return it.

    A stratified ``holdout_fraction`` of the data is held out; the held-out accuracy (or PSNR
    for autoencoders) and the training time are stored in ``meta``. ``train_config`` replaces
    the registry's training config (it is part of the cache key).
    """
    spec = _get_spec(name, train_config)
    x, y = _load_data(spec, data)
    key = data_key(spec, x, y)
    labels = None if y is None else y.numpy()
    tr = torch.from_numpy(holdout_indices(len(x), "train", spec.holdout_fraction,
                                          spec.train.seed, labels))
    te = torch.from_numpy(holdout_indices(len(x), "test", spec.holdout_fraction,
                                          spec.train.seed, labels))
    net = spec.build(_num_classes(spec, y))
    seconds = train_net(net, x[tr], None if y is None else y[tr], spec.train, progress)
    score = net.score(x[te], None if y is None else y[te])
    meta = {"name": name, "key": key, "score": score,
            "score_kind": "accuracy" if spec.labelled else "psnr_db",
            "train_seconds": seconds, "n_train": len(tr), "n_holdout": len(te),
            "num_classes": _num_classes(spec, y), "healthy": score >= spec.min_score,
            "config": spec.config_dict()}
    weights, info = _paths(name, key, root)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    _atomic_write(weights, lambda p: save_safetensors(state, p))
    _atomic_write(info, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return FeatureExtractor(name, net, spec.channels, spec.image_size, net.dim, meta,
                            has_logits=spec.labelled)


def _load_data(spec: ExtractorSpec, data) -> tuple[torch.Tensor, torch.Tensor | None]:
    if data is None:
        from difflab.data import build_dataset

        data = build_dataset(spec.dataset, image_size=spec.image_size, split="all")
    x, y = dataset_tensors(data)
    if x.shape[1:] != (spec.channels, spec.image_size, spec.image_size):
        raise DifflabError(f"extractor {spec.name!r} is trained on ({spec.channels}, "
                           f"{spec.image_size}, {spec.image_size}) images, the data has "
                           f"{tuple(x.shape[1:])}")
    return x, y


def get_extractor(name: str, data: ImageDataset | tuple | None = None, train: bool = False,
                  root: Path | None = None, progress: bool = False,
                  inception_weights: str | os.PathLike | None = None,
                  train_config: TrainConfig | None = None) -> FeatureExtractor:
    """The trained extractor ``name`` for ``data``, from the cache (or trained if ``train``).

    Args:
        name: a name in :data:`EXTRACTORS`, or ``"inception"``.
        data: the dataset it is trained on (default: its registry dataset, ``split="all"``).
        train: train and cache it when it is not cached yet.
        root: cache root (default :func:`cache_dir`).
        progress: show progress bars while training.
        inception_weights: for ``"inception"``: the weights file (see :mod:`.inception`).
        train_config: replaces the registry's training config (part of the cache key).

    Raises:
        ExtractorNotTrainedError: not cached and ``train`` is False (the message says how).
    """
    if name == "inception":
        from difflab.evaluation.inception import inception_extractor

        return inception_extractor(inception_weights)
    spec = _get_spec(name, train_config)
    x, y = _load_data(spec, data)
    key = data_key(spec, x, y)
    weights, info = _paths(name, key, root)
    if not (weights.is_file() and info.is_file()):
        if train:
            return train_extractor(name, (x, y), root, progress, train_config)
        raise ExtractorNotTrainedError(
            f"no trained {name!r} extractor for this data ({len(x)} images, key {key}) in "
            f"{weights.parent}. Train one (deterministic; a minute or a few on a CPU) with "
            f"`difflab eval RUN --train-extractor`, or in Python with "
            f"difflab.evaluation.get_extractor({name!r}, data, train=True).")
    meta = json.loads(info.read_text())
    net = spec.build(meta.get("num_classes", 0))
    net.load_state_dict(load_file(str(weights)))
    return FeatureExtractor(name, net, spec.channels, spec.image_size, net.dim, meta,
                            has_logits=spec.labelled)
