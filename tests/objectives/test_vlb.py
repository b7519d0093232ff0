"""Variational-bound terms and improved DDPM's hybrid loss.

References come from outside the code under test: DDPM eq. 7 written with the betas, the
Gaussian posterior of single-Gaussian data, ``torch.distributions``' KL and scipy's normal CDF.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from torch.distributions import Normal, kl_divergence

from difflab import VE, VP, Denoiser, DifflabError
from difflab.objectives import (
    HybridLoss,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    prior_kl,
    reverse_log_variance,
    vlb_term,
    vlb_terms,
)
from difflab.testing import GaussianMixture

F64 = torch.float64
LN2 = math.log(2.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors run fastest on one thread; OpenMP barriers stall on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def identity(t):
    return t


def ddpm_tables(path):
    """DDPM's beta_n, alpha_bar_n and beta_tilde_n (eq. 7), 0-based, straight from the betas."""
    betas = path.betas
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    return betas, abar, abar_prev, beta_tilde


def quantized(n, dim, seed):
    """8-bit data scaled to [-1, 1], including both edge values."""
    k = torch.randint(0, 256, (n, dim), generator=gen(seed))
    k[0, 0], k[1, 0] = 0, 255
    return k.double() / 127.5 - 1


def with_var(mean_fn, f, kind="eps"):
    """A learned-variance network: mean output from ``mean_fn``, constant ``var_frac = f``."""

    def net(x, t_in, cond):
        raw = torch.full_like(x, 2 * f - 1)  # var_frac = (raw + 1) / 2 (iDDPM eq. 15)
        return torch.cat([mean_fn(x, t_in), raw], 1)

    return net


# ----- building blocks --------------------------------------------------------------------------
def test_gaussian_kl_matches_torch_distributions():
    g = gen(0)
    m1, m2 = torch.randn(100, generator=g, dtype=F64), torch.randn(100, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=F64), torch.randn(100, generator=g, dtype=F64)
    ref = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(gaussian_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-14)
    assert float(gaussian_kl(m1, lv1, m1, lv1).abs().max()) < 1e-14


def scipy_bin_probs(x, mean, scale, half=1 / 255):
    lo = np.where(x < -1 + half, -np.inf, x - half)
    hi = np.where(x > 1 - half, np.inf, x + half)
    left = norm.cdf(hi, mean, scale) - norm.cdf(lo, mean, scale)
    right = norm.sf(lo, mean, scale) - norm.sf(hi, mean, scale)  # precise in the right tail
    return np.where(x < mean, left, right)


@pytest.mark.parametrize("mean,scale", [(0.0, 0.01), (0.3, 0.1), (-0.9, 1.0), (2.5, 0.5),
                                        (0.0, 30.0), (0.5, 1e-4), (-0.2, 0.003)])
def test_discretized_decoder_bins_sum_to_one_and_match_scipy(mean, scale):
    x = torch.linspace(-1, 1, 256, dtype=F64)
    lp = discretized_gaussian_log_likelihood(x, torch.tensor(mean, dtype=F64),
                                             torch.tensor(math.log(scale), dtype=F64))
    assert bool(torch.isfinite(lp).all())
    assert abs(float(torch.exp(lp).sum()) - 1.0) < 1e-12
    ref = scipy_bin_probs(x.numpy(), mean, scale)
    ok = ref > 1e-280  # below that scipy underflows; difflab's log stays finite (checked above)
    assert ok.sum() > 0
    np.testing.assert_allclose(lp.numpy()[ok], np.log(ref[ok]), rtol=1e-9, atol=1e-12)


def test_discretized_decoder_is_finite_with_finite_gradients_in_far_tails_float32():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -1.0, 1.0])
    mean = torch.tensor([1.0, -1.0, 0.9, -0.8, -1.0, 1.0], requires_grad=True)
    log_scale = torch.full((6,), math.log(0.005), requires_grad=True)
    lp = discretized_gaussian_log_likelihood(x, mean, log_scale)
    assert bool(torch.isfinite(lp).all()) and float(lp[:4].detach().max()) < -1000
    lp.sum().backward()
    assert bool(torch.isfinite(mean.grad).all()) and bool(torch.isfinite(log_scale.grad).all())


