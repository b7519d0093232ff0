"""Semantic Diffusion Guidance (Liu et al. 2023, Sec. 3-4) with a noise-aware alignment model.

The diffusion model is the exact denoiser of a Gaussian over 3x8x8 images; the guide is a small
random :class:`AlignmentModel` in float64 (its closing convs un-zeroed so every block matters).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab import VE, VP
from difflab.errors import DifflabError
from difflab.guidance.sdg import (
    alignment_score,
    content_energy,
    gram,
    sdg,
    style_energy,
    text_energy,
)
from difflab.networks.alignment import AlignmentConfig, AlignmentModel
from difflab.networks.layers import ResBlock
from difflab.networks.noisy import NoisyModel
from difflab.samplers import PerSampleNoise, ddpm
from difflab.testing import GaussianMixture

PATH = VP.linear()


def _net(seed=0, symmetric=False) -> AlignmentModel:
    torch.manual_seed(seed)
    net = AlignmentModel(AlignmentConfig.preset("tiny", image_size=8)).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.conv2.weight.normal_(0, 0.1)
            if symmetric and isinstance(m, nn.Conv2d):  # kernels even under a horizontal flip
                m.weight.copy_(0.5 * (m.weight + m.weight.flip(-1)))
    return net


@pytest.fixture(scope="module")
def model() -> NoisyModel:
    return NoisyModel(_net(), PATH)


@pytest.fixture(scope="module")
def den():
    g = torch.Generator().manual_seed(5)
    means = 0.5 * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.5]).denoiser(PATH)


def _x(n=3, seed=0, t=0.3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    return x0, eps, tt, PATH.add_noise(x0, eps, tt)


def _text(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 384, generator=g, dtype=torch.float64), dim=-1)


def _guidance_gradient(guided, den, x, t, scale):
    """The ``grad E`` a guided denoiser applied: ``(eps_guided - eps) / (sigma s)``."""
    sigma = PATH.sigma(t)[:, None, None, None]
    return (guided(x, t).eps - den(x, t).eps) / (sigma * scale)


def test_text_energy_is_minus_cosine_and_its_gradient_matches_finite_differences(model, den):
    _, _, t, x = _x()
    text = _text()
    e = text_energy(model, text)(x, t)
    cos = F.cosine_similarity(model.net.image_embed(x, 1000 * t), model.net.text_embed(text))
    torch.testing.assert_close(e, -cos, rtol=0, atol=1e-12)
    scale = 2.5
    grad = _guidance_gradient(sdg(den, model, text_emb=text, scale=scale), den, x, t, scale)
    g = torch.Generator().manual_seed(9)
    h = 1e-5
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        fd = (text_energy(model, text)(x + h * v, t) - text_energy(model, text)(x - h * v, t))
        fd = fd / (2 * h)
        torch.testing.assert_close((grad * v).sum(dim=(1, 2, 3)), fd, rtol=1e-6, atol=1e-9)


def test_one_guided_step_raises_the_alignment(model, den):
    """DDPM step 0.5 -> 0.45 with the same noise: guided ends more aligned than unguided."""
    _, _, _, x = _x(n=6, seed=2, t=0.5)
    text = _text(n=6, seed=3)
    grid = torch.tensor([0.5, 0.45], dtype=torch.float64)
    plain = ddpm(den, x, grid, noise=PerSampleNoise(range(6)))
    guided = ddpm(sdg(den, model, text_emb=text, scale=20.0), x, grid,
                  noise=PerSampleNoise(range(6)))
    s = torch.full((6,), 0.45, dtype=torch.float64)
    f = text_energy(model, text)
    assert bool((f(guided, s) < f(plain, s)).all())
    gain = alignment_score(model, guided, text, 0.45) - alignment_score(model, plain, text, 0.45)
    assert bool((gain > 0).all())
    torch.testing.assert_close(gain, f(plain, s) - f(guided, s))
    # read as clean images (t_min), the guided ones are more aligned too
    assert bool((alignment_score(model, guided, text) > alignment_score(model, plain, text)).all())


def test_content_energy_is_minimal_at_the_noised_reference(model, den):
    x0, eps, t, x = _x()
    e = content_energy(model, x0, noise=eps)
    torch.testing.assert_close(e(x, t), -torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    guided = sdg(den, model, ref=x0, kind="content", scale=1.0, noise=eps)
    grad = _guidance_gradient(guided, den, x, t, 1.0)
    assert grad.abs().max() < 1e-7
    # elsewhere the similarity is below 1 and the gradient is not zero
    _, _, _, other = _x(seed=4)
    assert bool((e(other, t) > -1 + 1e-4).all())
    assert _guidance_gradient(guided, den, other, t, 1.0).abs().max() > 1e-4


def test_reference_noise_is_fixed_and_shared_by_a_batch(model):
    x0, _, t, x = _x()
    g = torch.Generator().manual_seed(11)
    eps1 = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    by_seed = content_energy(model, x0[:1], generator=11)
    by_noise = content_energy(model, x0[:1], noise=eps1)
    torch.testing.assert_close(by_seed(x, t), by_noise(x, t), rtol=0, atol=0)
    torch.testing.assert_close(by_seed(x, t), by_seed(x, t), rtol=0, atol=0)  # fixed, not redrawn
    # a single reference serves a batch: the same as repeating it
    rep = content_energy(model, x0[:1].expand(3, -1, -1, -1), noise=eps1.expand(3, -1, -1, -1))
    torch.testing.assert_close(by_noise(x, t), rep(x, t))


def test_gram_forgets_positions():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    perm = torch.randperm(24, generator=g)
    shuffled = f.flatten(2)[:, :, perm].reshape(2, 5, 4, 6)
    torch.testing.assert_close(gram(shuffled), gram(f), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram(f)[0], f[0].reshape(5, -1) @ f[0].reshape(5, -1).T / 24)


class _PixelFeatures(nn.Module):
    """A guide whose 'features' are the pixels and their tanh (both commute with positions)."""

    def text_embed(self, text):
        return text

    def image_features(self, x, t):
        return [x, torch.tanh(x)]

    def forward(self, x, t, cond=None):
        return F.normalize(x.flatten(1), dim=-1)


def test_style_energy_sees_the_reference_only_through_gram_matrices(den):
    model = NoisyModel(_PixelFeatures(), PATH)
    x0, eps, t, _ = _x()
    _, _, _, x = _x(seed=8)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(64, generator=g)

    def shuffle(z):
        return z.flatten(2)[:, :, perm].reshape(z.shape)

    plain = style_energy(model, x0, noise=eps)(x, t)
    moved = style_energy(model, shuffle(x0), noise=shuffle(eps))(x, t)
    torch.testing.assert_close(moved, plain, rtol=1e-12, atol=1e-14)
    assert bool((plain > 1e-3).all())
    # the content energy of the same guide does see positions
    c_plain = content_energy(model, x0, noise=eps)(x, t)
    c_moved = content_energy(model, shuffle(x0), noise=shuffle(eps))(x, t)
    assert (c_plain - c_moved).abs().min() > 1e-3


def test_style_energy_of_a_flip_equivariant_tower_ignores_a_flipped_reference():
    """Even kernels + average-pool downsampling: features(flip x) = flip(features x)."""
    model = NoisyModel(_net(seed=3, symmetric=True), PATH)
    x0, eps, t, x = _x(seed=5)
    feats, flipped = (model.net.image_features(z, 1000 * t) for z in (x, x.flip(-1)))
    for a, b in zip(feats, flipped):
        torch.testing.assert_close(b, a.flip(-1), rtol=1e-10, atol=1e-12)
    _, _, _, other = _x(seed=6)
    plain = style_energy(model, x0, noise=eps)(other, t)
    mirrored = style_energy(model, x0.flip(-1), noise=eps.flip(-1))(other, t)
    torch.testing.assert_close(mirrored, plain, rtol=1e-9, atol=1e-15)
    assert bool((plain > 0).all())


def test_style_energy_is_zero_with_zero_gradient_at_the_noised_reference(model, den):
    x0, eps, t, x = _x()
    torch.testing.assert_close(style_energy(model, x0, noise=eps)(x, t),
                               torch.zeros(3, dtype=torch.float64), rtol=0, atol=0)
    guided = sdg(den, model, ref=x0, kind="style", scale=1.0, noise=eps)
    assert _guidance_gradient(guided, den, x, t, 1.0).abs().max() < 1e-12
    _, _, _, other = _x(seed=7)
    assert _guidance_gradient(guided, den, other, t, 1.0).abs().max() > 1e-6


def test_alignment_score_reads_clean_images_at_t_min(model):
    x0, _, _, _ = _x()
    text = _text()
    score = alignment_score(model, x0, text)
    want = F.cosine_similarity(model.net.image_embed(x0, 1000 * PATH.t_min),
                               model.net.text_embed(text))
    torch.testing.assert_close(score, want, rtol=0, atol=1e-12)
    assert not score.requires_grad
    # one text shared by the batch
    torch.testing.assert_close(alignment_score(model, x0, text[:1]),
                               alignment_score(model, x0, text[:1].expand(3, -1)))


def test_errors(model, den):
    x0, _, t, x = _x()
    text = _text()
    with pytest.raises(DifflabError, match="kind"):
        sdg(den, model, text_emb=text, kind="colour", scale=1.0)
    with pytest.raises(DifflabError, match="needs text_emb"):
        sdg(den, model, ref=x0, kind="text", scale=1.0)
    with pytest.raises(DifflabError, match="needs ref"):
        sdg(den, model, text_emb=text, kind="style", scale=1.0)
    with pytest.raises(DifflabError, match="path"):
        sdg(den, NoisyModel(model.net, VE()), text_emb=text, scale=1.0)
    with pytest.raises(DifflabError, match="NoisyModel"):
        text_energy(model.net, text)
    with pytest.raises(DifflabError, match="ref_x0 has shape"):
        content_energy(model, x0[:, :, :4], noise=None)(x, t)
    with pytest.raises(DifflabError, match="rows"):
        text_energy(model, text[:2])(x, t)
    with pytest.raises(DifflabError, match="scale"):
        sdg(den, model, text_emb=text, scale=float("nan"))
