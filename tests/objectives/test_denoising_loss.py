"""DenoisingLoss against closed forms, the exact mixture denoiser and hand-written losses.

The answers come from outside the code under test: the Gaussian posterior variance
``Var[x0 | x_t] = v sigma^2 / (alpha^2 v + sigma^2)`` (Bayes error of the exact denoiser), the
papers' weightings written out by hand, and the path's four primitives.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from difflab import (
    EDM,
    GVP,
    KINDS,
    VE,
    VP,
    Cond,
    Denoiser,
    DifflabError,
    FnDenoiser,
    Linear,
    Prediction,
    SubVP,
)
from difflab.objectives import DenoisingLoss, dsm_loss, edm_loss, flow_matching_loss
from difflab.testing import GaussianMixture

F64 = torch.float64
WEIGHTINGS = ("uniform", "snr", "min_snr", "edm", "sigma2")
GAMMA, SIGMA_DATA = 5.0, 0.5
MIX = GaussianMixture([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], stds=[0.3, 0.6], weights=[0.3, 0.7])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors run fastest on one thread; OpenMP barriers stall on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def coefs(path, t):
    t = t.double()
    return path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)


def c2_by_hand(target, a, s, da, ds):
    """Squared error scale of each target w.r.t. x0 at fixed x_t, from x_t = a x0 + s eps."""
    return {
        "x0": torch.ones_like(a),
        "eps": a**2 / s**2,  # eps = (x_t - a x0) / s
        "score": a**2 / s**4,  # score = -eps / s
        "v": (a**2 + s**2) ** 2 / s**2,  # v = a eps - s x0
        "velocity": (da - ds * a / s) ** 2,  # u = da x0 + ds eps
    }[target]


def weight_times_c2(weighting, target, a, s, da, ds):
    """E[loss] / Var[x0|x_t]: the weight on the x0-MSE that each paper's weighting amounts to."""
    snr = a**2 / s**2
    sv2 = (s / a) ** 2
    if weighting == "uniform":
        return c2_by_hand(target, a, s, da, ds)
    if weighting == "sigma2":
        return s**2 * c2_by_hand(target, a, s, da, ds)
    return {
        "snr": snr,
        "min_snr": snr.clamp_max(GAMMA),  # Hang et al. 2023, eq. 5
        "edm": (sv2 + SIGMA_DATA**2) / (sv2 * SIGMA_DATA**2),  # Karras et al. 2022, Table 1
    }[weighting]


def memoized(den) -> FnDenoiser:
    """``den`` answering repeated calls at the same ``(x_t, t)`` from a cache (many losses are
    evaluated on the same batch; the denoiser is the expensive part)."""
    last: list = []

    def fn(x, t, cond):
        if last and torch.equal(last[0], x) and torch.equal(last[1], t):
            return replace(last[2], x_t=x, t=t)
        last[:] = [x, t, den(x, t)]
        return last[2]

    return FnDenoiser(fn, den.path)


