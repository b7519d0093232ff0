"""Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"): betas rescaled so that the last step is pure noise (``alpha_T = 0``), v-prediction,
trailing timesteps. Every sampler must step from ``t = T`` without a NaN (peers' schedulers
divide by ``alpha_T`` or by an infinite log-SNR step there), and DDIM must match diffusers'
DDIMScheduler with ``rescale_betas_zero_snr=True``."""

from __future__ import annotations

import pytest
import torch

from difflab.config import load_config
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.objectives import DenoisingLoss
from difflab.paths import VP
from difflab.prediction import Prediction
from difflab.samplers import SAMPLERS, PerSampleNoise, sample, timesteps
from difflab.testing.mixture import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")

PATH = VP.discrete_scaled_linear(zero_snr=True)
MIX = GaussianMixture(torch.tensor([[-1.0, 0.5], [0.8, -0.2]], dtype=torch.float64),
                      [0.3, 0.7], [0.2, 0.3])
PLAIN = [s.name for s in sorted(SAMPLERS.values(), key=lambda s: s.name)
         if not s.needs_learned_variance and not s.needs_extra]


def v_oracle(path=PATH, mix=MIX):
    """The exact posterior of the mixture as a v-prediction network."""

    def net(x, t, cond):
        return Prediction.from_x0(mix.posterior_mean(x, t, path), x, t, path).as_kind("v")

    return Denoiser(net, path, prediction="v", time_input=lambda t: t)


def test_rescaled_betas_are_lin_et_als_algorithm_1():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    base = VP.discrete_scaled_linear()
    ours = PATH.betas
    ref = rescale_zero_terminal_snr(base.betas.clone()).double()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    # the closed form: sqrt(alpha_bar) shifted to end at 0 and scaled to keep its first value
    root = base.alphas_cumprod.sqrt()
    expect = (root - root[-1]) * root[0] / (root[0] - root[-1])
    torch.testing.assert_close(PATH.alphas_cumprod.sqrt(), expect, rtol=1e-12, atol=1e-15)
    assert float(PATH.alphas_cumprod[-1]) == 0.0 and float(PATH.betas[-1]) == 1.0
    assert float(PATH.alpha(1.0)) == 0.0 and float(PATH.sigma(1.0)) == 1.0


def test_the_path_stays_finite_and_consistent_up_to_alpha_zero():
    t = torch.linspace(PATH.t_min, 1.0, 4001, dtype=torch.float64)
    for fn in (PATH.alpha, PATH.sigma, PATH.d_alpha, PATH.d_sigma):
        assert bool(torch.isfinite(fn(t)).all()), fn.__name__
    assert bool(torch.isfinite(PATH.log_snr(t[:-1])).all())
    assert float(PATH.log_snr(1.0)) == float("-inf")
    # alpha^2 + sigma^2 = 1 and the derivatives are the derivatives (central differences, inside
    # an ordinary segment and inside the last one, where alpha is linear)
    torch.testing.assert_close(PATH.alpha(t) ** 2 + PATH.sigma(t) ** 2, torch.ones_like(t))
    h = 1e-7
    for tc in (0.4567, 0.9993, 0.99999):
        tt = torch.tensor([tc], dtype=torch.float64)
        for f, df in ((PATH.alpha, PATH.d_alpha), (PATH.sigma, PATH.d_sigma)):
            num = (f(tt + h) - f(tt - h)) / (2 * h)
            torch.testing.assert_close(df(tt), num, rtol=1e-5, atol=1e-6)
    # the inverses round-trip, the zero-SNR end included
    torch.testing.assert_close(PATH.t_from_log_alpha(PATH.log_alpha(t)), t, rtol=0, atol=1e-12)
    inner = t[:-1]
    torch.testing.assert_close(PATH.t_from_log_snr(PATH.log_snr(inner)), inner, rtol=0,
                               atol=1e-9)
    # the steps before the last are the rescaled chain's own knots
    n = torch.arange(PATH.N - 1)
    torch.testing.assert_close(PATH.alpha(PATH.step_time(n)) ** 2, PATH.alphas_cumprod[:-1])


