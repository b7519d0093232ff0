"""Standard Inception-v3 pool3 features (FID as published), only from local weights.

This is the network of Heusel et al. 2017 (the TF-slim 2015-12-05 graph ported to PyTorch by
torch-fidelity), reached through ``torchmetrics.image.fid.NoTrainInceptionV3``. difflab never
downloads it: the weights file must already be on disk, at

- the path given explicitly (``--inception-weights`` / ``inception_weights=``), or
- ``$DIFFLAB_INCEPTION_WEIGHTS``, or
- ``<cache>/weights/weights-inception-2015-12-05-6726825d.pth`` (``<cache>`` =
  ``$DIFFLAB_CACHE`` or ``~/.cache/difflab``).

It needs ``pip install torchmetrics torch-fidelity``. Images in ``[-1, 1]`` of any size are
quantised to ``uint8`` (as when saved as PNG), grayscale is repeated to RGB, and the network
resizes to 299x299 itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.errors import DifflabError
from difflab.evaluation.extractor import FeatureExtractor, cache_dir

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's port of the TF graph (its own state-dict layout; pytorch-fid's similarly
# named pt_inception-... file has another layout and does not load here)
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_SOURCE = f"download it from {WEIGHTS_URL}"


class MissingWeightsError(DifflabError, FileNotFoundError):
    """The Inception weights file is not on disk; the message says where to put it."""


def inception_weights_path(explicit: str | os.PathLike | None = None) -> Path:
    """Where the Inception weights are looked for (the first of the rules in the module doc)."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("DIFFLAB_INCEPTION_WEIGHTS")
    if env:
        return Path(env)

    return cache_dir() / "weights" / WEIGHTS_NAME


class _InceptionNet(torch.nn.Module):
    """Adapter: images in [-1, 1] -> uint8 RGB -> (pool3 features, logits)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.inner = net

    @staticmethod
    def _uint8_rgb(x: torch.Tensor) -> torch.Tensor:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner._torch_fidelity_forward(self._uint8_rgb(x))[0]  # (N, 2048)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner._torch_fidelity_forward(self._uint8_rgb(x))[1]  # (N, 1008)


def inception_extractor(weights: str | os.PathLike | None = None):
    """The ``inception`` :class:`~difflab.evaluation.features.FeatureExtractor` (2048-d pool3).

    Raises:
        MissingWeightsError: the weights file is absent (names the path and the file).
        DifflabError: torchmetrics / torch-fidelity are not installed.
    """

    path = inception_weights_path(weights)
    if not path.is_file():
        raise MissingWeightsError(
            f"Inception-v3 weights not found at {path}. difflab never downloads them: put "
            f"{WEIGHTS_NAME} ({WEIGHTS_SOURCE}) there, or point $DIFFLAB_INCEPTION_WEIGHTS / "
            f"--inception-weights at it. Without them use the dataset's own extractor "
            f"(e.g. 'mnist-lenet').")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:
        raise DifflabError("the 'inception' extractor needs torchmetrics and torch-fidelity: "
                           "pip install torchmetrics torch-fidelity") from e
    if not _TORCH_FIDELITY_AVAILABLE:
        raise DifflabError("the 'inception' extractor needs torch-fidelity: "
                           "pip install torch-fidelity")
    net = NoTrainInceptionV3(name="inception-v3-compat",
                             features_list=["2048", "logits_unbiased"],
                             feature_extractor_weights_path=str(path))
    meta = {"name": "inception", "weights": str(path)}
    return FeatureExtractor("inception", _InceptionNet(net), None, None, 2048, meta)
