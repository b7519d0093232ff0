"""Every recipe in configs/ is a valid config, and the ones that need no trained codec build
their task and network (the data they name is read for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from difflab.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("file", CONFIGS, ids=[f.stem for f in CONFIGS])
def test_every_config_validates(file):
    cfg = load_config(file)
    assert cfg.task.kind and cfg.model.arch


@pytest.mark.parametrize("name", ["vae_mnist", "dcgan_mnist"])
def test_the_baseline_recipes_build_on_the_shared_mnist(name):
    from difflab.tasks import make_task

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
    task = make_task(cfg)
    assert len(task.dataset) == 9000  # the 10,000 shared digits less the 10 % hold-out
    net = task.build_model()
    assert net.config.image_size == 28 and net.config.in_channels == 1
