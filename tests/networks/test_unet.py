"""Tests of the ADM / LDM U-Net (difflab.networks.unet)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from difflab.cond import Cond, Control
from difflab.errors import DifflabError
from difflab.networks import (
    Attention,
    SDPAProcessor,
    UNet,
    UNetConfig,
    attention_modules,
    set_attn_processor,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; OpenMP barriers stall under xdist / busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> UNetConfig:
    return UNetConfig.preset("tiny", **overrides)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Undo the zero-init so outputs depend on every path (tests only)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def ctx_cond(B: int = 2, L: int = 5, D: int = 8, **kw) -> Cond:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return Cond(context=torch.randn(B, L, D, generator=g), context_mask=mask, **kw)


def inputs(cfg: UNetConfig, B: int = 2, size: int | None = None):
    size = size or cfg.image_size
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, cfg.in_channels, size, size, generator=g), torch.tensor([3.25, 700.5])


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "size", "out_channels"),
    [
        ({}, 16, 3),
        ({}, 8, 3),
        ({}, 32, 3),
        ({"learn_sigma": True}, 16, 6),
        ({"in_channels": 1, "out_channels": 1, "resblock_updown": True}, 16, 1),
        ({"use_scale_shift_norm": False, "num_head_channels": 8}, 16, 3),
        ({"channel_mult": (1, 2, 2), "attention_resolutions": (16, 4)}, 16, 3),
    ],
)
def test_output_shape(overrides, size, out_channels):
    cfg = tiny(**overrides)
    x, t = inputs(cfg, size=size)
    out = randomize(UNet(cfg))(x, t)
    assert out.shape == (2, out_channels, size, size)
    assert torch.isfinite(out).all()


def test_presets_build_with_documented_sizes():
    counts = {n: sum(p.numel() for p in UNet(UNetConfig.preset(n)).parameters()) for n in PRESETS}
    assert 100_000 <= counts["tiny"] <= 300_000
    assert 3_000_000 <= counts["small"] <= 8_000_000
    assert counts["base"] > 30_000_000
    assert UNetConfig.preset("base").dropout == 0.1
    assert UNetConfig.preset("small", in_channels=1).in_channels == 1
    mnist = UNetConfig.preset("small", image_size=28)  # attention stays one level down
    assert mnist.attention_resolutions == (14,)
    assert UNet(mnist)(torch.randn(1, 3, 28, 28), torch.tensor([5.0])).shape == (1, 3, 28, 28)


PRESETS = ("tiny", "small", "base")


def test_conditional_model_shapes():
    cfg = tiny(num_classes=10, context_dim=8, concat_channels=2, learn_sigma=True)
    model = randomize(UNet(cfg))
    x, t = inputs(cfg)
    cond = ctx_cond(labels=torch.tensor([0, 10]), concat=torch.randn(2, 2, 16, 16))
    assert model(x, t, cond).shape == (2, 6, 16, 16)


def test_labels_change_output_and_missing_labels_mean_null_class():
    model = randomize(UNet(tiny(num_classes=4)))
    x, t = inputs(model.config)
    a = model(x, t, Cond(labels=torch.tensor([1, 1])))
    b = model(x, t, Cond(labels=torch.tensor([2, 2])))
    null = model(x, t, Cond(labels=torch.tensor([4, 4])))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, t), null)


def test_control_residuals_are_added_to_skips_and_middle():
    model = randomize(UNet(tiny()))
    x, t = inputs(model.config)
    skips = []
    hooks = [b.register_forward_hook(lambda m, i, o: skips.append(o)) for b in model.down]
    hooks.append(model.conv_in.register_forward_hook(lambda m, i, o: skips.insert(0, o)))
    mid = []
    hooks.append(model.mid.register_forward_hook(lambda m, i, o: mid.append(o)))
    base = model(x, t)
    for h in hooks:
        h.remove()
    assert model.num_skips == len(skips) == 4
    zeros = [torch.zeros_like(s) for s in [*skips, mid[0]]]

    def fixed(residuals):
        return Control(lambda x, t, hint, cond: residuals, hint=torch.zeros(2, 1))

    torch.testing.assert_close(model(x, t, Cond(control=[fixed(zeros)])), base)
    for i in range(len(zeros)):  # each residual reaches the output
        control = [z.clone() for z in zeros]
        control[i] += 1.0
        assert not torch.allclose(model(x, t, Cond(control=[fixed(control)])), base)


# --- initialisation and gradients ---------------------------------------------------------


def test_zero_init_gives_exactly_zero_output():
    cfg = tiny(num_classes=3, context_dim=8, learn_sigma=True)
    x, t = inputs(cfg)
    out = UNet(cfg)(x, t, ctx_cond(labels=torch.tensor([0, 2])))
    assert torch.equal(out, torch.zeros_like(out))


BEHIND_ZERO_INIT = {"time_embed", "label_emb", "norm1", "conv1", "emb_proj", "norm2"} | {
    "norm",
    "to_qkv",
    "proj_in",
    "blocks",  # attention internals, behind to_out / proj_out
}


@pytest.mark.parametrize("context", [False, True])
def test_gradients_spread_from_the_output_as_zero_init_layers_move(context):
    """SGD steps on a random target: step 1 reaches only the output conv, step 2 every
    parameter not hidden behind a zero-initialised layer, step 3 all of them."""
    torch.manual_seed(0)
    cfg = tiny(num_classes=3, context_dim=8 if context else None, learn_sigma=True, dropout=0.1)
    model = UNet(cfg)
    x, t = inputs(cfg)
    cond = ctx_cond(labels=torch.tensor([0, 3])) if context else Cond(labels=torch.tensor([0, 3]))
    target = torch.randn(2, 6, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    names = [n for n, _ in model.named_parameters()]
    expected_zero = [
        {n for n in names if not n.startswith("out_conv.")},
        {n for n in names if BEHIND_ZERO_INIT & set(n.split("."))},
        set(),
    ]
    for zero in expected_zero:
        opt.zero_grad()
        F.mse_loss(model(x, t, cond), target).backward()
        got = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
        assert got == zero
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()


# --- time embedding -----------------------------------------------------------------------


def test_timestep_embedding_closed_form_and_fractional_t():
    from difflab.networks import timestep_embedding

    t = torch.tensor([0.0, 1.0, 10.5, 999.0])
    dim = 8
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, 8)
    for i in range(4):  # w_i = 10000 ** (-i / 4); cos first, then sin
        w = 10000.0 ** (-i / 4)
        torch.testing.assert_close(emb[:, i], torch.cos(t * w), atol=1e-5, rtol=0)
        torch.testing.assert_close(emb[:, 4 + i], torch.sin(t * w), atol=1e-5, rtol=0)
    assert emb[2, 0] == pytest.approx(math.cos(10.5), abs=1e-6)
    near = timestep_embedding(torch.tensor([500.0, 500.25]), 128)
    assert (near[0] - near[1]).abs().max() > 0.1
    assert timestep_embedding(t, 7)[:, -1].eq(0).all()


def test_nearby_fractional_times_give_different_outputs():
    model = randomize(UNet(tiny()))
    x, _ = inputs(model.config)
    a = model(x, torch.tensor([100.0, 100.0]))
    b = model(x, torch.tensor([100.5, 100.5]))
    assert (a - b).abs().max() > 1e-4


# --- attention ----------------------------------------------------------------------------


def test_masked_context_token_has_no_effect():
    model = randomize(UNet(tiny(context_dim=8)))
    x, t = inputs(model.config)
    cond = ctx_cond()
    out = model(x, t, cond)
    changed = cond.context.clone()
    changed[0, 3:] = 100.0  # masked-out tokens of sample 0
    torch.testing.assert_close(
        model(x, t, Cond(context=changed, context_mask=cond.context_mask)), out
    )
    changed[0, 0] += 1.0  # a real token does matter
    assert not torch.allclose(
        model(x, t, Cond(context=changed, context_mask=cond.context_mask)), out
    )


def test_fully_masked_context_is_finite_and_ignores_the_tokens():
    model = randomize(UNet(tiny(context_dim=8)))
    x, t = inputs(model.config)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    a = model(x, t, Cond(context=torch.randn(2, 5, 8), context_mask=mask))
    b = model(x, t, Cond(context=torch.randn(2, 5, 8), context_mask=mask))
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


class CountingProcessor:
    def __init__(self):
        self.calls: list[bool] = []

    def __call__(self, module, x, context, context_mask):
        self.calls.append(module.is_cross)
        return SDPAProcessor()(module, x, context, context_mask)


class ManualProcessor:
    """The whole attention written out from the hidden states (Vaswani et al. 2017, eq. 1),
    using only the module's weights: the contract gives a processor what it needs."""

    def __call__(self, module, x, context, context_mask):
        src = x if context is None else context
        h, d = module.heads, module.head_dim
        if module.is_cross:
            q, kv = module.to_q(x), module.to_kv(src)
            k, v = kv[..., :h * d], kv[..., h * d:]
        else:
            q, k, v = module.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (h, d)).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        out = torch.nan_to_num(scores.softmax(dim=-1)) @ v
        return module.to_out(out.transpose(1, 2).flatten(2))


