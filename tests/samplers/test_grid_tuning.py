"""Tuned time grids (:mod:`difflab.samplers.tuning`): the search finds a known optimum, keeps
the grid's ends and order, is never worse than its start, beats every fixed grid on held-out
noises of the exact oracle, and keeps the best grid when interrupted."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from difflab.errors import DifflabError
from difflab.paths import VP
from difflab.samplers import sample, timesteps
from difflab.samplers.tuning import rms, sample_error, tune_grid
from difflab.testing import GaussianMixture, probability_flow_reference

FIXED = ("uniform", "quadratic", "log_snr", "karras")


def half_lambda(path, t):
    return 0.5 * path.log_snr(torch.as_tensor(t, dtype=torch.float64))


def test_sample_error_is_the_mean_of_per_sample_rms():
    a = torch.zeros(4, 3)
    b = torch.tensor([[1.0] * 3, [1.0] * 3, [1.0] * 3, [100.0] * 3])
    assert sample_error(a, b) == pytest.approx((1 + 1 + 1 + 100) / 4)
    assert rms(a, b) == pytest.approx(math.sqrt((9 + 3 * 100**2) / 12))


def test_the_search_finds_a_known_optimum_and_keeps_ends_and_order():
    """A fake solver whose error is the distance of the interior times (in half log-SNR) from a
    chosen grid: the search must land on that grid."""
    path = VP.discrete_linear()
    start = timesteps.uniform(path, 6, to_zero=False)
    target = timesteps.log_snr(path, 6, to_zero=False)
    lam_target = half_lambda(path, target)

    def solve(g):
        return (half_lambda(path, g) - lam_target)[None, 1:-1]

    res = tune_grid(solve, {"uniform": start}, torch.zeros(1, 5), path, sweeps=14,
                    min_gain=0.0)
    assert res.start == "uniform" and not res.interrupted
    assert res.grid[0] == start[0] and res.grid[-1] == start[-1]
    assert bool((res.grid[1:] < res.grid[:-1]).all())
    gaps = (lam_target[1:] - lam_target[:-1]).abs().min()
    assert float((half_lambda(path, res.grid) - lam_target).abs().max()) < 0.01 * float(gaps)
    assert res.error < 1e-3 * res.fixed["uniform"]
    assert res.history == sorted(res.history, reverse=True)  # sweeps never get worse


def test_a_grid_ending_at_zero_moves_its_last_positive_time():
    path = VP.discrete_linear()
    start = timesteps.uniform(path, 4)  # [..., t, 0]
    assert start[-1] == 0
    target = timesteps.log_snr(path, 4)
    lam_target = half_lambda(path, target[:-1])

    def solve(g):
        return (half_lambda(path, g[:-1]) - lam_target)[None, 1:]

    res = tune_grid(solve, {"uniform": start}, torch.zeros(1, 3), path, sweeps=14,
                    min_gain=0.0)
    assert res.grid[-1] == 0 and res.grid[0] == start[0]
    assert float(res.grid[-2]) == pytest.approx(float(target[-2]), rel=0.05)


@pytest.fixture(scope="module")
def oracle():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.3 * torch.rand(4, generator=g, dtype=torch.float64)
    path = VP.discrete_linear()
    den = GaussianMixture(means, stds).denoiser(path)
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64)
    tune, held = x[:512], x[512:]
    refs = [probability_flow_reference(den, z, path.t_max, path.t_min) for z in (tune, held)]
    return den, path, tune, held, refs


# The options of the measurement (the defaults before benchmarks/sampler_defaults.py
# chose "long_step" and UniPC-2 below 30 steps). The new defaults lower the order of a long last
# step themselves, which is part of what a tuned grid fixes, so they gain less from tuning.
BEFORE = {"dpmpp_2m": {"lower_order_final": True},
          "unipc_bh2": {"order": 3, "corrector_order": 3, "lower_order_final": True}}


@pytest.mark.parametrize("name, before, gain, rms_too", [
    ("dpmpp_2m", True, 2.0, True), ("dpmpp_2m", False, 1.3, True),
    ("unipc_bh2", True, 1.3, True), ("unipc_bh2", False, 1.08, False),
    ("ddim", False, 1.1, True)])
def test_tuned_grid_beats_every_fixed_grid_on_held_out_noises(oracle, name, before, gain,
                                                             rms_too):
    """At 10 network calls the tuned grid's error is below the best fixed grid's by ``gain``
    (the issue's 2x for DPM-Solver++(2M) with the options it was stated for; first-order DDIM
    has less to gain from a grid), measured on noises the search never saw. The plain RMS over
    the batch, which the search does not look at, falls too, except for UniPC with its new
    defaults: there the error of one held-out sample grows from 0.34 to 0.99 (it ends in
    another component than the exact solution), which outweighs the gain on all the others."""
    den, path, tune, held, (ref_tune, ref_held) = oracle
    opts = BEFORE[name] if before else {}
    grids = {k: timesteps.make_grid(k, path, 10, to_zero=False) for k in FIXED}
    grids.update({f"karras[rho={r}]": timesteps.karras(path, 10, rho=r, to_zero=False)
                  for r in (3, 5, 10)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = tune_grid(lambda g: sample(name, den, tune, g, **opts), grids, ref_tune, path)
        fixed = {k: sample_error(sample(name, den, held, g, **opts), ref_held)
                 for k, g in grids.items()}
        out = sample(name, den, held, res.grid, **opts)
    assert res.error <= min(res.fixed.values())
    assert sample_error(out, ref_held) * gain <= min(fixed.values()), fixed
    best = min(fixed, key=fixed.get)
    if rms_too:
        assert rms(out, ref_held) < rms(sample(name, den, held, grids[best], **opts), ref_held)


def test_interrupting_keeps_the_best_grid_so_far():
    path = VP.discrete_linear()
    start = timesteps.uniform(path, 5, to_zero=False)
    target = half_lambda(path, timesteps.log_snr(path, 5, to_zero=False))
    calls = []

    def solve(g):
        calls.append(g)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return (half_lambda(path, g) - target)[None, 1:-1]

    res = tune_grid(solve, {"uniform": start}, torch.zeros(1, 4), path)
    assert res.interrupted and res.solves == 6
    assert res.error <= res.fixed["uniform"]
    assert torch.equal(res.grid, min(calls[:6], key=lambda g: float(
        (half_lambda(path, g) - target)[1:-1].pow(2).mean())))


def test_bad_inputs_are_clear_errors():
    path = VP.discrete_linear()
    g = timesteps.uniform(path, 4, to_zero=False)
    solve = lambda grid: torch.zeros(1, 2)  # noqa: E731
    with pytest.raises(DifflabError, match="at least one"):
        tune_grid(solve, {}, torch.zeros(1, 2), path)
    with pytest.raises(DifflabError, match="differ in length"):
        tune_grid(solve, {"a": g, "b": g[:-1]}, torch.zeros(1, 2), path)
    with pytest.raises(DifflabError, match="descending"):
        tune_grid(solve, {"a": g.flip(0)}, torch.zeros(1, 2), path)
    with pytest.raises(DifflabError, match="sweeps"):
        tune_grid(solve, {"a": g}, torch.zeros(1, 2), path, sweeps=0)
    with pytest.raises(DifflabError, match="returned"):
        tune_grid(lambda grid: torch.zeros(3), {"a": g}, torch.zeros(1, 2), path)
    with pytest.raises(DifflabError, match="NaN"):
        tune_grid(lambda grid: torch.full((1, 2), math.nan), {"a": g}, torch.zeros(1, 2), path)


@pytest.mark.parametrize("times, words", [
    (None, "needs its times"),
    ([1.0], "at least two"),
    ([0.5, 0.7, 0.0], "descending"),
    ([1.0, float("nan"), 0.0], "descending"),
    ([2.0, 0.5, 0.0], "within"),
    ("abc", "numbers"),
])
def test_custom_grid_checks_its_times(times, words):
    with pytest.raises(DifflabError, match=words):
        timesteps.make_grid("custom", VP.discrete_linear(), 2, times=times)


def test_custom_grid_is_the_given_times():
    path = VP.discrete_linear()
    g = timesteps.make_grid("custom", path, 2, times=[1.0, 0.3, 0.0])
    assert g.dtype == torch.float64 and g.tolist() == [1.0, 0.3, 0.0]
    with pytest.raises(DifflabError, match="2 steps, but steps=3"):
        timesteps.make_grid("custom", path, 3, times=[1.0, 0.3, 0.0])
