"""collate -> (images, Cond); build_dataset names and errors; DataLoader integration."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from difflab.cond import Cond
from difflab.data import DATASETS, ArrayDataset, build_dataset, collate
from difflab.data.base import DataError


def test_collate_labels_and_captions():
    batch = [(torch.full((1, 2, 2), float(i)), {"label": i, "caption": f"c{i}"}) for i in range(3)]
    images, cond = collate(batch)
    assert isinstance(cond, Cond) and images.shape == (3, 1, 2, 2)
    assert torch.equal(images[:, 0, 0, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert cond.labels.dtype == torch.int64 and cond.labels.tolist() == [0, 1, 2]
    assert cond.extra == {"captions": ["c0", "c1", "c2"]} and cond.context is None
    assert cond.batch_size() == 3


def test_collate_without_info_and_with_mismatched_keys():
    images, cond = collate([(torch.zeros(3, 2, 2), {}), (torch.ones(3, 2, 2), {})])
    assert images.shape == (2, 3, 2, 2) and cond.labels is None and cond.extra == {}
    with pytest.raises(DataError, match="item 1"):
        collate([(torch.zeros(1, 2, 2), {"label": 0}), (torch.zeros(1, 2, 2), {})])
    with pytest.raises(ValueError):
        collate([])


def test_dataloader_with_digits():
    ds = build_dataset("digits", image_size=16, split="test")
    loader = DataLoader(ds, batch_size=32, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    x, cond = next(iter(loader))
    assert x.shape == (32, 1, 16, 16) and cond.labels.shape == (32,)
    assert sum(len(b[0]) for b in loader) == len(ds)


def test_registry_names_defaults_and_errors(mnist_dir, emoji_dir, monkeypatch):
    assert sorted(DATASETS) == sorted(
        ["digits", "mnist", "fashion_mnist", "folder", "emoji", "cifar10", "shapes"])
    with pytest.raises(ValueError, match="cifar10.*digits.*emoji.*fashion_mnist.*folder.*mnist"):
        build_dataset("imagenet")
    ds = build_dataset("MNIST", root=mnist_dir, split="test")
    assert (ds.name, ds.image_size, len(ds)) == ("mnist", 28, 10000)
    assert build_dataset("fashion-mnist", root=mnist_dir, split="test").name == "fashion_mnist"
    monkeypatch.setenv("DIFFLAB_DATA", str(emoji_dir.parent))
    em = build_dataset("emoji", cache=False)
    assert em.root == emoji_dir and em.image_size == 32 and len(em) == 3583
    assert build_dataset("mnist", split="test").root == mnist_dir
    with pytest.raises(ValueError, match="root"):
        build_dataset("folder")
    with pytest.raises(ValueError, match="no files needed"):
        build_dataset("digits", root="somewhere")
    with pytest.raises(ValueError, match="rendered by difflab"):
        build_dataset("shapes", root="somewhere")
    with pytest.raises(ValueError, match="unexpected keyword argument 'colour'"):
        build_dataset("digits", colour=True)
    monkeypatch.setenv("DIFFLAB_DATA", "/nonexistent-difflab-data")
    with pytest.raises(FileNotFoundError, match="/nonexistent-difflab-data/cifar10"):
        build_dataset("cifar10")


def test_array_dataset_validation_and_transform():
    flip = ArrayDataset(torch.arange(8, dtype=torch.uint8).reshape(2, 1, 2, 2),
                        labels=[1, 0], transform=lambda x: x.flip(-1))
    assert flip.num_classes == 2 and flip[0][1] == {"label": 1}
    assert torch.equal(flip[0][0], (torch.tensor([[[1, 0], [3, 2]]]) / 127.5 - 1))
    with pytest.raises(ValueError, match="one per image"):
        ArrayDataset(torch.zeros(2, 1, 2, 2), labels=[1])