def test_a_path_without_zero_snr_is_unchanged():
    path = VP.discrete_scaled_linear()
    assert not path.zero_terminal_snr and path.t_max_finite == path.t_max
    t = torch.linspace(path.t_min, 1.0, 333, dtype=torch.float64)
    L = path._knots
    u = t * path.N
    i = u.floor().clamp(0, path.N - 1).long()
    assert torch.equal(path.log_alpha(t), L[i] + (u - i.double()) * (L[i + 1] - L[i]))


@pytest.mark.parametrize("grid", ["trailing", "uniform", "log_snr", "karras"])
@pytest.mark.parametrize("name", PLAIN)
def test_every_sampler_starts_at_t_T_without_nan(name, grid):
    den = v_oracle()
    g = (timesteps.discrete(PATH, 6, "trailing") if grid == "trailing"
         else timesteps.make_grid(grid, PATH, 6))
    assert float(g[0]) == 1.0 and float(PATH.alpha(g[:1])) == 0.0
    x = PATH.prior_sample((8, 2), noise=PerSampleNoise(range(8))).double()
    opts = {"noise": PerSampleNoise(range(8, 16))} if "noise" in SAMPLERS[name].options() else {}
    seen = []
    from difflab.samplers import Hooks

    out = sample(name, den, x, g, hooks=Hooks(callback=lambda info: seen.append(info.t)),
                 **opts)
    assert bool(torch.isfinite(out).all()), name
    assert seen and seen[0] == 1.0  # the first step is taken from t = T and reported


def test_continuous_grids_leave_the_zero_snr_end_for_the_last_finite_time():
    for name in ("log_snr", "karras"):
        g = timesteps.make_grid(name, PATH, 8)
        assert float(g[0]) == 1.0 and float(g[1]) == pytest.approx(PATH.t_max_finite)
        assert bool(torch.isfinite(PATH.log_snr(g[1:-1])).all())
        assert g.numel() == 9 and float(g[-1]) == 0.0
    assert timesteps.karras(PATH, 1).tolist() == [1.0, 0.0]


@pytest.fixture(scope="module")
def flow_reference():
    """The probability-flow ODE from pure noise, solved by DPM-Solver++(3M) on 800 log-SNR
    steps (the first from t = T to the last finite time)."""
    den = v_oracle()
    x = PATH.prior_sample((64, 2), noise=PerSampleNoise(range(64))).double()
    return den, x, sample("dpmpp_3m", den, x, timesteps.log_snr(PATH, 800))


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc_bh2", "heun", "plms",
                                  "dpm_solver_3"])
def test_high_order_solvers_keep_their_order_from_t_T(name, flow_reference):
    """Taking the first step from alpha = 0 for a solver must not spoil its order: doubling the
    steps from 50 to 100 divides the error by more than 3 (order > 1.5; measured 4.2 - 23),
    where DDIM, first order, divides it by 2."""
    den, x, ref = flow_reference
    # the reference ends with DPM-Solver's denoising step from t_min; PLMS's own default ending
    # is a multistep step into t = 0, exact where that denoising step is not, so it ends the
    # same way here: what is measured is the first step
    opts = {"final": "denoise"} if name == "plms" else {}
    e50, e100 = (float((sample(name, den, x, timesteps.log_snr(PATH, n), **opts) - ref)
                       .abs().max()) for n in (50, 100))
    assert e50 / e100 > 3.0 and e100 < 0.02, (name, e50, e100)


def test_ddim_from_t_T_is_first_order(flow_reference):
    den, x, ref = flow_reference
    e50, e100 = (float((sample("ddim", den, x, timesteps.log_snr(PATH, n)) - ref).abs().max())
                 for n in (50, 100))
    assert 1.7 < e50 / e100 < 2.5, (e50, e100)


