"""Written files follow the user's umask (like ``touch``), including those renamed into place
from a temporary file, which ``tempfile.mkstemp`` creates with mode 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import difflab
from difflab.data import save_image_grid
from difflab.data.download import download_file
from difflab.evaluation.features import _atomic_write
from difflab.training.checkpoint import save_checkpoint


@pytest.fixture(params=[0o022, 0o077, 0o002])
def mask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_every_written_file_follows_the_umask(tmp_path, mask):
    want = 0o666 & ~mask
    touched = tmp_path / "touched"
    touched.touch()
    assert mode(touched) == want  # what every other tool does
    grid = save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png", nrow=2)
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, {"w": torch.ones(2)}, {"w": torch.ones(2)},
                           {"step": 1})
    src = tmp_path / "source.bin"
    src.write_bytes(b"difflab")
    got = download_file(src.as_uri(), tmp_path / "dl" / "copy.bin")
    cache = tmp_path / "cache.json"
    _atomic_write(cache, lambda p: p.write_text("{}"))
    comp = difflab.save(difflab.build("unet", preset="tiny", model_channels=4, num_heads=1),
                        tmp_path / "component")
    files = [grid, got, cache, *sorted(ckpt.iterdir()), tmp_path / "ckpts" / "latest",
             *sorted(comp.iterdir())]
    assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(want) for f in files}
