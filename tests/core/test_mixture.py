"""The ``GaussianMixture`` oracle against quadrature, autograd and its own definition.

Everything else in the core tests trusts this oracle, so here it is checked without it:
``p_t(x) = int p_0(x0) N(x; alpha x0, sigma^2) dx0`` and ``E[x0 | x_t]`` by
``scipy.integrate.quad`` in 1-D, the score as the autograd gradient of ``log p_t`` (Tweedie:
``score = grad log p_t``, Efron 2011; Song et al. 2021), and samples against the parameters.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from difflab.cond import Cond
from difflab.paths import GaussianPath

pytestmark = pytest.mark.usefixtures("one_thread")
QUAD_PATHS = ["vp_discrete_linear", "vp_cosine", "subvp", "ve", "edm", "linear"]


def times_at_noise_levels(path: GaussianPath, levels=(0.05, 0.4, 2.0)) -> list[float]:
    """Times where ``sigma / alpha`` takes the given values (a sharp, a medium, a broad blur)."""
    return [float(path.t_from_sigma_ve(torch.tensor(v, dtype=torch.float64))) for v in levels]


def normal_pdf(x: float, mean: float, sd: float) -> float:
    return math.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def data_pdf(mix):
    """``p_0`` of a 1-D mixture as a plain Python function (fast for quad)."""
    comps = list(zip(mix.weights.tolist(), mix.means[:, 0].tolist(),
                     mix.vars[:, 0].sqrt().tolist()))
    return lambda x0: sum(w * normal_pdf(x0, m, sd) for w, m, sd in comps)


def quad(fn, center: float) -> float:
    # the integrand is a product of the data density and a Gaussian of width sigma / alpha
    # around x / alpha: give quad that point and the mixture means as breakpoints
    val, _ = integrate.quad(fn, -12.0, 12.0, points=sorted({center, -1.5, 0.5, 2.0}),
                            limit=400, epsabs=1e-14, epsrel=1e-12)
    return val


@pytest.mark.parametrize("path_name", QUAD_PATHS)
def test_marginal_log_prob_and_posterior_mean_by_quadrature(make_path, mixture1d, path_name):
    path = make_path(path_name)
    xs = torch.tensor([-2.0, -0.3, 0.4, 1.7, 3.0], dtype=torch.float64)
    for t in times_at_noise_levels(path):
        a, s = float(path.alpha(t)), float(path.sigma(t))
        x = xs * a  # points where the blurred density is not negligible
        logp = mixture1d.marginal_log_prob(x[:, None], t, path)
        x0_hat = mixture1d.denoiser(path)(x[:, None], t).x0[:, 0]
        p0 = data_pdf(mixture1d)
        for i, xi in enumerate(x.tolist()):
            def joint(x0, xi=xi, a=a, s=s, p0=p0):
                return p0(x0) * normal_pdf(xi, a * x0, s)

            z = quad(joint, xi / a)
            num = quad(lambda x0, f=joint: x0 * f(x0), xi / a)
            assert float(logp[i]) == pytest.approx(math.log(z), abs=1e-9), (path_name, t, xi)
            assert float(x0_hat[i]) == pytest.approx(num / z, abs=1e-8), (path_name, t, xi)


def test_conditional_posterior_mean_by_quadrature(make_path, mixture1d):
    """``Cond(labels=k)`` gives ``E[x0 | x_t, k]``: one Gaussian component's posterior mean."""
    path = make_path("vp_linear")
    t = times_at_noise_levels(path, (0.5,))[0]
    a, s = float(path.alpha(t)), float(path.sigma(t))
    x = torch.tensor([[-0.8], [0.2], [1.1]], dtype=torch.float64)
    den = mixture1d.denoiser(path)
    for k in range(3):
        m, sd = float(mixture1d.means[k, 0]), float(mixture1d.vars[k, 0].sqrt())
        got = den.bind(Cond(labels=torch.tensor([k] * 3)))(x, t).x0[:, 0]
        for i, xi in enumerate(x[:, 0].tolist()):
            f = lambda x0, xi=xi, m=m, sd=sd: (  # noqa: E731
                normal_pdf(x0, m, sd) * normal_pdf(xi, a * x0, s))
            want = quad(lambda x0, f=f: x0 * f(x0), xi / a) / quad(f, xi / a)
            assert float(got[i]) == pytest.approx(want, abs=1e-8)


