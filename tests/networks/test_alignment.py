"""The noise-aware image-text alignment model (SDG, Liu et al. 2023 Sec. 4; CLIP's temperature)."""

import math

import pytest
import torch

from difflab import VP
from difflab.errors import DifflabError
from difflab.networks.alignment import (
    LOGIT_SCALE_MAX,
    AlignmentConfig,
    AlignmentModel,
)
from difflab.networks.layers import ResBlock
from difflab.networks.noisy import NoisyModel


def _model(seed: int = 0, perturb: bool = True, **overrides) -> AlignmentModel:
    """The tiny preset at 8 px; ``perturb`` un-zeros the closing convs so t matters."""
    torch.manual_seed(seed)
    net = AlignmentModel(AlignmentConfig.preset("tiny", image_size=8, **overrides))
    if perturb:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, ResBlock):
                    m.conv2.weight.normal_(0, 0.1)
    return net


def test_shapes_unit_norms_and_features():
    net = _model()
    c = net.config
    x = torch.randn(5, 3, 8, 8)
    t = torch.linspace(0, 900, 5)
    img = net.image_embed(x, t)
    assert img.shape == (5, c.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(5))
    txt = net.text_embed(torch.randn(5, c.text_dim))
    assert txt.shape == (5, c.embed_dim)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(5))
    feats = net.image_features(x, t)
    assert [tuple(f.shape) for f in feats] == [(5, 16, 8, 8), (5, 32, 4, 4)]
    assert net.feature_channels == (16, 32)
    torch.testing.assert_close(net(x, t, None), img, rtol=0, atol=0)
    # a scalar t is every sample's t; other sizes than image_size work (global pooling)
    full = torch.full((5,), 300.0)
    torch.testing.assert_close(net.image_embed(x, 300.0), net.image_embed(x, full))
    assert net.image_embed(torch.randn(2, 3, 12, 16), 0.0).shape == (2, c.embed_dim)


def test_zero_init_blocks_are_identity_and_time_matters_once_trained():
    """ResBlocks start as the identity (zero closing conv): the tower then ignores t."""
    net = _model(perturb=False)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(net.image_embed(x, 0.0), net.image_embed(x, 999.0))
    h = net.conv_in(x)
    torch.testing.assert_close(net.image_features(x, 5.0)[0], h)
    net = _model(perturb=True)
    assert (net.image_embed(x, 0.0) - net.image_embed(x, 999.0)).abs().max() > 1e-3


def test_samples_are_independent_of_the_batch():
    net = _model()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([1.0, 200.0, 500.0, 999.0])
    whole = net.image_embed(x, t)
    for i in range(4):
        torch.testing.assert_close(net.image_embed(x[i:i + 1], t[i:i + 1]), whole[i:i + 1],
                                   rtol=1e-5, atol=1e-6)


def test_noisy_model_feeds_the_path_time_input():
    net = _model()
    path = VP.discrete_linear(1000)
    model = NoisyModel(net, path)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.001, 0.5, 1.0], dtype=torch.float64)
    # discrete paths feed the fractional step index t N - 1
    torch.testing.assert_close(model(x, t), net.image_embed(x, torch.tensor([0.0, 499.0, 999.0])))


def test_logit_scale_init_and_clamp():
    net = _model()
    assert math.isclose(float(net.scale.detach()), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        net.logit_scale.fill_(math.log(1000.0))
    assert float(net.scale.detach()) == LOGIT_SCALE_MAX


def test_float64_model_runs_in_float64():
    net = _model().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert net.image_embed(x, torch.tensor([3.0, 4.0])).dtype == torch.float64
    assert net.text_embed(torch.randn(2, 384)).dtype == torch.float64


def test_presets():
    tiny, small = AlignmentConfig.preset("tiny"), AlignmentConfig.preset("small")
    assert (tiny.text_dim, small.text_dim) == (384, 384)
    assert small.image_size == 32 and small.channel_mult == (1, 2, 2)
    net = AlignmentModel(small)
    assert net.image_embed(torch.randn(1, 3, 32, 32), 10.0).shape == (1, small.embed_dim)


def test_errors_name_the_bad_value():
    with pytest.raises(DifflabError, match="preset"):
        AlignmentConfig.preset("huge")
    with pytest.raises(DifflabError, match="unknown field"):
        AlignmentConfig.preset("tiny", widht=3)
    with pytest.raises(DifflabError, match="image_size"):
        AlignmentConfig(image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(DifflabError, match="embed_dim"):
        AlignmentConfig(embed_dim=0)
    with pytest.raises(DifflabError, match="dropout"):
        AlignmentConfig(dropout=1.0)
    net = _model()
    with pytest.raises(DifflabError, match=r"\(B, 3, H, W\)"):
        net.image_embed(torch.randn(2, 1, 8, 8), 0.0)
    with pytest.raises(DifflabError, match="divisible"):
        net.image_embed(torch.randn(2, 3, 7, 8), 0.0)
    with pytest.raises(DifflabError, match=r"t of shape \(2,\)"):
        net.image_embed(torch.randn(2, 3, 8, 8), torch.zeros(3))
    with pytest.raises(DifflabError, match=r"\(B, 384\)"):
        net.text_embed(torch.randn(2, 512))
