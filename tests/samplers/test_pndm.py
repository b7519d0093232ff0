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