PATHS = [VP.linear(), VP.discrete_cosine(200), SubVP(), VE(), EDM(), Linear(), GVP()]


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_exact_denoiser_attains_the_closed_form_bayes_error(path):
    # x0 ~ N(m, v I): x0 | x_t is Gaussian with variance V per dim, independent of x_t, so the
    # per-sample loss of the exact denoiser is E[loss] * chi2_D / D, exactly.
    dim, reps, std = 8, 4000, 0.5
    gm = GaussianMixture(torch.full((1, dim), 0.3), std)
    den = memoized(gm.denoiser(path))
    times = path.t_min + torch.tensor([0.05, 0.5, 0.95], dtype=F64) * (path.t_max - path.t_min)
    t = times.repeat_interleave(reps)
    g = gen(0)
    x0 = gm.sample(t.numel(), g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    a, s, da, ds = coefs(path, times)
    post_var = std**2 * s**2 / (a**2 * std**2 + s**2)
    tol = 5 * math.sqrt(2 / (dim * reps))
    for target in KINDS:
        for weighting in WEIGHTINGS:
            loss = DenoisingLoss(target, weighting, gamma=GAMMA, sigma_data=SIGMA_DATA)
            got = loss.loss_at(den, x0, t, eps).reshape(3, reps).mean(1)
            expected = weight_times_c2(weighting, target, a, s, da, ds) * post_var
            rel = got / expected - 1
            assert bool((rel.abs() < tol).all()), f"{target}/{weighting}: rel. error {rel}"


def shifted(path, shift=0.0, scale=1.0) -> FnDenoiser:
    def fn(x, t, cond):
        x0 = MIX.posterior_mean(x, t, path) * scale + shift
        return Prediction.from_x0(x0, x, t, path)

    return FnDenoiser(fn, path)


@pytest.mark.parametrize("path", [VP.linear(), VP.discrete_linear(100), VE(), EDM(), Linear()],
                         ids=repr)
def test_exact_mixture_denoiser_beats_perturbed_denoisers(path):
    # stratified times (16 strata x 500) stand in for E_t; paired differences share x0, eps
    strata, reps = 16, 500
    frac = (torch.arange(strata, dtype=F64) + 0.5) / strata
    t = (path.t_min + frac * (path.t_max - path.t_min)).repeat_interleave(reps)
    g = gen(1)
    x0 = MIX.sample(t.numel(), g)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    exact = memoized(MIX.denoiser(path))
    others = {"shift": memoized(shifted(path, shift=0.3)),
              "scale": memoized(shifted(path, scale=2.0))}
    for target in KINDS:
        for weighting in WEIGHTINGS:
            loss = DenoisingLoss(target, weighting)
            base = loss.loss_at(exact, x0, t, eps)
            for name, den in others.items():
                d = (loss.loss_at(den, x0, t, eps) - base).reshape(strata, reps)
                mean = d.mean()
                se = d.var(1).sum().sqrt() / (strata * math.sqrt(reps))
                assert float(mean) > 4 * float(se), f"{target}/{weighting}/{name}"


def as_network(oracle, kind):
    """The exact denoiser disguised as a network that outputs parameterization ``kind``."""
    return lambda x, t_in, cond: oracle(x, t_in).as_kind(kind)


@pytest.mark.parametrize("path", [VP.linear(), VP.discrete_linear(100), VE(), EDM(), Linear(),
                                  GVP()], ids=repr)
def test_loss_does_not_depend_on_the_network_parameterization(path):
    oracle = MIX.denoiser(path)
    x0 = MIX.sample(256, gen(1))
    for kind in KINDS:
        den = Denoiser(as_network(oracle, kind), path, prediction=kind, time_input=identity)
        for target in KINDS:
            loss = DenoisingLoss(target, "min_snr")
            ref = loss(oracle, x0, generator=gen(2))
            got = loss(den, x0, generator=gen(2))
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=0,
                                       msg=f"network {kind}, target {target}")


def toy_net(x, t_in, cond):
    """A fixed, wrong network (its output means whatever the Denoiser's prediction says)."""
    return 0.3 * x + 0.2 * torch.sin(t_in)[:, None]


def batch(path, n=64, seed=3):
    g = gen(seed)
    x0 = MIX.sample(n, g)
    t = path.t_min + (path.t_max - path.t_min) * torch.rand(n, generator=g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    a, s, _, _ = coefs(path, t)
    return x0, t, eps, a[:, None], s[:, None]


def test_min_snr_on_eps_is_min_snr_over_snr_times_eps_mse():
    path = VP.linear()
    x0, t, eps, a, s = batch(path)
    eps_hat = toy_net(a * x0 + s * eps, t, None)
    snr = (a / s) ** 2
    by_hand = (snr.clamp_max(GAMMA) / snr)[:, 0] * ((eps_hat - eps) ** 2).mean(1)
    den = Denoiser(toy_net, path, "eps", time_input=identity)
    got = DenoisingLoss("eps", "min_snr", gamma=GAMMA).loss_at(den, x0, t, eps)
    assert 0 < int((snr[:, 0] > GAMMA).sum()) < t.numel()  # both branches of the min are used
    torch.testing.assert_close(got, by_hand, rtol=1e-12, atol=0)


def test_min_snr_on_v_is_hang_et_al_v_variant():
    path = VP.cosine()
    x0, t, eps, a, s = batch(path)
    x_t = a * x0 + s * eps
    eps_hat = toy_net(x_t, t, None)
    x0_hat = (x_t - s * eps_hat) / a
    v_err = (a * eps_hat - s * x0_hat) - (a * eps - s * x0)
    snr = (a / s) ** 2
    by_hand = (snr.clamp_max(GAMMA) / (snr + 1))[:, 0] * (v_err**2).mean(1)
    den = Denoiser(toy_net, path, "eps", time_input=identity)
    got = DenoisingLoss("v", "min_snr", gamma=GAMMA).loss_at(den, x0, t, eps)
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=0)


def test_edm_loss_is_lambda_sigma_times_x0_mse_with_lognormal_times():
    path = EDM()
    x0 = MIX.sample(64, gen(4))
    g = gen(5)  # the documented draw order: times first, then the noise
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(64, generator=g, dtype=F64)).clamp(0.002, 80.0)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    x_t = x0 + sigma[:, None] * eps
    x0_hat = x_t - sigma[:, None] * toy_net(x_t, sigma, None)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    by_hand = lam * ((x0_hat - x0) ** 2).mean(1)
    den = Denoiser(toy_net, path, "eps", time_input=identity)
    got = edm_loss()(den, x0, generator=gen(5))
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=0)


