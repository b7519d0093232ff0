"""The demo's judge (a digit classifier), its scoring, and the whole demo on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from difflab.data import Digits
from difflab.demo import (
    DemoSummary,
    SamplerScore,
    confident_fraction,
    labelled_grid,
    run_demo,
    sampler_plan,
    train_classifier,
)


@pytest.fixture(scope="module")
def judge():
    torch.set_num_threads(1)
    return train_classifier(8)


def test_the_judge_recognises_real_digits(judge):
    assert judge.accuracy > 0.93  # an MLP on the 8x8 digits reaches ~0.97
    assert 0.8 < judge.real_confident <= 1.0


def test_the_judge_is_not_confident_about_noise(judge):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(500, 1, 8, 8, generator=g) * 2 - 1
    frac, _ = confident_fraction(judge.model, noise)
    assert frac < judge.real_confident / 2
    x, y = Digits("test").as_tensors()
    _, hist = confident_fraction(judge.model, x)
    assert min(hist) > 0.5 * len(y) / 10 * judge.real_confident  # every class is recognised


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits


def test_confident_fraction_counts_probabilities_above_the_threshold():
    big = 10.0  # softmax of (10, 0, ..., 0) puts 0.9989 on class 0
    rows = [[big] + [0.0] * 9, [0.0] * 9 + [big], [1.0] + [0.0] * 9, [0.0, 3.0] + [0.0] * 8]
    frac, hist = confident_fraction(FixedLogits(rows), torch.zeros(4, 1, 8, 8))
    assert frac == 0.5
    assert hist == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]


def test_summary_goal_and_text():
    s = DemoSummary("c.toml", 10, 1.0, "done", 0.1, 0.97, 0.9, 8)
    s.samplers.append(SamplerScore("ddim", 50, 1.0, 0.85, 0.85 / 0.9, [1] * 10, "ddim_50.png"))
    assert s.goal_met()
    s.samplers.append(SamplerScore("ddim", 10, 1.0, 0.7, 0.7 / 0.9, [1] * 10, "ddim_10.png"))
    assert not s.goal_met() and "NOT met" in s.text() and "ddim   50 steps" in s.text()


def test_labelled_grid_is_upscaled_under_a_title(tmp_path):
    out = labelled_grid(torch.zeros(4, 1, 8, 8), "title", tmp_path / "g.png", scale=3)
    assert Image.open(out).size == (22 * 3, 22 * 3 + 16)


def test_the_plan_has_the_papers_samplers():
    plan = sampler_plan()
    assert ("ddpm", 1000) in plan and ("ddim", 50) in plan and ("ddim", 10) in plan


def test_the_demo_runs_end_to_end_on_a_tiny_budget(tmp_path):
    sets = ["model.model_channels=8", "model.num_heads=1", "train.steps=3",
            "train.batch_size=8", "train.sample_every=0", "train.tensorboard=false",
            "train.checkpoint_every=3"]
    summary = run_demo(tmp_path, minutes=1.0, overrides=sets, plan=[("ddim", 3), ("ddpm", 4)],
                       n=6, progress=False)
    assert summary.train_steps == 3 and [s.sampler for s in summary.samplers] == ["ddim", "ddpm"]
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["train_steps"] == 3 and len(data["samplers"]) == 2
    assert data["real_confident"] == pytest.approx(summary.real_confident)
    for s in data["samplers"]:
        assert 0.0 <= s["confident"] <= 1.0 and sum(s["classes"]) <= 6
        assert (tmp_path / s["grid"]).is_file()
    text = (tmp_path / "summary.txt").read_text()
    assert "ddpm" in text and "goal" in text
    # a second run replaces the demo's own run folder instead of refusing it
    run_demo(tmp_path, minutes=1.0, overrides=sets, plan=[("ddim", 2)], n=2, progress=False)
