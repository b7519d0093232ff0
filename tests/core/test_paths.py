"""The ``GaussianPath`` contract, checked against closed forms and finite differences.

Every expected value here is computed independently of ``difflab.paths``: from the papers'
definitions (DDPM's betas and eq. 7, iDDPM eq. 17, score-SDE eq. 33 and App. C, EDM Table 1,
SiT's interpolants), from central differences in float64, or by integrating the SDE's moment
equations with scipy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from difflab.paths import VP, DiscreteVP, GaussianPath
from difflab.samplers import GeneratorNoise

pytestmark = pytest.mark.usefixtures("one_thread")
EPS64 = float(np.finfo(np.float64).eps)


def sample_times(path: GaussianPath, n: int = 48, seed: int = 0) -> torch.Tensor:
    """Times spread over ``[t_min, t_max]``, log-uniform so that small ``t`` is well covered.

    On a discrete path the points lie strictly between knots (``(k + u) / N``, ``u`` in
    ``[0.1, 0.9]``), where ``log alpha`` is smooth, so finite differences are meaningful.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    if isinstance(path, DiscreteVP):
        k = torch.randint(1, path.N, (n,), generator=g).double()
        return (k + 0.1 + 0.8 * u) / path.N
    lo, hi = math.log(path.t_min), math.log(path.t_max)
    t = torch.exp(lo + (hi - lo) * u)
    # keep the exact ends too, nudged inside so that t +- h stays in the domain
    return torch.cat([t, torch.tensor([path.t_min * 1.001, path.t_max * 0.999])])


def step_for(path: GaussianPath, t: torch.Tensor) -> torch.Tensor:
    """A finite-difference step ``1e-3`` times the distance to the nearest non-smooth point.

    That is ``t = 0`` (``sigma ~ sqrt(t)``), ``t = 1`` where ``alpha`` vanishes on the cosine,
    linear and GVP paths, and the knots of a discrete path (``log alpha`` has kinks there).
    """
    if isinstance(path, DiscreteVP):
        frac = t * path.N - torch.floor(t * path.N)
        dist = torch.minimum(frac, 1 - frac) / path.N
    elif path.t_max <= 1:
        dist = torch.minimum(t, 1 - t)
    else:
        dist = t.clamp(max=1.0)
    return 1e-3 * dist


