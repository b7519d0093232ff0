"""The sampler contract, for every registered sampler (samplers added later are picked up here
automatically): any sampler runs any model, in any parameterization, on any path.

``sample(den, x_init, grid, *, noise=None, hooks=None, **options) -> Tensor`` of ``x_init``'s
shape and dtype; randomness only from ``noise``, so ``PerSampleNoise`` makes row ``i`` the same
whatever the batch; ``hooks.callback`` after each step of the grid.
"""

from __future__ import annotations

import pytest
import torch

from difflab.errors import DifflabError
from difflab.prediction import KINDS
from difflab.samplers import SAMPLERS, Hooks, PerSampleNoise, sample, timesteps

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = sorted(SAMPLERS.values(), key=lambda s: s.name)


def needs_extra(spec) -> tuple[str, ...]:
    """Options without which a sampler cannot run (e.g. Analytic-DPM's moments); a sampler
    declares them as ``spec.needs_extra``."""
    return tuple(getattr(spec, "needs_extra", ()))


FIXED_VARIANCE = [s.name for s in SPECS if not s.needs_learned_variance and not needs_extra(s)]
# samplers that need a learned variance, plus DDPM's optional learned variance
LEARNED_VARIANCE = [(s.name, {}) for s in SPECS if s.needs_learned_variance]
LEARNED_VARIANCE.append(("ddpm", {"variance": "learned"}))
SHAPE = (3, 2, 4, 4)
# solvers that choose their own steps and use only the grid's end points (their docstrings say so)
ADAPTIVE_STEPPING = {"dpm_adaptive"}


def short_grid(path, name: str) -> torch.Tensor:
    """Four steps, or ``order + 2`` for a high-order (multistep) sampler."""
    return timesteps.uniform(path, max(4, SAMPLERS[name].order + 2))


def check_output(out: torch.Tensor, what: str) -> None:
    assert isinstance(out, torch.Tensor), what
    assert out.shape == SHAPE and out.dtype == torch.float32, (what, out.shape, out.dtype)
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite output"


def test_registry_is_populated_and_specs_are_sane():
    assert {"ddpm", "ddim"} <= set(SAMPLERS)
    for spec in SPECS:
        assert spec.order >= 1 and spec.evals_per_step >= 1, spec
        assert {"noise", "hooks"} <= set(spec.options()), (
            f"sampler {spec.name!r} must accept the keyword-only options noise= and hooks="
        )


def test_samplers_that_need_extra_inputs_ask_for_them(make_path, image_mixture):
    """A sampler that cannot run without an extra input (so the loops below leave it out) names
    it among its options and, called without it, says which option it needs."""
    path = make_path("vp_linear")
    x = path.prior_sample(SHAPE, PerSampleNoise([0, 1, 2]))
    for spec in SPECS:
        extra = needs_extra(spec)
        assert set(extra) <= set(spec.options()), (spec.name, extra)
        if not extra:
            continue
        with pytest.raises(DifflabError) as info:
            sample(spec.name, image_mixture.denoiser(path), x, short_grid(path, spec.name))
        assert any(f"{opt}=" in str(info.value) for opt in extra), (spec.name, str(info.value))


@pytest.mark.parametrize("name", FIXED_VARIANCE)
def test_every_sampler_runs_every_parameterization_on_every_path(any_path, image_mixture,
                                                                 oracle_denoiser, name):
    grid = short_grid(any_path, name)
    torch.manual_seed(0)
    x = any_path.prior_sample(SHAPE, dtype=torch.float32)
    for kind in KINDS:
        den = oracle_denoiser(image_mixture, any_path, kind)
        check_output(sample(name, den, x.clone(), grid), f"{name} {any_path!r} {kind}")


@pytest.mark.parametrize("name,options", LEARNED_VARIANCE, ids=[n for n, _ in LEARNED_VARIANCE])
def test_learned_variance_samplers_run_on_every_path(any_path, image_mixture, oracle_denoiser,
                                                     name, options):
    grid = short_grid(any_path, name)
    torch.manual_seed(1)
    x = any_path.prior_sample(SHAPE, dtype=torch.float32)
    for kind in KINDS:
        den = oracle_denoiser(image_mixture, any_path, kind, var_frac=0.3)
        check_output(sample(name, den, x.clone(), grid, **options), f"{name} {any_path!r} {kind}")


@pytest.mark.parametrize("name", FIXED_VARIANCE)
def test_per_sample_noise_makes_rows_independent_of_the_batch(make_path, image_mixture,
                                                              oracle_denoiser, name):
    path = make_path("vp_linear")
    grid = short_grid(path, name)
    den = oracle_denoiser(image_mixture, path, "eps")

    def draw(seeds):
        noise = PerSampleNoise(seeds)
        x = path.prior_sample((len(seeds), *SHAPE[1:]), noise)
        return sample(name, den, x, grid, noise=noise)

    batch = draw([5, 6, 7])
    assert torch.equal(draw([6])[0], batch[1]), name
    again = draw([5, 6, 7])
    assert torch.equal(again, batch), f"{name}: not reproducible from its noise object"


@pytest.mark.parametrize("name", FIXED_VARIANCE)
def test_callback_sees_every_step(make_path, image_mixture, oracle_denoiser, name):
    """Steps are reported in order and chain from ``grid[0]`` to ``grid[-1]``; a sampler that
    steps on the grid reports exactly its steps (an adaptive one chooses its own)."""
    path = make_path("vp_cosine")
    grid = short_grid(path, name)
    den = oracle_denoiser(image_mixture, path, "x0")
    seen = []
    x = path.prior_sample(SHAPE, PerSampleNoise([0, 1, 2]))
    sample(name, den, x, grid, hooks=Hooks(callback=seen.append))
    assert [s.index for s in seen] == list(range(len(seen))) and seen, name
    assert all(s.total == seen[0].total for s in seen), name
    assert seen[0].t == float(grid[0]) and seen[-1].t_next == float(grid[-1]), name
    assert all(a.t_next == b.t for a, b in zip(seen, seen[1:])), name
    assert all(s.t_next < s.t for s in seen), name
    assert all(s.x.shape == SHAPE and s.x0.shape == SHAPE for s in seen), name
    if name not in ADAPTIVE_STEPPING:
        n = grid.numel() - 1
        assert len(seen) == n and seen[0].total == n, name
        assert [s.t for s in seen] == grid[:-1].tolist(), name


@pytest.mark.parametrize("name", FIXED_VARIANCE)
def test_float64_stays_float64(make_path, image_mixture, name):
    path = make_path("ve")
    x = path.prior_sample(SHAPE, PerSampleNoise([0, 1, 2]), dtype=torch.float64)
    out = sample(name, image_mixture.denoiser(path), x, short_grid(path, name))
    assert out.dtype == torch.float64 and out.shape == SHAPE
    assert bool(torch.isfinite(out).all())
