"""The toy family of docs/add_a_family.md, end to end: registry entry, config, build,
save / load, train, resume and sample, with no other file of difflab knowing about it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import difflab
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.training import train

TOY = Path(__file__).resolve().parents[1] / "docs" / "examples" / "toy_family.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_family", TOY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_family"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_toy_family_trains_saves_loads_and_samples(toy, tmp_path):
    torch.set_num_threads(1)
    sets = ["model.arch='toy_mlp'", "model.preset='tiny'", "model.hidden=24",
            "train.batch_size=16", "train.steps=60", "train.lr=3e-3",
            "train.checkpoint_every=60", "train.tensorboard=false", "train.log_every=10",
            "sample.n=4",
            "sample.steps=5"]
    with pytest.raises(DifflabError, match="model.hiden: unknown key.*family 'toy_mlp'"):
        load_config(None, [*sets, "model.hiden=3"])
    with pytest.raises(DifflabError, match="model.hidden=0.*family 'toy_mlp'"):
        load_config(None, [*sets[:2], "model.hidden=0"])
    result = train(load_config(None, sets), tmp_path / "toy", progress=False)
    losses = [r["loss"] for r in difflab.training.read_metrics(tmp_path / "toy")]
    assert losses[-1] < losses[0]  # it learns
    run = difflab.load_run(tmp_path / "toy")
    assert isinstance(run.net, toy.ToyMLP) and run.net.config.hidden == 24
    assert run.net.config.image_size == 8  # from the digits
    out = difflab.generate(difflab.SampleRequest(run, sampler="dpmpp_2m", steps=8, n=6))
    assert out.images.shape == (6, 1, 8, 8) and torch.isfinite(out.images).all()
    assert out.nfe == 8
    exported = difflab.save(run.net, tmp_path / "exported")
    back = difflab.load(exported)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                  run.net.state_dict().values()))
    assert result.step == 60
