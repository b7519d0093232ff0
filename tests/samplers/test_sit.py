"""SiT's samplers (Ma et al. 2024) against the Gaussian-mixture oracle.

* the interpolant's velocity and score that ``prediction.py`` derives from any parameterization
  equal the mixture's closed forms (and SiT's own velocity -> score / noise formulas);
* ``sit_ode`` (Heun) converges to the exact probability-flow solution at order 2, and dopri5
  reaches its tolerance;
* ``sit_sde`` reproduces the mixture for every ``w_t`` form, and the same run with the noise
  multiplied by ``sqrt(2)`` (the ``sqrt(2 w dt)`` error) does not; one step's variance on a
  Gaussian is checked exactly against the marginal it must reach.

Expected values come from the mixture's parameters (means, variances, weights), not from the
samplers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.paths import EDM, GVP, VE, VP, Linear
from difflab.prediction import KINDS, Prediction
from difflab.samplers import GeneratorNoise, Hooks, sample, timesteps
from difflab.samplers.sit import DIFFUSIONS, diffusion_fn
from difflab.testing import GaussianMixture, probability_flow_reference

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3000
FORMS = list(DIFFUSIONS)
PATHS = {"linear": Linear, "gvp": GVP, "vp_linear": VP.linear, "ve": lambda: VE(0.01, 50.0)}


@pytest.fixture(scope="module")
def mix4() -> GaussianMixture:
    """Three well-separated components in 4-D (stds <= 0.5), weights 0.5/0.3/0.2."""
    means = torch.tensor([[-2.0, -2.0, 1.5, 0.0], [2.0, 0.5, -1.5, 1.0], [0.0, 2.5, 1.5, -1.0]])
    stds = torch.tensor([[0.4, 0.3, 0.5, 0.4], [0.5, 0.4, 0.3, 0.3], [0.3, 0.5, 0.4, 0.5]])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


# ----- the interpolant's velocity and score ---------------------------------------------------
def closed_form(mix: GaussianMixture, path, x: torch.Tensor, t: float):
    """Velocity and score of ``p_t = sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2)``.

    Per component the flow of a Gaussian whose mean is ``alpha m`` and variance ``V``:
    ``alpha' m + (V' / 2V) (x - alpha m)``; the mixture's velocity is their
    responsibility-weighted sum (``p_t v = sum_k w_k N_k v_k``), and so is the score."""
    a, s = float(path.alpha(t)), float(path.sigma(t))
    da, ds = float(path.d_alpha(t)), float(path.d_sigma(t))
    var = a * a * mix.vars + s * s  # (K, D)
    diff = x[:, None, :] - a * mix.means  # (B, K, D)
    logits = torch.log(mix.weights) - 0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
    r = torch.softmax(logits, -1)[..., None]
    vel = (r * (da * mix.means + (a * da * mix.vars + s * ds) / var * diff)).sum(1)
    score = (r * (-diff / var)).sum(1)
    return vel, score


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path_name", list(PATHS))
def test_velocity_and_score_equal_the_closed_form(mix4, oracle_denoiser, path_name, kind):
    path = PATHS[path_name]()
    den = oracle_denoiser(mix4, path, kind)
    x = 2.0 * torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.05, 0.5, 0.9):
        pred = den(x, torch.full((32,), t, dtype=torch.float64))
        vel, score = closed_form(mix4, path, x, t)
        torch.testing.assert_close(pred.velocity, vel, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(pred.score, score, rtol=1e-8, atol=1e-8)


def test_score_is_the_gradient_of_the_marginal_log_density(mix4):
    path = GVP()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x.requires_grad_(True)
    grad, = torch.autograd.grad(mix4.marginal_log_prob(x, 0.3, path).sum(), x)
    torch.testing.assert_close(mix4.denoiser(path)(x.detach(), 0.3).score, grad)


@pytest.mark.parametrize("path_name", ["linear", "gvp", "vp_linear"])
def test_sits_velocity_to_score_and_noise_formulas(mix4, path_name):
    """SiT Sec. 2.2: with ``u`` the velocity, eliminating ``x0`` from ``x = alpha x0 + sigma eps``
    and ``u = alpha' x0 + sigma' eps`` gives ``eps = (alpha u - alpha' x) / (alpha sigma' -
    alpha' sigma)`` and ``s = -eps / sigma``: what ``Prediction.from_output('velocity')`` says."""
    path = PATHS[path_name]()
    t = 0.4
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, score = closed_form(mix4, path, x, t)
    pred = Prediction.from_output("velocity", u, x, t, path)
    a, s = float(path.alpha(t)), float(path.sigma(t))
    da, ds = float(path.d_alpha(t)), float(path.d_sigma(t))
    eps = (a * u - da * x) / (a * ds - da * s)
    torch.testing.assert_close(pred.eps, eps)
    torch.testing.assert_close(pred.score, -eps / s)
    torch.testing.assert_close(pred.score, score, rtol=1e-8, atol=1e-8)


# ----- the ODE --------------------------------------------------------------------------------
T_END = 0.01


@pytest.fixture(scope="module")
def flow(mix4):
    cache = {}

    def get(name: str):
        if name not in cache:
            path = PATHS[name]()
            den = mix4.denoiser(path)
            x = path.prior_sample((8, 4), GeneratorNoise.seeded(5), dtype=torch.float64)
            cache[name] = path, den, x, probability_flow_reference(den, x, path.t_max, T_END)
        return cache[name]

    return get


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_sit_ode_heun_converges_at_order_two(flow, path_name):
    path, den, x, ref = flow(path_name)
    steps = [32, 64, 128]
    errs = [float((sample("sit_ode", den, x, timesteps.uniform(
        path, n, t_end=T_END, to_zero=False)) - ref).pow(2).mean().sqrt()) for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    ratio = errs[-2] / errs[-1]  # measured: 3.86 (Linear), 3.94 (GVP)
    assert abs(slope - 2.0) < 0.15 and 3.6 < ratio < 4.4, (errs, slope, ratio)


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
def test_sit_ode_dopri5_reaches_its_tolerance(flow, path_name):
    path, den, x, ref = flow(path_name)
    grid = torch.tensor([path.t_max, T_END], dtype=torch.float64)
    evals = {}
    for tol in (1e-4, 1e-8):
        calls = []
        count = Hooks(correct_x0=lambda x0, t, calls=calls: calls.append(1) or x0)
        out = sample("sit_ode", den, x, grid, method="dopri5", rtol=tol, atol=tol, hooks=count)
        evals[tol] = len(calls)
    assert float((out - ref).abs().max()) < 1e-6
    assert evals[1e-4] < evals[1e-8], evals


def test_sit_ode_is_the_same_for_every_parameterization(mix4, oracle_denoiser):
    path = GVP()
    x = path.prior_sample((8, 4), GeneratorNoise.seeded(6), dtype=torch.float64)
    grid = timesteps.uniform(path, 12)
    outs = [sample("sit_ode", oracle_denoiser(mix4, path, k), x, grid) for k in KINDS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-9, atol=1e-9)


def test_step_to_zero_returns_the_clean_estimate(mix4):
    path = Linear()
    den = mix4.denoiser(path)
    x = path.prior_sample((8, 4), GeneratorNoise.seeded(7), dtype=torch.float64)
    to_t = sample("sit_ode", den, x, torch.tensor([path.t_max, 0.05], dtype=torch.float64))
    to_zero = sample("sit_ode", den, x, torch.tensor([path.t_max, 0.05, 0.0],
                                                     dtype=torch.float64))
    torch.testing.assert_close(to_zero, den(to_t, 0.05).x0)
    euler = to_t - 0.05 * den(to_t, 0.05).velocity  # on Linear the Euler step lands on x0_hat
    torch.testing.assert_close(to_zero, euler)


# ----- the SDE: the mixture's distribution ----------------------------------------------------
class ScaledNoise:
    """Noise multiplied by ``c``: with ``c = sqrt(2)`` the sampler's ``sqrt(w h) z`` becomes the
    wrong ``sqrt(2 w h) z``."""

    def __init__(self, noise, c: float) -> None:
        self.noise, self.c = noise, c

    def randn_like(self, x):
        return self.c * self.noise.randn_like(x)


def discrepancy(mix: GaussianMixture, x: torch.Tensor) -> dict[str, float]:
    """Largest |z-scores| of the component masses (nearest component), per-dimension means and
    per-dimension variances against the mixture's exact values (standard errors from the
    binomial, the exact variance and the sample's fourth central moment)."""
    w = mix.weights
    mean = w @ mix.means
    var = w @ (mix.vars + mix.means**2) - mean**2
    n = x.shape[0]
    logp = torch.log(w) - 0.5 * (((x[:, None] - mix.means) ** 2 / mix.vars)
                                 + torch.log(mix.vars)).sum(-1)
    freq = torch.bincount(logp.argmax(1), minlength=mix.K).double() / n
    m4 = ((x - x.mean(0)) ** 4).mean(0)
    return {"mass": float(((freq - w) / (w * (1 - w) / n).sqrt()).abs().max()),
            "mean": float(((x.mean(0) - mean) / (var / n).sqrt()).abs().max()),
            "var": float(((x.var(0) - var) / ((m4 - var**2) / n).sqrt()).abs().max())}


def run_sde(mix, path, form: str, c: float = 1.0, steps: int = 200) -> torch.Tensor:
    noise = GeneratorNoise.seeded(11)
    x = path.prior_sample((N, 4), noise, dtype=torch.float64)
    return sample("sit_sde", mix.denoiser(path), x, timesteps.uniform(path, steps),
                  noise=ScaledNoise(noise, c), diffusion=form)


CASES = [(p, f) for p in ("linear", "gvp", "vp_linear") for f in FORMS]
CASES += [("ve", "SBDM"), ("ve", "constant"), ("ve", "sigma")]


@pytest.mark.parametrize("path_name,form", CASES)
def test_sit_sde_reproduces_the_mixture(mix4, path_name, form):
    """200 Euler-Maruyama steps, 3000 samples: masses, means and variances within 4 standard
    errors (measured: at most ~3)."""
    d = discrepancy(mix4, run_sde(mix4, PATHS[path_name](), form))
    assert max(d.values()) < 4.0, d


@pytest.mark.parametrize("path_name,form", [(p, f) for p in ("linear", "gvp") for f in FORMS])
def test_the_sqrt_2_noise_error_is_caught(mix4, path_name, form):
    """The same run with the noise ``sqrt(2 w h) z`` inflates the variances by ~10 standard
    errors (8.4 to 10.9): the test above would fail."""
    d = discrepancy(mix4, run_sde(mix4, PATHS[path_name](), form, c=math.sqrt(2)))
    assert d["var"] > 6.0, d  # measured 8.4 to 10.9 (the correct runs: at most 2.9)


class ConstNoise:
    def __init__(self, value: float) -> None:
        self.value = value

    def randn_like(self, x):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("path_name", ["linear", "gvp"])
@pytest.mark.parametrize("form", FORMS)
def test_one_step_variance_is_the_marginal_variance(path_name, form):
    """Exact check of one Euler-Maruyama step on Gaussian data ``N(0, c^2)``: the score is
    linear, so the step is ``x_s = A x_t + B z``. Its noise is ``B = sqrt(w h)`` and the variance
    it produces, ``A^2 V_t + B^2``, equals the marginal ``V_s = alpha_s^2 c^2 + sigma_s^2`` up to
    ``O(h^2)``; with ``sqrt(2 w h)`` it is off by ``w h``, a first-order error."""
    path, c2, t, h = PATHS[path_name](), 0.3, 0.5, 1e-3
    gauss = GaussianMixture([[0.0]], [[math.sqrt(c2)]])
    den = gauss.denoiser(path)
    grid = torch.tensor([t, t - h], dtype=torch.float64)
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    a_map = float(sample("sit_sde", den, one, grid, diffusion=form, last_step=None,
                         noise=ConstNoise(0.0)))
    b = float(sample("sit_sde", den, zero, grid, diffusion=form, last_step=None,
                     noise=ConstNoise(1.0)))
    w = diffusion_fn(path, form)(t)
    assert b == pytest.approx(math.sqrt(w * h), rel=1e-12)
    v_t = float(path.alpha(t)) ** 2 * c2 + float(path.sigma(t)) ** 2
    v_s = float(path.alpha(t - h)) ** 2 * c2 + float(path.sigma(t - h)) ** 2
    right = a_map**2 * v_t + b * b - v_s
    wrong = a_map**2 * v_t + 2 * b * b - v_s
    assert abs(right) < 0.02 * w * h, (right, w * h)
    assert abs(wrong) > 0.9 * w * h, (wrong, w * h)


def test_sbdm_is_the_score_sde_reverse_sde(mix4):
    """``w = g^2``: ``v - g^2 s / 2 = f x - g^2 s``, Song et al.'s reverse SDE (eq. 6) and
    difflab's ``em`` sampler, step for step with the same noise."""
    path = VP.linear()
    x = path.prior_sample((64, 4), GeneratorNoise.seeded(0), dtype=torch.float64)
    grid = timesteps.uniform(path, 30)
    ours = sample("sit_sde", mix4.denoiser(path), x, grid, diffusion="SBDM", last_step=None,
                  noise=GeneratorNoise.seeded(1))
    em = sample("em", mix4.denoiser(path), x, grid, noise=GeneratorNoise.seeded(1))
    torch.testing.assert_close(ours, em, rtol=1e-9, atol=1e-9)


# ----- the last step --------------------------------------------------------------------------
def test_last_step_rules(mix4):
    path = Linear()
    den = mix4.denoiser(path)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t, s = 0.3, 0.1
    grid = torch.tensor([t, s], dtype=torch.float64)
    pred, w = den(x, t), diffusion_fn(path, "sigma")(t)

    def run(rule, seed=0):
        return sample("sit_sde", den, x, grid, diffusion="sigma", last_step=rule,
                      noise=GeneratorNoise.seeded(seed))

    torch.testing.assert_close(run("tweedie"), pred.x0)
    torch.testing.assert_close(run("Euler"), x - 0.2 * pred.velocity)  # SiT's spelling works
    torch.testing.assert_close(run("mean"), x - 0.2 * (pred.velocity - 0.5 * w * pred.score))
    torch.testing.assert_close(run("mean", 1), run("mean", 2))  # draws no noise
    assert not torch.equal(run(None, 1), run(None, 2))
    to_zero = torch.tensor([t, 0.0], dtype=torch.float64)
    none0 = sample("sit_sde", den, x, to_zero, last_step="none", noise=GeneratorNoise.seeded(0))
    torch.testing.assert_close(none0, pred.x0)


def test_last_step_size_sets_the_last_step(mix4):
    path = Linear()
    den = mix4.denoiser(path)
    x = path.prior_sample((4, 4), GeneratorNoise.seeded(4), dtype=torch.float64)
    grid = timesteps.uniform(path, 10)
    seen = []
    out = sample("sit_sde", den, x, grid, last_step_size=0.04, noise=GeneratorNoise.seeded(5),
                 hooks=Hooks(callback=seen.append))
    assert bool(torch.isfinite(out).all())
    head = [float(g) for g in grid[:-1] if g > 0.04]
    assert [st.t for st in seen] == pytest.approx(head + [0.04])
    assert seen[-1].t_next == 0.0


# ----- bad options ----------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    ({"diffusion": "cosine"}, "diffusion='cosine' is not valid: expected one of 'constant'"),
    ({"diffusion_norm": -1.0}, "diffusion_norm=-1.0 is not valid"),
    ({"diffusion_norm": float("nan")}, "diffusion_norm=nan is not valid"),
    ({"last_step": "median"}, "last_step='median' is not valid: expected one of 'mean'"),
    ({"last_step_size": 0.0}, r"last_step_size=0.0 is not valid: .*\(0, 1\)"),
    ({"last_step_size": 1.5}, r"last_step_size=1.5 is not valid"),
    ({"last_step": None, "last_step_size": 0.04}, "needs a last-step rule"),
    ({"last_step_size": 0.9995}, "does not fit the grid"),
])
def test_bad_sde_options_are_named(mix4, options, match):
    path = Linear()
    x = path.prior_sample((2, 4), GeneratorNoise.seeded(0), dtype=torch.float64)
    with pytest.raises(DifflabError, match=match):
        sample("sit_sde", mix4.denoiser(path), x, timesteps.uniform(path, 5), **options)


def test_unit_time_forms_refuse_paths_beyond_t_1(mix4):
    path = EDM()
    x = path.prior_sample((2, 4), GeneratorNoise.seeded(0), dtype=torch.float64)
    with pytest.raises(DifflabError, match="diffusion='linear' is defined on SiT's time range"):
        sample("sit_sde", mix4.denoiser(path), x, timesteps.karras(path, 5), diffusion="linear")


@pytest.mark.parametrize("options,match", [
    ({"method": "rk45"}, "method='rk45' is not valid"),
    ({"method": "dopri5", "rtol": 0.0}, "rtol/atol"),
])
def test_bad_ode_options_are_named(mix4, options, match):
    path = GVP()
    x = path.prior_sample((2, 4), GeneratorNoise.seeded(0), dtype=torch.float64)
    with pytest.raises(DifflabError, match=match):
        sample("sit_ode", mix4.denoiser(path), x, timesteps.uniform(path, 5), **options)
