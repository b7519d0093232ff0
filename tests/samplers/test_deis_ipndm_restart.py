"""iPNDM, DEIS and Restart sampling against answers known independently of them.

Their convergence orders (from the prior and from inside the trajectory), the evaluation counts
of ``ipndm``, ``ipndm_v`` and ``deis`` and their runs on every path and parameterization are in
``test_solver_orders.py``; the generic contract (shapes, dtypes, hooks, noise) in
``tests/core/test_sampler_contract.py``. Here: the identities that pin the coefficients (fixed
weights written out by hand, DDIM, tAB = rhoAB where ``t = rho``, the tAB integrals by scipy's
adaptive quadrature of the defining integral), and Restart's distribution, noise, evaluation
count and options.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from difflab.errors import DifflabError
from difflab.paths import EDM, VP
from difflab.samplers import GeneratorNoise, Hooks, PerSampleNoise, sample, timesteps
from difflab.samplers.deis import tab_coefficients
from difflab.testing import CountingDenoiser, GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")

MIX3 = GaussianMixture(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64), [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])


def start(path, n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * path.prior_std


def rho_uniform_grid(path, steps: int, rho_end: float) -> torch.Tensor:
    """Times whose ``rho = sigma / alpha`` is uniform from the path's largest to ``rho_end``."""
    rho = torch.linspace(float(path.sigma_ve(path.t_max)), rho_end, steps + 1,
                         dtype=torch.float64)
    grid = path.t_from_sigma_ve(rho)
    grid[0] = path.t_max
    return grid



# ----- iPNDM ----------------------------------------------------------------------------------
FIXED = [(1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12),
         (55 / 24, -59 / 24, 37 / 24, -9 / 24)]  # Adams-Bashforth, newest first


def ipndm_by_hand(den, x, grid):
    """iPNDM written out as k-diffusion's ``sample_ipndm`` does it, in EDM's ``x~ = x / alpha``
    and ``sigma~ = rho``: ``x~ += (rho_next - rho) sum_j w_j d_j`` with ``d = (x~ - D) / rho``
    (= eps). The grid ends at a positive time."""
    path, ds = den.path, []
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        rho_t, rho_s, a_t = float(path.sigma_ve(t)), float(path.sigma_ve(s)), float(path.alpha(t))
        x0 = den(x, t).x0
        d = (x / a_t - x0) / rho_t
        ds = [d, *ds][:4]
        w = FIXED[len(ds) - 1]
        x = float(path.alpha(s)) * (x / a_t + (rho_s - rho_t) * sum(c * e for c, e in zip(w, ds)))
    return x


