"""scikit-learn's 8x8 digits: exact pixel mapping, labels, deterministic disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from difflab.data import Digits


@pytest.fixture(scope="module")
def bunch():
    return load_digits()


def test_all_is_the_whole_set_with_exact_pixels(bunch):
    ds = Digits(split="all")
    assert len(ds) == 1797 and ds.num_classes == 10
    assert (ds.channels, ds.image_size, ds.name) == (1, 8, "digits")
    images, labels = ds.as_tensors()
    assert images.shape == (1797, 1, 8, 8)
    expected = torch.from_numpy(bunch.images.astype(np.float32)) / 8 - 1
    assert torch.equal(images[:, 0], expected)
    assert images.min() == -1.0 and images.max() == 1.0
    assert torch.equal(labels, torch.from_numpy(bunch.target).long())
    image, info = ds[5]
    assert torch.equal(image, expected[5][None]) and info == {"label": int(bunch.target[5])}


def test_split_is_disjoint_complete_stratified_and_deterministic(bunch):
    train, test = Digits(split="train", seed=3), Digits(split="test", seed=3)
    tr, te = set(train.indices.tolist()), set(test.indices.tolist())
    assert not tr & te and len(tr | te) == 1797
    counts = np.bincount(bunch.target)
    assert torch.bincount(test.labels).tolist() == [round(0.2 * c) for c in counts]
    again = Digits(split="test", seed=3)
    assert np.array_equal(again.indices, test.indices)
    assert torch.equal(again.as_tensors()[0], test.as_tensors()[0])
    assert not np.array_equal(Digits(split="test", seed=4).indices, test.indices)
    assert len(Digits(split="test", holdout_fraction=0.5)) == sum(round(c / 2) for c in counts)


def test_upscaled_images_stay_in_range():
    ds = Digits(split="test", image_size=16)
    x, _ = ds.as_tensors()
    assert x.shape[1:] == (1, 16, 16) and ds.image_size == 16
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0  # background stays black


@pytest.mark.parametrize("kwargs", [dict(split="val"), dict(holdout_fraction=1.0),
                                    dict(split="test", holdout_fraction=0.0),
                                    dict(image_size=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Digits(**kwargs)
