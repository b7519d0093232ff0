"""Fixtures for the evaluation tests: the shared data, and extractors trained once per test
run (one cache shared by the ``pytest -n`` workers, guarded by a file lock, so two workers
never train the same extractor)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import pytest
import torch

from difflab.data import ImageDataset, build_dataset
from difflab.evaluation import FeatureExtractor, get_extractor

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / ".." / "shared" / "data").resolve()


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: the suite runs under ``pytest -n 2`` on 2 shared cores, where
    2 threads per worker oversubscribe the cores (small float64 matmuls ran 10x slower) and
    change float summation order (bitwise determinism holds at a fixed thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def extractor_cache(tmp_path_factory) -> Path:
    """An extractor cache for this test run (never the user's ~/.cache), shared by the xdist
    workers (their base temp folders have one parent)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "difflab-eval-cache"
    root.mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(root: Path, name: str):
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _trained(name: str, data, root: Path) -> FeatureExtractor:
    start = time.perf_counter()
    with _locked(root, name), single_thread():
        ext = get_extractor(name, data, train=True, root=root)
    ext.meta["test_seconds"] = time.perf_counter() - start
    return ext


@pytest.fixture(scope="session")
def mnist() -> ImageDataset:
    """The shared MNIST test split (10,000 images, labels 0-9)."""
    root = SHARED / "mnist"
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} does not exist")
    return build_dataset("mnist", root=root, split="test")


@pytest.fixture(scope="session")
def emoji_root() -> Path:
    """The shared emoji folder (``png72/*.png`` + ``captions.tsv``)."""
    root = SHARED / "emoji"
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} does not exist")
    return root


@pytest.fixture(scope="session")
def mnist_lenet(mnist, extractor_cache) -> FeatureExtractor:
    """``mnist-lenet`` trained on 8,000 of the 10,000 images (2,000 held out), one thread."""
    return _trained("mnist-lenet", mnist, extractor_cache)


@pytest.fixture(scope="session")
def digits_mlp(extractor_cache) -> FeatureExtractor:
    """``digits-mlp`` trained on the digits train split (what ``configs/ddpm_digits.toml``
    trains on), one thread."""
    return _trained("digits-mlp", build_dataset("digits", split="train"), extractor_cache)
