"""Guidance on a class-labelled Gaussian mixture, whose conditional denoisers are exact."""

import pytest
import torch

from difflab import VE, VP, Cond, Linear
from difflab.errors import DifflabError
from difflab.guidance import cfg, classifier, energy, interval
from difflab.samplers import ddim, timesteps
from difflab.testing import GaussianMixture

PATHS = [VP.discrete_linear(), VP.linear(), VE(), Linear()]


@pytest.fixture(scope="module")
def gm():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 4, generator=g) * 1.5
    stds = torch.rand(3, 4, generator=g) * 0.3 + 0.2
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


def _x(path, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g) * path.prior_std


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_cfg_scale_one_and_zero_are_the_conditional_and_unconditional(gm, path):
    den = gm.denoiser(path)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cond, null = Cond(labels=y), Cond(labels=torch.full_like(y, gm.K))
    x = _x(path)
    for t in torch.linspace(path.t_min, path.t_max, 5, dtype=torch.float64):
        c = den.bind(cond)(x, t)
        u = den.bind(null)(x, t)
        g1 = cfg(den, cond, null, 1.0)(x, t)
        g0 = cfg(den, cond, null, 0.0)(x, t)
        torch.testing.assert_close(g1.x0, c.x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(g1.eps, c.eps, rtol=0, atol=1e-9)
        torch.testing.assert_close(g0.x0, u.x0, rtol=0, atol=1e-12)
        # scale 3 extrapolates: x0 = u + 3 (c - u), and x_t = alpha x0 + sigma eps still holds
        g3 = cfg(den, cond, null, 3.0)(x, t)
        torch.testing.assert_close(g3.x0, u.x0 + 3 * (c.x0 - u.x0))
        recon = g3.alpha * g3.x0 + g3.sigma * g3.eps
        torch.testing.assert_close(recon, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_classifier_guidance_with_exact_classifier_is_bayes_rule(gm, path):
    """s = 1, exact noisy classifier, exact unconditional denoiser == exact conditional one."""
    den = gm.denoiser(path)
    y = torch.tensor([2, 1, 0, 2, 1, 0])
    x = _x(path, seed=1)

    def log_p(x_t, t):
        return gm.log_responsibilities(x_t, t, path)[torch.arange(x_t.shape[0]), y]

    guided = classifier(den, log_p, 1.0)
    for t in torch.linspace(path.t_min, path.t_max, 5, dtype=torch.float64):
        want = den.bind(Cond(labels=y))(x, t)
        got = guided(x, t)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(got.score, want.score, rtol=1e-7, atol=1e-7)


def test_energy_on_x0_pulls_samples_towards_low_energy(gm):
    path = VP.linear()
    den = gm.denoiser(path)
    target = gm.means[2].reshape(4)

    def e(x0, t):
        return 0.5 * ((x0 - target) ** 2).sum(1)

    x = _x(path, n=200, seed=2)
    grid = timesteps.log_snr(path, 40)
    plain = ddim(den, x, grid)
    guided = ddim(energy(den, e, 2.0, on="x0"), x, grid)
    d_plain = (plain - target).norm(dim=1).mean()
    d_guided = (guided - target).norm(dim=1).mean()
    assert d_guided < 0.7 * d_plain


def test_interval_switches_guidance_off_outside(gm):
    path = VP.linear()
    den = gm.denoiser(path)
    y = torch.zeros(6, dtype=torch.long)
    cond, null = Cond(labels=y), Cond(labels=torch.full_like(y, gm.K))
    g = interval(cfg(den, cond, null, 4.0), 0.3, 0.7)
    x = _x(path)
    inside, outside = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    torch.testing.assert_close(g(x, inside).x0, cfg(den, cond, null, 4.0)(x, inside).x0)
    torch.testing.assert_close(g(x, outside).x0, den.bind(cond)(x, outside).x0)
    mixed = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.2, 0.6], dtype=torch.float64)
    got = g(x, mixed).x0
    guided, plain = cfg(den, cond, null, 4.0)(x, mixed).x0, den.bind(cond)(x, mixed).x0
    use = ((mixed >= 0.3) & (mixed <= 0.7))[:, None]
    torch.testing.assert_close(got, torch.where(use, guided, plain))
    assert not torch.allclose(guided, plain)


def test_cfg_sampling_concentrates_on_requested_class(gm):
    path = VP.discrete_linear()
    den = gm.denoiser(path)
    n = 300
    y = torch.full((n,), 1)
    cond, null = Cond(labels=y), Cond(labels=torch.full_like(y, gm.K))
    x = _x(path, n=n, seed=4)
    grid = timesteps.discrete(path, 25, "trailing")
    acc = []
    for s in (0.0, 1.0, 3.0):
        out = ddim(cfg(den, cond, null, s), x, grid)
        pred = gm.log_responsibilities(out, torch.tensor(path.t_min), path).argmax(1)
        acc.append(float((pred == 1).double().mean()))
    assert acc[0] < 0.5 < acc[1] <= acc[2]
    assert acc[2] > 0.98


def test_bad_inputs(gm):
    den = gm.denoiser(VP.linear())
    with pytest.raises(DifflabError, match="rescale"):
        cfg(den, Cond(labels=torch.zeros(1)), Cond(labels=torch.zeros(1)), 2.0, rescale=2.0)
    with pytest.raises(DifflabError, match="null_cond"):
        cfg(den, Cond(labels=torch.zeros(1)), None, 2.0)
    with pytest.raises(DifflabError, match="on="):
        energy(den, lambda x, t: x.sum(1), 1.0, on="z")
    with pytest.raises(DifflabError, match="t_lo < t_hi"):
        interval(cfg(den, Cond(labels=torch.zeros(1)), Cond(labels=torch.zeros(1)), 2.0), 0.5, 0.1)
    with pytest.raises(ValueError, match="labels must be component ids"):
        den.bind(Cond(labels=torch.tensor([7])))(torch.zeros(1, 4, dtype=torch.float64), 0.5)
    with pytest.raises(DifflabError, match="one value per sample"):
        energy(den, lambda x, t: x, 1.0, on="xt")(torch.zeros(2, 4, dtype=torch.float64),
                                                  torch.full((2,), 0.5, dtype=torch.float64))
