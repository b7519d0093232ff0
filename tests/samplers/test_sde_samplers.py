"""Score-SDE samplers (Song et al. 2021) with the exact mixture denoiser.

* the stochastic ones (Euler-Maruyama, reverse diffusion, predictor-corrector) reproduce the
  data's component weights, means and per-dimension variances on a VP and a VE path;
* the Langevin corrector leaves the noisy marginal ``p_t`` invariant;
* the probability-flow ODE matches an independent DOP853 solution (``probability_flow_reference``)
  with ``dopri5``, and fixed-step ``rk4`` converges at order 4.

The expected statistics are computed from the mixture's parameters (``mix4``: three
well-separated components in 4-D, weights 0.5/0.3/0.2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.paths import VE, VP
from difflab.samplers import GeneratorNoise, Hooks, sample, timesteps
from difflab.samplers import sde as sde_mod  # registers em, reverse_diffusion, pc, langevin, ode
from difflab.testing import GaussianMixture, probability_flow_reference

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3000
PATHS = {"vp": lambda: VP.linear(), "ve": lambda: VE(0.01, 50.0)}

@pytest.fixture(scope="module")
def mix4() -> GaussianMixture:
    """Three well-separated components in 4-D (means >= 3.9 apart, stds <= 0.5), weights
    0.5/0.3/0.2: the tolerances below were calibrated on it."""
    means = torch.tensor([[-2.0, -2.0, 1.5, 0.0], [2.0, 0.5, -1.5, 1.0], [0.0, 2.5, 1.5, -1.0]])
    stds = torch.tensor([[0.4, 0.3, 0.5, 0.4], [0.5, 0.4, 0.3, 0.3], [0.3, 0.5, 0.4, 0.5]])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])



def assert_reproduces(mix, x: torch.Tensor, what: str, w_tol=0.03, m_tol=0.08, v_tol=0.08):
    """Weights within ``w_tol`` (3 points ~ 3 standard errors at N=3000), means within ``m_tol``
    of the per-dimension std, per-dimension variances within ``v_tol`` (relative)."""
    w = mix.weights
    mean = w @ mix.means
    total_var = w @ (mix.vars + mix.means**2) - mean**2
    xf = x.reshape(x.shape[0], -1).double()
    assert bool(torch.isfinite(xf).all()), f"{what}: non-finite samples"
    logp = torch.log(w) - 0.5 * (((xf[:, None] - mix.means) ** 2 / mix.vars)
                                 + torch.log(mix.vars)).sum(-1)
    freq = torch.bincount(logp.argmax(1), minlength=mix.K).double() / xf.shape[0]
    assert float((freq - w).abs().max()) < w_tol, f"{what}: weights {freq.tolist()}"
    m_err = float(((xf.mean(0) - mean).abs() / total_var.sqrt()).max())
    assert m_err < m_tol, f"{what}: means {xf.mean(0).tolist()} vs {mean.tolist()}"
    v_err = float((xf.var(0) / total_var - 1).abs().max())
    assert v_err < v_tol, f"{what}: variances {xf.var(0).tolist()} vs {total_var.tolist()}"


def test_statistics_check_is_calibrated(mix4):
    x = mix4.sample(N, generator=torch.Generator().manual_seed(0))
    assert_reproduces(mix4, x, "exact samples")
    with pytest.raises(AssertionError, match="variances"):
        assert_reproduces(mix4, x * 1.1, "inflated")


CASES = [
    ("em", {}, 100),
    ("reverse_diffusion", {}, 100),
    ("pc", {"step_norm": "batch"}, 75),  # reverse diffusion + 1 Langevin step: 150 evaluations
    ("pc", {"predictor": "em", "snr": 0.1, "step_norm": "batch"}, 50),
    ("pc", {"predictor": "ddim", "step_norm": "batch"}, 50),
]


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("name,options,steps", CASES,
                         ids=["em", "reverse_diffusion", "pc", "pc_em", "pc_ddim"])
def test_stochastic_samplers_reproduce_the_mixture(mix4, path_name, name, options, steps):
    path = PATHS[path_name]()
    noise = GeneratorNoise.seeded(11)
    x = path.prior_sample((N, 4), noise, dtype=torch.float64)
    out = sample(name, mix4.denoiser(path), x, timesteps.uniform(path, steps), noise=noise,
                 **options)
    assert_reproduces(mix4, out, f"{name} {options} on {path!r}")


@pytest.mark.parametrize("path_name", list(PATHS))
def test_langevin_corrector_keeps_the_noisy_marginal(mix4, path_name):
    """Song et al. Alg. 4/5 at a fixed ``t`` starting from exact samples of ``p_t`` must stay in
    ``p_t`` (a mixture with means ``alpha m_k`` and variances ``alpha^2 v_k + sigma^2``)."""
    path = PATHS[path_name]()
    t = torch.tensor(0.3, dtype=torch.float64)
    a, s = float(path.alpha(t)), float(path.sigma(t))
    g = torch.Generator().manual_seed(3)
    x_t = a * mix4.sample(N, generator=g) + s * torch.randn(N, 4, generator=g,
                                                                 dtype=torch.float64)
    out, _ = sde_mod.langevin_correct(mix4.denoiser(path), x_t, t, snr=0.16, steps=30,
                                      alpha=1.0, noise=GeneratorNoise(g), hooks=Hooks(),
                                      step_norm="batch")
    moved = float((out - x_t).norm(dim=1).mean() / x_t.norm(dim=1).mean())
    assert moved > 0.1, "the corrector barely moved: the check below would be vacuous"
    noisy = GaussianMixture(a * mix4.means, (a * a * mix4.vars + s * s).sqrt(),
                            mix4.weights)
    assert_reproduces(noisy, out, f"langevin corrector at t=0.3 on {path!r}")


def test_langevin_sampler_runs_and_denoises(mix4):
    """Corrector-only sampling (``pc`` with predictor 'none') ends in the data's support."""
    path = VE(0.01, 2.0)
    x = path.prior_sample((256, 4), GeneratorNoise.seeded(0), dtype=torch.float64)
    out = sample("langevin", mix4.denoiser(path), x, timesteps.log_snr(path, 40),
                 n_corrector=5, snr=0.2, step_norm="batch", noise=GeneratorNoise.seeded(1))
    dist = torch.cdist(out, mix4.means).min(1).values
    assert float(dist.median()) < 1.0  # components are >= 3.9 apart with stds <= 0.5


