"""Trainable and frozen parts: an adapter-only task trains a small module on top of a frozen
base model that its checkpoints name by path and hash (never copy), resumes bit-exactly, and
refuses to resume against a changed base; text runs name their frozen text encoder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import difflab
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.tasks import register_task
from difflab.tasks.base import FrozenPart, content_hash
from difflab.tasks.diffusion import DiffusionTask
from difflab.training import Trainer, train


class Adapted(nn.Module):
    """The frozen base U-Net plus a trained 1x1-convolution residual on its output."""

    def __init__(self, base: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base, self.adapter = base, adapter

    def forward(self, x, t, cond=None):
        return self.base(x, t, cond) + self.adapter(x)


@register_task
class AdapterTestTask(DiffusionTask):
    """A test adapter task: ``[task] kind = "adapter_test"``; the base comes from the
    component folder in the ``ADAPTER_BASE`` class attribute."""

    kind = "adapter_test"
    BASE = None

    def build_trainable(self):
        self.base = difflab.load(self.BASE).requires_grad_(False)
        return {"adapter": nn.Conv2d(1, 1, 1)}

    def frozen_parts(self):
        return {"base": FrozenPart(self.base, str(self.BASE), content_hash(self.BASE))}

    def part_metadata(self):
        return {}

    def part_family(self, name):
        return None, None

    def loss(self, modules, x, cond, generator):
        net = Adapted(self.base.to(x.device), modules["adapter"])
        den = self.wrap(net, check_finite=False)
        return self.objective(den, x, None, generator=generator)


def adapter_config(base, *more):
    AdapterTestTask.BASE = base
    return load_config(None, ["task.kind='adapter_test'", "model.preset='tiny'",
                              "model.model_channels=4", "model.num_heads=1",
                              "train.batch_size=8", "train.checkpoint_every=2",
                              "train.tensorboard=false", "train.lr=1e-2",
                              "data.holdout_fraction=0.96", *more])


@pytest.fixture
def base(tmp_path):
    net = difflab.build("unet", preset="tiny", model_channels=4, num_heads=1, image_size=8,
                        in_channels=1, out_channels=1)
    return difflab.save(net, tmp_path / "base")


def test_an_adapter_run_saves_only_the_adapter_and_resumes_bit_exactly(base, tmp_path):
    torch.set_num_threads(1)
    straight = train(adapter_config(base, "train.steps=4"), tmp_path / "straight",
                     progress=False)
    ckpt = straight.checkpoint
    files = {p.name for p in ckpt.iterdir()}
    assert files == {"adapter.safetensors", "adapter-ema.safetensors", "training_state.pt",
                     "manifest.json"}  # no copy of the base
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["frozen"]["base"] == {"source": str(base), "sha256": content_hash(base)}
    assert sum(p.stat().st_size for p in ckpt.iterdir()) < \
        (base / "model.safetensors").stat().st_size

    half = tmp_path / "half"
    train(adapter_config(base, "train.steps=2"), half, progress=False)
    train(adapter_config(base, "train.steps=4"), half, resume=True, progress=False)
    for f in ("adapter-ema.safetensors", "adapter.safetensors"):
        a = load_file(str(ckpt / f))
        b = load_file(str(half / "checkpoints" / "step_4" / f))
        assert all(torch.equal(a[k], b[k]) for k in a)
    earlier = load_file(str(ckpt.parent / "step_2" / "adapter.safetensors"))
    assert not torch.equal(earlier["weight"], a["weight"])  # it trained


def test_resuming_against_a_changed_frozen_part_is_refused(base, tmp_path):
    run = tmp_path / "run"
    train(adapter_config(base, "train.steps=2"), run, progress=False)
    changed = difflab.build("unet", preset="tiny", model_channels=4, num_heads=1, image_size=8,
                            in_channels=1, out_channels=1)
    shutil.rmtree(base)
    difflab.save(changed, base)
    with pytest.raises(DifflabError, match="frozen part 'base' has changed"):
        Trainer(adapter_config(base, "train.steps=4"), run, resume=True)


def test_a_text_run_names_its_frozen_text_encoder(tmp_path):
    from pathlib import Path

    emoji = Path(__file__).resolve().parents[3] / "shared" / "data" / "emoji"
    cfg = load_config(None, ["task.cond='text'", "task.p_uncond=0.2", "model.preset='tiny'",
                             "model.model_channels=4", "model.num_heads=1", "data.name='emoji'",
                             f"data.root={str(emoji)!r}", "data.image_size=8",
                             "data.holdout_fraction=0.99", "train.batch_size=8",
                             "train.steps=1", "train.tensorboard=false"])
    result = train(cfg, tmp_path / "t2i", progress=False)
    frozen = json.loads((result.checkpoint / "manifest.json").read_text())["frozen"]
    assert set(frozen) == {"text_encoder"} and len(frozen["text_encoder"]["sha256"]) == 64
    assert "text_encoder.safetensors" not in {p.name for p in result.checkpoint.iterdir()}