def central(path: GaussianPath, fn, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourth-order central difference of ``fn`` at ``t`` and a bound on its rounding error.

    ``f' = [8 (f(t+h) - f(t-h)) - (f(t+2h) - f(t-2h))] / (12 h) + O(h^4)``; with ``h`` a
    thousandth of the distance to the nearest singularity the truncation error is ~1e-12
    relative. Rounding contributes at most ``~ 1.5 delta / h`` for function values known to
    ``delta``, taken as a few ulps of ``max(|f|, 1)`` (``sigma^2 = 1 - alpha^2`` is only known
    to an ulp of 1).
    """
    h = step_for(path, t)
    f1, f_1, f2, f_2 = fn(t + h), fn(t - h), fn(t + 2 * h), fn(t - 2 * h)
    fd = (8 * (f1 - f_1) - (f2 - f_2)) / (12 * h)
    scale = torch.stack([f1.abs(), f_1.abs(), f2.abs(), f_2.abs(), torch.ones_like(t)]).amax(0)
    rounding = 16 * EPS64 * scale / h
    return fd, rounding


def assert_close_fd(exact: torch.Tensor, fd: torch.Tensor, rounding: torch.Tensor,
                    what: str, rtol: float = 1e-6) -> None:
    err = (exact - fd).abs()
    tol = rtol * exact.abs() + rounding + 1e-300
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (
        f"{what}: analytic {float(exact[worst]):.12g} vs finite difference "
        f"{float(fd[worst]):.12g} (error {float(err[worst]):.3g}, "
        f"tolerance {float(tol[worst]):.3g})"
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_t_zero_is_exactly_the_data(any_path, dtype):
    """``t = 0`` is the clean-data end on every path: ``alpha = 1``, ``sigma = 0`` exactly, in
    either precision (samplers test ``sigma(0) == 0`` to take the final ``x0_hat`` step)."""
    t0 = torch.zeros(2, dtype=dtype)
    assert bool((any_path.alpha(t0) == 1).all()), f"{any_path!r}: alpha(0) = {any_path.alpha(t0)}"
    assert bool((any_path.sigma(t0) == 0).all()), f"{any_path!r}: sigma(0) = {any_path.sigma(t0)}"
    assert float(any_path.sigma(0.0)) == 0.0 and float(any_path.alpha(0.0)) == 1.0
    assert float(any_path.log_snr(0.0)) == math.inf


# ----- derivatives and the SDE ------------------------------------------------------------------
def test_d_alpha_d_sigma_match_finite_differences(any_path):
    t = sample_times(any_path)
    fd, rnd = central(any_path, any_path.alpha, t)
    assert_close_fd(any_path.d_alpha(t), fd, rnd, f"{any_path!r} d_alpha")
    fd, rnd = central(any_path, any_path.sigma, t)
    assert_close_fd(any_path.d_sigma(t), fd, rnd, f"{any_path!r} d_sigma")


def test_sde_matches_finite_differences_of_sigma2_and_log_alpha(any_path):
    """``f = d log alpha / dt``, ``g^2 = d sigma^2 / dt - 2 f sigma^2`` (Kingma et al. 2021)."""
    t = sample_times(any_path)
    f, g2 = any_path.sde(t)
    f_fd, f_rnd = central(any_path, lambda u: torch.log(any_path.alpha(u)), t)
    assert_close_fd(f, f_fd, f_rnd, f"{any_path!r} drift f")
    s2_fd, s2_rnd = central(any_path, lambda u: any_path.sigma(u) ** 2, t)
    s2 = any_path.sigma(t) ** 2
    g2_fd = s2_fd - 2 * f_fd * s2
    rounding = s2_rnd + 2 * s2 * f_rnd + 1e-6 * (2 * f.abs() * s2)
    assert_close_fd(g2, g2_fd, rounding, f"{any_path!r} diffusion g^2")
    assert bool((g2 > 0).all()), f"{any_path!r}: g^2 must be positive"


def test_sde_moment_equations_reproduce_the_marginals(any_path):
    """Integrating the SDE's moment ODEs from ``t_min`` gives ``alpha(t)`` and ``sigma(t)^2``.

    For ``dx = f x dt + g dw`` the mean factor ``m`` and variance ``P`` of ``x_t | x_0`` obey
    ``d log m / dt = f`` and ``dP/dt = 2 f P + g^2`` (Sarkka & Solin, eq. 5.51). On a discrete
    path ``f`` jumps at every knot, so the ODE is solved knot to knot over the first 20 steps.
    """
    p = any_path
    if isinstance(p, DiscreteVP):  # integrate knot to knot over the first 20 steps
        breaks = np.arange(1, 22) / p.N
    else:
        breaks = np.linspace(p.t_min, p.t_max, 7)

    y = [math.log(float(p.alpha(p.t_min))), float(p.sigma(p.t_min)) ** 2]
    for t0, t1 in zip(breaks[:-1], breaks[1:]):
        # on a discrete path f jumps at the knots: evaluate it just inside each segment
        lo, hi = t0 + 1e-12, t1 - 1e-12

        def rhs(t, y, lo=lo, hi=hi):
            f, g2 = p.sde(min(max(float(t), lo), hi))
            return [float(f), 2 * float(f) * y[1] + float(g2)]

        sol = solve_ivp(rhs, (t0, t1), y, rtol=1e-11, atol=1e-14, method="DOP853")
        assert sol.success
        y = sol.y[:, -1]
        t1_in = torch.tensor(t1, dtype=torch.float64)
        assert math.exp(y[0]) == pytest.approx(float(p.alpha(t1_in)), rel=1e-8)
        assert y[1] == pytest.approx(float(p.sigma(t1_in)) ** 2, rel=1e-8, abs=1e-14)


# ----- log-SNR and its inverse ------------------------------------------------------------------
def test_log_snr_is_two_log_alpha_over_sigma_and_strictly_decreasing(any_path):
    t = torch.linspace(any_path.t_min, any_path.t_max, 20001, dtype=torch.float64)
    lam = any_path.log_snr(t)
    ref = 2 * (torch.log(any_path.alpha(t)) - torch.log(any_path.sigma(t)))
    torch.testing.assert_close(lam, ref, rtol=1e-10, atol=1e-10)
    assert bool((lam[1:] < lam[:-1]).all()), f"{any_path!r}: log_snr is not strictly decreasing"


def assert_inverse(path: GaussianPath, back: torch.Tensor, t: torch.Tensor, what: str) -> None:
    """``|back - t| <= 1e-11 t + 1e-14 t_max``.

    The absolute part allows for the closed forms' own conditioning near ``t_min`` (e.g. the
    cosine path's ``arccos`` of a number within 1e-4 of 1 is only known to ~1e-14).
    """
    err = (back - t).abs()
    tol = 1e-11 * t + 1e-14 * path.t_max
    worst = int(torch.argmax(err / tol))
    assert bool((err <= tol).all()), (
        f"{path!r}: {what} = {float(back[worst]):.17g} at t = {float(t[worst]):.17g}"
    )


def test_t_from_log_snr_inverts_log_snr(any_path):
    t = sample_times(any_path, n=200, seed=1)
    if isinstance(any_path, DiscreteVP):  # the knots themselves as well as points between
        t = torch.cat([t, any_path.step_time(torch.arange(any_path.N))])
    t = torch.cat([t, torch.tensor([any_path.t_min, any_path.t_max], dtype=torch.float64)])
    back = any_path.t_from_log_snr(any_path.log_snr(t))
    assert_inverse(any_path, back, t, "t_from_log_snr(log_snr(t))")


def test_sigma_ve_inverse(any_path):
    t = sample_times(any_path, n=50, seed=2)
    back = any_path.t_from_sigma_ve(any_path.sigma(t) / any_path.alpha(t))
    assert_inverse(any_path, back, t, "t_from_sigma_ve(sigma / alpha)")


# ----- noising, transitions, posteriors -----------------------------------------------------
def test_add_noise_broadcasts_per_sample_coefficients(any_path):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = sample_times(any_path, n=4, seed=4)[:4]
    out = any_path.add_noise(x0, eps, t)
    for i in range(4):
        a, s = float(any_path.alpha(float(t[i]))), float(any_path.sigma(float(t[i])))
        torch.testing.assert_close(out[i], a * x0[i] + s * eps[i], rtol=1e-14, atol=1e-14)
    scalar = any_path.add_noise(x0, eps, float(t[0]))
    a, s = float(any_path.alpha(float(t[0]))), float(any_path.sigma(float(t[0])))
    torch.testing.assert_close(scalar, a * x0 + s * eps, rtol=1e-14, atol=1e-14)


def test_transitions_compose_to_the_marginal(any_path):
    """``q(x_t | x_0) = int q(x_t | x_s) q(x_s | x_0) dx_s`` (VDM eq. 4) for ``u < s < t``."""
    t3 = torch.sort(sample_times(any_path, n=60, seed=6)[:60].reshape(20, 3), dim=1).values
    u, s, t = t3[:, 0], t3[:, 1], t3[:, 2]
    a_ts, v_ts = any_path.transition(t, s)
    a_su, v_su = any_path.transition(s, u)
    a_tu, v_tu = any_path.transition(t, u)
    torch.testing.assert_close(a_ts * a_su, a_tu, rtol=1e-12, atol=0)
    torch.testing.assert_close(a_ts**2 * v_su + v_ts, v_tu, rtol=1e-9, atol=1e-15)
    # composing with the marginal at s gives the marginal at t
    a_s, s_s = any_path.alpha(s), any_path.sigma(s)
    torch.testing.assert_close(a_ts * a_s, any_path.alpha(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(a_ts**2 * s_s**2 + v_ts, any_path.sigma(t) ** 2, rtol=1e-9,
                               atol=1e-15)


def test_posterior_is_the_gaussian_conditional(any_path):
    """``q(x_s | x_t, x0)`` by Gaussian conditioning of the joint of ``(x_s, x_t) | x0``."""
    t2 = torch.sort(sample_times(any_path, n=40, seed=7)[:40].reshape(20, 2), dim=1).values
    s, t = t2[:, 0], t2[:, 1]
    c_xt, c_x0, var = any_path.posterior(t, s)
    a_s, s_s, a_t, s_t = (any_path.alpha(s), any_path.sigma(s), any_path.alpha(t),
                          any_path.sigma(t))
    a_ts = a_t / a_s
    cov = a_ts * s_s**2  # Cov(x_s, x_t | x0)
    gain = cov / s_t**2
    torch.testing.assert_close(c_xt, gain, rtol=1e-10, atol=0)
    torch.testing.assert_close(c_x0, a_s - gain * a_t, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(var, s_s**2 - gain * cov, rtol=1e-7, atol=1e-15)


# ----- the discrete DDPM chain ------------------------------------------------------------------
def ddpm_linear_betas(n: int = 1000) -> np.ndarray:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02."""
    return np.linspace(1e-4, 0.02, n)


def iddpm_cosine_betas(n: int = 1000, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. 17 and the clipping of beta at 0.999."""
    f = lambda k: math.cos((k / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(k + 1) / f(k), 0.999) for k in range(n)])


@pytest.mark.parametrize("name,betas_fn", [("vp_discrete_linear", ddpm_linear_betas),
                                           ("vp_discrete_cosine", iddpm_cosine_betas)])
def test_discrete_alphas_cumprod_match_ddpm(make_path, name, betas_fn):
    p = make_path(name)
    betas = betas_fn(1000)
    abar = np.cumprod(1 - betas)
    # beta = 1 - ratio is only known to an ulp of 1
    np.testing.assert_allclose(p.betas.numpy(), betas, rtol=1e-12, atol=4 * EPS64)
    np.testing.assert_allclose(p.alphas_cumprod.numpy(), abar, rtol=1e-11)
    n = torch.arange(1000)
    np.testing.assert_allclose((p.alpha(p.step_time(n)) ** 2).numpy(), abar, rtol=1e-11)
    np.testing.assert_allclose((p.sigma(p.step_time(n)) ** 2).numpy(), 1 - abar, rtol=1e-11)
    # data end and network time signal: step n is fed as the integer n
    assert float(p.alpha(0.0)) == 1.0 and float(p.sigma(0.0)) == 0.0
    np.testing.assert_allclose(p.time_input(p.step_time(n)).numpy(), np.arange(1000.0),
                               atol=1e-9)


@pytest.mark.parametrize("name,betas_fn", [("vp_discrete_linear", ddpm_linear_betas),
                                           ("vp_discrete_cosine", iddpm_cosine_betas)])
def test_discrete_posterior_is_ddpm_eq7(make_path, name, betas_fn):
    """DDPM eq. 7 between consecutive steps ``n -> n-1``, computed by hand from the betas."""
    p = make_path(name)
    betas = betas_fn(1000)
    abar = np.cumprod(1 - betas)
    n = np.arange(1, 1000)
    c_x0 = np.sqrt(abar[n - 1]) * betas[n] / (1 - abar[n])
    c_xt = np.sqrt(1 - betas[n]) * (1 - abar[n - 1]) / (1 - abar[n])
    beta_tilde = (1 - abar[n - 1]) / (1 - abar[n]) * betas[n]
    got_xt, got_x0, got_var = p.posterior(p.step_time(n), p.step_time(n - 1))
    np.testing.assert_allclose(got_xt.numpy(), c_xt, rtol=1e-9)
    np.testing.assert_allclose(got_x0.numpy(), c_x0, rtol=1e-9)
    np.testing.assert_allclose(got_var.numpy(), beta_tilde, rtol=1e-9)
    a_ts, beta = p.transition(p.step_time(n), p.step_time(n - 1))
    np.testing.assert_allclose(a_ts.numpy(), np.sqrt(1 - betas[n]), rtol=1e-12)
    np.testing.assert_allclose(beta.numpy(), betas[n], rtol=1e-9)
    # the first step goes to the data: a point mass at x0
    c_xt0, c_x00, var0 = p.posterior(p.step_time(0), 0.0)
    assert float(c_xt0) == 0.0 and float(var0) == 0.0
    assert float(c_x00) == pytest.approx(1.0, abs=1e-15)


def test_discrete_log_alpha_is_linear_between_knots(make_path):
    p = make_path("vp_discrete_linear")
    abar = np.cumprod(1 - ddpm_linear_betas())
    la = 0.5 * np.log(abar)
    k = np.arange(0, 999)
    t_mid = torch.from_numpy((k + 1.5) / 1000)
    np.testing.assert_allclose(torch.log(p.alpha(t_mid)).numpy(), 0.5 * (la[k] + la[k + 1]),
                               rtol=1e-12)


# ----- closed forms of the continuous paths ----------------------------------------------
def closed_form(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``alpha(t), sigma(t)`` from the papers' definitions with default parameters."""
    if name in ("vp_linear", "subvp"):  # score SDE eq. 33 (App. B) / eq. 12
        alpha = np.exp(-0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1)
        sigma = np.sqrt(1 - alpha**2) if name == "vp_linear" else 1 - alpha**2
    elif name == "vp_cosine":  # iDDPM eq. 17: alpha^2 = f(t) / f(0)
        s = 0.008
        alpha = np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)
        sigma = np.sqrt(1 - alpha**2)
    elif name == "ve":  # NCSN / score SDE App. C: geometric sigmas
        alpha, sigma = np.ones_like(t), 0.01 * (50.0 / 0.01) ** t
    elif name == "edm":  # EDM Table 1: sigma(t) = t, s(t) = 1
        alpha, sigma = np.ones_like(t), t.copy()
    elif name == "linear":  # rectified flow / SiT linear interpolant
        alpha, sigma = 1 - t, t.copy()
    else:  # SiT GVP
        alpha, sigma = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
    return alpha, sigma


@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "subvp", "ve", "edm", "linear", "gvp"])
def test_continuous_paths_match_their_closed_forms(make_path, name):
    p = make_path(name)
    t = sample_times(p, n=100, seed=8).numpy()
    alpha, sigma = closed_form(name, t)
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(p.alpha(tt).numpy(), alpha, rtol=1e-12)
    np.testing.assert_allclose(p.sigma(tt).numpy(), sigma, rtol=1e-9)


