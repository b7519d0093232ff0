"""Blocks in any dimension, the shared encoder trunk, and the attention-processor contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.cond import Cond
from difflab.networks import UNet, UNetConfig, attention_modules, set_attn_processor
from difflab.networks.alignment import AlignmentConfig, AlignmentModel
from difflab.networks.attention import (
    Attention,
    AttentionBlock,
    ProbabilityProcessor,
    SDPAProcessor,
    SpatialTransformer,
)
from difflab.networks.classifier import ClassifierConfig, NoisyClassifier
from difflab.networks.layers import (
    ContextBlock,
    Downsample,
    EmbedSequential,
    ResBlock,
    TimestepBlock,
    Upsample,
)
from difflab.networks.trunk import EncoderTrunk


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


# ----- any dimension -------------------------------------------------------------------------
@pytest.mark.parametrize("dims, shape", [(1, (2, 3, 16)), (2, (2, 3, 16, 8)),
                                         (3, (2, 3, 4, 16, 8))])
def test_resampling_halves_and_doubles_space_but_keeps_frames(dims, shape):
    x = torch.randn(shape)
    down = Downsample(3, dims=dims)(x)
    pooled = Downsample(3, use_conv=False, dims=dims)(x)
    up = Upsample(3, dims=dims)(x)
    frames = shape[2:3] if dims == 3 else ()
    space = shape[3:] if dims == 3 else shape[2:]
    assert down.shape == pooled.shape == (2, 3, *frames, *(s // 2 for s in space))
    assert up.shape == (2, 3, *frames, *(2 * s for s in space))
    res = ResBlock(3, 8, 5, dims=dims, down=True)
    assert res(x, torch.randn(2, 8)).shape == (2, 5, *frames, *(s // 2 for s in space))


def _inflate(unet2d: UNet, unet3d: UNet) -> None:
    """3-D weights equal to the 2-D ones on the middle frame tap, zero elsewhere."""
    src = unet2d.state_dict()
    with torch.no_grad():
        for name, p in unet3d.state_dict().items():
            w = src[name]
            if p.ndim == 5:  # (out, in, kT, kH, kW)
                p.zero_()
                p[:, :, p.shape[2] // 2] = w
            else:
                p.copy_(w)


def test_a_video_unet_of_inflated_weights_on_one_frame_is_the_image_unet():
    """A 3-D U-Net is a configuration of the same blocks: with 2-D kernels on the middle
    temporal tap, a one-frame video gives the image U-Net's output exactly (rounding aside)."""
    cfg = UNetConfig.preset("tiny", model_channels=8, num_heads=2, resblock_updown=True)
    image = randomize(UNet(cfg))
    video = UNet(UNetConfig.preset("tiny", model_channels=8, num_heads=2, resblock_updown=True,
                                   dims=3))
    _inflate(image, video)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 500.0])
    torch.testing.assert_close(video(x[:, :, None], t)[:, :, 0], image(x, t),
                               atol=1e-5, rtol=1e-5)
    clip = torch.randn(2, 3, 5, 16, 16)
    assert video(clip, t).shape == (2, 3, 5, 16, 16)


def test_a_sequence_unet_trains():
    net = UNet(UNetConfig.preset("tiny", dims=1, in_channels=2, out_channels=2))
    x = torch.randn(4, 2, 16)
    out = net(x, torch.zeros(4))
    assert out.shape == (4, 2, 16) and torch.equal(out, torch.zeros_like(out))  # zero init
    randomize(net)
    net(x, torch.zeros(4)).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match=r"shape \(B, 2, L\)"):
        net(torch.randn(4, 2, 16, 16), torch.zeros(4))


# ----- blocks get only what they read ------------------------------------------------------
class Plain(nn.Module):
    def forward(self, x):
        return x + 1


class Timed(TimestepBlock):
    def forward(self, x, emb):
        return x + emb.sum()


class Texted(ContextBlock):
    def forward(self, x, context=None, context_mask=None):
        return x + context.sum()


def test_embed_sequential_passes_the_embedding_and_context_only_to_blocks_that_take_them():
    seq = EmbedSequential([Plain(), Timed(), Texted()])
    x, emb, ctx = torch.zeros(1), torch.full((1, 2), 2.0), torch.full((1, 1, 3), 3.0)
    assert float(seq(x, emb, ctx)) == 1 + 4 + 9
    assert isinstance(ResBlock(4, 8), TimestepBlock)
    assert isinstance(SpatialTransformer(4, 1, 4, context_dim=3), ContextBlock)
    assert not isinstance(AttentionBlock(4, 1, 4), (TimestepBlock, ContextBlock))