def test_decoder_rejects_bad_bins():
    with pytest.raises(DifflabError, match="bins"):
        discretized_gaussian_log_likelihood(torch.zeros(2), torch.zeros(2), torch.zeros(2),
                                            bins=1)


# ----- the bound's terms, by hand -----------------------------------------------------------------
def x0_net(x, t_in):
    return 0.9 * x  # a deliberately wrong clean-data estimate


def test_kl_term_matches_ddpm_eq7_by_hand():
    n_steps, n, f = 20, 7, 0.3
    path = VP.discrete_linear(n_steps)
    betas, abar, abar_prev, beta_tilde = ddpm_tables(path)
    den = Denoiser(with_var(x0_net, f), path, "x0", time_input=identity, learned_variance=True)
    x0 = quantized(64, 4, 1)
    eps = torch.randn(x0.shape, generator=gen(2), dtype=F64)
    x_t = abar[n].sqrt() * x0 + (1 - abar[n]).sqrt() * eps
    c_x0 = abar_prev[n].sqrt() * betas[n] / (1 - abar[n])
    c_xt = (1 - betas[n]).sqrt() * (1 - abar_prev[n]) / (1 - abar[n])
    var_p = torch.exp(f * torch.log(betas[n]) + (1 - f) * torch.log(beta_tilde[n]))
    q = Normal(c_xt * x_t + c_x0 * x0, beta_tilde[n].sqrt())
    p = Normal(c_xt * x_t + c_x0 * 0.9 * x_t, var_p.sqrt())
    by_hand = kl_divergence(q, p).mean(1) / LN2
    got = vlb_terms(den, x0, (n + 1) / n_steps, n / n_steps, eps=eps)
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=0)


def test_decoder_term_uses_the_clipped_variance_by_hand():
    # iDDPM convention at the last step: log var = f log beta_1 + (1 - f) log beta_tilde_2
    n_steps, f = 20, 0.3
    path = VP.discrete_linear(n_steps)
    betas, abar, _, beta_tilde = ddpm_tables(path)
    den = Denoiser(with_var(x0_net, f), path, "x0", time_input=identity, learned_variance=True)
    x0 = quantized(64, 4, 3)
    eps = torch.randn(x0.shape, generator=gen(4), dtype=F64)
    x_t = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps
    scale = math.exp(0.5 * (f * math.log(betas[0]) + (1 - f) * math.log(beta_tilde[1])))
    probs = scipy_bin_probs(x0.numpy(), (0.9 * x_t).numpy(), scale)
    by_hand = torch.from_numpy(-np.log(probs).mean(1) / LN2)
    got = vlb_terms(den, x0, 1 / n_steps, 0.0, eps=eps)
    torch.testing.assert_close(got, by_hand, rtol=1e-9, atol=0)