@pytest.mark.parametrize("name", ["vp_discrete_linear", "vp_discrete_cosine", "vp_linear",
                                  "vp_cosine"])
def test_vp_paths_preserve_variance(make_path, name):
    p = make_path(name)
    t = sample_times(p, n=100, seed=9)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t),
                               rtol=0, atol=1e-14)


def test_subvp_sigma_is_one_minus_alpha_squared(make_path):
    p, vp = make_path("subvp"), VP.linear()
    t = sample_times(p, n=100, seed=10)
    torch.testing.assert_close(p.alpha(t), vp.alpha(t), rtol=1e-15, atol=0)
    torch.testing.assert_close(p.sigma(t), 1 - vp.alpha(t) ** 2, rtol=1e-9, atol=1e-16)
    # sub-VP's variance never exceeds VP's (Song et al. 2021, Sec. 3.4)
    assert bool((p.sigma(t) <= vp.sigma(t)).all())


def test_prior_matches_sigma_at_t_max(any_path):
    s = float(any_path.sigma(any_path.t_max))
    assert any_path.prior_std == pytest.approx(s, rel=1e-15)
    z = torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expect = (-0.5 * (z / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum((1, 2))
    torch.testing.assert_close(any_path.prior_logp(z), expect, rtol=1e-12, atol=1e-12)
    draws = any_path.prior_sample((20000,), GeneratorNoise.seeded(12), dtype=torch.float64)
    # the sample std of 20000 normals is within 4 standard errors (4 / sqrt(40000)) of s
    assert float(draws.std()) == pytest.approx(s, rel=0.02)
    assert abs(float(draws.mean())) < 4 * s / math.sqrt(20000)
