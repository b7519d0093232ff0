"""Fixtures for the evaluation tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from difflab.data import ImageDataset, build_dataset
from difflab.evaluation import FeatureExtractor, get_extractor


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test process: the suite runs under ``pytest -n 2`` on 2 shared
    cores, where small float64 matmuls with 2 threads each are 10x slower (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def mnist() -> ImageDataset:
    """The shared MNIST test split (10,000 images, labels 0-9)."""
    root = SHARED / "mnist"
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} does not exist")
    return build_dataset("mnist", root=root, split="test")


@pytest.fixture(scope="session")
def extractor_cache(tmp_path_factory) -> Path:
    """A fresh extractor cache for this test session (never the user's ~/.cache)."""
    return tmp_path_factory.mktemp("difflab-cache")


@pytest.fixture(scope="session")
def mnist_lenet(mnist, extractor_cache) -> FeatureExtractor:
    """``mnist-lenet`` trained once per session on 8,000 of the 10,000 images (2,000 held out),
    one thread (as under ``pytest -n 2``); the wall time is in ``meta['test_seconds']``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        ext = get_extractor("mnist-lenet", mnist, train=True, root=extractor_cache)
    finally:
        torch.set_num_threads(before)
    ext.meta["test_seconds"] = time.perf_counter() - start
    return ext


@pytest.fixture(scope="session")
def emoji_root() -> Path:
    """The shared emoji folder (``png72/*.png`` + ``captions.tsv``)."""
    root = SHARED / "emoji"
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} does not exist")
    return root