def test_log_prob_and_responsibilities_match_scipy(make_path, mixture4d):
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    w = mixture4d.weights.numpy()
    means, sds = mixture4d.means.numpy(), mixture4d.vars.sqrt().numpy()
    comp = np.stack([stats.multivariate_normal.logpdf(x.numpy(), means[k], np.diag(sds[k] ** 2))
                     for k in range(3)], axis=1)
    np.testing.assert_allclose(mixture4d.log_prob(x).numpy(),
                               np.log(np.exp(comp) @ w), rtol=1e-12)
    path = make_path("gvp")
    t = 0.4
    a, s = float(path.alpha(t)), float(path.sigma(t))
    comp_t = np.stack([stats.multivariate_normal.logpdf(
        x.numpy(), a * means[k], np.diag(a * a * sds[k] ** 2 + s * s)) for k in range(3)], axis=1)
    joint = comp_t + np.log(w)
    resp = joint - np.log(np.exp(joint).sum(1, keepdims=True))
    np.testing.assert_allclose(mixture4d.log_responsibilities(x, t, path).numpy(), resp,
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mixture4d.marginal_log_prob(x, t, path).numpy(),
                               np.log(np.exp(joint).sum(1)), rtol=1e-12)


@pytest.mark.parametrize("path_name", ["vp_discrete_cosine", "vp_linear", "subvp", "ve", "edm",
                                       "linear", "gvp"])
def test_score_is_the_gradient_of_the_marginal_log_density(make_path, mixture4d, path_name):
    """Tweedie: the oracle's ``score = -eps_hat / sigma`` equals ``grad_x log p_t(x)``."""
    path = make_path(path_name)
    den = mixture4d.denoiser(path)
    g = torch.Generator().manual_seed(1)
    for t in times_at_noise_levels(path, (0.05, 0.3, 1.0, 5.0)):
        x0 = mixture4d.sample(8, generator=g)
        x = path.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
        x = x.requires_grad_(True)
        (grad,) = torch.autograd.grad(mixture4d.marginal_log_prob(x, t, path).sum(), x)
        score = den(x.detach(), t).score
        torch.testing.assert_close(score, grad, rtol=1e-9, atol=1e-9 / float(path.sigma(t)))


def test_sample_statistics_match_the_parameters(mixture4d):
    n = 20000
    x, labels = mixture4d.sample(n, generator=torch.Generator().manual_seed(2),
                                 return_labels=True)
    assert x.shape == (n, 4) and x.dtype == torch.float64
    w = np.array([0.5, 0.3, 0.2])
    freq = np.bincount(labels.numpy(), minlength=3) / n
    assert np.abs(freq - w).max() < 4 * math.sqrt(0.25 / n)
    for k in range(3):
        xk = x[labels == k]
        se = mixture4d.vars[k].sqrt() / math.sqrt(len(xk))
        assert bool(((xk.mean(0) - mixture4d.means[k]).abs() < 4 * se).all())
        rel = xk.var(0) / mixture4d.vars[k] - 1
        assert float(rel.abs().max()) < 4 * math.sqrt(2 / len(xk))
    # the closed-form moments, from the parameters by hand
    means = mixture4d.means.numpy()
    mean = w @ means
    var = w @ (mixture4d.vars.numpy() + means**2) - mean**2
    np.testing.assert_allclose(mixture4d.mean().numpy(), mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(mixture4d.covariance_diag().numpy(), var, rtol=1e-12)


def test_sample_keeps_the_data_shape(image_mixture):
    x = image_mixture.sample(5, generator=torch.Generator().manual_seed(3))
    assert x.shape == (5, 2, 4, 4)
    labels = torch.tensor([1, 1, 0, 1, 0])
    x = image_mixture.sample(5, generator=torch.Generator().manual_seed(4), labels=labels)
    d = (x.reshape(5, 1, -1) - image_mixture.means[None]).pow(2).sum(-1)
    assert torch.equal(d.argmin(1), labels)
