"""Classifier guidance with a noise-aware classifier behind a NoisyModel
(difflab.guidance.noisy_classifier)."""

from __future__ import annotations

import pytest
import torch

from difflab import VP, Cond
from difflab.errors import DifflabError
from difflab.guidance import classifier
from difflab.guidance.noisy_classifier import check_classifier_matches, classifier_log_prob
from difflab.networks.classifier import ClassifierConfig, NoisyClassifier
from difflab.networks.noisy import NoisyModel
from difflab.paths.base import expand_like
from difflab.testing import GaussianMixture

N = 1000


@pytest.fixture(scope="module")
def gm():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 4, generator=g) * 1.5
    stds = torch.rand(3, 4, generator=g) * 0.3 + 0.2
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


class OracleClassifierNet:
    """The mixture's exact noisy classifier as a *network*: it reads the discrete path's step
    index ``t_in = t N - 1`` (what NoisyModel feeds it) and returns logits ``log p(k | x_t)``."""

    def __init__(self, gm: GaussianMixture, path) -> None:
        self.gm, self.path = gm, path

    def __call__(self, x, t_in, cond=None):
        assert cond is None and t_in.dtype == torch.float32
        t = (t_in.double() + 1.0) / N  # back from the step index to path time
        return self.gm.log_responsibilities(x, t, self.path)


def _x(path, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=torch.float64, generator=g) * path.prior_std


STEPS = [0, 9, 250, 600, 999]  # integer steps: t_in is exact in float32


def test_log_prob_is_the_exact_posterior_through_the_step_index_convention(gm):
    path = VP.discrete_linear(N)
    y = torch.tensor([2, 1, 0, 2, 1, 0])
    log_p = classifier_log_prob(NoisyModel(OracleClassifierNet(gm, path), path), y)
    x = _x(path)
    for n in STEPS:
        t = path.step_time(n)
        want = gm.log_responsibilities(x, t, path)[torch.arange(6), y]
        torch.testing.assert_close(log_p(x, t), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(log_p(x, t.expand(6)), want, rtol=0, atol=1e-12)
    # fed path time instead of the step index, the same network answers something else
    wrong = classifier_log_prob(NoisyModel(OracleClassifierNet(gm, path), path, lambda t: t), y)
    t = path.step_time(250)
    assert not torch.allclose(wrong(x, t), log_p(x, t))


def test_one_label_for_all_samples(gm):
    path = VP.discrete_linear(N)
    x, t = _x(path), path.step_time(100)
    model = NoisyModel(OracleClassifierNet(gm, path), path)
    torch.testing.assert_close(classifier_log_prob(model, 1)(x, t),
                               classifier_log_prob(model, torch.ones(6, dtype=torch.long))(x, t))


def test_guidance_at_scale_one_is_the_exact_conditional_denoiser(gm):
    """Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t) (ADM Sec. 4.1)."""
    path = VP.discrete_linear(N)
    den = gm.denoiser(path)
    y = torch.tensor([2, 1, 0, 2, 1, 0])
    model = NoisyModel(OracleClassifierNet(gm, path), path)
    guided = classifier(den, classifier_log_prob(model, y), 1.0)
    x = _x(path, seed=4)
    for n in STEPS:
        t = path.step_time(n)
        want = den.bind(Cond(labels=y))(x, t)
        got = guided(x, t)
        torch.testing.assert_close(got.x0, want.x0, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(got.score, want.score, rtol=1e-7, atol=1e-7)
    unguided = den(x, path.step_time(250))
    assert not torch.allclose(guided(x, path.step_time(250)).x0, unguided.x0)


def test_guidance_with_a_network_classifier_adds_its_gradient():
    """``eps_guided = eps - s sigma grad_x log p(y | x_t)`` with the network fed ``t N - 1``."""
    path = VP.discrete_linear(N)
    torch.manual_seed(0)
    net = NoisyClassifier(ClassifierConfig.preset("tiny", num_classes=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    gm = GaussianMixture(torch.randn(2, 1, 8, 8, generator=g), 0.5)
    den = gm.denoiser(path)
    y = torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = path.step_time(torch.tensor([10, 400, 800]))
    guided = classifier(den, classifier_log_prob(NoisyModel(net, path), y), 2.5)(x, t)
    xr = x.clone().requires_grad_(True)
    logp = torch.log_softmax(net(xr, torch.tensor([10.0, 400.0, 800.0])), 1)[torch.arange(3), y]
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    want = den(x, t).eps - 2.5 * expand_like(path.sigma(t), x) * grad
    torch.testing.assert_close(guided.eps, want, rtol=1e-5, atol=1e-6)


def test_log_prob_bad_inputs(gm):
    path = VP.discrete_linear(N)
    model = NoisyModel(OracleClassifierNet(gm, path), path)
    x, t = _x(path), path.step_time(5)
    with pytest.raises(DifflabError, match="null class"):
        classifier_log_prob(model, 3)(x, t)  # 3 = K: the diffusion models' null class
    with pytest.raises(DifflabError, match="out of range"):
        classifier_log_prob(model, 5)(x, t)
    with pytest.raises(DifflabError, match=">= 0"):
        classifier_log_prob(model, -1)
    with pytest.raises(DifflabError, match="integer labels"):
        classifier_log_prob(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(DifflabError, match="batch size 6"):
        classifier_log_prob(model, torch.tensor([0, 1]))(x, t)
    with pytest.raises(DifflabError, match="NoisyModel"):
        classifier_log_prob(OracleClassifierNet(gm, path), 0)


def test_classifier_must_match_the_diffusion_run():
    check_classifier_matches((28, 1, 10), (28, 1, 10))
    check_classifier_matches((28, 1, 10), (28, 1, None))  # an unconditional diffusion model
    with pytest.raises(DifflabError) as err:
        check_classifier_matches((32, 1, 10), (28, 1, 10), "runs/clf", "runs/ddpm")
    msg = str(err.value)
    assert "image_size: runs/clf has 32, runs/ddpm has 28" in msg and "channels:" not in msg
    with pytest.raises(DifflabError, match="in_channels: .* has 3, .* has 1"):
        check_classifier_matches((28, 3, 10), (28, 1, 10))
    with pytest.raises(DifflabError, match="num_classes: .* has 2, .* has 10"):
        check_classifier_matches((28, 1, 2), (28, 1, 10))
    with pytest.raises(DifflabError, match="triple"):
        check_classifier_matches((28, 1), (28, 1, 10))