# ----- the probability-flow ODE ------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_reference(mix4):
    """DOP853 solutions from ``t_max`` to ``1e-3`` for 8 prior draws, one per path name."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = PATHS_ODE[name]()
            x = path.prior_sample((8, 4), GeneratorNoise.seeded(5), dtype=torch.float64)
            den = mix4.denoiser(path)
            cache[name] = (path, den, x, probability_flow_reference(den, x, path.t_max, 1e-3))
        return cache[name]

    return get


PATHS_ODE = {"vp_linear": lambda: VP.linear(), "ve": lambda: VE(0.01, 10.0)}


@pytest.mark.parametrize("variable", ["log_snr", "t"])
@pytest.mark.parametrize("path_name", list(PATHS_ODE))
def test_ode_dopri5_matches_the_reference_solution(flow_reference, path_name, variable):
    path, den, x, ref = flow_reference(path_name)
    out = sample("ode", den, x, torch.tensor([path.t_max, 1e-3]), method="dopri5", rtol=1e-8,
                 atol=1e-8, variable=variable)
    assert float((out - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("path_name,variable,spacing", [
    ("vp_linear", "t", timesteps.uniform),  # Song et al.'s eq. 13 in t, uniform steps
    ("ve", "log_snr", timesteps.log_snr),  # the default variable, log-SNR steps
], ids=["vp_linear_t", "ve_log_snr"])
def test_ode_rk4_converges_at_order_four(flow_reference, path_name, variable, spacing):
    path, den, x, ref = flow_reference(path_name)
    steps = [32, 64, 128]
    errs = [float((sample("ode", den, x, spacing(path, n, t_end=1e-3, to_zero=False),
                          method="rk4", variable=variable) - ref).pow(2).mean().sqrt())
            for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]  # least-squares slope of RMS errors
    assert abs(slope - 4.0) < 0.3, (errs, slope)


def test_ode_log_snr_variable_is_smooth_on_the_discrete_chain(mix4):
    """In ``t`` DDPM's chain has a kink at every step; in log-SNR the flow is smooth, so
    dopri5 reaches the reference with few evaluations (the ``t`` version needs thousands)."""
    path = VP.discrete_linear(1000)
    den = mix4.denoiser(path)
    x = path.prior_sample((8, 4), GeneratorNoise.seeded(8), dtype=torch.float64)
    ref = probability_flow_reference(den, x, 1.0, 2e-3)
    calls = []
    counted = Hooks(callback=None, correct_x0=lambda x0, t: calls.append(1) or x0)
    out = sample("ode", den, x, torch.tensor([1.0, 2e-3]), method="dopri5", rtol=1e-8,
                 atol=1e-8, hooks=counted)
    assert float((out - ref).abs().max()) < 1e-5
    assert len(calls) < 600, len(calls)


def test_ode_final_zero_returns_the_denoised_estimate(mix4):
    path = VP.linear()
    den = mix4.denoiser(path)
    x = path.prior_sample((8, 4), GeneratorNoise.seeded(7), dtype=torch.float64)
    to_t = sample("ode", den, x, torch.tensor([1.0, 0.05]))
    to_zero = sample("ode", den, x, torch.tensor([1.0, 0.05, 0.0]))
    torch.testing.assert_close(to_zero, den(to_t, 0.05).x0)


def test_flow_drift_is_the_velocity(mix4, any_path):
    """Song et al. eq. 13 through ``path.sde`` equals ``d_alpha x0_hat + d_sigma eps_hat``."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((16,), 0.5 * (any_path.t_min + any_path.t_max), dtype=torch.float64)
    pred = mix4.denoiser(any_path)(x, t)
    torch.testing.assert_close(sde_mod.flow_drift(pred), pred.velocity, rtol=1e-9, atol=1e-9)


