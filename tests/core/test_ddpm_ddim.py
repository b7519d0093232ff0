"""DDPM and DDIM with the exact denoiser: they must reproduce the data, converge to the exact
probability-flow ODE solution at order 1, and invert.

The data is ``mixture4d`` (three well-separated components in 4-D, weights 0.5/0.3/0.2). Its
true statistics are computed here by hand from the parameters; sample statistics are compared
with tolerances of roughly three standard errors for the sample sizes used (see
``assert_reproduces_mixture``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.samplers import GeneratorNoise, ddim, ddim_invert, ddpm, timesteps
from difflab.testing import probability_flow_reference

pytestmark = pytest.mark.usefixtures("one_thread")
N_SAMPLES = 6000


def mixture_statistics(mix, x: torch.Tensor):
    """Component frequencies (each sample assigned to its most likely component under the data
    distribution), per-dimension means and variances of the samples ``x``."""
    means, var = mix.means.double(), mix.vars.double()
    xf = x.reshape(x.shape[0], -1).double()
    logp = torch.log(mix.weights) - 0.5 * (((xf[:, None] - means) ** 2 / var) + torch.log(var)
                                           ).sum(-1)
    freq = torch.bincount(logp.argmax(1), minlength=mix.K).double() / x.shape[0]
    return freq, xf.mean(0), xf.var(0)


def assert_reproduces_mixture(mix, x: torch.Tensor, what: str) -> None:
    """Weights within 2 percentage points, means within 5 % of the per-dimension standard
    deviation, per-dimension variances within 5 % (relative), for 6000 samples.

    For 6000 samples of ``mixture4d`` the standard errors are ~0.65 points (weights), ~1.3 % of
    a std (means) and ~1.2-1.5 % (variances), so the tolerances are ~3 standard errors; samples
    drawn directly from the mixture pass them for each of 300 seeds tried. For fewer samples
    the tolerances grow as ``1 / sqrt(n)``.
    """
    scale = math.sqrt(N_SAMPLES / x.shape[0])
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means, var = mix.means.double(), mix.vars.double()
    mean = w @ means
    total_var = w @ (var + means**2) - mean**2
    freq, m_hat, v_hat = mixture_statistics(mix, x)
    assert bool(torch.isfinite(x).all()), f"{what}: non-finite samples"
    assert float((freq - w).abs().max()) < 0.02 * scale, f"{what}: weights {freq.tolist()}"
    mean_err = ((m_hat - mean).abs() / total_var.sqrt()).max()
    assert float(mean_err) < 0.05 * scale, f"{what}: means {m_hat.tolist()} vs {mean.tolist()}"
    var_err = (v_hat / total_var - 1).abs().max()
    assert float(var_err) < 0.05 * scale, (
        f"{what}: variances {v_hat.tolist()} vs {total_var.tolist()}"
    )


def prior(path, n: int, seed: int, dim: int = 4, dtype=torch.float64):
    noise = GeneratorNoise.seeded(seed)
    return path.prior_sample((n, dim), noise, dtype=dtype), noise


def test_data_itself_passes_the_statistics_check(mixture4d):
    """The check is calibrated: exact samples pass it (and shifted ones do not)."""
    x, labels = mixture4d.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0),
                                 return_labels=True)
    assert_reproduces_mixture(mixture4d, x, "exact samples")
    with pytest.raises(AssertionError, match="variances"):
        assert_reproduces_mixture(mixture4d, x * 1.08, "scaled samples")
    with pytest.raises(AssertionError, match="weights"):  # a third of component 0 dropped
        keep = (labels != 0) | (torch.arange(N_SAMPLES) % 3 != 0)
        assert_reproduces_mixture(mixture4d, x[keep], "missing some")


# ----- DDPM -----------------------------------------------------------------------------------
def test_ddpm_respaced_reproduces_the_mixture(make_path, mixture4d):
    """Ho et al. Algorithm 2 with ``beta_tilde`` on 250 of the 1000 steps (iDDPM Sec. 4).

    The small variance leaves out the posterior's own uncertainty about ``x0`` (Bao et al. 2022,
    Analytic-DPM), so it under-disperses by ``O(1 / steps)``: measured -1 to -1.5 % of variance
    at 250 steps, -2 to -2.7 % at 100 steps; 250 keeps that well inside the 5 % tolerance.
    """
    path = make_path("vp_discrete_linear")
    grid = timesteps.discrete(path, 250, spacing="trailing")
    x, noise = prior(path, N_SAMPLES, seed=1)
    out = ddpm(mixture4d.denoiser(path), x, grid, noise=noise)
    assert_reproduces_mixture(mixture4d, out, "ddpm small, 250 steps")


def test_ddpm_full_chain_reproduces_the_mixture(make_path, mixture4d):
    """All 1000 steps of the DDPM chain once (2000 samples: tolerances ~1.7x wider)."""
    path = make_path("vp_discrete_linear")
    grid = timesteps.discrete(path, 1000)
    x, noise = prior(path, 2000, seed=2)
    out = ddpm(mixture4d.denoiser(path), x, grid, noise=noise)
    assert_reproduces_mixture(mixture4d, out, "ddpm small, 1000 steps")


def test_ddpm_large_variance_runs(make_path, mixture4d):
    path = make_path("vp_discrete_linear")
    grid = timesteps.discrete(path, 100, spacing="trailing")
    x, noise = prior(path, N_SAMPLES, seed=3)
    out = ddpm(mixture4d.denoiser(path), x, grid, noise=noise, variance="large")
    assert_reproduces_mixture(mixture4d, out, "ddpm large, 100 steps")


@pytest.mark.parametrize("var_frac,equivalent", [(0.0, "small"), (1.0, "large")])
def test_ddpm_learned_variance_interpolates_small_and_large(make_path, mixture4d,
                                                            oracle_denoiser, var_frac,
                                                            equivalent):
    """iDDPM eq. 15 at ``f = 0`` is ``beta_tilde`` and at ``f = 1`` is ``beta``: with the same
    noise, a fake learned-variance network (oracle mean, constant ``f``) reproduces the fixed
    variance runs."""
    path = make_path("vp_discrete_cosine")
    grid = timesteps.discrete(path, 50, spacing="trailing")
    x, _ = prior(path, 64, seed=4)
    learned = oracle_denoiser(mixture4d, path, "eps", var_frac=var_frac)
    fixed = oracle_denoiser(mixture4d, path, "eps")
    a = ddpm(learned, x, grid, noise=GeneratorNoise.seeded(5), variance="learned")
    b = ddpm(fixed, x, grid, noise=GeneratorNoise.seeded(5), variance=equivalent)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddpm_learned_variance_in_between_runs(make_path, mixture4d, oracle_denoiser):
    path = make_path("vp_discrete_linear")
    grid = timesteps.discrete(path, 100, spacing="trailing")
    x, noise = prior(path, N_SAMPLES, seed=6)
    den = oracle_denoiser(mixture4d, path, "v", var_frac=0.5)
    out = ddpm(den, x, grid, noise=noise, variance="learned")
    assert_reproduces_mixture(mixture4d, out, "ddpm learned (f = 0.5), 100 steps")


# ----- DDIM -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_discrete_cosine", "vp_linear", "ve", "gvp"])
def test_ddim_eta1_is_ddpm(make_path, mixture4d, path_name):
    """DDIM eq. 16 with ``eta = 1`` is DDPM's posterior step (DDIM Sec. 4.1): same noise, same
    samples, on any grid."""
    path = make_path(path_name)
    grid = timesteps.log_snr(path, 30)
    den = mixture4d.denoiser(path)
    x, _ = prior(path, 32, seed=7)
    a = ddim(den, x, grid, eta=1.0, noise=GeneratorNoise.seeded(8))
    b = ddpm(den, x, grid, noise=GeneratorNoise.seeded(8))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_eta1_reproduces_the_mixture(make_path, mixture4d):
    """On a continuous path this time (100 uniform steps of the cosine schedule; measured
    variance bias -1.7 % to +0.2 %)."""
    path = make_path("vp_cosine")
    grid = timesteps.uniform(path, 100)
    x, noise = prior(path, N_SAMPLES, seed=9)
    out = ddim(mixture4d.denoiser(path), x, grid, eta=1.0, noise=noise)
    assert_reproduces_mixture(mixture4d, out, "ddim eta=1, 100 steps")


def convergence_slope(path, mixture, steps=(10, 20, 40, 80)) -> tuple[float, list[float]]:
    """Least-squares slope of log RMS error against log step size, DDIM (eta = 0) vs the exact
    probability-flow ODE solution, from ``t_max`` down to ``t_end`` where ``sigma/alpha = 0.1``.
    """
    den = mixture.denoiser(path)
    t_end = float(path.t_from_sigma_ve(torch.tensor(0.1, dtype=torch.float64)))
    x, _ = prior(path, 8, seed=10)
    ref = probability_flow_reference(den, x, path.t_max, t_end)
    errors = []
    for n in steps:
        grid = timesteps.log_snr(path, n, t_end=t_end, to_zero=False)
        out = ddim(den, x, grid)
        errors.append(float((out - ref).pow(2).mean().sqrt()))
    slope = float(np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0])
    return slope, errors


@pytest.mark.parametrize("path_name", ["vp_discrete_linear", "vp_linear", "ve", "edm", "gvp"])
def test_ddim_converges_to_the_probability_flow_ode_at_order_1(make_path, mixture4d, path_name):
    slope, errors = convergence_slope(make_path(path_name), mixture4d)
    assert abs(slope - 1.0) < 0.25, f"{path_name}: slope {slope:.3f}, errors {errors}"
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_ddim_to_zero_returns_the_clean_estimate(make_path, mixture4d):
    """A grid ending at 0: the last step returns ``x0_hat`` at the last positive time."""
    path = make_path("vp_linear")
    den = mixture4d.denoiser(path)
    grid = timesteps.uniform(path, 5)
    x, _ = prior(path, 8, seed=11)
    head = ddim(den, x, grid[:-1])
    out = ddim(den, x, grid)
    torch.testing.assert_close(out, den(head, grid[-2]).x0, rtol=0, atol=0)


# ----- DDIM inversion -------------------------------------------------------------------------
def inversion_errors(path, mixture, steps, fixed_point_iters: int) -> list[float]:
    den = mixture.denoiser(path)
    x0 = mixture.sample(16, generator=torch.Generator().manual_seed(12))
    errs = []
    for n in steps:
        grid = timesteps.log_snr(path, n)
        z = ddim_invert(den, x0, grid, fixed_point_iters=fixed_point_iters)
        errs.append(float((ddim(den, z, grid) - x0).abs().max()))
    return errs


def test_ddim_inversion_with_fixed_point_iterations_returns_the_data(make_path, mixture4d):
    """Invert then sample with the exact denoiser: back to the data within 1e-3 at 500 steps,
    and closer with every refinement of the grid."""
    errs = inversion_errors(make_path("vp_linear"), mixture4d, (50, 100, 500), 2)
    assert errs[-1] < 1e-3, errs
    assert errs[0] > errs[1] > errs[2], errs


def test_plain_ddim_inversion_error_shrinks_with_steps(make_path, mixture4d):
    """The explicit inversion is only first order (the prediction is taken at the lower time),
    so only a monotone decrease is asserted."""
    errs = inversion_errors(make_path("vp_linear"), mixture4d, (50, 100, 500), 0)
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[1], errs
    assert math.isfinite(errs[0])