def test_processor_is_called_by_every_attention_module():
    model = randomize(UNet(tiny(context_dim=8, transformer_depth=2)))
    mods = attention_modules(model)
    n_cross = sum(m.is_cross for m in mods.values())
    assert n_cross == len(mods) // 2 == 8  # 4 transformers x depth 2
    counter = CountingProcessor()
    set_attn_processor(model, counter)
    x, t = inputs(model.config)
    model(x, t, ctx_cond())
    assert len(counter.calls) == len(mods) and sum(counter.calls) == n_cross
    counters = {name: CountingProcessor() for name in mods}
    set_attn_processor(model, counters)
    model(x, t, ctx_cond())
    assert all(len(c.calls) == 1 for c in counters.values())
    with pytest.raises(DifflabError, match="missing"):
        set_attn_processor(model, {next(iter(mods)): SDPAProcessor()})


@pytest.mark.parametrize("context", [False, True])
def test_manual_processor_matches_sdpa(context):
    model = randomize(UNet(tiny(context_dim=8 if context else None)), seed=3)
    x, t = inputs(model.config)
    cond = ctx_cond() if context else None
    ref = model(x, t, cond)
    set_attn_processor(model, ManualProcessor())
    torch.testing.assert_close(model(x, t, cond), ref, atol=1e-5, rtol=1e-5)


