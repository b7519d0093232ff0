"""PNDM / PLMS: the multistep weights against exact polynomial integrals and PNDM's published
coefficients, the transfer against DDIM, and the warm-up warning. Their convergence orders are in
``test_solver_orders.py``."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import difflab.samplers.pndm  # noqa: F401  (registers the solvers)
from difflab.paths import EDM, VP
from difflab.prediction import Prediction
from difflab.samplers import sample, timesteps
from difflab.samplers.exponential import nodes
from difflab.samplers.pndm import adams_bashforth_weights, transfer
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("coefs", [
    [1], [Fraction(3, 2), Fraction(-1, 2)], [Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12)],
    [Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)],  # PNDM eq. 12
])
def test_uniform_nodes_give_the_classical_adams_bashforth_weights(coefs):
    k = len(coefs)
    rhos = [5.0 + 0.5 * j for j in range(k)]  # newest first, steps of 0.5 towards rho = 4.5
    np.testing.assert_allclose(adams_bashforth_weights(rhos, 4.5), [float(c) for c in coefs],
                               rtol=1e-12)


def test_variable_step_weights_integrate_cubics_exactly():
    rng = np.random.default_rng(0)
    rhos = [3.0, 3.4, 4.5, 6.0]  # uneven, newest first; the step goes down to 2.2
    p = np.polynomial.Polynomial(rng.normal(size=4))
    weights = adams_bashforth_weights(rhos, 2.2)
    exact = (p.integ()(2.2) - p.integ()(3.0)) / (2.2 - 3.0)  # mean of p over the step
    assert float(np.dot(weights, p(np.array(rhos)))) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("path", [VP.discrete_linear(), EDM()], ids=["vp", "edm"])
def test_transfer_is_the_ddim_step(path):
    t = torch.tensor(0.7 if path.t_max == 1.0 else 20.0, dtype=torch.float64)
    s = t * 0.4
    x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    pred = Prediction.from_output("eps", eps, x, t, path)
    ddim = float(path.alpha(s)) * pred.x0 + float(path.sigma(s)) * eps  # DDIM eq. 12, eta = 0
    node_t, node_s = nodes(path, torch.stack([t, s]))
    torch.testing.assert_close(transfer(x, eps, node_t, node_s), ddim, rtol=1e-12, atol=1e-12)


def test_plms_warns_once_when_the_grid_is_too_short_and_pndm_never():
    path = VP.discrete_linear()
    den = GaussianMixture(torch.zeros(1, 2), 0.5).denoiser(path)
    x = torch.randn(3, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample("plms", den, x, timesteps.uniform(path, 3))  # 2 solver steps
        sample("plms", den, x, timesteps.uniform(path, 8))
        sample("pndm", den, x, timesteps.uniform(path, 2))  # Runge-Kutta: no fallback
    assert [str(w.message).split(" was")[0] for w in caught] == ["plms"]
    assert "given 3 step(s)" in str(caught[0].message)


@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_the_multistep_final_step_integrates_the_noise_interpolant_to_rho_zero(name):
    """``final="multistep"`` (the default): the step from the last positive time ``t`` into the
    data is ``x_0 = x_t / alpha_t + int_rho_t^0 p(rho) d rho``, ``p`` the cubic through the last
    four evaluations ``(rho_j, eps_j)`` at the grid points (DDIM's ODE ``d(x / alpha) = eps
    d rho`` in ``(x / alpha, rho)``, where ``t = 0`` is the point ``rho = 0``). The expectation
    is built here from the states on the truncated grids and numpy's polynomials; the NFE is
    the same as with ``final="denoise"``, which returns ``x0_hat`` at ``t``."""
    path = VP.discrete_linear()
    den = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), 0.3).denoiser(path)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grid = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)  # trailing: a long last step
    positive = grid[:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncated grids are short for PLMS's order
        states = [sample(name, den, x, positive[: j + 1]) if j else x
                  for j in range(len(positive))]
    rhos = [float(path.sigma_ve(t)) for t in positive[-4:]]
    eps = [den(s, t).eps for s, t in zip(states[-4:], positive[-4:])]
    integral = torch.zeros_like(x)
    for j in range(4):  # int_rho_t^0 L_j(rho) d rho, L_j the Lagrange basis of the four rhos
        others = [r for k, r in enumerate(rhos) if k != j]
        basis = np.polynomial.Polynomial.fromroots(others) / np.prod([rhos[j] - r for r in others])
        antider = basis.integ()
        integral = integral + float(antider(0.0) - antider(rhos[-1])) * eps[j]
    t_last = positive[-1]
    expected = states[-1] / float(path.alpha(t_last)) + integral
    torch.testing.assert_close(sample(name, den, x, grid), expected, rtol=0, atol=1e-12)
    denoised = sample(name, den, x, grid, final="denoise")
    torch.testing.assert_close(denoised, den(states[-1], t_last).x0, rtol=0, atol=1e-12)
    assert float((denoised - expected).abs().max()) > 1e-4  # the two endings differ here


def test_final_is_validated():
    from difflab.errors import DifflabError

    path = VP.discrete_linear()
    den = GaussianMixture(torch.zeros(1, 2), 0.5).denoiser(path)
    with pytest.raises(DifflabError, match="final='last'"):
        sample("pndm", den, torch.randn(2, 2), timesteps.uniform(path, 5), final="last")
