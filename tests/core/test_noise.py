"""Noise objects: the only randomness a sampler sees."""

from __future__ import annotations

import pytest
import torch

from difflab.samplers import GeneratorNoise, PerSampleNoise, as_noise, ddpm, timesteps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_per_sample_noise_rows_are_their_own_seeded_streams():
    noise = PerSampleNoise([11, 3, 7])
    x = torch.empty(3, 2, 5)
    first, second = noise.randn_like(x), noise.randn_like(x)
    for row, seed in enumerate([11, 3, 7]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(first[row], torch.randn(2, 5, generator=g))
        assert torch.equal(second[row], torch.randn(2, 5, generator=g))  # the stream goes on
    assert first.dtype == torch.float32
    assert noise.randn_like(x.double()).dtype == torch.float64


def test_per_sample_noise_slices_restart_the_same_streams():
    full = PerSampleNoise(range(10))
    sub = full[2:5]
    assert sub.seeds == [2, 3, 4]
    a = full.randn_like(torch.empty(10, 4))
    b = sub.randn_like(torch.empty(3, 4))
    assert torch.equal(a[2:5], b)


def test_generator_noise_and_as_noise():
    x = torch.empty(4, 3, dtype=torch.float64)
    a = GeneratorNoise.seeded(5).randn_like(x)
    assert torch.equal(a, torch.randn(4, 3, generator=torch.Generator().manual_seed(5),
                                      dtype=torch.float64))
    assert torch.equal(as_noise(5).randn_like(x), a)
    assert torch.equal(as_noise(torch.Generator().manual_seed(5)).randn_like(x), a)
    per_sample = PerSampleNoise([1, 2, 3, 4])
    assert as_noise(per_sample) is per_sample
    assert isinstance(as_noise(None), GeneratorNoise)


def test_ddpm_sample_i_is_bitwise_the_same_in_any_batch(make_path, mixture4d):
    """PerSampleNoise through the full DDPM sampler with the exact denoiser: row ``i`` is
    identical whether it is drawn alone, in a batch of 7 or in a batch of 64 (the prior is drawn
    from the same noise object, so it too is per row)."""
    path = make_path("vp_discrete_linear")
    den = mixture4d.denoiser(path)
    grid = timesteps.discrete(path, 40)

    def draw(seeds, dtype):
        noise = PerSampleNoise(seeds)
        x = path.prior_sample((len(seeds), 4), noise, dtype=dtype)
        return ddpm(den, x, grid, noise=noise)

    for dtype in (torch.float64, torch.float32):
        big = draw(range(64), dtype)
        seven = draw(range(30, 37), dtype)
        assert torch.equal(seven, big[30:37]), dtype
        for i in (0, 33, 63):
            assert torch.equal(draw([i], dtype)[0], big[i]), (dtype, i)
        assert big.dtype == dtype and bool(torch.isfinite(big).all())
        # and the rows really differ from each other (each has its own stream)
        assert torch.unique(big[:, 0]).numel() == 64