# ----- one trunk ---------------------------------------------------------------------------
def test_unet_classifier_and_alignment_share_the_trunk_and_its_names():
    unet = UNet(UNetConfig.preset("tiny"))
    clf = NoisyClassifier(ClassifierConfig.preset("tiny"))
    aln = AlignmentModel(AlignmentConfig.preset("tiny"))
    for net in (unet, clf, aln):
        assert isinstance(net, EncoderTrunk)
        names = {n.split(".")[0] for n, _ in net.named_parameters()}
        assert {"conv_in", "down"} <= names
    assert unet.mid is not None and clf.mid is not None and aln.mid is None
    # the U-Net's trunk is what its own encoder computes: same conv_in / down weights give
    # the classifier's trunk the same features
    c = unet.config
    twin = NoisyClassifier(ClassifierConfig(
        image_size=16, in_channels=3, num_classes=2, model_channels=c.model_channels,
        channel_mult=c.channel_mult, num_res_blocks=c.num_res_blocks,
        attention_resolutions=c.attention_resolutions, num_heads=c.num_heads, pool="mean"))
    randomize(unet)
    own = unet.state_dict()
    twin.load_state_dict({k: own[k] for k in twin.state_dict()
                          if k.startswith(("conv_in", "down", "mid", "time_embed"))}, strict=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 9.0])
    emb = torch.nn.functional.silu(unet.time_embed(t))
    h_u, skips_u = unet.run_trunk(x, emb)
    h_c, skips_c = twin.run_trunk(x, emb)
    torch.testing.assert_close(h_u, h_c)
    assert len(skips_u) == unet.num_skips == len(unet.skip_channels)


def test_alignment_features_are_the_level_ends_of_the_trunk():
    aln = randomize(AlignmentModel(AlignmentConfig.preset("tiny", num_res_blocks=2)))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 9.0])
    feats = aln.image_features(x, t)
    assert [f.shape[1] for f in feats] == list(aln.feature_channels)
    assert [f.shape[-1] for f in feats] == [16, 8]
    assert aln.level_ends == (2, 5)


# ----- the attention-processor contract ------------------------------------------------------
class LoRAProcessor(nn.Module):
    """A test adapter: low-rank updates of the q/k/v projections (Hu et al. 2021, eq. 3),
    wrapping the module's own projections before attention."""

    def __init__(self, attn: Attention, rank: int = 2) -> None:
        super().__init__()
        dim_in = attn.to_qkv.in_features if not attn.is_cross else attn.to_q.in_features
        out = (attn.to_qkv if not attn.is_cross else attn.to_q).out_features
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=False)
        nn.init.zeros_(self.up.weight)  # starts as the base model exactly

    def __call__(self, attn, x, context=None, context_mask=None):
        if attn.is_cross:
            q = attn.split(attn.to_q(x) + self.up(self.down(x)))
            _, k, v = attn.project(x, context)
        else:
            qkv = attn.to_qkv(x) + self.up(self.down(x))
            q, k, v = qkv.unflatten(-1, (3, attn.heads, attn.head_dim)).permute(2, 0, 3, 1, 4)
        mask, empty = attn.key_mask(context_mask)
        return attn.output(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask), empty)


def _text_unet():
    net = randomize(UNet(UNetConfig.preset("tiny", model_channels=8, num_heads=2,
                                           context_dim=6)), seed=4)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([2.0, 600.0])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return net, x, t, Cond(context=torch.randn(2, 3, 6, generator=g), context_mask=mask)


def test_a_lora_processor_wraps_the_projections_and_trains_only_itself():
    net, x, t, cond = _text_unet()
    ref = net(x, t, cond)
    net.requires_grad_(False)
    base = [p for p in net.parameters()]
    loras = {name: LoRAProcessor(m) for name, m in attention_modules(net).items()}
    set_attn_processor(net, loras)  # a processor that is a module becomes a submodule
    torch.testing.assert_close(net(x, t, cond), ref, rtol=0, atol=0)  # zero-init: exact
    params = [p for lora in loras.values() for p in lora.parameters()]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (net(x, t, cond) - 1.0).square().mean().backward()
        opt.step()
    assert all(p.grad is None for p in base)
    assert all(p.grad is not None for p in params)
    assert not torch.allclose(net(x, t, cond), ref)


class Recorder(ProbabilityProcessor):
    def __init__(self):
        self.maps: list[torch.Tensor] = []

    def edit(self, attn, probs):
        self.maps.append(probs)
        return probs


class Injector(ProbabilityProcessor):
    """Prompt-to-prompt's replacement (Hertz et al. 2023, Sec. 3.2): use stored maps."""

    def __init__(self, maps):
        self.maps = iter(maps)

    def edit(self, attn, probs):
        stored = next(self.maps)
        assert stored.shape == probs.shape
        return stored


@torch.no_grad()
def test_probabilities_can_be_read_and_replaced():
    net, x, t, cond = _text_unet()
    ref = net(x, t, cond)
    rec = Recorder()
    set_attn_processor(net, rec)
    torch.testing.assert_close(net(x, t, cond), ref, atol=1e-5, rtol=1e-5)
    cross = [m for m in rec.maps if m.shape[-1] == 3]
    assert cross and all(torch.allclose(m.sum(-1), torch.ones(())) for m in rec.maps)
    # masked key (sample 0, token 2) gets no weight
    assert all(float(m[0, ..., 2].abs().max()) == 0.0 for m in cross)
    # other prompt, injected maps of the first: attention follows the injected maps, so the
    # output differs from the other prompt's own and equals the recorded pass when the
    # values are the same
    other = Cond(context=torch.randn(2, 3, 6), context_mask=cond.context_mask)
    set_attn_processor(net, SDPAProcessor())
    own = net(x, t, other)
    set_attn_processor(net, Injector(rec.maps))
    injected = net(x, t, other)
    assert not torch.allclose(injected, own)
    set_attn_processor(net, Injector(rec.maps))
    torch.testing.assert_close(net(x, t, cond), ref, atol=1e-5, rtol=1e-5)
