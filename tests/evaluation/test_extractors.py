"""Feature extractors: accuracy on held-out MNIST, caching, determinism, errors, and FID
orderings that any sane extractor must produce."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from difflab import VP, Denoiser
from difflab.data import build_dataset, holdout_indices
from difflab.errors import DifflabError
from difflab.evaluation import (
    EXTRACTORS,
    ExtractorNotTrainedError,
    MissingWeightsError,
    RealReference,
    TrainConfig,
    get_extractor,
)
from difflab.evaluation.inception import WEIGHTS_NAME
from difflab.samplers import Hooks, PerSampleNoise, sample, timesteps


def test_mnist_lenet_reaches_98_percent_on_held_out_images(mnist, mnist_lenet):
    x, y = mnist.as_tensors()
    spec = EXTRACTORS["mnist-lenet"]
    held = holdout_indices(len(y), "test", spec.holdout_fraction, spec.train.seed, y.numpy())
    train = holdout_indices(len(y), "train", spec.holdout_fraction, spec.train.seed, y.numpy())
    assert len(held) == 2000 and len(train) == 8000 and not set(held) & set(train)
    pred = mnist_lenet.logits(x[held]).argmax(1)
    accuracy = float((pred == y[held]).double().mean())
    print(f"mnist-lenet: held-out accuracy {accuracy:.4f}, trained in "
          f"{mnist_lenet.meta['train_seconds']:.1f} s (fixture: "
          f"{mnist_lenet.meta['test_seconds']:.1f} s, with any wait for another worker)")
    assert accuracy >= 0.98
    assert mnist_lenet.features(x[:10]).shape == (10, 128)


def test_cached_extractor_loads_identically_and_other_data_is_not_cached(
        mnist, mnist_lenet, extractor_cache):
    x, y = mnist.as_tensors()
    again = get_extractor("mnist-lenet", mnist, root=extractor_cache)  # no training allowed
    assert torch.equal(again.features(x[:50]), mnist_lenet.features(x[:50]))
    with pytest.raises(ExtractorNotTrainedError, match=r"(?s)mnist-lenet.*--train-extractor"):
        get_extractor("mnist-lenet", (x[:500], y[:500]), root=extractor_cache)


def test_training_is_deterministic_given_the_seed(tmp_path, digits_mlp):
    data = build_dataset("digits", split="train")
    a = digits_mlp
    b = get_extractor("digits-mlp", data, train=True, root=tmp_path)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.meta["key"] == b.meta["key"]
    x, y = data.as_tensors()
    held = holdout_indices(len(y), "test", 0.2, 0, y.numpy())
    assert float((a.logits(x[held]).argmax(1) == y[held]).double().mean()) >= 0.9


def test_emoji_autoencoder_embeds_and_has_no_logits(tmp_path, emoji_root):
    data = build_dataset("emoji", root=emoji_root, image_size=32, split="all", limit=128)
    ext = get_extractor("emoji-ae", data, train=True, root=tmp_path,
                        train_config=TrainConfig(epochs=2, batch_size=32, shift=0))
    x = torch.stack([data[i][0] for i in range(len(data))])
    f = ext.features(x)
    assert f.shape == (128, 64) and torch.isfinite(f).all()
    assert ext.meta["score_kind"] == "psnr_db"
    with pytest.raises(DifflabError, match="no class logits"):
        ext.logits(x[:2])


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFLAB_INCEPTION_WEIGHTS", raising=False)
    expected = tmp_path / "weights" / WEIGHTS_NAME
    with pytest.raises(MissingWeightsError, match=str(expected)):
        get_extractor("inception")
    monkeypatch.setenv("DIFFLAB_INCEPTION_WEIGHTS", str(tmp_path / "mine.pth"))
    with pytest.raises(MissingWeightsError, match=r"(?s)mine\.pth.*never downloads"):
        get_extractor("inception")


def test_mismatched_image_sizes_are_rejected(mnist, mnist_lenet):
    with pytest.raises(DifflabError, match=r"expects \(1, 28, 28\) images, got \(1, 32, 32\)"):
        mnist_lenet.features(torch.zeros(2, 1, 32, 32))
    x, _ = mnist.as_tensors()
    ref = RealReference(mnist_lenet, x[:400])
    with pytest.raises(DifflabError, match=r"real images are \(1, 28, 28\) but generated"):
        ref.evaluate(torch.zeros(300, 3, 28, 28))
    with pytest.raises(DifflabError, match="KID"):  # 100 samples < 128 feature dimensions
        ref.evaluate(x[:100], metrics=("fid",))


def test_fid_orders_real_floor_below_degraded_below_noise(mnist, mnist_lenet):
    x, _ = mnist.as_tensors()
    g = torch.Generator().manual_seed(0)
    ref = RealReference(mnist_lenet, x[:6000], generator=g)  # 3,000 reference + 3,000 others
    n = 1000
    kw = {"kid_subsets": 20, "kid_subset_size": 500}
    floor = ref.floor(n, ("fid", "kid", "pr"), **kw)
    held = ref.holdout_images[:n]
    mild = (held + 0.25 * torch.randn(held.shape, generator=g)).clamp(-1, 1)
    noise = torch.rand(held.shape, generator=g) * 2 - 1
    s_mild, s_noise = ref.evaluate(mild, **kw), ref.evaluate(noise, **kw)
    print(f"{floor['fid']}\n{s_mild['fid']} (mild noise)\n{s_noise['fid']} (uniform noise)")
    assert floor["fid"].value < s_mild["fid"].value < s_noise["fid"].value
    assert floor["fid"].n_fake == s_mild["fid"].n_fake == n
    assert floor["kid"].value < s_mild["kid"].value < s_noise["kid"].value
    assert floor["precision"].value > s_noise["precision"].value
    assert floor["recall"].value > 0.8 and s_noise["recall"].value < 0.05


class _MLP(nn.Module):
    """A tiny x0-predicting MLP ``net(x, t_in, cond)`` with sinusoidal time features."""

    def __init__(self, d: int = 784, hidden: int = 256, freqs: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(freqs) / freqs))
        self.net = nn.Sequential(nn.Linear(d + 2 * freqs, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, t, cond=None):
        e = t[:, None].float() * self.freqs
        return self.net(torch.cat([x.flatten(1), e.sin(), e.cos()], 1)).view_as(x)


def _samples(net: nn.Module, path, n: int) -> torch.Tensor:
    den = Denoiser(net, path, prediction="x0")
    clamp = Hooks(correct_x0=lambda x0, t: x0.clamp(-1, 1))
    with torch.no_grad():
        x = path.prior_sample((n, 1, 28, 28), noise=PerSampleNoise(range(n)))
        return sample("ddim", den, x, timesteps.discrete(path, 20), hooks=clamp)


def test_fid_orders_floor_below_trained_below_untrained_diffusion_model(mnist, mnist_lenet):
    """A real diffusion model (x0-prediction MLP on a 1000-step VP path, DDPM's L_simple on x0,
    a few hundred Adam steps on the 8,000 training images) against the same model untrained."""
    x, _ = mnist.as_tensors()
    train_idx = torch.from_numpy(holdout_indices(len(x), "train", 0.2, 0))
    torch.manual_seed(0)
    trained, untrained = _MLP(), _MLP()
    path = VP.discrete_linear(1000)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(trained.parameters(), 2e-3)
    for _ in range(300):
        x0 = x[train_idx[torch.randint(0, len(train_idx), (128,), generator=g)]]
        t = torch.randint(1, 1001, (128,), generator=g).double() / 1000
        x_t = path.add_noise(x0, torch.randn(x0.shape, generator=g), t).float()
        loss = (trained(x_t, path.time_input(t)) - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = RealReference(mnist_lenet, x, generator=torch.Generator().manual_seed(0))
    n = 600
    floor = ref.floor(n, ("fid",))["fid"]
    good = ref.evaluate(_samples(trained, path, n), ("fid",))["fid"]
    bad = ref.evaluate(_samples(untrained, path, n), ("fid",))["fid"]
    print(f"{floor}\n{good} (trained)\n{bad} (untrained)")
    assert floor.value < good.value < bad.value
    assert np.isfinite(good.value) and good.value < 0.5 * bad.value
