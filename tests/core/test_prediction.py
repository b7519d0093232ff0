"""``Prediction``: the five parameterizations, their definitions, round trips and error scales.

The expected values are the papers' definitions written out by hand: ``v = alpha eps - sigma x0``
(Salimans & Ho 2022, eq. 6 generalised), ``score = -eps / sigma`` (Tweedie),
``velocity = d_alpha x0 + d_sigma eps`` (flow matching / SiT).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.paths import DiscreteVP, GaussianPath
from difflab.prediction import KINDS, Prediction

pytestmark = pytest.mark.usefixtures("one_thread")
EPS64 = float(np.finfo(np.float64).eps)


def grid_times(path: GaussianPath, n: int = 41) -> torch.Tensor:
    """``n`` times from ``t_min`` to ``t_max`` (log-spaced, ends included; knots and between)."""
    t = torch.logspace(np.log10(path.t_min), np.log10(path.t_max), n, dtype=torch.float64)
    if isinstance(path, DiscreteVP):
        mid = (torch.arange(1, path.N, 37, dtype=torch.float64) + 0.5) / path.N
        t = torch.cat([t, mid])
    t[0], t[n - 1] = path.t_min, path.t_max
    return t


def random_state(path: GaussianPath, t: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (t.numel(), 2, 3)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps, path.add_noise(x0, eps, t)


def coefs(path: GaussianPath, t: torch.Tensor):
    col = lambda c: c.reshape(-1, 1, 1)  # noqa: E731
    return (col(path.alpha(t)), col(path.sigma(t)), col(path.d_alpha(t)), col(path.d_sigma(t)))


def by_hand(kind: str, x0, eps, a, s, da, ds) -> torch.Tensor:
    """Each parameterization from its definition."""
    return {
        "eps": eps,
        "x0": x0,
        "v": a * eps - s * x0,
        "score": -eps / s,
        "velocity": da * x0 + ds * eps,
    }[kind]


def test_as_kind_matches_the_definitions(any_path):
    t = grid_times(any_path)
    x0, eps, xt = random_state(any_path, t)
    pred = Prediction(xt, t, x0, eps, any_path)
    a, s, da, ds = coefs(any_path, t)
    for kind in KINDS:
        torch.testing.assert_close(pred.as_kind(kind), by_hand(kind, x0, eps, a, s, da, ds),
                                   rtol=1e-13, atol=1e-13, msg=lambda m, k=kind: f"{k}: {m}")
    torch.testing.assert_close(pred.score, pred.as_kind("score"))


@pytest.mark.parametrize("kind", KINDS)
def test_from_output_round_trips_to_float64_precision(any_path, kind):
    """``from_output(kind, pred.as_kind(kind))`` gives back ``x0`` and ``eps``.

    Each inverse divides by ``alpha`` or ``sigma`` (or the velocity system's determinant), so
    float64 rounding is amplified by at most ``1 + alpha/sigma + sigma/alpha`` (times the
    velocity's ``|d_alpha| + |d_sigma|`` over its determinant); the tolerance is 64 ulps of that.
    """
    t = grid_times(any_path)
    x0, eps, xt = random_state(any_path, t, seed=1)
    pred = Prediction(xt, t, x0, eps, any_path)
    back = Prediction.from_output(kind, pred.as_kind(kind), xt, t, any_path)
    a, s, da, ds = coefs(any_path, t)
    cond = 1 + a / s + s / a
    if kind == "velocity":
        cond = cond * (1 + (da.abs() + ds.abs()) * (a + s) / (a * ds - s * da).abs())
    scale = 1 + x0.abs() + eps.abs()
    for name, got, want in (("x0", back.x0, x0), ("eps", back.eps, eps)):
        err = (got - want).abs() / (cond * scale)
        assert float(err.max()) < 64 * EPS64, (
            f"{any_path!r} {kind} -> {name}: error {float(err.max()) / EPS64:.1f} ulps (scaled)"
        )
    # the result is a consistent state: x_t = alpha x0 + sigma eps
    torch.testing.assert_close(a * back.x0 + s * back.eps, xt, rtol=1e-12, atol=1e-12)


def test_error_scale_matches_a_finite_perturbation_of_x0(any_path):
    """At fixed ``x_t`` an ``x0`` error ``d`` moves ``eps`` by ``-alpha d / sigma``; the
    ``kind`` output then moves by ``error_scale(kind) * d``.
    """
    t = grid_times(any_path)
    x0, eps, xt = random_state(any_path, t, seed=2)
    a, s, da, ds = coefs(any_path, t)
    d = 1e-3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64)
    x0_p = x0 + d
    eps_p = (xt - a * x0_p) / s  # by hand, not through Prediction.with_x0
    pred = Prediction(xt, t, x0, eps, any_path)
    moved = Prediction(xt, t, x0_p, eps_p, any_path)
    for kind in KINDS:
        c = pred.error_scale(kind).reshape(-1, 1, 1)
        delta = moved.as_kind(kind) - pred.as_kind(kind)
        want = by_hand(kind, x0_p, eps_p, a, s, da, ds) - by_hand(kind, x0, eps, a, s, da, ds)
        torch.testing.assert_close(delta, want, rtol=1e-8, atol=1e-12)
        rel = ((delta - c * d).abs() / (c.abs() * d.abs() + 1e-300)).max()
        # the difference of two O(|kind|) numbers carries ~|kind| ulps of rounding
        noise = (EPS64 * (moved.as_kind(kind).abs() + 1) / (c.abs() * d.abs())).max()
        assert float(rel) < 1e-6 + 64 * float(noise), f"{any_path!r} {kind}: {float(rel):.3g}"


def test_v_inverse_is_general_on_non_vp_paths(make_path):
    """``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)`` where ``alpha^2 + sigma^2 != 1``."""
    for name in ("ve", "edm", "subvp", "linear"):
        p = make_path(name)
        t = grid_times(p)
        x0, eps, xt = random_state(p, t, seed=4)
        a, s, _, _ = coefs(p, t)
        assert float((a * a + s * s - 1).abs().max()) > 0.1  # genuinely not variance-preserving
        v = a * eps - s * x0
        back = Prediction.from_output("v", v, xt, t, p)
        torch.testing.assert_close(back.x0, (a * xt - s * v) / (a * a + s * s), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(back.x0, x0, rtol=1e-9, atol=1e-9)


def test_with_x0_and_with_eps_keep_x_t(any_path):
    t = grid_times(any_path)
    x0, eps, xt = random_state(any_path, t, seed=5)
    pred = Prediction(xt, t, x0, eps, any_path)
    a, s, _, _ = coefs(any_path, t)
    new_x0 = torch.clamp(x0, -0.5, 0.5)
    p2 = pred.with_x0(new_x0)
    assert torch.equal(p2.x0, new_x0) and p2.x_t is xt
    torch.testing.assert_close(p2.eps, (xt - a * new_x0) / s, rtol=1e-14, atol=1e-14)
    new_eps = eps * 0.5
    p3 = pred.with_eps(new_eps)
    assert torch.equal(p3.eps, new_eps)
    torch.testing.assert_close(a * p3.x0 + s * p3.eps, xt, rtol=1e-12, atol=1e-12)


def test_from_output_accepts_scalar_time_and_float32(any_path):
    t = 0.5 * (any_path.t_min + any_path.t_max)
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    xt = any_path.add_noise(x0, eps, t)
    pred = Prediction.from_output("eps", eps, xt, t, any_path)
    assert pred.t.shape == (4,) and pred.x0.dtype == torch.float32
    torch.testing.assert_close(pred.x0, x0, rtol=1e-4, atol=1e-4)
