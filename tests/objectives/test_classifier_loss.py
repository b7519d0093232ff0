"""Tests of the noise-aware classifier loss (difflab.objectives.classifier)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab import VP, Cond, Denoiser
from difflab.errors import DifflabError
from difflab.networks.classifier import ClassifierConfig, NoisyClassifier
from difflab.networks.noisy import NoisyModel
from difflab.objectives.classifier import NoisyClassifierLoss, _classifier
from difflab.objectives.time import UniformTime


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(num_classes: int = 3, seed: int = 0) -> NoisyClassifier:
    torch.manual_seed(seed)
    net = NoisyClassifier(ClassifierConfig.preset("tiny", num_classes=num_classes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # leave the zero-init, so the logits depend on t
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net


class Spy(torch.nn.Module):
    """Linear logits; records the time inputs and conditions it was given."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, num_classes)
        self.seen: list = []

    def forward(self, x, t_in, cond=None):
        self.seen.append((t_in, cond))
        return self.lin(x.flatten(1))


def _data(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_discrete_path_loss_is_cross_entropy_at_the_drawn_step(smoothing):
    """Reproduce DDPM's draw by hand: step ``n ~ U{0..N-1}``, ``t = (n+1)/N``, then ``eps``."""
    path = VP.discrete_linear(1000)
    net = _net()
    x0, y = _data()
    got = NoisyClassifierLoss(label_smoothing=smoothing)(
        NoisyModel(net, path), x0, Cond(labels=y), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    n = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = path.alphas_cumprod[n].float()[:, None, None, None]  # DDPM's alpha_bar_n
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    want = F.cross_entropy(net(x_t, n.float()), y, reduction="none", label_smoothing=smoothing)
    assert got.shape == (6,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_continuous_path_loss_uses_uniform_time_and_the_path_time_input():
    path = VP.linear()
    net = _net()
    x0, y = _data()
    got = NoisyClassifierLoss()(NoisyModel(net, path), x0, Cond(labels=y),
                                generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = path.t_min + (path.t_max - path.t_min) * torch.rand(6, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g)
    x_t = path.add_noise(x0, eps, t)
    want = F.cross_entropy(net(x_t, (1000 * t).float()), y, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_labels_are_not_shown_to_the_network_and_other_fields_are():
    spy = Spy()
    x0, y = _data()
    NoisyClassifierLoss()(NoisyModel(spy, VP.linear()), x0, Cond(labels=y))
    assert spy.seen[-1][1] is None
    ctx = torch.zeros(6, 2, 4)
    NoisyClassifierLoss()(NoisyModel(spy, VP.linear()), x0, Cond(labels=y, context=ctx))
    passed = spy.seen[-1][1]
    assert passed.labels is None and passed.context is ctx


def test_factory_time_range_and_its_errors():
    spy = Spy()
    loss = _classifier(time_sampler="uniform", t_min=0.2, t_max=0.3, label_smoothing=0.05)
    assert loss.time_sampler == UniformTime(0.2, 0.3) and loss.label_smoothing == 0.05
    x0, y = _data(64)
    loss(NoisyModel(spy, VP.linear()), x0, Cond(labels=y))
    t = spy.seen[-1][0] / 1000
    assert 0.2 - 1e-6 <= float(t.min()) and float(t.max()) <= 0.3 + 1e-6
    with pytest.raises(DifflabError, match="without time_sampler"):
        _classifier(t_min=0.2)
    with pytest.raises(DifflabError, match="time_sampler"):
        _classifier(time_sampler="beta")


def test_bad_inputs():
    path = VP.discrete_linear(100)
    model = NoisyModel(Spy(), path)
    x0, y = _data()
    loss = NoisyClassifierLoss()
    with pytest.raises(DifflabError, match="labels"):
        loss(model, x0, None)
    with pytest.raises(DifflabError, match="labels"):
        loss(model, x0, Cond())
    with pytest.raises(DifflabError, match="integer labels"):
        loss(model, x0, Cond(labels=y.float()))
    with pytest.raises(DifflabError, match=r"shape \(6,\)"):
        loss(model, x0, Cond(labels=y[:4]))
    with pytest.raises(DifflabError, match="null class"):
        loss(model, x0, Cond(labels=torch.full((6,), 3)))  # 3 = num_classes = the null class
    with pytest.raises(DifflabError, match="out of range"):
        loss(model, x0, Cond(labels=torch.full((6,), 7)))
    with pytest.raises(DifflabError, match=">= 0"):
        loss(model, x0, Cond(labels=torch.full((6,), -1)))
    with pytest.raises(DifflabError, match="NoisyModel"):
        loss(Denoiser(Spy(), path), x0, Cond(labels=y))
    with pytest.raises(DifflabError, match="label_smoothing"):
        NoisyClassifierLoss(label_smoothing=1.0)


def _two_digits():
    from difflab.data.digits import Digits

    ds = Digits("all")
    keep = (ds.labels == 0) | (ds.labels == 1)
    x, y = ds.images[keep], ds.labels[keep]
    test = torch.arange(len(y)) % 5 == 0  # every fifth image is held out
    return (x[~test], y[~test]), (x[test], y[test])


def test_noisy_classifier_learns_where_the_posterior_is_informative():
    """The tiny classifier on real 8x8 digits 0 vs 1: near-perfect at small t, chance at t_max.

    At ``t_max`` of DDPM's linear schedule ``alpha ~ 0.006``: ``x_t`` carries almost no trace of
    the image, the true posterior is the prior (1/2, 1/2) and no classifier can beat chance.
    """
    (xtr, ytr), (xte, yte) = _two_digits()
    path = VP.discrete_linear(1000)
    torch.manual_seed(0)
    model = NoisyModel(NoisyClassifier(ClassifierConfig.preset("tiny", num_classes=2)), path)
    opt = torch.optim.Adam(model.net.parameters(), 5e-3)
    loss, g = NoisyClassifierLoss(), torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(ytr), (32,), generator=g)
        value = loss(model, xtr[idx], Cond(labels=ytr[idx]), generator=g).mean()
        opt.zero_grad()
        value.backward()
        opt.step()
    x, y = xte.repeat(8, 1, 1, 1), yte.repeat(8)  # 576 noisy held-out images
    with torch.no_grad():
        small = path.step_time(torch.randint(0, 100, (len(y),), generator=g))  # first 10%
        eps = torch.randn(x.shape, generator=g)
        acc_small = (model(path.add_noise(x, eps, small), small).argmax(1) == y).double().mean()
        big = torch.full((len(y),), path.t_max, dtype=torch.float64)
        acc_big = (model(path.add_noise(x, eps, big), big).argmax(1) == y).double().mean()
    assert acc_small > 0.95
    assert abs(float(acc_big) - 0.5) < 0.1  # binomial std of chance on 576: 0.02
