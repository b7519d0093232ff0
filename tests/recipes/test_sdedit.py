"""SDEdit: the start grid, the closed-form edit of Gaussian data, guides, the recipe end to end
and its bad inputs."""

from __future__ import annotations

import pytest
import torch

from difflab import cli
from difflab.errors import DifflabError
from difflab.paths import VE, VP
from difflab.recipes.sdedit import (
    digit_strokes,
    faithfulness,
    gaussian_blur,
    sdedit,
    stroke_painting,
)
from difflab.samplers import PerSampleNoise
from difflab.sampling import draw, sample_seeds, sampling_grid, start_grid
from difflab.testing import GaussianMixture


# ----- the grid ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["uniform", "log_snr", "karras", "quadratic"])
def test_start_grid_runs_all_steps_from_t0(grid):
    path = VP.cosine()
    g = start_grid(path, 10, grid, None, 0.4)
    assert g.numel() == 11 and float(g[-1]) == 0.0
    assert float(g[0]) == pytest.approx(0.4 * path.t_max)
    assert bool((g[1:] < g[:-1]).all())


def test_start_grid_at_one_is_the_full_grid():
    path = VP.discrete_linear()
    assert torch.equal(start_grid(path, 20, "auto", None, 1.0), sampling_grid(path, 20))


def test_start_grid_on_a_discrete_path_starts_at_the_step_of_t0():
    path = VP.discrete_linear()  # N = 1000, times (k + 1) / N
    g = start_grid(path, 25, "discrete", None, 0.3)
    assert float(g[0]) == pytest.approx(300 / 1000)
    assert g.numel() == 26 and float(g[-1]) == 0.0
    k = g[:-1] * 1000  # every time is one of the path's own steps
    assert torch.allclose(k, k.round()) and bool((k >= 1).all())
    with pytest.raises(DifflabError, match="at most 3 steps"):
        start_grid(path, 4, "discrete", None, 0.003)


def test_start_grid_on_ve_scales_the_time_range():
    path = VE()
    g = start_grid(path, 8, "karras", None, 0.5)
    assert float(g[0]) == pytest.approx(0.5 * path.t_max)


@pytest.mark.parametrize("t0", [0.0, -0.1, 1.5, float("nan")])
def test_start_grid_rejects_t0_outside_0_1(t0):
    with pytest.raises(DifflabError, match="t0"):
        start_grid(VP.cosine(), 10, "uniform", None, t0)


# ----- the edit of Gaussian data has a closed form ----------------------------------------------
def test_sdedit_of_gaussian_data_is_the_affine_flow_map(oracle_denoiser):
    """Data N(mu, s^2 I): x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and the probability-flow ODE
    maps it affinely, x_0 = mu + s (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2). SDEdit from
    guide g with noise eps lands at mu + s (alpha (g - mu) + sigma eps) / sqrt(alpha^2 s^2 +
    sigma^2), sample by sample."""
    g0 = torch.Generator().manual_seed(3)
    mu = torch.randn(1, 1, 4, 4, generator=g0, dtype=torch.float64)
    s = 0.3
    mixture = GaussianMixture(mu, [s])
    path = VP.cosine()
    den = oracle_denoiser(mixture, path, "eps")
    guide = torch.randn(1, 1, 4, 4, generator=g0, dtype=torch.float64)
    n, t0 = 6, 0.6
    x, seeds = draw(den, (1, 4, 4), n, sampler="dpmpp_2m", steps=60, grid="log_snr",
                    grid_options={}, options={}, seed=5, batch_size=4, cond=None,
                    null_cond=None, guide=None, clip_x0=False, init=guide.float(), t0=t0)
    assert seeds == sample_seeds(5, n)
    z = guide.float()
    eps = torch.cat([PerSampleNoise(seeds[:4]).randn_like(z.expand(4, 1, 4, 4)),
                     PerSampleNoise(seeds[4:]).randn_like(z.expand(2, 1, 4, 4))]).double()
    tt = torch.tensor([t0 * path.t_max], dtype=torch.float64)
    a, sg = float(path.alpha(tt)), float(path.sigma(tt))
    expected = mu + s * (a * (guide - mu) + sg * eps) / (a * a * s * s + sg * sg) ** 0.5
    assert torch.allclose(x.double(), expected, atol=1e-3)
    # and the same edit with the strength-style truncation of the full grid would not be:
    # t0 picks the start time exactly
    assert float(start_grid(path, 60, "log_snr", None, t0)[0]) == pytest.approx(t0 * path.t_max)


