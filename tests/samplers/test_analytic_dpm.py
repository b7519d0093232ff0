"""Analytic-DPM (Bao et al. 2022a) and SN/NPR-DPM (Bao et al. 2022b) against closed forms.

For Gaussian data ``N(m, s^2 I)`` everything is known: with ``x_t = a_t x0 + sigma_t eps``,

* ``E[eps | x_t] = sigma_t (x_t - a_t m) / (a_t^2 s^2 + sigma_t^2)``, so
  ``Gamma_t = E ||E[eps | x_t]||^2 / d = sigma_t^2 / (a_t^2 s^2 + sigma_t^2)``;
* ``(x_s, x_t)`` is jointly Gaussian, so the true reverse variance of DDPM's (Markov) chain is
  ``Var(x_s) - Cov(x_s, x_t)^2 / Var(x_t)`` with ``Var(x_u) = a_u^2 s^2 + sigma_u^2`` and
  ``Cov = a_s a_t s^2 + (a_t / a_s) sigma_s^2``;
* the reverse kernels are exactly Gaussian, so a sampler with the exact mean and the optimal
  variance is exact in distribution on *any* grid, however coarse.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import FnDenoiser
from difflab.errors import DifflabError
from difflab.likelihood import vlb
from difflab.objectives.residual import ResidualHead, ResidualLoss
from difflab.paths import VE, VP
from difflab.samplers import SAMPLERS, GeneratorNoise, sample, timesteps
from difflab.samplers.analytic import (
    AnalyticMoments,
    estimate_gamma,
    optimal_variance,
    variance_bounds,
)
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")
M, S, D = 0.3, 0.4, 3
PATHS = {"vp_discrete": lambda: VP.discrete_linear(1000), "vp_linear": lambda: VP.linear(),
         "ve": lambda: VE(0.01, 20.0)}

@pytest.fixture(scope="module")
def mix4() -> GaussianMixture:
    """Three well-separated components in 4-D (means >= 3.9 apart, stds <= 0.5), weights
    0.5/0.3/0.2: the tolerances below were calibrated on it."""
    means = torch.tensor([[-2.0, -2.0, 1.5, 0.0], [2.0, 0.5, -1.5, 1.0], [0.0, 2.5, 1.5, -1.0]])
    stds = torch.tensor([[0.4, 0.3, 0.5, 0.4], [0.5, 0.4, 0.3, 0.3], [0.3, 0.5, 0.4, 0.5]])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])



def single() -> GaussianMixture:
    return GaussianMixture([[M] * D], S)


def gamma_closed(path, t) -> torch.Tensor:
    a, sg = path.alpha(t), path.sigma(t)
    return sg**2 / (a**2 * S * S + sg**2)


def exact_moments(path, grid) -> AnalyticMoments:
    t = grid[grid > 0]
    return AnalyticMoments(t, gamma_closed(path, t), torch.zeros_like(t), 0, repr(path))


# ----- Gamma and the optimal variance ------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_discrete", "ve"])
def test_gamma_estimate_matches_the_closed_form(path_name):
    path = PATHS[path_name]()
    g = torch.Generator().manual_seed(0)
    grid = timesteps.uniform(path, 12)
    mom = estimate_gamma(single().denoiser(path), single().sample(3000, generator=g), grid,
                         generator=g)
    closed = gamma_closed(path, mom.times)
    assert mom.times.numel() == 12 and mom.n_samples == 3000
    assert bool(((mom.gamma - closed).abs() <= 4 * mom.stderr + 1e-12).all()), (mom.gamma, closed)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_optimal_variance_is_the_true_reverse_variance(path_name):
    """eta = 1: Thm. 1's var* equals ``Var(x_s | x_t)`` of the jointly Gaussian pair;
    eta = 0 (deterministic DDIM family): var* = ``(a_s - sigma_s a_t / sigma_t)^2 Var(x0 | x_t)``.
    """
    path = PATHS[path_name]()
    for t, s in [(0.9, 0.5), (0.5, 0.45), (0.2, 0.01), (0.05, 0.02)]:
        a_t, a_s = float(path.alpha(t)), float(path.alpha(s))
        sg_t, sg_s = float(path.sigma(t)), float(path.sigma(s))
        gamma = float(gamma_closed(path, torch.tensor(t, dtype=torch.float64)))
        var_t, var_s = a_t**2 * S * S + sg_t**2, a_s**2 * S * S + sg_s**2
        cov = a_s * a_t * S * S + (a_t / a_s) * sg_s**2
        true_ddpm = var_s - cov**2 / var_t
        var_x0 = S * S * sg_t**2 / var_t
        true_ddim = (a_s - sg_s * a_t / sg_t) ** 2 * var_x0
        assert optimal_variance(path, t, s, gamma, eta=1.0) == pytest.approx(true_ddpm, rel=1e-9)
        assert optimal_variance(path, t, s, gamma, eta=0.0) == pytest.approx(true_ddim, rel=1e-9)


def test_clipping_bounds_of_theorem_two():
    path = VP.linear()
    t, s = 0.6, 0.4
    lo, hi = variance_bounds(path, t, s, eta=1.0)
    beta_tilde = float(path.posterior(t, s)[2])
    c = float(path.posterior(t, s)[1])
    assert lo == pytest.approx(beta_tilde, rel=1e-12)
    assert hi == pytest.approx(beta_tilde + c * c * float(path.sigma_ve(t)) ** 2, rel=1e-12)
    assert optimal_variance(path, t, s, gamma=1.3) == pytest.approx(lo, rel=1e-12)  # Gamma > 1
    assert optimal_variance(path, t, s, gamma=-0.2) == pytest.approx(hi, rel=1e-12)
    _, hi_img = variance_bounds(path, t, s, eta=1.0, data_range=(-1.0, 1.0))
    assert hi_img == pytest.approx(beta_tilde + c * c * min(float(path.sigma_ve(t)) ** 2, 1.0))


# ----- AnalyticMoments: files and lookup ---------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_moments_round_trip(tmp_path, suffix):
    mom = AnalyticMoments([0.5, 0.1, 0.9], [0.6, 0.2, 0.95], [0.01, 0.02, 0.03], 123, "VP")
    mom.save(tmp_path / f"m{suffix}")
    back = AnalyticMoments.load(tmp_path / f"m{suffix}")
    assert back.times.tolist() == [0.1, 0.5, 0.9] and back.gamma.tolist() == [0.2, 0.6, 0.95]
    assert back.stderr.tolist() == [0.02, 0.01, 0.03]
    assert back.n_samples == 123 and back.path == "VP"
    with pytest.raises(DifflabError, match=r"\.json or \.safetensors"):
        mom.save(tmp_path / "m.pt")


def test_gamma_lookup_interpolates_in_log_snr_and_refuses_to_extrapolate():
    path = VP.linear()
    mom = AnalyticMoments([0.2, 0.6], [0.3, 0.9], [0.0, 0.0], 1)
    assert mom.gamma_at(torch.tensor(0.6, dtype=torch.float64), path) == 0.9
    lam = [float(path.log_snr(t)) for t in (0.2, 0.35, 0.6)]
    w = (lam[1] - lam[0]) / (lam[2] - lam[0])
    assert mom.gamma_at(0.35, path) == pytest.approx(0.3 + w * 0.6, rel=1e-12)
    with pytest.raises(DifflabError, match="estimate_gamma"):
        mom.gamma_at(0.7, path)


# ----- samplers ----------------------------------------------------------------------------------
def gaussian_stats_error(x: torch.Tensor) -> tuple[float, float]:
    """Max |mean - M| / S and max |var / S^2 - 1| over dimensions."""
    return (float(((x.mean(0) - M).abs() / S).max()), float((x.var(0) / S**2 - 1).abs().max()))


@pytest.mark.parametrize("path_name", ["vp_discrete", "ve"])
def test_exact_on_a_coarse_grid_where_fixed_variances_are_not(path_name):
    """Five steps: with the exact mean the optimal variance is exact (4000 samples: SE of the
    variance ~2.2 %); DDPM's beta_tilde loses ~half of the variance on the same grid."""
    path = PATHS[path_name]()
    den = single().denoiser(path)
    grid = timesteps.uniform(path, 5)
    mom = exact_moments(path, grid)
    noise = GeneratorNoise.seeded(3)
    x = path.prior_sample((4000, D), noise, dtype=torch.float64)
    for name in ("analytic_ddpm", "analytic_ddim"):
        out = sample(name, den, x, grid, moments=mom, clip_pixels=None, noise=noise)
        m_err, v_err = gaussian_stats_error(out)
        assert m_err < 0.06 and v_err < 0.08, (name, m_err, v_err)
    _, v_small = gaussian_stats_error(sample("ddpm", den, x, grid, noise=noise))
    assert v_small > 0.2, v_small


