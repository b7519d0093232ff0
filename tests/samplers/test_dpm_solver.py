"""DPM-Solver / DPM-Solver++: the integrator weights, the multistep machinery, the adaptive
solver and the SDE variant, each against an answer known without the code under test
(quadrature, polynomials, DDIM, the exact ODE solution, the mixture's own parameters)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import integrate

import difflab.samplers.dpm_solver  # noqa: F401  (registers the solvers)
from difflab.errors import DifflabError
from difflab.paths import EDM, VP
from difflab.samplers import PerSampleNoise, sample, timesteps
from difflab.samplers.dpm_solver import newton_derivatives
from difflab.samplers.exponential import hphi, lowers_final, step_orders
from difflab.testing import CountingDenoiser, GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")



def smooth_mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(3, 3, generator=g, dtype=torch.float64),
                           [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("h", [1e-3, 0.3, 5.0])
def test_integrator_weights_match_their_integral_definition(k, sign, h):
    # h^k phi_k(sign h) = h^k int_0^1 e^((1-u) sign h) u^(k-1)/(k-1)! du
    val, _ = integrate.quad(lambda u: math.exp((1 - u) * sign * h) * u ** (k - 1)
                            / math.factorial(k - 1), 0.0, 1.0, epsabs=0, epsrel=1e-13)
    assert hphi(k, h, sign) == pytest.approx(h**k * val, rel=1e-9)


def test_newton_derivatives_are_exact_for_quadratics():
    a, b, c = (torch.randn(4, dtype=torch.float64) for _ in range(3))
    f = lambda lam: a + b * lam + c * lam * lam  # noqa: E731
    lams = [0.3, -0.4, -1.7]  # oldest first, uneven spacing
    hist = [(lam, f(lam)) for lam in lams]
    l0 = lams[-1]
    d = newton_derivatives(hist)
    torch.testing.assert_close(d[0], f(l0))
    torch.testing.assert_close(d[1], b + 2 * c * l0)
    torch.testing.assert_close(d[2], 2 * c)
    secant = (f(l0) - f(lams[1])) / (l0 - lams[1])
    torch.testing.assert_close(newton_derivatives(hist[1:])[1], secant)


def test_first_order_solvers_are_ddim():
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(16, 3, dtype=torch.float64)
    grid = timesteps.uniform(path, 12)
    ref = sample("ddim", den, x, grid)
    for name in ("dpm_solver_1",):
        torch.testing.assert_close(sample(name, den, x, grid), ref, rtol=0, atol=1e-12)
    # the multistep solvers at order 1 (one step) and DPM-Solver++1 are DDIM too
    one = timesteps.uniform(path, 1, to_zero=False, t_end=0.3)
    for name in ("dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(sample(name, den, x, one), sample("ddim", den, x, one),
                                       rtol=0, atol=1e-12)


def test_step_orders_warm_up_and_lower_the_final_steps():
    assert step_orders(3, 12, True) == [1, 2] + [3] * 10
    assert step_orders(3, 5, True) == [1, 2, 3, 2, 1]
    assert step_orders(3, 5, False) == [1, 2, 3, 3, 3]
    assert step_orders(2, 1, True) == [1]
    # an int threshold: lower on grids of fewer than that many solver steps (True is 10)
    assert step_orders(3, 12, 13) == [1, 2] + [3] * 8 + [2, 1]
    assert step_orders(3, 12, 12) == [1, 2] + [3] * 10
    assert step_orders(2, 9, 10) == step_orders(2, 9, True) == [1] + [2] * 7 + [1]
    assert step_orders(3, 5, 0) == step_orders(3, 5, False)
    assert step_orders(3, 40, "always") == [1, 2] + [3] * 36 + [2, 1]


def test_long_step_lowers_when_the_last_step_exceeds_one_in_lambda():
    even = [0.0, 0.9, 1.8, 2.7]  # steps of 0.9
    assert not lowers_final("long_step", even)
    assert lowers_final("long_step", [0.0, 0.9, 1.8, 2.81])  # last step 1.01
    assert lowers_final("long_step", [0.0, 1.5])  # a single long step
    assert step_orders(3, 3, "long_step", even) == [1, 2, 3]
    assert step_orders(3, 3, "long_step", [0.0, 0.5, 1.0, 2.2]) == [1, 2, 1]
    with pytest.raises(ValueError, match="lams"):
        step_orders(3, 3, "long_step")


@pytest.mark.parametrize("value", ["sometimes", -1, 2.5, None, [10]])
def test_lower_order_final_is_validated(value):
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    for name in ("dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "unipc_bh2"):
        with pytest.raises(DifflabError, match="lower_order_final=.*'long_step' or 'always'"):
            sample(name, den, torch.randn(2, 3), timesteps.uniform(path, 6),
                   lower_order_final=value)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpm_solver_2m"])
def test_the_default_lowers_a_long_last_step_only(name):
    """``"long_step"``: on a grid whose last step is longer than 1 in ``lambda`` the run is the
    lowered one (``lower_order_final="always"``), on one whose steps are all shorter it is the
    full-order one (``False``)."""
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for grid, lowered in ((timesteps.uniform(path, 12, to_zero=False), True),  # h_last ~ 2.5
                          (timesteps.log_snr(path, 12, to_zero=False), False)):  # h ~ 0.8
        lam = 0.5 * path.log_snr(grid)
        assert (float(lam[-1] - lam[-2]) > 1) == lowered
        ref = sample(name, den, x, grid, lower_order_final="always" if lowered else False)
        torch.testing.assert_close(sample(name, den, x, grid), ref, rtol=0, atol=0)
        other = sample(name, den, x, grid, lower_order_final=False if lowered else "always")
        assert not torch.allclose(other, ref)


def test_lower_order_final_ends_with_a_ddim_step():
    path = EDM()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(8, 3, dtype=torch.float64) * 80
    grid = timesteps.log_snr(path, 6, t_end=0.05, to_zero=False)
    for lof in (True, "always", "long_step", 7):  # 6 steps of 1.23 in lambda
        got = sample("dpmpp_2m", den, x, grid, lower_order_final=lof)
        head = sample("dpmpp_2m", den, x, grid[:-1], lower_order_final=False)
        torch.testing.assert_close(got, sample("ddim", den, head, grid[-2:]), rtol=0,
                                   atol=1e-12)
    assert not torch.allclose(got, sample("dpmpp_2m", den, x, grid, lower_order_final=False))
    assert torch.equal(sample("dpmpp_2m", den, x, grid, lower_order_final=6),
                       sample("dpmpp_2m", den, x, grid, lower_order_final=False))


@pytest.mark.parametrize("name,form", [("dpmpp_3m", "data"), ("dpm_solver_3m", "noise")])
def test_the_half_second_difference_halves_the_f2_term(name, form):
    """Three steps at orders 1, 2, 3 (no lowering): the first two are the same for both
    weights, so the third-step results differ by exactly the ``f''`` term's half,
    ``C h^3 phi_3 d`` with ``d`` the second divided difference of the three outputs (``C``:
    ``alpha_s`` in the data form, ``-sigma_s`` in the noise form)."""
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grid = timesteps.log_snr(path, 3, t_end=0.2, to_zero=False)
    runs = {w: sample(name, den, x, grid, lower_order_final=False, second_difference=w)
            for w in ("taylor", "half")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncated grids are short for order 3
        states = [x] + [sample(name, den, x, grid[: j + 2], lower_order_final=False)
                        for j in range(2)]
    out = [den(s, t).x0 if form == "data" else den(s, t).eps for s, t in zip(states, grid)]
    lam = [float(0.5 * path.log_snr(t)) for t in grid]
    d = ((out[2] - out[1]) / (lam[2] - lam[1]) - (out[1] - out[0]) / (lam[1] - lam[0])) \
        / (lam[2] - lam[0])
    h = lam[3] - lam[2]
    # h^3 phi_3(z) = (e^z - 1 - z - z^2/2) / sign^3, z = sign h (sign -1: data, +1: noise)
    sign = -1.0 if form == "data" else 1.0
    z = sign * h
    h3phi3 = (math.expm1(z) - z - z * z / 2) * sign**3
    C = float(path.alpha(grid[3])) if form == "data" else -float(path.sigma(grid[3]))
    torch.testing.assert_close(runs["taylor"] - runs["half"], C * h3phi3 * d, rtol=0,
                               atol=1e-13)


def test_auto_second_difference_switches_to_taylor_at_65_steps():
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for steps, weight in ((64, "half"), (65, "taylor")):
        grid = timesteps.log_snr(path, steps, to_zero=False)
        torch.testing.assert_close(sample("dpmpp_3m", den, x, grid),
                                   sample("dpmpp_3m", den, x, grid, second_difference=weight),
                                   rtol=0, atol=0)
    assert sample("dpm_solver_3m", den, x, grid).equal(  # the noise form keeps the Taylor weight
        sample("dpm_solver_3m", den, x, timesteps.log_snr(path, 65, to_zero=False),
               second_difference="taylor"))


@pytest.mark.parametrize("name,order", [("dpmpp_2m", 2), ("dpmpp_3m", 3),
                                        ("dpm_solver_2m", 2), ("dpm_solver_3m", 3)])
def test_too_short_grids_fall_back_with_one_warning(name, order):
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(4, 3, dtype=torch.float64)
    short = timesteps.uniform(path, order)  # order - 1 solver steps, then the denoising step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(name, den, x, short)
        sample(name, den, x, timesteps.uniform(path, order + 2))  # long enough: silent
    ours = [w for w in caught if name in str(w.message)]
    assert len(ours) == 1
    assert f"given {order} step(s)" in str(ours[0].message)
    assert f"order {order}" in str(ours[0].message)


def test_bad_options_name_the_argument():
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    x, grid = torch.randn(2, 3), timesteps.uniform(path, 4)
    for name, opts, arg in [("dpm_solver_2", {"r1": 1.5}, "r1"), ("dpmpp_2s", {"r": 0.0}, "r"),
                            ("dpmpp_3m", {"second_difference": "full"}, "second_difference"),
                            ("dpm_solver_3m", {"second_difference": 0.5}, "second_difference"),
                            ("dpm_adaptive", {"order": 4}, "order"),
                            ("dpm_adaptive", {"rtol": -1.0}, "rtol")]:
        with pytest.raises(DifflabError, match=arg):
            sample(name, den, x, grid, **opts)


# ----- adaptive step size ----------------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_solver_meets_its_tolerance(adaptive_problem, order):
    den, x, ref = adaptive_problem
    grid = torch.tensor([1.0, 0.1], dtype=torch.float64)
    scale = float(ref.pow(2).mean().sqrt())  # the size of x that rtol is relative to
    runs = []
    for rtol, atol in [(1e-2, 1e-3), (1e-3, 1e-4)]:
        counted = CountingDenoiser(den)
        out = sample("dpm_adaptive", counted, x, grid, order=order, rtol=rtol, atol=atol)
        error = float((out - ref).pow(2).mean().sqrt())
        assert error < max(atol, rtol * scale), (rtol, error)
        runs.append((error, counted.calls))
    (e_loose, n_loose), (e_tight, n_tight) = runs
    assert e_tight < e_loose / 3 and n_tight > n_loose


def test_adaptive_solver_uses_only_the_ends_and_denoises_at_the_data_end(adaptive_problem):
    den, x, _ = adaptive_problem
    path = den.path
    coarse, fine = timesteps.uniform(path, 3), timesteps.uniform(path, 30)
    torch.testing.assert_close(sample("dpm_adaptive", den, x, coarse),
                               sample("dpm_adaptive", den, x, fine), rtol=0, atol=0)
    to_tmin = sample("dpm_adaptive", den, x, torch.tensor([1.0, path.t_min], dtype=torch.float64))
    torch.testing.assert_close(sample("dpm_adaptive", den, x, coarse),
                               den(to_tmin, path.t_min).x0, rtol=0, atol=1e-12)
    # every sample controls its own steps: its result does not depend on the rest of the batch
    # (up to the last-bit rounding of vectorised kernels, which depends on the batch size)
    batch = sample("dpm_adaptive", den, x, coarse)
    torch.testing.assert_close(sample("dpm_adaptive", den, x[3:4], coarse), batch[3:4],
                               rtol=0, atol=1e-12)
    with pytest.raises(DifflabError, match="max_evals"):
        sample("dpm_adaptive", den, x, coarse, rtol=1e-6, atol=1e-8, max_evals=50)


# ----- the SDE variant -------------------------------------------------------------------------
def mixture_statistics(mixture: GaussianMixture, x: torch.Tensor, path):
    """Component weights, the largest mean error, and each component's mean variance ratio."""
    k = mixture.log_responsibilities(x, 0.0, path).argmax(1)
    weights = torch.bincount(k, minlength=mixture.K).double() / len(k)
    mean_err = max(float((x[k == j].mean(0) - mixture.means[j]).abs().max())
                   for j in range(mixture.K))
    var_ratio = torch.stack([(x[k == j].var(0) / mixture.vars[j]).mean()
                             for j in range(mixture.K)])
    return weights, mean_err, var_ratio


