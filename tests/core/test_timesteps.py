"""Time grids: shape, ends, spacing, and the published index sets of discrete respacing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.paths import DiscreteVP
from difflab.samplers import timesteps

CONTINUOUS_KINDS = ["uniform", "quadratic", "log_snr", "karras"]


def grid_kinds(path):
    kinds = list(CONTINUOUS_KINDS)
    if isinstance(path, DiscreteVP):
        kinds += ["discrete"]
    return kinds


@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_every_grid_is_descending_from_t_max_to_zero(any_path, steps):
    for kind in grid_kinds(any_path):
        grid = timesteps.make_grid(kind, any_path, steps)
        assert grid.dtype == torch.float64 and grid.ndim == 1, kind
        assert grid.numel() == steps + 1, (kind, grid)
        assert bool((grid[1:] < grid[:-1]).all()), (kind, grid)
        assert float(grid[-1]) == 0.0, kind
        if kind == "discrete":  # the last step of the chain, (N-1+1)/N = 1 = t_max, or below
            assert float(grid[0]) <= any_path.t_max
        else:
            assert float(grid[0]) == any_path.t_max, kind
            if steps > 1:
                assert float(grid[-2]) == pytest.approx(any_path.t_min, rel=1e-12), kind


@pytest.mark.parametrize("kind", CONTINUOUS_KINDS)
def test_grids_that_stop_at_t_end(any_path, kind):
    t_end = float(any_path.t_from_log_snr(torch.tensor(2.0, dtype=torch.float64)))
    t_start = 0.9 * any_path.t_max + 0.1 * t_end
    grid = timesteps.make_grid(kind, any_path, 12, t_start=t_start, t_end=t_end, to_zero=False)
    assert grid.numel() == 13
    # t_start is met to the last ulp (quadratic computes it as t_end + (t_start - t_end) * 1)
    assert float(grid[0]) == pytest.approx(t_start, rel=4e-16) and float(grid[-1]) == t_end
    assert bool((grid[1:] < grid[:-1]).all())


def test_uniform_and_quadratic_by_definition(make_path):
    p = make_path("vp_linear")
    u = np.linspace(1.0, 0.0, 10)  # 10 times from t_max to t_min, then the data end 0
    uniform = p.t_min + (p.t_max - p.t_min) * u
    quadratic = p.t_min + (p.t_max - p.t_min) * u**2  # DDIM App. D.2
    np.testing.assert_allclose(timesteps.uniform(p, 10).numpy(), np.r_[uniform, 0.0],
                               rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(timesteps.quadratic(p, 10).numpy(), np.r_[quadratic, 0.0],
                               rtol=1e-14, atol=1e-16)


def test_log_snr_grid_is_uniform_in_log_snr(any_path):
    grid = timesteps.log_snr(any_path, 25)
    lam = any_path.log_snr(grid[:-1]).numpy()
    steps = np.diff(lam)
    assert bool((steps > 0).all())
    np.testing.assert_allclose(steps, steps.mean(), rtol=1e-8)
    assert lam[0] == pytest.approx(float(any_path.log_snr(any_path.t_max)), abs=1e-12)
    assert lam[-1] == pytest.approx(float(any_path.log_snr(any_path.t_min)), abs=1e-9)


@pytest.mark.parametrize("rho", [7.0, 3.0])
def test_karras_is_edm_eq5_on_the_edm_path(make_path, rho):
    """EDM eq. 5: ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``
    for ``i < N`` and ``sigma_N = 0``."""
    p = make_path("edm")
    N = 18
    i = np.arange(N)
    s_min, s_max = 0.002, 80.0
    sig = (s_max ** (1 / rho) + i / (N - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    got = timesteps.karras(p, N, rho=rho).numpy()
    np.testing.assert_allclose(got, np.r_[sig, 0.0], rtol=1e-12)


def test_karras_on_a_vp_path_is_in_sigma_over_alpha(make_path):
    p = make_path("vp_linear")
    grid = timesteps.karras(p, 10)
    sv = (p.sigma(grid[:-1]) / p.alpha(grid[:-1])).numpy()
    ends = sv[0] ** (1 / 7), sv[-1] ** (1 / 7)
    np.testing.assert_allclose(sv, np.linspace(*ends, 10) ** 7, rtol=1e-9)


# Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed"), Table 2:
# T = 1000, S = 10, written there 1-based; here 0-based step indices n (time (n + 1) / N).
TABLE2 = {
    "linspace": [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    "leading": [0, 100, 200, 300, 400, 500, 600, 700, 800, 900],
    "trailing": [99, 199, 299, 399, 499, 599, 699, 799, 899, 999],
}


@pytest.mark.parametrize("spacing", list(TABLE2))
def test_discrete_spacings_match_lin_et_al_table2(make_path, spacing):
    p = make_path("vp_discrete_linear")
    grid = timesteps.discrete(p, 10, spacing=spacing)
    idx = sorted(TABLE2[spacing], reverse=True)
    np.testing.assert_allclose(grid.numpy(), np.r_[(np.array(idx) + 1) / 1000, 0.0], rtol=1e-15)
    # the network is fed exactly those integer steps
    np.testing.assert_allclose(p.time_input(grid[:-1]).numpy(), idx, atol=1e-9)


def test_discrete_spacings_when_steps_do_not_divide_n(make_path):
    p = make_path("vp_discrete_cosine")
    lead = timesteps.discrete(p, 7, spacing="leading")  # DDIM: k = N // S = 142
    np.testing.assert_allclose(lead[:-1].numpy() * 1000 - 1, np.arange(6, -1, -1) * 142,
                               atol=1e-9)
    trail = timesteps.discrete(p, 7, spacing="trailing")  # round(N - i N / S) - 1
    want = np.round(1000 - np.arange(7) * 1000 / 7) - 1
    np.testing.assert_allclose(trail[:-1].numpy() * 1000 - 1, want, atol=1e-9)
    assert float(trail[0]) == 1.0  # starts at the last step, N - 1
    full = timesteps.discrete(p, 1000)
    np.testing.assert_allclose(full[:-1].numpy(), np.arange(1000, 0, -1) / 1000, rtol=1e-15)


def test_grid_from_truncates(make_path):
    p = make_path("vp_linear")
    grid = timesteps.uniform(p, 10)
    out = timesteps.grid_from(grid, 0.45)
    assert float(out[0]) == 0.45
    torch.testing.assert_close(out[1:], grid[grid < 0.45])
    assert bool((out[1:] < out[:-1]).all()) and float(out[-1]) == 0.0
    # starting exactly on a grid time keeps it once
    t0 = float(grid[3])
    out = timesteps.grid_from(grid, t0)
    torch.testing.assert_close(out, grid[3:])