class Fixed:
    """Replays one tensor of noise per call (the same for two samplers)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def randn_like(self, x):
        self.seed += 1
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(self.seed),
                           dtype=x.dtype)


@pytest.mark.parametrize("name", ["npr_ddpm", "sn_ddpm"])
def test_exact_residual_heads_give_the_optimal_variance(name):
    """For Gaussian data ``E[(eps - eps_hat)^2 | x_t] = 1 - Gamma_t`` (NPR) and
    ``E[eps^2 | x_t] = 1 - Gamma_t + eps_hat^2`` (SN): with these exact heads both samplers must
    take exactly Analytic-DPM's steps."""
    path = VP.linear()
    den = single().denoiser(path)

    def npr(x_t, t):
        return (1 - gamma_closed(path, t)).reshape(-1, 1).expand_as(x_t)

    def sn(x_t, t):
        return npr(x_t, t) + den(x_t, t).eps ** 2

    grid = timesteps.uniform(path, 6)
    x = path.prior_sample((50, D), GeneratorNoise.seeded(0), dtype=torch.float64)
    ref = sample("analytic_ddpm", den, x, grid, moments=exact_moments(path, grid),
                 noise=Fixed(7))
    out = sample(name, den, x, grid, residual=npr if name == "npr_ddpm" else sn,
                 noise=Fixed(7))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path_name", ["vp_linear", "ve"])
