"""MNIST's ``classes`` filter keeps only those labels, after the hold-out split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflab.data.idx import MNIST
from difflab.errors import DifflabError

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def test_classes_filter_keeps_the_held_out_split_of_the_kept_classes():
    full = MNIST(ROOT, split="all", holdout_fraction=0.1)
    some = MNIST(ROOT, split="all", holdout_fraction=0.1, classes=range(9))
    x_full, y_full = full.as_tensors()
    x_some, y_some = some.as_tensors()
    assert set(y_some.tolist()) == set(range(9))
    keep = y_full != 9
    assert torch.equal(x_some, x_full[keep]) and torch.equal(y_some, y_full[keep])
    with pytest.raises(DifflabError, match="classes"):
        MNIST(ROOT, split="all", classes=[10])
