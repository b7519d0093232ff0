"""UniPC: the order conditions of its weights, UniP and UniC separately against the exact ODE
solution (UniC raises the order by one at no extra evaluation), and the fallback warning."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate

import difflab.samplers.unipc  # noqa: F401  (registers the solvers)
from difflab.errors import DifflabError
from difflab.paths import VP
from difflab.samplers import sample, timesteps
from difflab.samplers.unipc import BH, unipc_weights
from difflab.testing import GaussianMixture, probability_flow_reference


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def phi(k: int, z: float) -> float:
    """``phi_k(z) = int_0^1 e^((1-u) z) u^(k-1)/(k-1)! du`` by quadrature."""
    return integrate.quad(lambda u: math.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1),
                          0.0, 1.0, epsabs=0, epsrel=1e-13)[0]


@pytest.mark.parametrize("bh", ["bh1", "bh2"])
@pytest.mark.parametrize("rs", [[-1.0, 1.0], [-0.7, -1.9], [-1.0, -2.0, 1.0]])
def test_weights_solve_the_order_conditions(bh, rs):
    h = 0.4
    B = BH[bh](h)
    a = np.array(unipc_weights(rs, h, B))
    for n in range(1, len(rs) + 1):  # sum_k a_k r_k^(n-1) = n! h phi_(n+1)(-h) / B(h)
        lhs = float(sum(a_k * r**(n - 1) for a_k, r in zip(a, rs)))
        assert lhs == pytest.approx(math.factorial(n) * h * phi(n + 1, -h) / B, rel=1e-9)
    assert unipc_weights([-1.3], h, B) == [0.5]  # UniPC with B(h): a_1 = 1/2
    assert BH["bh1"](h) == h and BH["bh2"](h) == pytest.approx(1 - math.exp(-h))


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(torch.randn(3, 3, generator=g, dtype=torch.float64),
                              [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])
    path = VP.discrete_linear()
    den = mixture.denoiser(path)
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return den, x, probability_flow_reference(den, x, 1.0, 0.1)


def slope(problem, name, steps, **opts) -> float:
    den, x, ref = problem
    errors = []
    for n in steps:
        grid = timesteps.log_snr(den.path, n, t_end=0.1, to_zero=False)
        errors.append(float((sample(name, den, x, grid, **opts) - ref).pow(2).mean().sqrt()))
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_unip_1_is_ddim(problem):
    den, x, _ = problem
    grid = timesteps.log_snr(den.path, 10)
    for name in ("unipc_bh1", "unipc_bh2"):
        out = sample(name, den, x, grid, order=1, corrector=False)
        torch.testing.assert_close(out, sample("ddim", den, x, grid), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,opts,order", [
    ("unipc_bh1", {"order": 1}, 2),  # UniC-1 turns DDIM into a second-order method
    ("unipc_bh2", {"order": 1}, 2),
    ("unipc_bh1", {"order": 2, "corrector": False}, 2),  # UniP-p alone has order p
    ("unipc_bh2", {"order": 3, "corrector": False}, 3),
])
def test_unic_raises_the_order_by_one(problem, name, opts, order):
    assert abs(slope(problem, name, (16, 32, 64), **opts) - order) < 0.3


@pytest.mark.parametrize("name,opts,order", [
    ("unipc_bh2", {"order": 2, "corrector_order": 1}, 2),  # the default pairing at order 2
    ("unipc_bh2", {"order": 3, "corrector_order": 1}, 2),  # UniC-q: order min(p, q) + 1
    ("unipc_bh1", {"order": 2, "corrector_order": 3}, 3),  # UniC-3 after UniP-2: still 3
])
def test_the_corrector_order_sets_the_order(problem, name, opts, order):
    assert abs(slope(problem, name, (32, 64, 128), **opts) - order) < 0.3


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("corrector_order", [None, "order"])
def test_the_corrector_makes_every_order_more_accurate(problem, order, corrector_order):
    den, x, ref = problem
    q = order if corrector_order == "order" else None
    grid = timesteps.log_snr(den.path, 64, t_end=0.1, to_zero=False)
    err = {c: float((sample("unipc_bh2", den, x, grid, order=order, corrector=c,
                            corrector_order=q) - ref).norm()) for c in (True, False)}
    assert err[True] < err[False] / 2, err


def test_the_defaults(problem):
    """UniC one order below UniP (at least 1); bh2's order 2 below 30 solver steps, 3 from 30;
    bh1's 3; ``lower_order_final="long_step"``."""
    den, x, _ = problem
    for name, steps, p in (("unipc_bh1", 10, 3), ("unipc_bh2", 29, 2), ("unipc_bh2", 30, 3)):
        grid = timesteps.log_snr(den.path, steps, t_end=0.1, to_zero=False)
        torch.testing.assert_close(
            sample(name, den, x, grid),
            sample(name, den, x, grid, order=p, corrector_order=p - 1,
                   lower_order_final="long_step"), rtol=0, atol=0)
    grid = timesteps.log_snr(den.path, 8, t_end=0.1, to_zero=False)
    torch.testing.assert_close(sample("unipc_bh2", den, x, grid, order=1),
                               sample("unipc_bh2", den, x, grid, order=1, corrector_order=1),
                               rtol=0, atol=0)
    assert not torch.allclose(sample("unipc_bh1", den, x, grid),
                              sample("unipc_bh1", den, x, grid, corrector_order=3))


def test_too_short_grid_warns_once_and_bad_order_is_rejected(problem):
    den, x, _ = problem
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample("unipc_bh1", den, x, timesteps.uniform(den.path, 3))  # 2 solver steps
        sample("unipc_bh1", den, x, timesteps.uniform(den.path, 12))
    ours = [w for w in caught if "unipc_bh1" in str(w.message)]
    assert len(ours) == 1 and "given 3 step(s)" in str(ours[0].message)
    with pytest.raises(DifflabError, match="order"):
        sample("unipc_bh2", den, x, timesteps.uniform(den.path, 4), order=4)
    for opts, arg in (({"corrector_order": 0}, "corrector_order"),
                      ({"corrector_order": True}, "corrector_order"),
                      ({"order": 2.0}, "order")):
        with pytest.raises(DifflabError, match=arg):
            sample("unipc_bh1", den, x, timesteps.uniform(den.path, 4), **opts)