def test_reverse_log_variance_variants():
    n_steps = 20
    path = VP.discrete_linear(n_steps)
    betas, _, _, beta_tilde = ddpm_tables(path)
    den = Denoiser(with_var(x0_net, 0.25), path, "x0", time_input=identity,
                   learned_variance=True)
    x = torch.randn(3, 2, generator=gen(5), dtype=F64)
    n = torch.tensor([0, 4, 19])
    pred = den(x, (n + 1).double() / n_steps)
    s = n.double() / n_steps
    clipped_bt = torch.where(n == 0, beta_tilde[1], beta_tilde[n])
    learned = reverse_log_variance(pred, s)[:, 0]
    torch.testing.assert_close(
        learned, 0.25 * torch.log(betas[n]) + 0.75 * torch.log(clipped_bt), rtol=1e-12, atol=0)
    # away from the data end it is exactly the sampler's variance (Prediction.reverse_log_var)
    torch.testing.assert_close(learned[1:], pred.reverse_log_var(s)[1:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(reverse_log_variance(pred, s, "small")[:, 0],
                               torch.log(clipped_bt), rtol=1e-12, atol=0)
    large = torch.where(n == 0, beta_tilde[1], betas[n])  # DDPM's fixedlarge at the last step
    torch.testing.assert_close(reverse_log_variance(pred, s, "large")[:, 0], torch.log(large),
                               rtol=1e-12, atol=0)
    with pytest.raises(DifflabError, match="variance='tiny'"):
        reverse_log_variance(pred, s, "tiny")


def test_prior_kl_by_hand():
    path = VP.discrete_linear(100)
    x0 = quantized(8, 5, 6)
    abar_T = float(torch.prod(1 - path.betas))  # 0.36: a short chain that does not reach N(0, I)
    std_T = math.sqrt(1 - abar_T)  # the model's prior is the path's N(0, sigma(t_max)^2)
    q = Normal(math.sqrt(abar_T) * x0, std_T)
    prior = Normal(torch.zeros_like(x0), torch.full_like(x0, std_T))
    by_hand = kl_divergence(q, prior).mean(1) / LN2
    torch.testing.assert_close(prior_kl(path, x0), by_hand, rtol=1e-10, atol=0)
    ve = VE(0.01, 50.0)
    ref = kl_divergence(Normal(x0, 50.0), Normal(torch.zeros_like(x0), 50.0)).mean(1) / LN2
    torch.testing.assert_close(prior_kl(ve, x0), ref, rtol=1e-10, atol=0)


# ----- the learned variance: closed form for single-Gaussian data ------------------------------
def test_true_reverse_variance_minimises_the_expected_kl_in_closed_form():
    # x0 ~ N(m, v I) with the exact mean: E KL = 0.5 [log(var_p/bt) + var*/var_p - 1] per dim with
    # var* = Var[x_s | x_t] = bt + c_x0^2 Var[x0 | x_t], minimised at var_p = var* (iDDPM Sec. 3.1)
    n_steps, dim, size, v = 100, 8, 20_000, 0.25
    path = VP.discrete_linear(n_steps)
    betas, abar, abar_prev, beta_tilde = ddpm_tables(path)
    gm = GaussianMixture(torch.full((1, dim), 0.3), math.sqrt(v))
    oracle = gm.denoiser(path)
    g = gen(7)
    for n in (20, 40, 90):  # f* = 0.89, 0.69, 0.37
        beta, bt = float(betas[n]), float(beta_tilde[n])
        c_x0 = float(abar_prev[n].sqrt() * betas[n] / (1 - abar[n]))
        post_var = v * float(1 - abar[n]) / float(abar[n] * v + 1 - abar[n])
        var_star = bt + c_x0**2 * post_var
        f_star = math.log(var_star / bt) / math.log(beta / bt)
        assert 0 < f_star < 1, "the true variance must lie between beta_tilde and beta"
        x0 = gm.sample(size, g)
        eps = torch.randn(x0.shape, generator=g, dtype=F64)
        got = {}
        for f in (f_star, 0.0, 1.0):
            net = with_var(lambda x, t_in: oracle(x, t_in).eps, f)
            den = Denoiser(net, path, "eps", time_input=identity, learned_variance=True)
            got[f] = vlb_terms(den, x0, (n + 1) / n_steps, n / n_steps, eps=eps)
            var_p = math.exp(f * math.log(beta) + (1 - f) * math.log(bt))
            expected = 0.5 * (math.log(var_p / bt) + var_star / var_p - 1) / LN2
            if f == f_star:
                expected = 0.5 * math.log(var_star / bt) / LN2
            se = 0.5 * c_x0**2 * post_var / var_p * math.sqrt(2 / (dim * size)) / LN2
            assert abs(float(got[f].mean()) - expected) < 5 * se + 1e-12, (n, f, expected)
        for f in (0.0, 1.0):  # paired: the same x0, eps for every variance
            diff = got[f] - got[f_star]
            assert float(diff.mean()) > 5 * float(diff.std()) / math.sqrt(size), (n, f)


# ----- the hybrid loss --------------------------------------------------------------------------
class TwoHeadNet(nn.Module):
    """Separate parameters for the mean (eps) and the variance interpolation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean_head = nn.Linear(dim + 1, dim, dtype=F64)
        self.var_head = nn.Linear(dim + 1, dim, dtype=F64)

    def forward(self, x, t_in, cond):
        h = torch.cat([x, t_in[:, None].to(x.dtype) / 100], 1)
        return torch.cat([self.mean_head(h), torch.tanh(self.var_head(h))], 1)


def grads(loss, params):
    out = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def test_vlb_term_trains_only_the_variance():
    torch.manual_seed(0)
    n_steps, dim = 50, 6
    path = VP.discrete_linear(n_steps)
    net = TwoHeadNet(dim)
    den = Denoiser(net, path, "eps", learned_variance=True)
    x0 = quantized(2 * n_steps, dim, 8)
    steps = torch.arange(2 * n_steps) % n_steps  # includes the decoder step n = 0
    eps = torch.randn(x0.shape, generator=gen(9), dtype=F64)
    hybrid = HybridLoss(lam=0.001)
    terms = hybrid.terms_at(den, x0, steps, eps)
    mean_p, var_p = list(net.mean_head.parameters()), list(net.var_head.parameters())
    assert all(float(g.abs().max()) == 0 for g in grads(terms["vlb"].sum(), mean_p))
    assert all(float(g.abs().max()) > 0 for g in grads(terms["vlb"].sum(), var_p))
    for g_all, g_simple in zip(grads(terms["loss"].sum(), mean_p),
                               grads(terms["simple"].sum(), mean_p)):
        torch.testing.assert_close(g_all, g_simple, rtol=1e-12, atol=0)
    for g_all, g_vlb in zip(grads(terms["loss"].sum(), var_p), grads(terms["vlb"].sum(), var_p)):
        torch.testing.assert_close(g_all, 0.001 * n_steps * g_vlb, rtol=1e-10, atol=1e-15)
    # without the stop-gradient the same term would train the mean: the check can fail
    t = path.step_time(steps)
    unfrozen = vlb_term(den(path.add_noise(x0, eps, t), t), x0, steps.double() / n_steps)
    assert any(float(g.abs().max()) > 0 for g in grads(unfrozen.sum(), mean_p))


def test_hybrid_loss_by_hand_from_the_documented_draws():
    torch.manual_seed(1)
    n_steps, dim, size = 30, 4, 16
    path = VP.discrete_cosine(n_steps)
    net = TwoHeadNet(dim)
    den = Denoiser(net, path, "eps", learned_variance=True)
    x0 = quantized(size, dim, 10)
    loss = HybridLoss(lam=0.01)(den, x0, generator=gen(11))
    g = gen(11)  # steps first, then the noise
    steps = torch.randint(0, n_steps, (size,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    t = (steps.double() + 1) / n_steps
    _, abar, _, _ = ddpm_tables(path)
    x_t = abar[steps, None].sqrt() * x0 + (1 - abar[steps, None]).sqrt() * eps
    eps_hat = net(x_t, t * n_steps - 1, None)[:, :dim]
    simple = ((eps_hat - eps) ** 2).mean(1)
    vlb = vlb_terms(den, x0, t, steps.double() / n_steps, eps=eps)
    assert loss.shape == (size,) and bool((loss > simple).all())
    torch.testing.assert_close(loss, simple + 0.01 * n_steps * vlb, rtol=1e-10, atol=0)


def test_hybrid_rejects_continuous_paths_and_fixed_variances():
    x0 = quantized(4, 3, 12)
    net = TwoHeadNet(3)
    with pytest.raises(DifflabError, match="discrete VP path"):
        HybridLoss()(Denoiser(net, VP.linear(), learned_variance=True), x0)
    with pytest.raises(DifflabError, match="discrete VP path"):
        HybridLoss()(Denoiser(net, VE(), learned_variance=True), x0)
    path = VP.discrete_linear(10)
    with pytest.raises(DifflabError, match="learned_variance=True"):
        HybridLoss()(Denoiser(lambda x, t, c: 0 * x, path), x0)
    gm = GaussianMixture(torch.zeros(1, 3), 0.5)
    with pytest.raises(DifflabError, match="learned_variance=True"):
        HybridLoss()(gm.denoiser(path), x0)
    with pytest.raises(DifflabError, match="lam"):
        HybridLoss(lam=-1.0)
    with pytest.raises(DifflabError, match="floating-point"):
        HybridLoss()(Denoiser(net, path, learned_variance=True), x0.long())
    with pytest.raises(DifflabError, match="0 <= s < t"):
        vlb_terms(Denoiser(net, path, learned_variance=True), x0, 0.5, 0.5)