def test_analytic_ddpm_reproduces_the_mixture(mix4, path_name):
    path = PATHS[path_name]()
    den = mix4.denoiser(path)
    g = torch.Generator().manual_seed(4)
    grid = timesteps.uniform(path, 50)
    mom = estimate_gamma(den, mix4.sample(2000, generator=g), grid, generator=g)
    noise = GeneratorNoise.seeded(5)
    x = path.prior_sample((3000, 4), noise, dtype=torch.float64)
    out = sample("analytic_ddpm", den, x, grid, moments=mom, noise=noise)
    w = mix4.weights
    mean = w @ mix4.means
    total_var = w @ (mix4.vars + mix4.means**2) - mean**2
    freq = torch.bincount(mix4.log_responsibilities(out, 0.0, path).argmax(1),
                          minlength=3).double() / out.shape[0]
    assert float((freq - w).abs().max()) < 0.03, freq
    assert float(((out.mean(0) - mean).abs() / total_var.sqrt()).max()) < 0.08
    assert float((out.var(0) / total_var - 1).abs().max()) < 0.08, out.var(0) / total_var


def test_imperfect_model_analytic_variance_lowers_the_vlb():
    """An eps-model that under-predicts the noise by 10 % (``eps_hat = 0.9 E[eps | x_t]``):
    Analytic-DPM's variance, from Gamma estimated with *this* model, gives a lower bound (bits/dim
    of 8-bit data) than both DDPM variances on the same 50-step grid."""
    mix = GaussianMixture([[-0.5, 0.3], [0.4, -0.2]], [[0.15, 0.1], [0.12, 0.2]], [0.35, 0.65])
    path = VP.discrete_linear(1000)
    oracle = mix.denoiser(path)
    model = FnDenoiser(lambda x, t, c: (p := oracle(x, t)).with_eps(0.9 * p.eps), path)
    g = torch.Generator().manual_seed(8)
    x0 = ((mix.sample(2000, generator=g) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    grid = torch.cat([torch.ones(1, dtype=torch.float64), timesteps.discrete(path, 50)[1:]])
    mom = estimate_gamma(model, x0, grid, generator=g)
    res = {v: vlb(model, x0, grid=grid, variance=v, moments=mom, generator=g)
           for v in ("small", "large", "analytic")}
    ana = res["analytic"]
    for fixed in ("small", "large"):
        gap = res[fixed].mean() - ana.mean()
        assert gap > 4 * math.hypot(res[fixed].stderr(), ana.stderr()), (fixed, gap)


# ----- errors and flags --------------------------------------------------------------------------
@pytest.mark.parametrize("name,option", [("analytic_ddpm", "moments"),
                                         ("analytic_ddim", "moments"),
                                         ("npr_ddpm", "residual"), ("sn_ddpm", "residual")])
def test_missing_extra_input_is_a_clear_error_and_flagged(name, option):
    path = VP.linear()
    with pytest.raises(DifflabError, match=f"needs {option}="):
        sample(name, single().denoiser(path), torch.zeros(2, D), timesteps.uniform(path, 3))
    assert SAMPLERS[name].needs_extra == (option,)


def test_bad_options():
    path = VP.linear()
    den = single().denoiser(path)
    grid = timesteps.uniform(path, 3)
    mom = exact_moments(path, grid)
    for options, pattern in [({"eta": 2.0}, "eta"), ({"data_range": (1, -1)}, "data_range"),
                             ({"clip_pixels": 0.0}, "clip_pixels"), ({"moments": {}}, "moments")]:
        with pytest.raises(DifflabError, match=pattern):
            sample("analytic_ddim", den, torch.zeros(2, D), grid, **({"moments": mom} | options))


# ----- the residual objective ---------------------------------------------------------------------
def test_residual_head_training_reduces_the_loss_towards_the_optimum():
    """A tiny head trained with the NPR loss on the exact mean: for Gaussian data the optimal
    head is ``1 - Gamma_t`` everywhere, whose loss is ``E[Var((eps - eps_hat)^2 | x_t)] =
    2 (1 - Gamma_t)^2`` per element (a head stuck at 0 scores ``3 (1 - Gamma_t)^2``); training
    must close most of the gap between the untrained head and that optimum."""
    torch.manual_seed(0)
    path = VP.linear()
    den = single().denoiser(path)
    net = torch.nn.Sequential(torch.nn.Linear(D + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, D))
    head = ResidualHead(lambda x, t, c: net(torch.cat([x.float(), t.float()[:, None]], 1)).double(),
                        path, time_input=lambda t: t)
    loss_fn = ResidualLoss(head, kind="npr")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x0 = single().sample(256, generator=g)
    ge = torch.Generator().manual_seed(3)
    t = torch.rand(4096, generator=ge, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    eps = torch.randn(4096, D, generator=ge, dtype=torch.float64)
    big = single().sample(4096, generator=ge)
    with torch.no_grad():
        first = float(loss_fn.loss_at(den, big, t, eps).mean())
    for _ in range(150):
        loss = loss_fn(den, x0, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(loss_fn.loss_at(den, big, t, eps).mean())
    optimum = float((2 * (1 - gamma_closed(path, t)) ** 2).mean())
    assert final - optimum < 0.3 * (first - optimum), (first, final, optimum)
    with pytest.raises(DifflabError, match="kind"):
        ResidualLoss(head, kind="var")