def test_dpmpp_2m_sde_reproduces_the_mixture(mixture4d):
    path = VP.discrete_linear()
    x = torch.randn(3000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = sample("dpmpp_2m_sde", mixture4d.denoiser(path), x, timesteps.log_snr(path, 60),
                 noise=7)
    weights, mean_err, var_ratio = mixture_statistics(mixture4d, out, path)
    torch.testing.assert_close(weights, mixture4d.weights, rtol=0, atol=0.03)
    assert mean_err < 0.1  # component means are O(2); std of the estimate ~0.02
    assert bool(((var_ratio - 1).abs() < 0.08).all()), var_ratio


def test_dpmpp_2m_sde_noise_is_per_sample():
    path = EDM()
    den = smooth_mixture().denoiser(path)
    x = torch.randn(6, 3, dtype=torch.float64) * 80
    grid = timesteps.karras(path, 8)
    full = sample("dpmpp_2m_sde", den, x, grid, noise=PerSampleNoise(range(6)))
    part = sample("dpmpp_2m_sde", den, x[:3], grid, noise=PerSampleNoise(range(3)))
    torch.testing.assert_close(full[:3], part, rtol=0, atol=1e-12)
    assert not torch.allclose(full, sample("dpmpp_2m_sde", den, x, grid, noise=1))
