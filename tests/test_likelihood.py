"""Likelihoods against answers known independently of difflab.

* ODE likelihood (Song et al. 2021, App. D) of the exact mixture denoiser vs the mixture's own
  log-density; Hutchinson's estimate is unbiased; 8-bit dequantization reproduces the discrete
  probability of a pixel bin computed with scipy's normal CDF (the +7 bits/dim offset).
* The discrete VLB (Ho et al. 2020, eq. 5) decomposes into prior + KLs + decoder; every KL of a
  Gaussian data set has a closed-form expectation; with the true reverse variance the bound sits
  just above the exact NLL of the quantized data.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from difflab.errors import DifflabError
from difflab.likelihood import ode_likelihood, vlb
from difflab.paths import VE, VP, GaussianPath, as_time
from difflab.samplers import timesteps
from difflab.samplers.analytic import AnalyticMoments, optimal_variance
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def mix3() -> GaussianMixture:
    return GaussianMixture([[-1.0, 0.5, 0.2], [0.8, -0.4, 0.1]],
                           [[0.3, 0.2, 0.4], [0.25, 0.35, 0.3]], [0.3, 0.7])


# Paths whose prior matches the marginal at t_max to ~1e-3 nats (alpha(t_max) m / sigma small).
ODE_PATHS = {"vp_linear": lambda: VP.linear(0.1, 30.0), "ve": lambda: VE(0.01, 1000.0),
             "vp_discrete": lambda: VP.discrete(torch.linspace(1e-4, 0.03, 1000))}


@pytest.mark.parametrize("path_name", list(ODE_PATHS))
def test_ode_likelihood_exact_divergence_matches_the_mixture(mix3, path_name):
    path = ODE_PATHS[path_name]()
    x = mix3.sample(48, generator=torch.Generator().manual_seed(0))
    res = ode_likelihood(mix3.denoiser(path), x, divergence="exact", rtol=1e-6, atol=1e-6)
    at_t_end = mix3.marginal_log_prob(x, path.t_min, path)
    assert float((res.log_prob - at_t_end).abs().max()) < 3e-3  # solver + prior mismatch
    true = mix3.log_prob(x)
    rel = abs(float(res.log_prob.mean() - true.mean())) / abs(float(true.mean()))
    assert rel < 0.01, rel
    torch.testing.assert_close(res.bpd, -res.log_prob / (3 * LN2))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(mix3, probe):
    path = ODE_PATHS["vp_linear"]()
    den = mix3.denoiser(path)
    x = mix3.sample(96, generator=torch.Generator().manual_seed(1))
    exact = ode_likelihood(den, x, divergence="exact")
    hutch = ode_likelihood(den, x, divergence="hutchinson", probe=probe, n_probes=2,
                           generator=torch.Generator().manual_seed(2))
    diff = hutch.bpd - exact.bpd
    assert float(diff.abs().max()) > 1e-4  # the estimator is noisy: the check is not vacuous
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(96)
    assert abs(hutch.mean() - exact.mean()) < hutch.summary()["stderr"]


def test_dequantized_bpd_is_the_discrete_bin_probability():
    """8-bit data ``x = 2k/255 - 1``: averaged over the dequantization noise the result must be
    ``-log2 P(bin k) / d`` with the bin ``[2k/256 - 1, 2(k+1)/256 - 1)`` of the dequantized
    variable, ``P`` from scipy (each component's mass is a product of normal-CDF differences).
    Without the +7 bits/dim offset it would be off by 7. One ``u`` per sample scatters the
    result by ~0.012 bits here, so each bin is evaluated with 8 draws; the Jensen gap
    ``E_u[-log p] + log E_u[p]`` is ~2e-4 bits for these bins."""
    means = np.array([[-0.3, 0.2], [0.4, -0.1]])
    stds = np.array([[0.2, 0.15], [0.15, 0.2]])
    w = np.array([0.4, 0.6])
    mix = GaussianMixture(means, stds, w)
    path = ODE_PATHS["vp_linear"]()
    xc = mix.sample(24, generator=torch.Generator().manual_seed(3))
    k = torch.floor((xc + 1) / 2 * 256).clamp(0, 255)
    reps = 8
    res = ode_likelihood(mix.denoiser(path), (k / 127.5 - 1).repeat_interleave(reps, 0),
                         divergence="exact", dequantize_bits=8,
                         generator=torch.Generator().manual_seed(4), rtol=1e-6, atol=1e-6)
    bpd = res.bpd.reshape(-1, reps).mean(1).numpy()
    lo, hi = (2 * k.numpy() / 256 - 1), (2 * (k.numpy() + 1) / 256 - 1)
    comp = np.prod(norm.cdf((hi[:, None] - means) / stds) - norm.cdf((lo[:, None] - means) / stds),
                   axis=-1)
    nll_bits = -np.log2(comp @ w) / 2
    diff = bpd - nll_bits
    assert np.abs(diff).max() < 0.025, diff
    assert abs(diff.mean()) < 3 * diff.std() / math.sqrt(diff.size) + 1e-3, diff


# ----- the discrete VLB ----------------------------------------------------------------------
M, S, D = 0.1, 0.2, 3
VP_PATH = VP.discrete_linear(1000)


def vlb_grid(steps: int) -> torch.Tensor:
    """``steps`` of DDPM's 1000, starting at t_max = 1 (the prior term) and ending at 0."""
    grid = timesteps.discrete(VP_PATH, steps)
    return torch.cat([torch.ones(1, dtype=torch.float64), grid[1:]])


def exact_moments(path, grid) -> AnalyticMoments:
    t = grid[grid > 0]
    a, sg = path.alpha(t), path.sigma(t)
    return AnalyticMoments(t, sg**2 / (a**2 * S * S + sg**2), torch.zeros_like(t), 0)


def expected_kl_bits(path, t, s, variance: str) -> float:
    """``E_{x0 ~ N(M, S^2), x_t} KL(q(x_s | x_t, x0) || p(x_s | x_t))`` per dim in bits, with
    ``p``'s mean built from ``E[x0 | x_t]``: the means differ by ``c_x0 (x0 - E[x0|x_t])``, whose
    second moment is ``c_x0^2 Var(x0 | x_t)``."""
    _, c_x0, bt = (float(v) for v in path.posterior(t, s))
    a, sg = float(path.alpha(t)), float(path.sigma(t))
    var_x0 = S * S * sg * sg / (a * a * S * S + sg * sg)
    gamma = sg * sg / (a * a * S * S + sg * sg)
    v_p = {"small": bt, "large": float(path.transition(t, s)[1]),
           "analytic": optimal_variance(path, t, s, gamma)}[variance]
    return 0.5 * (math.log(v_p / bt) + (bt + c_x0 * c_x0 * var_x0) / v_p - 1) / LN2


@pytest.mark.parametrize("variance", ["small", "large", "analytic"])
def test_vlb_terms_match_their_closed_forms(variance):
    data = GaussianMixture([[M] * D], S)
    x0 = data.sample(3000, generator=torch.Generator().manual_seed(5))
    grid = vlb_grid(20)
    res = vlb(data.denoiser(VP_PATH), x0, grid=grid, variance=variance,
              moments=exact_moments(VP_PATH, grid), generator=torch.Generator().manual_seed(6))
    terms = res.terms
    torch.testing.assert_close(res.bpd, terms["prior"] + terms["kl"].sum(1) + terms["decoder"])
    assert bool((terms["kl"] >= -1e-12).all()) and terms["kl"].shape == (3000, 19)
    a_T, s_T = float(VP_PATH.alpha(1.0)), float(VP_PATH.sigma(1.0))
    prior = (a_T**2 * x0**2 / (2 * s_T**2)).mean(1) / LN2
    torch.testing.assert_close(terms["prior"], prior, rtol=1e-6, atol=1e-12)
    for j in range(19):
        kl = terms["kl"][:, j]
        expected = expected_kl_bits(VP_PATH, grid[j], grid[j + 1], variance)
        se = float(kl.std()) / math.sqrt(kl.numel())
        assert abs(float(kl.mean()) - expected) < 4 * se + 1e-9, (j, float(kl.mean()), expected)


def test_vlb_with_the_true_variance_brackets_the_exact_nll():
    """Quantized Gaussian data: the exact NLL is ``-log P(bin)`` under the normal CDF. With the
    exact mean and Analytic-DPM's (here exact) variance the bound is above it by a small margin;
    ``large`` is clearly looser."""
    s = 0.25
    data = GaussianMixture([[M] * D], s)
    k = ((data.sample(3000, generator=torch.Generator().manual_seed(7)) + 1) * 127.5).round()
    x0 = k / 127.5 - 1
    grid = vlb_grid(100)
    t = grid[grid > 0]
    a, sg = VP_PATH.alpha(t), VP_PATH.sigma(t)
    mom = AnalyticMoments(t, sg**2 / (a**2 * s * s + sg**2), torch.zeros_like(t), 0)
    den = data.denoiser(VP_PATH)
    res = vlb(den, x0, grid=grid, variance="analytic", moments=mom,
              generator=torch.Generator().manual_seed(8))
    edges = (k.numpy() + np.array([[[-0.5]], [[0.5]]])) / 127.5 - 1
    p_bin = norm.cdf((edges[1] - M) / s) - norm.cdf((edges[0] - M) / s)
    nll = torch.from_numpy(-np.log2(p_bin).mean(1))
    gap = res.bpd - nll
    se = float(gap.std()) / math.sqrt(gap.numel())
    assert -3 * se < float(gap.mean()) < 0.05 + 3 * se, (float(gap.mean()), se)
    large = vlb(den, x0, grid=grid, variance="large", generator=torch.Generator().manual_seed(8))
    assert large.mean() - res.mean() > 0.1


def test_learned_variance_at_zero_is_small(mixture1d, oracle_denoiser):
    path = VP.discrete_linear(200)
    x0 = mixture1d.sample(64, generator=torch.Generator().manual_seed(9)).clamp(-1, 1)
    grid = torch.cat([torch.ones(1, dtype=torch.float64), timesteps.discrete(path, 20)[1:]])
    learned = vlb(oracle_denoiser(mixture1d, path, "eps", var_frac=0.0), x0, grid=grid,
                  variance="learned", generator=torch.Generator().manual_seed(1))
    small = vlb(oracle_denoiser(mixture1d, path, "eps"), x0, grid=grid, variance="small",
                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned.bpd, small.bpd)


def test_clipped_means_keep_a_few_step_bound_finite_on_a_cosine_path():
    """An eps model with a small error (+0.05) on the cosine path: at t = 1 (alpha about 5e-5)
    its x0_hat is off by 0.05 sigma / alpha, about 1e3, and the 10-step bound's first step,
    down to alpha_s = 0.17, costs thousands of bits/dim. With x0_hat clipped to [-1, 1] the
    means differ by at most 2 c_x0 per pixel, which caps that term in closed form; steps whose
    x0_hat is already in range are unchanged."""
    from difflab.denoiser import Denoiser

    path = VP.discrete_cosine(1000)
    data = GaussianMixture([[M] * D], S)
    base = data.denoiser(path)
    biased = Denoiser(lambda x, t, c: base(x, t).eps + 0.05, path, prediction="eps",
                      time_input=lambda t: t)
    k = ((data.sample(2000, generator=torch.Generator().manual_seed(3)).clamp(-0.8, 0.8) + 1)
         * 127.5).round()
    x0 = k / 127.5 - 1
    grid = timesteps.discrete(path, 10, spacing="linspace")
    assert float(grid[0]) == 1.0
    raw, clipped = (vlb(biased, x0, grid=grid, variance="small", clip_x0=c,
                        generator=torch.Generator().manual_seed(4)) for c in (False, True))
    assert float(raw.terms["kl"][:, 0].mean()) > 1000
    _, c_x0, v_q = (float(v) for v in path.posterior(grid[:1], grid[1:2]))
    v_p = v_q  # variance "small": p's variance is the posterior's
    cap = 0.5 * (math.log(v_p / v_q) + v_q / v_p - 1 + (2 * c_x0) ** 2 / v_p) / LN2
    assert float(clipped.terms["kl"][:, 0].max()) <= cap + 1e-9
    # what remains is the bound of the exact model: the error of the first step is gone
    exact = vlb(base, x0, grid=grid, variance="small", generator=torch.Generator().manual_seed(4))
    assert raw.mean() > exact.mean() + 1000 and abs(clipped.mean() - exact.mean()) < 2
    torch.testing.assert_close(clipped.terms["kl"][:, -1], raw.terms["kl"][:, -1])
    torch.testing.assert_close(clipped.terms["decoder"], raw.terms["decoder"])


def test_default_grid_is_every_step_of_a_discrete_path():
    path = VP.discrete_linear(50)
    data = GaussianMixture([[M]], S)
    res = vlb(data.denoiser(path), data.sample(8).clamp(-1, 1), variance="large")
    assert res.terms["kl"].shape == (8, 49) and res.nfe == 50


# ----- bad inputs -----------------------------------------------------------------------------
def test_vlb_rejects_bad_settings(mixture1d, oracle_denoiser):
    x0 = torch.zeros(4, 1)
    ve = VE()
    with pytest.raises(DifflabError, match="variance='learned' on VE"):
        vlb(oracle_denoiser(mixture1d, ve, "eps", var_frac=0.5), x0,
            grid=timesteps.uniform(ve, 10), variance="learned")
    with pytest.raises(DifflabError, match="needs grid="):
        vlb(mixture1d.denoiser(ve), x0)
    with pytest.raises(DifflabError, match="learned_variance=True"):
        vlb(mixture1d.denoiser(VP_PATH), x0, grid=vlb_grid(5), variance="learned")
    with pytest.raises(DifflabError, match="moments=AnalyticMoments"):
        vlb(mixture1d.denoiser(VP_PATH), x0, grid=vlb_grid(5), variance="analytic")
    with pytest.raises(DifflabError, match="from t_max"):
        vlb(mixture1d.denoiser(VP_PATH), x0, grid=timesteps.uniform(VP_PATH, 5, t_start=0.5))
    with pytest.raises(DifflabError, match="outside data_range"):
        vlb(mixture1d.denoiser(VP_PATH), x0 + 2.0, grid=vlb_grid(5))
    with pytest.raises(DifflabError, match="variance='tiny'"):
        vlb(mixture1d.denoiser(VP_PATH), x0, grid=vlb_grid(5), variance="tiny")


class ToZero(GaussianPath):
    """The linear interpolant run all the way to ``alpha(1) = 0`` (difflab's paths stop short)."""

    t_min, t_max = 1e-3, 1.0

    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return as_time(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(as_time(t))

    def d_sigma(self, t):
        return torch.ones_like(as_time(t))


def test_ode_likelihood_rejects_non_invertible_settings(mix3):
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(DifflabError, match="method='em'.*deterministic ODE solver"):
        ode_likelihood(mix3.denoiser(VP.linear()), x, method="em")
    with pytest.raises(DifflabError, match="alpha = 0"):
        ode_likelihood(mix3.denoiser(ToZero()), x)
    with pytest.raises(DifflabError, match="t_end=0"):
        ode_likelihood(mix3.denoiser(VE()), x, t_end=0.0)
    with pytest.raises(DifflabError, match="8-bit data"):
        ode_likelihood(mix3.denoiser(VE()), x + 0.001, dequantize_bits=8)
    for options, pattern in [({"divergence": "trace"}, "divergence"), ({"probe": "x"}, "probe"),
                             ({"n_probes": 0}, "n_probes"), ({"rtol": 0.0}, "rtol")]:
        with pytest.raises(DifflabError, match=pattern):
            ode_likelihood(mix3.denoiser(VE()), x, **options)
