"""Sampling from runs: per-sample noise streams, x0 clipping, grids, labels."""

from __future__ import annotations

import pytest
import torch

from difflab.cond import Cond
from difflab.denoiser import FnDenoiser
from difflab.errors import DifflabError
from difflab.paths import EDM, VP, Linear
from difflab.prediction import Prediction
from difflab.sampling import auto_grid_name, draw, sampling_grid


def generate(den, shape, n, *, sampler, steps=50, seed=0, batch_size=256, labels=None,
             clip_x0=False):
    """The sampling loop of difflab.generate with the default grid and no guidance."""
    cond = None if labels is None else Cond(labels=labels)
    return draw(den, shape, n, sampler=sampler, steps=steps, grid="auto", grid_options={},
                options={}, seed=seed, batch_size=batch_size, cond=cond, null_cond=None,
                guide=None, clip_x0=clip_x0)[0]


def constant_x0(value: float, path=None, seen: list | None = None, gain: float = 0.0
                ) -> FnDenoiser:
    """A denoiser predicting x0 = value + gain * x_t (recording the labels it is bound to)."""
    path = path or VP.discrete_linear(100)

    def fn(x_t, t, cond: Cond | None):
        if seen is not None:
            seen.append(None if cond is None else cond.labels.tolist())
        return Prediction.from_x0(value + gain * x_t, x_t, t, path)

    return FnDenoiser(fn, path)


def test_clip_x0_clips_every_clean_data_estimate():
    """DDIM's last step returns x0_hat: 3.0 unclipped, 1.0 with DDPM's clip_denoised."""
    den = constant_x0(3.0)
    raw = generate(den, (1, 2, 2), 3, sampler="ddim", steps=5)
    clipped = generate(den, (1, 2, 2), 3, sampler="ddim", steps=5, clip_x0=True)
    torch.testing.assert_close(raw, torch.full_like(raw, 3.0))
    torch.testing.assert_close(clipped, torch.ones_like(clipped))


def test_sample_i_does_not_depend_on_the_batch_size():
    den = constant_x0(0.0, gain=0.5)
    whole = generate(den, (1, 4, 4), 5, sampler="ddpm", steps=10, seed=3)
    split = generate(den, (1, 4, 4), 5, sampler="ddpm", steps=10, seed=3, batch_size=2)
    torch.testing.assert_close(whole, split, rtol=0, atol=0)
    other = generate(den, (1, 4, 4), 5, sampler="ddpm", steps=10, seed=4)
    assert not torch.equal(whole, other)
    assert not torch.equal(whole[0], whole[1])  # rows have their own streams


def test_labels_are_bound_per_batch():
    seen: list = []
    den = constant_x0(0.0, seen=seen)
    generate(den, (1, 2, 2), 3, sampler="ddim", steps=2, labels=torch.tensor([4, 5, 6]),
             batch_size=2)
    assert seen == [[4, 5], [4, 5], [6], [6]]


def test_auto_grids_follow_the_path():
    assert auto_grid_name(VP.discrete_linear(10)) == "discrete"
    assert auto_grid_name(EDM()) == "karras" and auto_grid_name(Linear()) == "uniform"
    grid = sampling_grid(VP.discrete_linear(10), 10)
    torch.testing.assert_close(grid[:-1], torch.arange(10, 0, -1, dtype=torch.float64) / 10)
    assert grid[-1] == 0


def test_bad_sampler_names_are_rejected():
    with pytest.raises(DifflabError, match="ddim"):
        generate(constant_x0(0.0), (1, 2, 2), 1, sampler="nope")