def test_stochastic_first_step_has_the_exact_posterior():
    """From x_T ~ N(0, I) at alpha_T = 0, x_s must be alpha_s x0_hat + sigma_s z: for the oracle
    x0_hat(x_T) is the data mean, so x_s has mean alpha_s E[x0] and standard deviation sigma_s."""
    den = v_oracle()
    g = timesteps.discrete(PATH, 10, "trailing")
    s = g[1]
    n = 20000
    x = PATH.prior_sample((n, 2), noise=PerSampleNoise(range(n))).double()
    seen = {}
    from difflab.samplers import Hooks

    def grab(info):
        if info.t == 1.0:
            seen["x"] = info.x

    sample("euler_ancestral", den, x, g, hooks=Hooks(callback=grab),
           noise=PerSampleNoise(range(n, 2 * n)))
    mean = (MIX.weights[:, None] * MIX.means).sum(0)
    a_s, sig_s = float(PATH.alpha(s)), float(PATH.sigma(s))
    xs = seen["x"]
    torch.testing.assert_close(xs.mean(0), a_s * mean, rtol=0, atol=4 * sig_s / n ** 0.5)
    torch.testing.assert_close(xs.std(0), torch.full((2,), sig_s, dtype=torch.float64),
                               rtol=0.03, atol=0)


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers_with_zero_snr_v_prediction_and_trailing_steps(steps):
    """Step counts that divide 1000: diffusers' DDIM steps to ``t - 1000 // steps`` while its
    trailing timesteps are rounded, so for other counts (12: gaps of 83 and 84) it steps to a
    time it then does not continue from; difflab steps between its grid's own times."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                          timestep_spacing="trailing", prediction_type="v_prediction",
                          set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    den = v_oracle()
    x0 = PATH.prior_sample((16, 2), noise=PerSampleNoise(range(16))).double()
    x = x0.clone()
    for ts in sched.timesteps:
        t = (float(ts) + 1.0) / 1000.0
        v = den.net(x, torch.full((16,), t, dtype=torch.float64), None)
        x = sched.step(v, ts, x).prev_sample
        assert bool(torch.isfinite(x).all()), int(ts)
    grid = timesteps.discrete(PATH, steps, "trailing")
    assert [round(float(t) * 1000) - 1 for t in grid[:-1]] == sched.timesteps.tolist()
    ours = sample("ddim", den, x0, grid)
    torch.testing.assert_close(ours, x.double(), rtol=0, atol=1e-5)


def test_eps_prediction_and_edm_preconditioning_are_refused_at_zero_snr():
    net = lambda x, t, c: x  # noqa: E731
    for kind in ("eps", "score"):
        with pytest.raises(DifflabError, match="alpha = 0"):
            Denoiser(net, PATH, prediction=kind)
    from difflab.denoiser import EDMPrecond

    with pytest.raises(DifflabError, match="preconditioning"):
        Denoiser(net, PATH, prediction="x0", precond=EDMPrecond())
    for kind in ("v", "x0", "velocity"):
        Denoiser(net, PATH, prediction=kind)
    with pytest.raises(DifflabError, match="task.prediction='v'"):
        load_config(None, ["path.kind='discrete_scaled_linear'", "path.zero_snr=true"])
    load_config(None, ["path.kind='discrete_scaled_linear'", "path.zero_snr=true",
                       "task.prediction='v'", "objective.target='v'"])
    with pytest.raises(DifflabError, match="zero_snr"):
        load_config(None, ["path.kind='vp_linear'", "path.zero_snr=true",
                           "task.prediction='v'"])
    with pytest.raises(DifflabError, match="zero_snr"):
        VP.discrete_linear(zero_snr="yes")


def test_the_v_loss_is_finite_and_exact_at_t_T():
    """At alpha = 0 the v target is -x0: the loss of the oracle there is its posterior spread."""
    den = v_oracle()
    x0 = MIX.sample(512, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = DenoisingLoss(target="v").loss_at(den, x0, torch.ones(512, dtype=torch.float64), eps)
    assert bool(torch.isfinite(loss).all())
    # v_hat - v = -(x0_hat - x0) with x0_hat = E[x0] at T
    mean = (MIX.weights[:, None] * MIX.means).sum(0)
    torch.testing.assert_close(loss, ((x0 - mean) ** 2).mean(1), rtol=1e-10, atol=1e-12)
