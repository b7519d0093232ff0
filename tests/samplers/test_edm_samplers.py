"""EDM's Euler / Heun / Euler-ancestral: identities with DDIM and DDPM's ancestral step, the churn
window, and the stochastic samplers against the mixture's own weights, means and variances."""

from __future__ import annotations

import pytest
import torch

import difflab.samplers.edm  # noqa: F401  (registers the samplers)
from difflab.errors import DifflabError
from difflab.paths import EDM, VP
from difflab.samplers import sample, timesteps
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(3, 3, generator=g, dtype=torch.float64),
                           [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])


@pytest.mark.parametrize("path", [VP.discrete_linear(), EDM()], ids=["vp", "edm"])
def test_euler_in_sigma_tilde_is_ddim(path):
    # x~ + (sigma~_s - sigma~_t) eps = x0 + sigma~_s eps, i.e. DDIM eq. 12 divided by alpha_s
    den = smooth_mixture().denoiser(path)
    x = torch.randn(16, 3, dtype=torch.float64) * path.prior_std
    grid = timesteps.karras(path, 12)
    ddim = sample("ddim", den, x, grid)
    torch.testing.assert_close(sample("euler", den, x, grid), ddim, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample("euler_ancestral", den, x, grid, eta=0.0), ddim,
                               rtol=1e-10, atol=1e-10)


def test_euler_ancestral_is_ddpms_ancestral_step():
    # sigma_up is the posterior std and sigma_down the DDIM coefficient: one step of DDPM
    # (Ho et al. 2020, Alg. 2) written in sigma~, so the same noise gives the same samples
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(16, 3, dtype=torch.float64)
    grid = timesteps.discrete(path, 20, "trailing")
    torch.testing.assert_close(sample("euler_ancestral", den, x, grid, noise=3),
                               sample("ddpm", den, x, grid, noise=3), rtol=1e-9, atol=1e-9)


def test_heun_churn_acts_only_inside_its_window():
    path = EDM()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(8, 3, dtype=torch.float64) * 80
    grid = timesteps.karras(path, 10)
    plain = sample("heun", den, x, grid)
    outside = sample("heun", den, x, grid, S_churn=40.0, S_tmin=100.0, S_tmax=200.0, noise=1)
    torch.testing.assert_close(outside, plain, rtol=0, atol=0)
    churned = sample("heun", den, x, grid, S_churn=40.0, noise=1)
    assert not torch.allclose(churned, plain)
    torch.testing.assert_close(sample("heun", den, x, grid, S_churn=40.0, noise=1), churned)


def test_bad_churn_options_name_the_argument():
    path = EDM()
    den = smooth_mixture().denoiser(path)
    x, grid = torch.randn(2, 3), timesteps.karras(path, 4)
    for opts, arg in [({"S_churn": -1.0}, "S_churn"), ({"S_tmin": 5.0, "S_tmax": 1.0}, "S_tmin"),
                      ({"S_noise": 0.0}, "S_noise")]:
        with pytest.raises(DifflabError, match=arg):
            sample("heun", den, x, grid, **opts)
    with pytest.raises(DifflabError, match="eta"):
        sample("euler_ancestral", den, x, grid, eta=-0.5)


def mixture_statistics(mixture: GaussianMixture, x: torch.Tensor, path):
    """Component weights, the largest mean error, and each component's mean variance ratio."""
    k = mixture.log_responsibilities(x, 0.0, path).argmax(1)
    weights = torch.bincount(k, minlength=mixture.K).double() / len(k)
    mean_err = max(float((x[k == j].mean(0) - mixture.means[j]).abs().max())
                   for j in range(mixture.K))
    var_ratio = torch.stack([(x[k == j].var(0) / mixture.vars[j]).mean()
                             for j in range(mixture.K)])
    return weights, mean_err, var_ratio


@pytest.mark.parametrize("name,opts,steps,var_tol", [
    ("heun", {"S_churn": 20.0}, 60, 0.08),
    # ancestral steps with DDPM's small variance shrink the variance by O(1/steps)
    # (Bao et al. 2022): ~9% at 100 steps, ~5% at 250
    ("euler_ancestral", {}, 250, 0.08),
])
def test_stochastic_samplers_reproduce_the_mixture(mixture4d, name, opts, steps, var_tol):
    path = EDM()
    x = torch.randn(2000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = sample(name, mixture4d.denoiser(path), x * 80.0, timesteps.karras(path, steps),
                 noise=11, **opts)
    weights, mean_err, var_ratio = mixture_statistics(mixture4d, out, path)
    torch.testing.assert_close(weights, mixture4d.weights, rtol=0, atol=0.03)
    assert mean_err < 0.1  # component means are O(2); std of the estimate ~0.03
    assert bool(((var_ratio - 1).abs() < var_tol).all()), var_ratio
