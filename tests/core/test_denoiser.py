"""``Denoiser``: a network in any parameterization, its time signal, EDM preconditioning,
learned variances and bound conditioning, all checked against the exact oracle or by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.cond import Cond
from difflab.denoiser import Denoiser, EDMPrecond
from difflab.prediction import KINDS, Prediction

pytestmark = pytest.mark.usefixtures("one_thread")


def noisy_batch(mixture, path, n: int = 12, seed: int = 0):
    """Mixture samples noised at times spread over the path's whole range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.exp(torch.linspace(math.log(path.t_min), math.log(path.t_max), n,
                                 dtype=torch.float64))
    x0 = mixture.sample(n, generator=g)
    return path.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t), t


@pytest.mark.parametrize("kind", KINDS)
def test_every_parameterization_gives_the_oracle(any_path, mixture4d, oracle_denoiser, kind):
    """A network trained to output ``kind`` exactly is the exact denoiser, whatever ``kind``."""
    x, t = noisy_batch(mixture4d, any_path)
    pred = oracle_denoiser(mixture4d, any_path, kind)(x, t)
    want = mixture4d.posterior_mean(x, t, any_path)
    a = any_path.alpha(t)[:, None]
    s = any_path.sigma(t)[:, None]
    # x0 comes back through 1/alpha or 1/sigma: allow the matching amplification of rounding
    tol = 1e-12 * (1 + a / s + s / a) * (1 + x.abs())
    assert bool(((pred.x0 - want).abs() <= tol).all()), f"{kind}: {(pred.x0 - want).abs().max()}"
    assert pred.x0.dtype == torch.float64 and pred.var_frac is None


def test_default_time_signals(make_path):
    """Fractional step index on discrete paths, ``1000 t`` on continuous VP and sub-VP,
    ``log(sigma) / 4`` on VE and EDM (EDM Table 1's ``c_noise``)."""
    seen = {}

    def net(x, t_in, cond):
        seen["t"] = t_in
        return torch.zeros_like(x)

    x = torch.zeros(3, 2, dtype=torch.float64)
    p = make_path("vp_discrete_linear")
    Denoiser(net, p)(x, torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(seen["t"], torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))
    for name in ("vp_linear", "vp_cosine", "subvp"):
        p = make_path(name)
        t = torch.tensor([p.t_min, 0.25, 0.5], dtype=torch.float64)
        Denoiser(net, p)(x, t)
        torch.testing.assert_close(seen["t"], 1000 * t)
    for name, sigma in (("ve", lambda t: 0.01 * 5000.0**t), ("edm", lambda t: t)):
        p = make_path(name)
        t = torch.tensor([p.t_min, 0.3, 0.9], dtype=torch.float64)
        Denoiser(net, p)(x, t)
        torch.testing.assert_close(seen["t"], torch.log(sigma(t)) / 4, rtol=1e-12, atol=1e-12)
    # a custom time_input wins, and the signal is cast to the data's dtype
    p = make_path("vp_linear")
    Denoiser(net, p, time_input=lambda t: 2 * t)(x.float(), 0.25)
    assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], torch.full((3,), 0.5))


