"""Tests of the noise-aware classifier (difflab.networks.classifier)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.networks import attention_modules
from difflab.networks.classifier import AttentionPool2d, ClassifierConfig, NoisyClassifier


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; OpenMP barriers stall under xdist / busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every parameter (the zero-init makes a fresh net ignore ``t``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _tiny(**kw) -> NoisyClassifier:
    torch.manual_seed(0)
    return NoisyClassifier(ClassifierConfig.preset("tiny", **{"num_classes": 3, **kw}))


# ----- configuration ----------------------------------------------------------------------------
def test_presets():
    tiny = _tiny()
    assert 1_000 < tiny.num_parameters() < 10_000  # a few thousand
    small = ClassifierConfig.preset("small", image_size=28, in_channels=1)
    assert small.attention_resolutions == (7,)  # attention and pooling at 7x7 for 28 px
    assert small.image_size // small.downsample_factor == 7
    base = ClassifierConfig.preset("base")  # ADM's 64x64 classifier: pooled at 8x8
    assert base.image_size // base.downsample_factor == 8
    assert base.pool == "attention" and base.resblock_updown and base.feature_dim == 512
    net = NoisyClassifier(small)
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.tensor([3.0, 700.0])).shape == (2, 10)


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 10, "channel_mult": (1, 2, 2)}, "image_size"),
        ({"attention_resolutions": (3,)}, "attention_resolutions"),
        ({"pool": "max"}, "pool"),
        ({"num_heads": 3}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"model_channels": 0}, "model_channels"),
    ],
)
def test_config_rejects_bad_values(kw, word):
    with pytest.raises(DifflabError, match=word):
        ClassifierConfig.preset("tiny", **kw)


def test_preset_rejects_unknown_name_and_field():
    with pytest.raises(DifflabError, match="tiny"):
        ClassifierConfig.preset("huge")
    with pytest.raises(DifflabError, match="widht"):
        ClassifierConfig.preset("tiny", widht=3)


# ----- the model --------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_shapes_features_and_head(pool):
    net = _tiny(pool=pool)
    _randomize(net)
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([0.0, 10.0, 200.0, 500.0, 999.0])
    logits = net(x, t)
    feats = net.features(x, t)
    assert logits.shape == (5, 3) and feats.shape == (5, net.config.feature_dim)
    torch.testing.assert_close(net.head(feats), logits, rtol=0, atol=0)
    # a scalar t is every sample's t; each sample is classified on its own (GroupNorm is
    # per sample), so a batch of one gives the same answer as its row in the batch
    torch.testing.assert_close(net(x, 7.0), net(x, torch.full((5,), 7.0)))
    torch.testing.assert_close(net(x[2:3], t[2:3]), logits[2:3], rtol=1e-5, atol=1e-6)


def test_zero_init_ignores_time_until_trained():
    """Every residual branch starts at zero, so the fresh net cannot see ``t``; trained, it can."""
    net = _tiny()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(net(x, torch.zeros(4)), net(x, torch.full((4,), 900.0)),
                               rtol=0, atol=0)
    _randomize(net)
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.full((4,), 900.0)))


def test_mean_pool_accepts_other_sizes_attention_pool_does_not():
    x = torch.randn(2, 1, 16, 16)
    assert _tiny(pool="mean")(x, torch.zeros(2)).shape == (2, 3)
    with pytest.raises(DifflabError, match="8x8"):
        _tiny()(x, torch.zeros(2))


def test_bad_inputs():
    net = _tiny()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(DifflabError, match="in_channels=1"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(DifflabError, match="t of shape"):
        net(x, torch.zeros(3))
    with pytest.raises(DifflabError, match="labels"):
        net(x, torch.zeros(2), Cond(labels=torch.zeros(2, dtype=torch.long)))
    net(x, torch.zeros(2), Cond(extra={"captions": ["a", "b"]}))  # extra is ignored
    with pytest.raises(DifflabError, match="divisible"):
        _tiny(pool="mean")(torch.randn(2, 1, 9, 9), torch.zeros(2))


# ----- attention pooling ------------------------------------------------------------------------
def _pool(seed: int = 0) -> AttentionPool2d:
    torch.manual_seed(seed)
    return AttentionPool2d(channels=8, spatial_size=4, heads=2, head_dim=4)


def test_attention_pool_is_permutation_invariant_without_positions():
    """With ``P = 0`` the mean token and the set of keys ignore the order of the pixels."""
    pool = _pool()
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    pool.double()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = x.flatten(2)[:, :, perm].reshape(x.shape)
    assert not torch.allclose(pool(x), pool(shuffled))  # the positional embedding sees order
    with torch.no_grad():
        pool.pos_emb.zero_()
    torch.testing.assert_close(pool(shuffled), pool(x), rtol=0, atol=1e-12)


def test_attention_pool_matches_brute_force_softmax():
    """Token 0 (mean + P_0) queries [mean; pixels] + P, per head (Vaswani et al. eq. 1)."""
    pool = _pool().double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    a = pool.attn
    wq, wkv, wo = a.to_q, a.to_kv, a.to_out
    got = pool(x)
    for b in range(2):
        tokens = x[b].flatten(1).T  # (16, 8)
        seq = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.pos_emb  # (17, 8)
        q = wq(seq[0])  # (8,)
        k, v = wkv(seq).chunk(2, dim=-1)  # (17, 8) each
        heads = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            w = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(4), dim=0)  # (17,)
            heads.append(w @ v[:, sl])
        torch.testing.assert_close(got[b], wo(torch.cat(heads)), rtol=1e-10, atol=1e-12)


def test_attention_processors_reach_the_pool():
    names = attention_modules(_tiny())
    assert "pool.attn" in names and "mid.1.attn" in names
