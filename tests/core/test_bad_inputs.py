"""Bad input fails early with a ``DifflabError`` (a ``ValueError``) whose message names the
argument, the offending value where there is one, and what would be accepted."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from difflab.cond import Cond
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.paths import EDM, GVP, VE, VP, Linear, SubVP
from difflab.prediction import Prediction
from difflab.samplers import (
    PerSampleNoise,
    as_noise,
    ddim,
    ddim_invert,
    ddpm,
    get_sampler,
    sample,
    timesteps,
)
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def raises(*patterns: str):
    """``pytest.raises(DifflabError)`` whose message matches every regex in ``patterns``."""
    with pytest.raises(DifflabError) as info:
        yield info
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not found in the message {msg!r}"


@pytest.fixture
def setup(make_path):
    path = make_path("vp_linear")
    mix = GaussianMixture(torch.zeros(2, 3), 1.0)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    return path, mix.denoiser(path), x


def zero_net(x, t, cond):
    return torch.zeros_like(x)


# ----- grids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.0], [1.0, 0.2, 0.4, 0.0]])
def test_grid_not_strictly_descending(setup, bad):
    path, den, x = setup
    for run in (lambda: ddpm(den, x, bad), lambda: ddim(den, x, bad),
                lambda: ddim_invert(den, x, bad), lambda: sample("ddim", den, x, bad)):
        with raises(r"grid", r"not strictly descending", r"expected .*descending|t_max"):
            run()


@pytest.mark.parametrize("bad,value", [([1.5, 0.5, 0.0], "1.5"), ([1.0, 1e-7, 0.0], "1e-07"),
                                       ([1.0, 0.5, -0.1], "-0.1"),
                                       ([float("nan"), 0.5, 0.0], "nan")])
def test_grid_outside_the_valid_range(setup, bad, value):
    _, den, x = setup
    with raises(r"grid", value, r"t_min=1e-05|finite"):
        ddim(den, x, bad)


def test_grid_too_short_or_not_1d(setup):
    _, den, x = setup
    with raises(r"grid", r"at least 2"):
        ddim(den, x, [1.0])
    with raises(r"grid", r"1-D"):
        ddim(den, x, torch.ones(2, 2))


def test_denoiser_time_outside_the_valid_range(setup):
    path, den, x = setup
    for t in (1.5, 0.0, 1e-7, float("inf")):
        with raises(r"\bt\b", r"t_min=1e-05", r"t_max=1"):
            den(x, t)
    with raises(r"\bt\b", r"t_min=0.002", r"t_max=80"):
        Denoiser(zero_net, EDM())(x, torch.full((4,), 100.0))


def test_shape_mismatch_between_x_and_t(setup):
    path, den, x = setup
    for t in (torch.full((3,), 0.5), torch.full((4, 1), 0.5)):
        with raises(r"\bt has shape", r"x_t has shape \(4, 3\)", r"expected t of shape \(4,\)"):
            den(x, t)
    with raises(r"t has shape \(3,\)", r"batch size 4"):
        path.add_noise(x, torch.randn_like(x), torch.full((3,), 0.5))
    with raises(r"eps has shape", r"x0 has shape", r"equal shapes"):
        path.add_noise(x, torch.randn(4, 2), 0.5)


def test_unknown_prediction_kind(setup):
    path, _, x = setup
    accepted = r"'eps', 'x0', 'v', 'score', 'velocity'"
    with raises(r"prediction='epsilon'", accepted):
        Denoiser(zero_net, path, prediction="epsilon")
    with raises(r"prediction='noise'", accepted):
        Prediction.from_output("noise", x, x, 0.5, path)
    pred = Prediction.from_output("eps", x, x, 0.5, path)
    with raises(r"'flow'", accepted):
        pred.as_kind("flow")
    with raises(r"'flow'", accepted):
        pred.error_scale("flow")


def test_model_output_shape_mismatch(setup):
    path, _, x = setup
    with raises(r"model output has shape \(4, 6\)", r"x_t has shape \(4, 3\)", "learned_variance"):
        Denoiser(lambda x, t, c: torch.zeros(4, 6), path)(x, 0.5)
    with raises(r"learned_variance=True", r"expects 6 output channels", r"got 3"):
        Denoiser(zero_net, path, learned_variance=True)(x, 0.5)
    with raises(r"network returned", r"list", r"Tensor"):
        Denoiser(lambda x, t, c: [x], path)(x, 0.5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_model_output(setup, value):
    path, _, x = setup
    bad = Denoiser(lambda x, t, c: torch.full_like(x, value), path)
    with raises(r"network returned non-finite values", r"t in \[0\.5, 0\.5\]"):
        bad(x, 0.5)
    with raises(r"non-finite"):  # and through a sampler, at the first step
        ddpm(bad, x, timesteps.uniform(path, 3))


def test_unknown_sampler_and_option(setup):
    path, den, x = setup
    grid = timesteps.uniform(path, 3)
    with raises(r"sampler='dpm\+\+'", r"one of .*ddim.*ddpm"):
        sample("dpm++", den, x, grid)
    with raises(r"sampler='DDIM'", r"ddim"):
        get_sampler("DDIM")
    with raises(r"'ddim'", r"unknown option\(s\) \['etaa'\]", r"accepted are .*'eta'"):
        sample("ddim", den, x, grid, etaa=0.5)
    with raises(r"variance='tiny'", r"small, large, learned"):
        sample("ddpm", den, x, grid, variance="tiny")
    with raises(r"eta=-1", r">= 0"):
        ddim(den, x, grid, eta=-1.0)


def test_ddpm_learned_variance_needs_a_learned_variance_denoiser(setup):
    path, den, x = setup
    grid = timesteps.uniform(path, 3)
    with raises(r"variance='learned'", r"'small' or 'large'", r"learned_variance=True"):
        ddpm(den, x, grid, variance="learned")
    with raises(r"variance='learned'", r"learned_variance=True"):
        ddpm(Denoiser(zero_net, path), x, grid, variance="learned")
    with raises(r"reverse_log_var", r"learned_variance=True"):
        Prediction.from_output("eps", x, x, 0.5, path).reverse_log_var(0.4)


def test_per_sample_noise_seed_count(setup):
    path, den, x = setup
    with raises(r"PerSampleNoise has 3 seeds", r"batch has 4 rows", r"one seed per row"):
        PerSampleNoise([1, 2, 3]).randn_like(x)
    with raises(r"PerSampleNoise has 2 seeds", r"4 rows"):
        ddpm(den, x, timesteps.uniform(path, 3), noise=PerSampleNoise([1, 2]))
    with raises(r"PerSampleNoise", r"at least one seed"):
        PerSampleNoise([])
    with raises(r"noise='seed'", r"int seed", r"torch.Generator", r"randn_like"):
        as_noise("seed")


def test_bad_sampler_inputs(setup):
    path, den, x = setup
    grid = timesteps.uniform(path, 3)
    with raises(r"x_init", r"floating-point", r"\(B, \.\.\.\)"):
        ddim(den, torch.zeros(4, 3, dtype=torch.long), grid)
    with raises(r"x_init", r"batch dimension"):
        ddim(den, torch.zeros(3), grid)
    with raises(r"hooks", r"Hooks", r"dict"):
        ddim(den, x, grid, hooks={"callback": print})
    with raises(r"cond", r"difflab.Cond", r"dict"):
        den.bind({"labels": 1})
    den.bind(Cond())  # a Cond is fine


@pytest.mark.parametrize("make,patterns", [
    (lambda: VE(sigma_min=0.0), [r"sigma_min=0.0", r"0 < sigma_min < sigma_max"]),
    (lambda: VE(sigma_min=5.0, sigma_max=1.0), [r"sigma_min=5.0", r"sigma_max=1.0"]),
    (lambda: VE(t_min=0.5, t_max=0.1), [r"t_min=0.5", r"t_max=0.1", r"0 < t_min < t_max"]),
    (lambda: EDM(sigma_min=-1.0), [r"sigma_min=-1.0", r"0 < sigma_min < sigma_max"]),
    (lambda: Linear(t_min=0.0), [r"t_min=0.0", r"0 < t_min < t_max < 1"]),
    (lambda: Linear(t_max=1.0), [r"t_max=1.0", r"t_max < 1"]),
    (lambda: GVP(t_min=0.5, t_max=0.2), [r"t_min=0.5", r"t_max=0.2", r"0 < t_min < t_max < 1"]),
    (lambda: VP.linear(beta_min=-0.1), [r"beta_min=-0.1", r"0 <= beta_min <= beta_max"]),
    (lambda: VP.linear(beta_min=5.0, beta_max=1.0), [r"beta_min=5.0", r"beta_max=1.0"]),
    (lambda: VP.linear(t_min=0.0), [r"t_min=0.0", r"0 < t_min < t_max"]),
    (lambda: SubVP(beta_max=0.0), [r"beta_max=0.0", r"beta_max > 0"]),
    (lambda: SubVP(t_min=2.0), [r"t_min=2.0", r"0 < t_min < t_max"]),
    (lambda: VP.cosine(t_max=1.5), [r"t_max=1.5", r"t_max < 1"]),
    (lambda: VP.cosine(t_min=0.0), [r"t_min=0.0", r"0 < t_min"]),
    (lambda: VP.cosine(s=-0.5), [r"s=-0.5", r">= 0"]),
    (lambda: VP.discrete([0.1, 1.5]), [r"betas=", r"\(0, 1\)"]),
    (lambda: VP.discrete([1.0, 0.5]), [r"betas=", r"the last may be 1"]),
    (lambda: VP.discrete([]), [r"betas=\[\]", r"non-empty"]),
    (lambda: VP.discrete_linear(0), [r"N=0", r"positive number of steps"]),
    (lambda: VP.discrete_cosine(-3), [r"N=-3", r"positive number of steps"]),
])
def test_bad_path_parameters(make, patterns):
    with raises(*patterns):
        make()


def test_bad_grid_parameters(make_path):
    p, d = make_path("vp_linear"), make_path("vp_discrete_linear")
    with raises(r"steps=0", r"positive integer"):
        timesteps.uniform(p, 0)
    with raises(r"steps=2.5", r"positive integer"):
        timesteps.log_snr(p, 2.5)
    with raises(r"t_start=0.1", r"greater than t_end=0.5"):
        timesteps.karras(p, 5, t_start=0.1, t_end=0.5)
    with raises(r"spacing='middle'", r"leading, trailing, linspace"):
        timesteps.discrete(d, 10, spacing="middle")
    with raises(r"steps=2000", r"at most the path's 1000 steps"):
        timesteps.discrete(d, 2000)
    with raises(r"timesteps.discrete needs a discrete path", r"VP.linear", r"log_snr"):
        timesteps.discrete(p, 10)
    with raises(r"grid='cosine'", r"uniform, quadratic, log_snr, karras, discrete"):
        timesteps.make_grid("cosine", p, 10)
    with raises(r"t0=0.0", r"above the grid's last time"):
        timesteps.grid_from(timesteps.uniform(p, 4), 0.0)


def test_bad_mixture_parameters():
    with raises(r"means", r"\(K, \*data_shape\)"):
        GaussianMixture(torch.zeros(3), 1.0)
    with raises(r"stds", r"positive"):
        GaussianMixture(torch.zeros(2, 3), [1.0, -1.0])
    with raises(r"weights", r"2 positive numbers"):
        GaussianMixture(torch.zeros(2, 3), 1.0, [1.0, 0.0])
    mix = GaussianMixture(torch.zeros(2, 3), 1.0)
    den = mix.denoiser(VP.linear())
    with raises(r"labels", r"\[0, 2\]", r"\[3\]"):
        den.bind(Cond(labels=torch.tensor([3])))(torch.zeros(1, 3), 0.5)
    with raises(r"labels has 2 entries", r"batch of 3", r"expected 1 or 3"):
        den.bind(Cond(labels=torch.tensor([0, 1])))(torch.zeros(3, 3), 0.5)