def test_reverse_diffusion_step_is_ddpm_on_the_discrete_chain(mix4):
    """App. E, eq. 47: ``x_{i-1} = (2 - sqrt(1 - beta_i)) x_i + beta_i score + sqrt(beta_i) z``."""
    path = VP.discrete_linear(1000)
    den = mix4.denoiser(path)
    n = 500
    t, s = path.step_time(n), path.step_time(n - 1)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    beta = float(path.betas[n])

    class Fixed:
        def randn_like(self, like):
            return z

    out = sde_mod.reverse_diffusion(den, x, torch.stack([t, s]), noise=Fixed())
    score = den(x, t).score
    expected = (2 - math.sqrt(1 - beta)) * x + beta * score + math.sqrt(beta) * z
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


# ----- bad options ---------------------------------------------------------------------------
@pytest.mark.parametrize("options,pattern", [
    ({"predictor": "heun"}, "predictor"),
    ({"corrector": "ald"}, "corrector"),
    ({"n_corrector": -1}, "n_corrector"),
    ({"snr": 0.0}, "snr"),
    ({"step_norm": "global"}, "step_norm"),
    ({"predictor": "none", "corrector": "none"}, "predictor='none'"),
])
def test_pc_rejects_bad_options(mix4, options, pattern):
    path = VE()
    x = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(DifflabError, match=pattern):
        sample("pc", mix4.denoiser(path), x, timesteps.uniform(path, 3), **options)


@pytest.mark.parametrize("method", ["em", "pc", "rk5"])
def test_ode_rejects_stochastic_or_unknown_methods(mix4, method):
    path = VE()
    with pytest.raises(DifflabError, match="method=.*deterministic ODE solver"):
        sample("ode", mix4.denoiser(path), torch.zeros(2, 4), timesteps.uniform(path, 3),
               method=method)