@pytest.mark.parametrize("path", [VP.discrete_linear(), EDM()], ids=["vp", "edm"])
def test_ipndm_is_the_fixed_weight_method_written_out(path):
    grid = timesteps.karras(path, 9, to_zero=False)  # non-uniform in rho: the weights matter
    x = start(path)
    den = MIX3.denoiser(path)
    torch.testing.assert_close(sample("ipndm", den, x, grid), ipndm_by_hand(den, x, grid),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", [VP.linear(), EDM()], ids=["vp", "edm"])
def test_ipndm_equals_ipndm_v_on_a_grid_uniform_in_rho_and_only_there(path):
    den, x = MIX3.denoiser(path), start(path)
    uniform = rho_uniform_grid(path, 12, 0.5)
    diff = float((sample("ipndm", den, x, uniform) - sample("ipndm_v", den, x, uniform))
                 .abs().max())
    assert diff < 1e-10
    geometric = timesteps.log_snr(path, 12, to_zero=False)
    diff = float((sample("ipndm", den, x, geometric) - sample("ipndm_v", den, x, geometric))
                 .abs().max())
    assert diff > 1e-4


# ----- DEIS -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_discrete_linear", "vp_cosine", "edm", "linear"])
@pytest.mark.parametrize("to_zero", [False, True])
def test_deis_order_1_is_ddim(make_path, path_name, to_zero):
    path = make_path(path_name)
    den, x = MIX3.denoiser(path), start(path)
    grid = timesteps.karras(path, 11, to_zero=to_zero)
    for mode in ("tab", "rhoab"):
        torch.testing.assert_close(sample("deis", den, x, grid, order=1, mode=mode),
                                   sample("ddim", den, x, grid), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_tab_is_rhoab_where_time_is_rho(order):
    """On EDM's path ``t = sigma = rho``: the polynomial in ``t`` is the polynomial in ``rho``,
    so the Gauss-Legendre tAB weights must reproduce the exact Adams-Bashforth ones."""
    path = EDM()
    den, x = MIX3.denoiser(path), start(path)
    grid = timesteps.karras(path, 10)
    torch.testing.assert_close(sample("deis", den, x, grid, order=order),
                               sample("deis", den, x, grid, order=order, mode="rhoab"),
                               rtol=1e-11, atol=1e-11)
    vp = VP.linear()  # where t is not rho the two differ
    den, x = MIX3.denoiser(vp), start(vp)
    grid = timesteps.log_snr(vp, 10)
    diff = sample("deis", den, x, grid, order=order) - sample("deis", den, x, grid, order=order,
                                                              mode="rhoab")
    assert float(diff.abs().max()) > 1e-5


def lagrange(ts, j):
    others = [t for i, t in enumerate(ts) if i != j]
    return lambda tau: math.prod((tau - o) / (ts[j] - o) for o in others)


def weighted(f, g):
    return lambda u: f(u) * g(u)


@pytest.mark.parametrize("path", [VP.linear(), VP.cosine(), VP.discrete_linear()],
                         ids=["vp_linear", "vp_cosine", "vp_discrete"])
@pytest.mark.parametrize("ts,t_next", [([0.6, 0.7], 0.5), ([0.35, 0.5, 0.62], 0.2),
                                       ([0.9, 0.93, 0.99], 0.8)])
def test_tab_coefficients_are_deis_eq_15_by_adaptive_quadrature(path, ts, t_next):
    """``C_j = int_(t_i)^(t_next) L_j(tau) rho'(tau) d tau`` straight from its definition:
    scipy's adaptive quadrature, ``rho' = (sigma' alpha - sigma alpha') / alpha^2`` from the
    path's derivatives (not used by the sampler, which integrates by parts). On the discrete
    path ``rho'`` jumps at every knot: scipy is told where, while the sampler's Gauss-Legendre
    rule on the continuous ``L_j' rho`` is accurate to ~1e-7 there."""
    rho = lambda t: float(path.sigma_ve(torch.tensor(t, dtype=torch.float64)))  # noqa: E731

    def d_rho(tau):
        t = torch.tensor(tau, dtype=torch.float64)
        a, s = float(path.alpha(t)), float(path.sigma(t))
        return (float(path.d_sigma(t)) * a - s * float(path.d_alpha(t))) / (a * a)

    edges = [t_next, ts[0]]
    if hasattr(path, "N"):  # the knots k / N inside the step
        edges[1:1] = [k / path.N for k in range(math.ceil(t_next * path.N),
                                                math.floor(ts[0] * path.N) + 1)]
    ours = tab_coefficients(path, ts, t_next, rho(ts[0]), rho(t_next))
    for j, c in enumerate(ours):
        integrand = weighted(lagrange(ts, j), d_rho)
        exact = sum(integrate.quad(integrand, a, b, epsabs=0, epsrel=1e-13)[0]
                    for a, b in zip(edges, edges[1:]) if b > a)
        tol = 1e-6 if len(edges) > 2 else 1e-10  # measured 2e-7 across kinks, 1e-15 without
        assert -c == pytest.approx(exact, rel=tol), (j, ours)


# ----- Restart --------------------------------------------------------------------------------
RESTART = dict(restart_sigma_min=0.5, restart_sigma_max=1.2, restart_k=3, restart_steps=4)


@pytest.mark.parametrize("path_name", ["vp_linear", "edm", "linear"])
def test_restart_without_restarts_is_heun(make_path, path_name):
    path = make_path(path_name)
    den, x = MIX3.denoiser(path), start(path)
    grid = timesteps.karras(path, 12)
    heun = sample("heun", den, x, grid)
    assert torch.equal(sample("restart", den, x, grid, noise=3, **{**RESTART, "restart_k": 0}),
                       heun)
    assert torch.equal(sample("restart", den, x, grid, noise=3), heun)  # no interval
    assert not torch.equal(sample("restart", den, x, grid, noise=3, **RESTART), heun)


def mixture_cdf(mix: GaussianMixture):
    w, m, s = mix.weights.numpy(), mix.means[:, 0].numpy(), mix.vars[:, 0].sqrt().numpy()
    return lambda x: (w * stats.norm.cdf((np.asarray(x)[:, None] - m) / s)).sum(1)


def test_restart_samples_the_mixture(mixture1d):
    """40 000 samples through Restart on VP (alpha != 1, so the forward jump's conversion
    between ``x`` and ``x / alpha`` matters), three restarts over EDM sigma [0.5, 1.2].

    * The Kolmogorov-Smirnov distance to the exact mixture CDF is below 1.95 / sqrt(n) (the
      0.1% critical value for an exact sampler, 0.0098). Measured 0.0038: the discretisation
      bias of 40 + 3 x 4 Heun steps takes little of it, while a jump with the noise added to
      ``x`` instead of ``x / alpha`` (0.018), one of variance ``rho_max^2`` instead of
      ``rho_max^2 - rho_min^2`` (0.015) or 0.8 times the right scale (0.035) fail.
    * Mean and variance within 4 standard errors of the exact ones (the variance's from the
      mixture's exact fourth central moment).
    """
    path, n = VP.linear(), 40_000
    den = mixture1d.denoiser(path)
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = timesteps.karras(path, 40)
    out = sample("restart", den, x * path.prior_std, grid, noise=GeneratorNoise(
        torch.Generator().manual_seed(1)), restart_sigma_min=0.5, restart_sigma_max=1.2,
        restart_k=4, restart_steps=8)[:, 0].numpy()
    ks = stats.kstest(out, mixture_cdf(mixture1d)).statistic
    assert ks < 1.95 / math.sqrt(n), ks
    w, m, v = (a.numpy().ravel() for a in (mixture1d.weights, mixture1d.means, mixture1d.vars))
    mean = float(np.dot(w, m))
    var = float(np.dot(w, v + (m - mean) ** 2))
    d = m - mean  # E (X - mean)^4 for X ~ N(m, v): d^4 + 6 d^2 v + 3 v^2
    mu4 = float(np.dot(w, d**4 + 6 * d**2 * v + 3 * v**2))
    assert abs(out.mean() - mean) < 4 * math.sqrt(var / n), (out.mean(), mean)
    assert abs(out.var() - var) < 4 * math.sqrt((mu4 - var**2) / n), (out.var(), var)


def test_restart_noise_is_reproducible_and_per_sample():
    path = VP.linear()
    den = MIX3.denoiser(path)
    grid = timesteps.karras(path, 10)

    def run(noise, rows=slice(None)):
        return sample("restart", den, start(path, 6)[rows], grid, noise=noise, **RESTART)

    a = run(torch.Generator().manual_seed(4))
    assert torch.equal(a, run(torch.Generator().manual_seed(4)))
    assert torch.equal(a, run(4))  # an int seed is the same generator
    assert float((a - run(torch.Generator().manual_seed(5))).abs().min()) > 0
    rows = run(PerSampleNoise(range(6)))
    assert torch.equal(run(PerSampleNoise([2, 3]), slice(2, 4)), rows[2:4])


@pytest.mark.parametrize("to_zero", [True, False])
@pytest.mark.parametrize("k,steps", [(0, 4), (1, 1), (3, 4)])
def test_restart_evaluation_count(to_zero, k, steps):
    """Heun's ``2 N - z`` (z = 1 when the last of the ``N`` steps goes to 0, a single Euler
    evaluation) plus two evaluations for each of the ``k * steps`` restart steps."""
    path = EDM()
    counted = CountingDenoiser(MIX3.denoiser(path))
    grid = timesteps.karras(path, 9, to_zero=to_zero)
    out = sample("restart", counted, start(path), grid, noise=0,
                 **{**RESTART, "restart_k": k, "restart_steps": steps})
    assert counted.calls == 2 * 9 - int(to_zero) + 2 * k * steps
    assert bool(torch.isfinite(out).all())


def test_restart_reports_the_main_steps_only():
    path = VP.linear()
    grid = timesteps.karras(path, 8)
    seen = []
    sample("restart", MIX3.denoiser(path), start(path), grid, noise=0,
           hooks=Hooks(callback=seen.append), **RESTART)
    assert [s.index for s in seen] == list(range(8))
    assert [s.t for s in seen] == grid[:-1].tolist()


# ----- all three: grids ending at 0, options -------------------------------------------------
@pytest.mark.parametrize("path_name", ["vp_discrete_linear", "vp_cosine", "ve", "edm", "linear",
                                       "gvp"])
def test_grids_ending_at_zero_stay_finite(make_path, path_name):
    path = make_path(path_name)
    den, x = MIX3.denoiser(path), start(path)
    for grid in (timesteps.karras(path, 7), timesteps.uniform(path, 7),
                 timesteps.log_snr(path, 7)):
        assert float(grid[-1]) == 0.0
        for name, opts in [("ipndm", {}), ("ipndm_v", {}), ("deis", {}), ("deis", {"order": 2}),
                           ("deis", {"mode": "rhoab"}), ("restart", {"restart_k": 2})]:
            if name == "restart":  # an interval inside every grid: between its last two levels
                sig = path.sigma_ve(grid[-3:-1]).tolist()
                opts = {**opts, "restart_sigma_min": sig[1], "restart_sigma_max": sig[0],
                        "noise": 0}
            out = sample(name, den, x, grid, **opts)
            assert bool(torch.isfinite(out).all()), (name, opts, path_name)


BAD = [
    ("deis", {"order": 0}, "order"),
    ("deis", {"order": 4}, "order"),
    ("deis", {"order": 2.0}, "order"),
    ("deis", {"mode": "logrho"}, "mode"),
    ("restart", {**RESTART, "restart_sigma_min": 1.2}, "restart_sigma_min"),  # t_min = t_max
    ("restart", {**RESTART, "restart_sigma_min": 2.0}, "restart_sigma_min"),  # t_min > t_max
    ("restart", {**RESTART, "restart_sigma_max": 200.0}, "restart_sigma_max"),  # above the grid
    ("restart", {**RESTART, "restart_sigma_min": 1e-3}, "restart_sigma_min"),  # below it
    ("restart", {**RESTART, "restart_k": -1}, "restart_k"),
    ("restart", {**RESTART, "restart_steps": 0}, "restart_steps"),
    ("restart", {"restart_sigma_min": 0.5}, "restart_sigma_max"),
    ("restart", {"restart_sigma_max": 1.2}, "restart_sigma_min"),
    # the grid level nearest 0.8 is 0.885: no room below restart_sigma_max = 0.85
    ("restart", {"restart_sigma_min": 0.8, "restart_sigma_max": 0.85}, "restart_sigma_max"),
]


@pytest.mark.parametrize("name,opts,option", BAD, ids=[f"{n}-{o}" for n, _, o in BAD])
def test_bad_options_are_named(name, opts, option):
    path = VP.linear()  # karras(12): noise levels 0.001 .. 152 at the positive times
    grid = timesteps.karras(path, 12)
    with pytest.raises(DifflabError, match=option):
        sample(name, MIX3.denoiser(path), start(path), grid, **opts)


def test_short_grids_warn_once_and_still_run():
    path = VP.linear()
    den, x = MIX3.denoiser(path), start(path)
    for name in ("ipndm", "ipndm_v", "deis"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sample(name, den, x, timesteps.log_snr(path, 3))  # 2 solver steps
        assert [str(w.message).split(" was")[0] for w in caught] == [name]
        assert bool(torch.isfinite(out).all())
