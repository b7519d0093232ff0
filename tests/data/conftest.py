"""Fixtures for the data tests: the shared real data in ``../shared/data``."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the repository (skips only if it truly does not exist)."""
    path = (REPO / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} does not exist")
    return path


@pytest.fixture(scope="session")
def mnist_dir(shared_data: Path) -> Path:
    """The shared MNIST folder (test split only, gzip IDX)."""
    return shared_data / "mnist"


@pytest.fixture(scope="session")
def emoji_dir(shared_data: Path) -> Path:
    """The shared emoji folder (``png72/*.png`` and ``captions.tsv``)."""
    return shared_data / "emoji"