@pytest.mark.parametrize("path_name", ["edm", "vp_linear", "ve"])
def test_edm_preconditioning_by_hand(make_path, path_name):
    """EDM Table 1 / eq. 7 with ``sigma~ = sigma / alpha`` and input ``x / alpha`` (Sec. 4)."""
    path = make_path(path_name)
    sd = 0.5
    w = torch.tensor([[0.3, -0.2], [0.1, 0.7]], dtype=torch.float64)
    seen = {}

    def net(x_in, c_noise, cond):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return x_in @ w + c_noise[:, None]

    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(path.t_min, path.t_max, 5, dtype=torch.float64)
    pred = Denoiser(net, path, precond=EDMPrecond(sigma_data=sd))(x, t)
    a = path.alpha(t)[:, None]
    sv = (path.sigma(t) / path.alpha(t))[:, None]
    c_skip = sd**2 / (sv**2 + sd**2)
    c_out = sv * sd / torch.sqrt(sv**2 + sd**2)
    c_in = 1 / torch.sqrt(sv**2 + sd**2)
    c_noise = torch.log(sv[:, 0]) / 4
    torch.testing.assert_close(seen["x_in"], c_in * x / a, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(seen["c_noise"], c_noise, rtol=1e-13, atol=1e-13)
    want = c_skip * x / a + c_out * ((c_in * x / a) @ w + c_noise[:, None])
    torch.testing.assert_close(pred.x0, want, rtol=1e-12, atol=1e-12)


def test_edm_preconditioned_oracle_is_exact(make_path, mixture4d):
    """A network outputting ``F = (D - c_skip x~) / c_out`` for the exact ``D`` is exact."""
    path = make_path("vp_cosine")
    pre = EDMPrecond()

    def net(x_in, c_noise, cond):
        sv = torch.exp(4 * c_noise)[:, None]
        sd2 = pre.sigma_data**2
        x_scaled = x_in * torch.sqrt(sv**2 + sd2)  # undo c_in: this is x / alpha
        t = path.t_from_sigma_ve(sv[:, 0])
        d = mixture4d.posterior_mean(x_scaled * path.alpha(t)[:, None], t, path)
        c_skip, c_out = sd2 / (sv**2 + sd2), sv * pre.sigma_data / torch.sqrt(sv**2 + sd2)
        return (d - c_skip * x_scaled) / c_out

    x, t = noisy_batch(mixture4d, path, seed=2)
    pred = Denoiser(net, path, precond=pre)(x, t)
    torch.testing.assert_close(pred.x0, mixture4d.posterior_mean(x, t, path), rtol=1e-7,
                               atol=1e-7)


def test_learned_variance_is_iddpm_eq15(make_path, mixture4d, oracle_denoiser):
    """``log var = f log beta + (1 - f) log beta_tilde`` for the step actually taken."""
    p = make_path("vp_discrete_linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x, _ = noisy_batch(mixture4d, p, n=3)
    for f in (0.0, 0.3, 1.0):
        den = oracle_denoiser(mixture4d, p, "eps", var_frac=f)
        n = np.array([11, 400, 999])
        t = p.step_time(torch.from_numpy(n))
        pred = den(x, t)
        assert torch.equal(pred.var_frac, torch.full_like(x, f))
        torch.testing.assert_close(pred.x0, mixture4d.posterior_mean(x, t, p), rtol=1e-10,
                                   atol=1e-10)
        # one DDPM step n -> n-1
        beta_tilde = (1 - abar[n - 1]) / (1 - abar[n]) * betas[n]
        want = f * np.log(betas[n]) + (1 - f) * np.log(beta_tilde)
        got = pred.reverse_log_var(p.step_time(torch.from_numpy(n - 1)))
        np.testing.assert_allclose(got.numpy(), np.repeat(want[:, None], 4, 1), rtol=1e-9)
        # a respaced step n -> n-10 uses that step's beta = 1 - abar_n / abar_{n-10}
        m = n - 10
        got = pred.reverse_log_var(p.step_time(torch.from_numpy(m)))
        beta = 1 - abar[n] / abar[m]
        beta_tilde = (1 - abar[m]) / (1 - abar[n]) * beta
        want = f * np.log(beta) + (1 - f) * np.log(beta_tilde)
        np.testing.assert_allclose(got[:, 0].numpy(), want, rtol=1e-9)


def test_bind_passes_cond_and_leaves_the_original_unbound(make_path, mixture4d):
    path = make_path("vp_linear")
    seen = []

    def net(x, t, cond):
        seen.append(cond)
        return torch.zeros_like(x)

    den = Denoiser(net, path)
    cond = Cond(labels=torch.tensor([1, 2]))
    den.bind(cond)(torch.zeros(2, 3), 0.5)
    den(torch.zeros(2, 3), 0.5)
    assert seen[0] is cond and seen[1] is None
    # the oracle bound to a label is that component's posterior mean
    x, t = noisy_batch(mixture4d, path, n=4, seed=3)
    oracle = mixture4d.denoiser(path)
    labels = torch.tensor([0, 1, 2, 1])
    got = oracle.bind(Cond(labels=labels))(x, t).x0
    for k in range(3):
        a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
        m, v = mixture4d.means[k], mixture4d.vars[k]
        want = m + a * v / (a * a * v + s * s) * (x - a * m)  # Gaussian posterior mean
        torch.testing.assert_close(got[labels == k], want[labels == k], rtol=1e-12, atol=1e-12)
    # label K is the null class: the unconditional posterior mean
    null = oracle.bind(Cond(labels=torch.tensor([3])))(x, t).x0
    torch.testing.assert_close(null, mixture4d.posterior_mean(x, t, path), rtol=0, atol=0)


def test_check_finite_can_be_turned_off(make_path):
    path = make_path("vp_linear")
    nan_net = lambda x, t, c: torch.full_like(x, float("nan"))  # noqa: E731
    pred = Denoiser(nan_net, path, check_finite=False)(torch.zeros(2, 3), 0.5)
    assert bool(torch.isnan(pred.x0).all())


def test_denoiser_returns_a_prediction_matching_the_input(any_path, mixture4d, oracle_denoiser):
    x, t = noisy_batch(mixture4d, any_path, n=3)
    pred = oracle_denoiser(mixture4d, any_path, "v")(x.float(), t)
    assert isinstance(pred, Prediction) and pred.x_t.dtype == torch.float32
    assert pred.x0.shape == x.shape and pred.t.shape == (3,)
    a, s = any_path.alpha(t)[:, None].float(), any_path.sigma(t)[:, None].float()
    torch.testing.assert_close(a * pred.x0 + s * pred.eps, x.float(), rtol=1e-4, atol=1e-4)


def test_cond_index_and_to_reach_the_per_sample_extras():
    """``Cond.extra`` holds per-sample tensors and lists (captions, text embeddings): indexing
    slices them with the other fields, ``to`` moves only tensors, ``cat`` joins them."""
    emb = torch.arange(12.0).reshape(6, 2)
    c = Cond(labels=torch.arange(6), extra={"text_emb": emb, "captions": list("abcdef"),
                                            "note": "kept"})
    part = c[2:5]
    assert torch.equal(part.labels, torch.tensor([2, 3, 4]))
    assert torch.equal(part.extra["text_emb"], emb[2:5])
    assert part.extra["captions"] == ["c", "d", "e"] and part.extra["note"] == "kept"
    picked = c[torch.tensor([5, 0])]
    assert picked.extra["captions"] == ["f", "a"]
    assert torch.equal(picked.extra["text_emb"], emb[[5, 0]])
    moved = c.to(torch.float64)
    assert moved.extra["text_emb"].dtype == torch.float64 and moved.extra["captions"] == c.extra[
        "captions"]
    back = Cond.cat([c[:2], c[2:]])
    assert torch.equal(back.extra["text_emb"], emb) and back.extra["captions"] == list("abcdef")
