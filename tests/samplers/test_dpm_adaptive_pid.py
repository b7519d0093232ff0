"""The PID step controller of ``dpm_adaptive`` (``controller="pid"``): its step sequence against
the controller formula written out here, per-sample independence, accuracy against the exact
probability-flow ODE, and option checking."""

from __future__ import annotations

import math

import pytest
import torch

import difflab.samplers.dpm_adaptive  # noqa: F401  (registers the solver)
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError
from difflab.paths import EDM, VP
from difflab.samplers import sample, timesteps
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(DenoiserBase):
    """Records the time of every (batched) evaluation."""

    def __init__(self, den: DenoiserBase) -> None:
        self.den, self.path, self.times = den, den.path, []

    def predict(self, x, t):
        self.times.append(t.clone())
        return self.den.predict(x, t)


def smooth_mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.randn(3, 3, generator=g, dtype=torch.float64),
                           [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])


def hand_pid(den, x, sigma_start, sigma_end, rtol, atol, h_init, gains, safety):
    """DPM-Solver-12 on EDM's path (``alpha = 1``, ``lambda = -log sigma``) for one sample,
    with the PID controller spelled out: returns the evaluated sigmas, the accept decisions
    and the result."""
    kp, ki, kd = gains
    k = 2
    b1, b2, b3 = (kp + ki + kd) / k, -(kp + 2 * kd) / k, kd / k
    lam, lam_end = -math.log(sigma_start), -math.log(sigma_end)
    h, hist, sigmas, decisions, eps = min(h_init, lam_end - lam), None, [], [], None

    def eps_at(y, sigma):
        sigmas.append(sigma)
        return (y - den(y, torch.tensor([sigma], dtype=torch.float64)).x0) / sigma

    while lam < lam_end:
        sigma_t = math.exp(-lam)
        if eps is None:
            eps = eps_at(x, sigma_t)
        last = h >= lam_end - lam
        sigma_s = sigma_end if last else math.exp(-(lam + h))
        step = (lam_end - lam) if last else h
        sigma_1 = math.exp(-(lam + step / 2))
        u1 = x - sigma_1 * math.expm1(step / 2) * eps
        d1 = eps_at(u1, sigma_1) - eps
        x_1 = x - sigma_s * math.expm1(step) * eps
        x_2 = x_1 - sigma_s * math.expm1(step) * d1  # / (2 r1) with r1 = 1/2
        delta = (rtol * torch.maximum(x_1.abs(), x.abs())).clamp_min(atol)
        err = float(((x_2 - x_1) / delta).pow(2).mean().sqrt())
        e = 1.0 / (err + 1e-8)
        if hist is None:
            hist = [e, e]  # the first trial fills the history with its own error
        factor = 1.0 + math.atan(e**b1 * hist[0] ** b2 * hist[1] ** b3 - 1.0)
        accept = factor >= safety
        decisions.append(accept)
        if accept:
            hist = [e, hist[0]]
            x, lam, eps = x_2, lam_end if last else lam + step, None
        h = min(step * factor, lam_end - lam)
    return sigmas, decisions, x


@pytest.mark.parametrize("gains", [(0.0, 1.0, 0.0), (0.4, 0.3, 0.0), (0.3, 0.5, 0.2)],
                         ids=["integral", "pi34", "pid"])
def test_pid_steps_follow_the_controller_formula(gains):
    path = EDM(sigma_min=0.01, sigma_max=20.0)
    den = smooth_mixture().denoiser(path)
    x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    opts = {"rtol": 1e-3, "atol": 1e-4, "h_init": 0.5, "accept_safety": 0.81}
    sigmas, decisions, expected = hand_pid(den, x, 20.0, 0.01, opts["rtol"], opts["atol"],
                                           opts["h_init"], gains, opts["accept_safety"])
    assert not all(decisions) and sum(decisions) > 5  # both branches are exercised
    rec = Recording(den)
    out = sample("dpm_adaptive", rec, x, torch.tensor([20.0, 0.01], dtype=torch.float64),
                 order=2, controller="pid", pcoeff=gains[0], icoeff=gains[1], dcoeff=gains[2],
                 **opts)
    got = torch.cat(rec.times)
    torch.testing.assert_close(got, torch.tensor(sigmas, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_pid_rows_do_not_depend_on_the_batch(adaptive_problem, order):
    den, x, _ = adaptive_problem
    grid = timesteps.uniform(den.path, 3)
    batch = sample("dpm_adaptive", den, x, grid, order=order, controller="pid")
    for i in (0, 3, 15):
        alone = sample("dpm_adaptive", den, x[i:i + 1], grid, order=order, controller="pid")
        torch.testing.assert_close(alone, batch[i:i + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_pid_meets_its_tolerance_and_converges(adaptive_problem, order):
    den, x, ref = adaptive_problem
    grid = torch.tensor([1.0, 0.1], dtype=torch.float64)
    scale = float(ref.pow(2).mean().sqrt())  # the size of x that rtol is relative to
    errors = []
    for rtol, atol in [(1e-2, 1e-3), (1e-3, 1e-4), (1e-4, 1e-5)]:
        out = sample("dpm_adaptive", den, x, grid, order=order, rtol=rtol, atol=atol,
                     controller="pid")
        errors.append(float((out - ref).pow(2).mean().sqrt()))
        assert errors[-1] < max(atol, rtol * scale), (rtol, errors[-1])
    assert errors[2] < errors[1] / 3 < errors[0] / 9


def test_explicit_dpm_controller_is_the_default(adaptive_problem):
    den, x, _ = adaptive_problem
    grid = torch.tensor([1.0, 0.1], dtype=torch.float64)
    torch.testing.assert_close(sample("dpm_adaptive", den, x, grid, controller="dpm"),
                               sample("dpm_adaptive", den, x, grid), rtol=0, atol=0)


@pytest.mark.parametrize("opts,arg", [
    ({"controller": "pi"}, "controller"),
    ({"controller": "pid", "icoeff": 0.0}, "icoeff"),
    ({"controller": "pid", "icoeff": -0.3}, "icoeff"),
    ({"controller": "pid", "pcoeff": float("nan")}, "pcoeff"),
    ({"controller": "pid", "dcoeff": float("inf")}, "dcoeff"),
    ({"controller": "pid", "pcoeff": -2.0}, r"pcoeff \+ icoeff \+ dcoeff"),
    ({"controller": "pid", "accept_safety": 0.0}, "accept_safety"),
    ({"controller": "pid", "accept_safety": 1.5}, "accept_safety"),
])
def test_bad_pid_options_name_the_argument(opts, arg):
    path = VP.discrete_linear()
    den = smooth_mixture().denoiser(path)
    with pytest.raises(DifflabError, match=arg):
        sample("dpm_adaptive", den, torch.randn(2, 3), timesteps.uniform(path, 4), **opts)


def test_pid_respects_max_evals(adaptive_problem):
    den, x, _ = adaptive_problem
    with pytest.raises(DifflabError, match="max_evals"):
        sample("dpm_adaptive", den, x, timesteps.uniform(den.path, 3), controller="pid",
               rtol=1e-6, atol=1e-8, max_evals=50)