# ----- guides and measures -----------------------------------------------------------------------
def test_stroke_painting_has_at_most_k_colours_before_the_blur():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    p = stroke_painting(x, colors=4, block=4, blur=0.0)
    for i in range(2):
        colours = torch.unique(p[i].reshape(3, -1).T, dim=0)
        assert colours.shape[0] <= 4
    assert p.shape == x.shape and float(p.abs().max()) <= 1
    assert torch.equal(stroke_painting(x, seed=1), stroke_painting(x, seed=1))


def test_digit_strokes_are_binary_before_the_blur_and_follow_the_digit():
    x = -torch.ones(1, 1, 16, 16)
    x[..., 4:12, 6:10] = 1.0  # a vertical bar
    s = digit_strokes(x, cell=4, blur=0.0, seed=0)
    assert set(torch.unique(s).tolist()) <= {-1.0, 1.0}
    assert float(s[..., 4:12, 4:12].mean()) > float(s[..., :, :3].mean())


def test_gaussian_blur_keeps_constants_and_mass():
    x = torch.full((1, 2, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(x, 1.5), x, atol=1e-6)
    d = torch.zeros(1, 1, 21, 21)
    d[..., 10, 10] = 1
    assert float(gaussian_blur(d, 1.0).sum()) == pytest.approx(1.0, abs=1e-5)


def test_faithfulness_is_zero_for_the_guide_and_sees_layout():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert torch.allclose(faithfulness(x, x), torch.zeros(3))
    shifted = torch.roll(x, 8, dims=-1)
    assert bool((faithfulness(shifted, x) > 0).all())


# ----- the recipe on a trained run ---------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(train_tiny_run):
    return train_tiny_run("sdedit")


def test_sdedit_small_t0_keeps_the_guide_and_t0_one_forgets_it(digits_run):
    guide = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    near = sdedit(digits_run, guide, 0.002, sampler="ddim", steps=2, seed=0)
    assert near.images.shape == (2, 1, 8, 8) and near.metadata["t0"] == 0.002
    assert float((near.images - guide).abs().max()) < 0.1
    far = sdedit(digits_run, guide, 0.9, sampler="ddim", steps=3, seed=0)
    assert float((far.images - guide).abs().mean()) > float((near.images - guide).abs().mean())


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return str(path)


def test_sdedit_cli_writes_the_grid(digits_run, tmp_path):
    import numpy as np

    guide = _png(tmp_path / "g.png", (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4))
    out = tmp_path / "out.png"
    assert cli.main(["edit", "sdedit", str(digits_run), "--guide", guide, "--t0", "0.5",
                     "--n", "3", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("case", ["t0", "size", "channels", "missing"])
def test_sdedit_cli_bad_inputs_name_the_problem_and_write_nothing(digits_run, tmp_path, capsys,
                                                                  case):
    import numpy as np

    good = _png(tmp_path / "g.png", np.zeros((8, 8), np.uint8))
    args = {"t0": (good, "1.5"), "size": (_png(tmp_path / "big.png", np.zeros((16, 16),
                                                                              np.uint8)), "0.5"),
            "channels": (_png(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8)), "0.5"),
            "missing": (str(tmp_path / "nope.png"), "0.5")}[case]
    out = tmp_path / "out.png"
    code = cli.main(["edit", "sdedit", str(digits_run), "--guide", args[0], "--t0", args[1],
                     "--out", str(out)]) if case != "t0" else None
    if case == "t0":
        with pytest.raises(SystemExit) as e:
            cli.main(["edit", "sdedit", str(digits_run), "--guide", args[0], "--t0", args[1],
                      "--out", str(out)])
        code = e.value.code
    assert code == 2
    err = capsys.readouterr().err
    assert {"t0": "1.5", "size": "16x16", "channels": "3-channel", "missing": "does not exist"
            }[case] in err
    assert not out.exists()


def test_sdedit_library_rejects_t0_and_shape(digits_run):
    with pytest.raises(DifflabError, match="t0"):
        sdedit(digits_run, torch.zeros(1, 1, 8, 8), 0.0)
    with pytest.raises(DifflabError, match="shape"):
        sdedit(digits_run, torch.zeros(1, 3, 8, 8), 0.5)
    with pytest.raises(DifflabError, match=r"\[-1, 1\]"):
        sdedit(digits_run, torch.full((1, 1, 8, 8), 3.0), 0.5)