def test_flow_matching_on_the_linear_path_regresses_eps_minus_x0():
    path = Linear()
    x0 = MIX.sample(64, gen(6))
    g = gen(7)
    t = path.t_min + (path.t_max - path.t_min) * torch.rand(64, generator=g, dtype=F64)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    by_hand = ((toy_net(x_t, t, None) - (eps - x0)) ** 2).mean(1)  # Liu et al. 2023, eq. 1
    den = Denoiser(toy_net, path, "velocity", time_input=identity)
    got = flow_matching_loss()(den, x0, generator=gen(7))
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=0)


@pytest.mark.parametrize("path", [VE(), VP.linear(), VP.discrete_linear(50)], ids=repr)
def test_dsm_and_snr_weightings_reduce_to_l_simple(path):
    # sigma^2 |s_hat + eps/sigma|^2 = |eps_hat - eps|^2 (Song & Ermon 2019) and
    # SNR * |x0_hat - x0|^2 = |eps_hat - eps|^2 (Kingma et al. 2021)
    den = Denoiser(toy_net, path, "x0", time_input=identity)
    x0 = MIX.sample(128, gen(8))
    simple = DenoisingLoss("eps")(den, x0, generator=gen(9))
    assert float(simple.min()) > 0
    for loss in (dsm_loss(), DenoisingLoss("x0", "snr"), DenoisingLoss("v", "snr")):
        torch.testing.assert_close(loss(den, x0, generator=gen(9)), simple, rtol=1e-9, atol=0)


def test_reduce_sum_is_dim_times_mean():
    path = VP.linear()
    den = Denoiser(toy_net, path, "eps", time_input=identity)
    x0 = MIX.sample(16, gen(10))
    mean = DenoisingLoss("v", "edm")(den, x0, generator=gen(11))
    total = DenoisingLoss("v", "edm", reduce="sum")(den, x0, generator=gen(11))
    torch.testing.assert_close(total, 3 * mean, rtol=1e-12, atol=0)


def test_condition_is_bound_to_the_denoiser():
    path = VP.linear()
    den = MIX.denoiser(path)
    x0, labels = MIX.sample(64, gen(12), return_labels=True)
    cond = Cond(labels=labels)
    loss = DenoisingLoss("eps")
    with_cond = loss(den, x0, cond, gen(13))
    torch.testing.assert_close(with_cond, loss(den.bind(cond), x0, None, gen(13)), rtol=0, atol=0)
    # knowing the component can only help: lower average Bayes error
    assert float(with_cond.mean()) < float(loss(den, x0, None, gen(13)).mean())


class ConvNet(nn.Module):
    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, x, t_in, cond):
        t_map = t_in.to(x.dtype)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return self.conv(torch.cat([x, t_map], 1))


@pytest.mark.parametrize("make", [
    lambda: DenoisingLoss(), lambda: DenoisingLoss("x0", "min_snr"), lambda: dsm_loss(),
    lambda: DenoisingLoss("v", "edm", time_sampler="lognormal"), lambda: flow_matching_loss(),
    lambda: edm_loss(),
], ids=["simple", "x0_min_snr", "dsm", "v_edm", "flow", "edm"])
def test_losses_are_per_sample_positive_and_train_the_network(make):
    torch.manual_seed(0)
    net = ConvNet()
    path = VP.discrete_linear(100)
    den = Denoiser(net, path, "eps")
    x0 = torch.rand(5, 2, 4, 4, generator=gen(14)) * 2 - 1  # float32 images
    loss = make()(den, x0, generator=gen(15))
    assert loss.shape == (5,) and loss.dtype == torch.float32
    assert bool((loss > 0).all()) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


def test_bad_inputs_fail_with_clear_messages():
    path = VP.linear()
    den = Denoiser(toy_net, path)
    x0 = MIX.sample(4, gen(0))
    with pytest.raises(DifflabError, match="target='noise'.*'eps', 'x0', 'v', 'score'"):
        DenoisingLoss(target="noise")
    with pytest.raises(DifflabError, match="weighting='p2'.*'uniform', 'snr', 'min_snr'"):
        DenoisingLoss(weighting="p2")
    with pytest.raises(DifflabError, match="time_sampler='beta'.*'discrete', 'uniform'"):
        DenoisingLoss(time_sampler="beta")
    with pytest.raises(DifflabError, match="reduce='max'"):
        DenoisingLoss(reduce="max")
    with pytest.raises(DifflabError, match="gamma"):
        DenoisingLoss(weighting="min_snr", gamma=-1.0)
    with pytest.raises(DifflabError, match="dtype torch.int64.*floating-point"):
        DenoisingLoss()(den, torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(DifflabError, match="DenoiserBase"):
        DenoisingLoss()(toy_net, x0)
    with pytest.raises(DifflabError, match="continuous path"):
        DenoisingLoss(time_sampler="discrete")(den, x0)