def test_self_and_cross_attention_are_flagged():
    assert not Attention(8, 2, 4).is_cross
    assert Attention(8, 2, 4, context_dim=6).is_cross
    model = UNet(tiny())
    assert all(not m.is_cross for m in attention_modules(model).values())


# --- memory formats and mixed precision ---------------------------------------------------


def test_channels_last_matches_contiguous():
    model = randomize(UNet(tiny(context_dim=8, resblock_updown=True)))
    x, t = inputs(model.config)
    ref = model(x, t, ctx_cond())
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t, ctx_cond())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_runs_and_is_close():
    model = randomize(UNet(tiny(num_classes=2, context_dim=8)), seed=4)
    x, t = inputs(model.config)
    cond = ctx_cond(labels=torch.tensor([0, 1]))
    ref = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 0.05


def test_a_bfloat16_model_runs_behind_a_denoiser_with_float32_time():
    """A model cast to bfloat16 (no autocast) takes float32 text tokens and keeps the time
    signal in float32: in bfloat16 the DDPM step 997 would become 996 (8-bit mantissa)."""
    from difflab.denoiser import Denoiser
    from difflab.paths import VP

    model = randomize(UNet(tiny(num_classes=2, context_dim=8)), seed=5)
    half = randomize(UNet(tiny(num_classes=2, context_dim=8)), seed=5).to(torch.bfloat16)
    x, _ = inputs(model.config)
    cond = ctx_cond(labels=torch.tensor([0, 1]))
    path = VP.discrete_linear()
    t = torch.tensor([998.0, 500.0], dtype=torch.float64) / 1000  # step 997
    seen = []
    half.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    ref = Denoiser(model, path, prediction="eps", cond=cond).predict(x, t).eps
    out = Denoiser(half, path, prediction="eps", cond=cond).predict(x.bfloat16(), t).eps
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert seen[0].dtype == torch.float32
    assert torch.equal(seen[0], path.time_input(t).float())
    assert float(seen[0][0]) != float(path.time_input(t)[0].bfloat16())  # would have rounded
    assert (out.float() - ref).norm() / ref.norm() < 0.05


# --- input validation ---------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    plain = UNet(tiny())
    x, t = inputs(plain.config)
    with pytest.raises(
        ValueError, match=r"expected x of shape \(B, 3, H, W\).*got \(2, 4, 16, 16\)"
    ):
        plain(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        plain(torch.randn(2, 3, 15, 15), t)
    with pytest.raises(ValueError, match="labels given to an unconditional model"):
        plain(x, t, Cond(labels=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, Cond(context=torch.randn(2, 3, 8)))
    with pytest.raises(ValueError, match=r"expected t of shape \(2,\)"):
        plain(x, torch.ones(3))
    with pytest.raises(ValueError, match="expected 5 control residuals"):
        plain(x, t, Cond(control=[Control(lambda *a: [torch.zeros(1)], torch.zeros(2, 1))]))
    with pytest.raises(ValueError, match="difflab.Control"):
        plain(x, t, Cond(control=[torch.zeros(1)]))

    labelled = UNet(tiny(num_classes=4))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\].*got values in \[0, 5\]"):
        labelled(x, t, Cond(labels=torch.tensor([0, 5])))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        labelled(x, t, Cond(labels=torch.tensor([-1, 0])))

    text = UNet(tiny(context_dim=8))
    with pytest.raises(
        ValueError, match=r"expected cond.context of shape \(2, L, 8\).*got \(2, 3, 6\)"
    ):
        text(x, t, Cond(context=torch.randn(2, 3, 6)))
    with pytest.raises(ValueError, match=r"expected cond.context of shape"):
        text(x, t)

    concat = UNet(tiny(concat_channels=2))
    with pytest.raises(ValueError, match=r"expected cond.concat of shape \(2, 2, 16, 16\)"):
        concat(x, t, Cond(concat=torch.randn(2, 1, 16, 16)))


def test_bad_configs_raise():
    with pytest.raises(DifflabError, match="attention_resolutions"):
        tiny(attention_resolutions=(5,))
    with pytest.raises(DifflabError, match="one of"):
        UNetConfig.preset("huge")
    with pytest.raises(DifflabError, match="unknown field"):
        UNetConfig.preset("tiny", channels=3)
    with pytest.raises(DifflabError, match="head layout"):
        tiny(num_heads=3)
