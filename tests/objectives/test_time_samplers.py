"""Time samplers: exact support, known moments, reproducibility, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from difflab import EDM, VE, VP, DifflabError, Linear
from difflab.objectives import (
    DiscreteUniformTime,
    LogNormalTime,
    UniformTime,
    build_time_sampler,
    default_time_sampler,
)

N_DRAWS = 40_000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors run fastest on one thread; OpenMP barriers stall on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_discrete_uniform_hits_exactly_the_knots_with_equal_frequency():
    n_steps = 10
    path = VP.discrete_linear(n_steps)
    t = DiscreteUniformTime().sample(path, N_DRAWS, gen())
    assert t.dtype == torch.float64 and t.shape == (N_DRAWS,)
    knots = (torch.arange(n_steps, dtype=torch.float64) + 1) / n_steps  # DDPM's t in {1..T}
    match = t[:, None] == knots[None, :]
    assert bool(match.any(1).all()), "a time off the knots (n+1)/N was drawn"
    counts = match.sum(0).double()
    expected = N_DRAWS / n_steps
    sd = math.sqrt(N_DRAWS * (1 / n_steps) * (1 - 1 / n_steps))  # binomial
    assert float((counts - expected).abs().max()) < 5 * sd


def test_discrete_uniform_steps_agree_with_times():
    path = VP.discrete_cosine(50)
    sampler = DiscreteUniformTime()
    steps = sampler.sample_steps(path, 100, gen(3))
    t = sampler.sample(path, 100, gen(3))
    assert steps.dtype == torch.int64
    assert int(steps.min()) >= 0 and int(steps.max()) <= 49
    assert torch.equal(t, (steps.double() + 1) / 50)


@pytest.mark.parametrize("path", [VP.linear(), VE(), EDM(), Linear()], ids=repr)
def test_discrete_uniform_rejects_continuous_paths(path):
    with pytest.raises(DifflabError, match="continuous path"):
        DiscreteUniformTime().sample(path, 4, gen())


@pytest.mark.parametrize("path", [VP.linear(), VE(), EDM(), Linear(), VP.discrete_linear(20)],
                         ids=repr)
def test_uniform_time_moments_and_range(path):
    t = UniformTime().sample(path, N_DRAWS, gen(1))
    lo, hi = path.t_min, path.t_max
    assert t.dtype == torch.float64
    assert float(t.min()) >= lo and float(t.max()) <= hi
    width = hi - lo
    se = width / math.sqrt(12 * N_DRAWS)
    assert abs(float(t.mean()) - (lo + hi) / 2) < 5 * se
    assert abs(float(t.var()) - width**2 / 12) < 0.03 * width**2 / 12


def test_uniform_time_custom_range_and_bad_range():
    path = VP.linear()
    t = UniformTime(0.2, 0.3).sample(path, 1000, gen())
    assert float(t.min()) >= 0.2 and float(t.max()) <= 0.3
    with pytest.raises(DifflabError, match="t_min"):
        UniformTime(0.0, 0.5).sample(path, 4, gen())  # below path.t_min = 1e-5
    with pytest.raises(DifflabError, match="t_min"):
        UniformTime(0.5, 0.4).sample(path, 4, gen())


def test_lognormal_edm_moments_of_log_sigma():
    # EDM: alpha = 1, sigma = t, so ln t itself must be N(P_mean, P_std^2) (Karras Table 1);
    # the clamp to [0.002, 80] cuts at z = -4.2 / +4.6 and is invisible at this precision.
    t = LogNormalTime().sample(EDM(), N_DRAWS, gen(2))
    lt = torch.log(t)
    assert abs(float(lt.mean()) - (-1.2)) < 5 * 1.2 / math.sqrt(N_DRAWS)
    assert abs(float(lt.std()) - 1.2) < 5 * 1.2 / math.sqrt(2 * N_DRAWS)


@pytest.mark.parametrize("path", [VP.linear(), VP.discrete_linear(1000), Linear(t_min=1e-4)],
                         ids=repr)
def test_lognormal_is_the_same_noise_distribution_on_any_path(path):
    # ln(sigma / alpha) at the drawn t is N(0.5, 0.8^2) on every path (EDM Sec. 4)
    t = LogNormalTime(0.5, 0.8).sample(path, N_DRAWS, gen(4))
    ls = torch.log(path.sigma(t) / path.alpha(t))
    assert abs(float(ls.mean()) - 0.5) < 5 * 0.8 / math.sqrt(N_DRAWS)
    assert abs(float(ls.std()) - 0.8) < 5 * 0.8 / math.sqrt(2 * N_DRAWS)


def test_lognormal_clamps_to_the_path_range():
    path = EDM(0.002, 80.0)
    assert bool((LogNormalTime(p_mean=10.0, p_std=0.1).sample(path, 64, gen()) == 80.0).all())
    assert bool((LogNormalTime(p_mean=-20.0, p_std=0.1).sample(path, 64, gen()) == 0.002).all())
    with pytest.raises(DifflabError, match="p_std"):
        LogNormalTime(p_std=0.0)


@pytest.mark.parametrize("sampler", [DiscreteUniformTime(), UniformTime(), LogNormalTime()],
                         ids=lambda s: s.name)
def test_generator_is_the_only_randomness(sampler):
    path = VP.discrete_linear(100)
    a = sampler.sample(path, 32, gen(7))
    torch.manual_seed(123)  # the global RNG must not matter when a generator is given
    b = sampler.sample(path, 32, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, sampler.sample(path, 32, gen(8)))
    torch.manual_seed(5)
    c = sampler.sample(path, 32)
    torch.manual_seed(5)
    assert torch.equal(c, sampler.sample(path, 32))  # None = the global RNG


def test_defaults_and_names():
    assert isinstance(default_time_sampler(VP.discrete_linear(10)), DiscreteUniformTime)
    for path in (VP.linear(), VE(), EDM(), Linear()):
        assert isinstance(default_time_sampler(path), UniformTime)
    assert build_time_sampler("lognormal", p_mean=0.1) == LogNormalTime(0.1, 1.2)
    assert build_time_sampler("uniform", t_min=0.1) == UniformTime(0.1, None)
    with pytest.raises(DifflabError, match="'discrete', 'uniform', 'lognormal'"):
        build_time_sampler("logit_normal")
    with pytest.raises(DifflabError, match=r"does not take \['p_mean'\]"):
        build_time_sampler("uniform", p_mean=0.0)
    with pytest.raises(DifflabError, match="positive int"):
        UniformTime().sample(VP.linear(), 0)
