"""DiT (Peebles & Xie 2023) as a difflab family: adaLN-Zero starts every block as the identity and
the output at exactly zero; after one optimizer step the gradients reach the modulation layers;
the fixed positions are the closed-form sin-cos table; every block design of the ablation and
text cross-attention run forward and backward; bad inputs are named; a ``[model] arch = "dit"``
config trains through ``difflab train`` in pixel space and on latents and samples with every
sampler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import difflab
from difflab import cli
from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.networks.dit import BLOCKS, PRESETS, DiT, DiTConfig, sincos_2d

CONFIG = """
[path]
kind = "discrete_linear"
N = 1000
[model]
arch = "dit"
preset = "tiny"
hidden_size = 16
learn_sigma = true
[task]
kind = "diffusion"
prediction = "eps"
cond = "class"
p_uncond = 0.1
[objective]
name = "hybrid"
[data]
name = "digits"
[train]
steps = 2
batch_size = 8
log_every = 1
checkpoint_every = 2
tensorboard = false
[sample]
steps = 3
n = 4
"""



def tiny(**kw) -> DiT:
    kw = {"in_channels": 3, "out_channels": 3, "num_classes": 4, **kw}
    return difflab.build("dit", preset="tiny", **kw)


def inputs(B: int = 2, C: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, C, size, size, generator=g), torch.tensor([3.0, 731.5])[:B]


def test_presets_are_table_1():
    table = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, (depth, width, heads) in table.items():
        c = PRESETS[name]
        assert (c.depth, c.hidden_size, c.num_heads, c.mlp_ratio) == (depth, width, heads, 4.0)
    c = DiTConfig.preset("S", patch_size=4, image_size=28, in_channels=1)
    assert c.grid == 7 and c.depth == 12


def test_adaln_zero_starts_every_block_as_the_identity_and_outputs_zero():
    net = tiny(context_dim=6, learn_sigma=True)
    x, t = inputs()
    cond = Cond(labels=torch.tensor([1, 4]), context=torch.randn(2, 5, 6))
    out = net(x, t, cond)
    assert out.shape == (2, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(h, c, None, cond.context, None), h)
    for block in ("adaln", "in_context", "cross_attention"):  # zero output, blocks not identity
        other = tiny(block=block)
        assert torch.equal(other(x, t), torch.zeros(2, 3, 8, 8))


def test_after_one_step_the_gradients_reach_the_modulation_layers():
    net = tiny()
    x, t = inputs()
    cond = Cond(labels=torch.tensor([0, 2]))
    target = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def grads():
        net.zero_grad()
        ((net(x, t, cond) - target) ** 2).mean().backward()
        return {k: float(p.grad.abs().max()) for k, p in net.named_parameters()}

    first = grads()  # at init only the zero output layer can move: everything else sees 0
    assert first["final.linear.weight"] > 0
    assert all(v == 0 for k, v in first.items() if not k.startswith("final.linear"))
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    second = grads()
    for i in range(len(net.blocks)):
        assert second[f"blocks.{i}.modulation.weight"] > 0
    assert second["final.modulation.weight"] > 0


def test_the_positions_are_the_closed_form_sin_cos_table():
    dim, h, w = 16, 3, 5
    pe = sincos_2d(dim, h, w)
    q = dim // 4
    for i, j in ((0, 0), (1, 3), (2, 4)):
        row = pe[i * w + j]
        for k in range(q):
            omega = 10000.0 ** (-k / q)
            want = [math.sin(j * omega), math.cos(j * omega), math.sin(i * omega),
                    math.cos(i * omega)]
            got = [float(row[k]), float(row[q + k]), float(row[2 * q + k]),
                   float(row[3 * q + k])]
            assert got == pytest.approx(want, abs=1e-6)
    net = tiny()
    assert torch.equal(net.pos_embed, sincos_2d(32, 4, 4))
    assert "pos_embed" not in net.state_dict()  # fixed: computed, never stored


@pytest.mark.parametrize("block", BLOCKS)
def test_every_block_design_runs_forward_and_backward(block):
    torch.manual_seed(0)
    net = tiny(block=block, context_dim=6, learn_sigma=True)
    with torch.no_grad():  # off the zero init, so every parameter matters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = inputs()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    cond = Cond(labels=torch.tensor([0, 3]), context=torch.randn(2, 3, 6), context_mask=mask)
    out = net(x, t, cond)
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    dead = [k for k, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert dead == []
    # the other labels and texts give other outputs, and the null class is the default
    with torch.no_grad():
        base = net(x, t, Cond(labels=torch.tensor([4, 4]), context=cond.context))
        assert torch.equal(base, net(x, t, Cond(context=cond.context)))
        assert not torch.allclose(base, net(x, t, Cond(labels=torch.tensor([1, 2]),
                                                       context=cond.context)))


def test_non_square_inputs_and_checkpointing():
    torch.manual_seed(1)
    net = tiny(grad_checkpointing=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, 12)
    out = net(x, torch.tensor([5.0, 50.0]))
    assert out.shape == (2, 3, 8, 12)
    out.square().sum().backward()
    with_ckpt = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad()
    net.config.grad_checkpointing = False
    net(x, torch.tensor([5.0, 50.0])).square().sum().backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, with_ckpt[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda n: n(torch.randn(2, 3, 9, 8), torch.ones(2)), "9x8 is not divisible by the patch"),
    (lambda n: n(torch.randn(2, 1, 8, 8), torch.ones(2)), r"expected x of shape \(B, 3, H, W\)"),
    (lambda n: n(torch.randn(2, 3, 8, 8), torch.ones(3)), r"t of shape \(2,\)"),
    (lambda n: n(torch.randn(2, 3, 8, 8), torch.ones(2), Cond(context=torch.randn(2, 4, 6))),
     "no text cross-attention.*context_dim=None"),
    (lambda n: n(torch.randn(2, 3, 8, 8), torch.ones(2), Cond(labels=torch.tensor([0, 5]))),
     r"lie in \[0, 4\]"),
    (lambda n: n(torch.randn(2, 3, 8, 8), torch.ones(2), Cond(concat=torch.randn(2, 1, 8, 8))),
     "cond.concat given"),
])
def test_bad_inputs_are_named(call, match):
    with pytest.raises(DifflabError, match=match):
        call(tiny())


def test_bad_configs_are_named():
    with pytest.raises(DifflabError, match="image_size=28.*multiple of patch_size=8"):
        difflab.build("dit", preset="S", image_size=28, patch_size=8)
    with pytest.raises(DifflabError, match="block='adaLN'.*adaln_zero"):
        difflab.build("dit", preset="tiny", block="adaLN")
    with pytest.raises(DifflabError, match="num_heads=5.*divisor of hidden_size=32"):
        difflab.build("dit", preset="tiny", num_heads=5)
    unconditional = difflab.build("dit", preset="tiny")
    with pytest.raises(DifflabError, match="labels given to an unconditional model"):
        unconditional(torch.randn(1, 1, 8, 8), torch.ones(1), Cond(labels=torch.tensor([0])))


# ----- runs ----------------------------------------------------------------------------------
def train_run(tmp: Path, *sets: str, text: str = CONFIG) -> Path:
    config = tmp / "dit.toml"
    config.write_text(text)
    out = tmp / "run"
    args = [a for s in sets for a in ("--set", s)]
    assert cli.main(["train", str(config), "--out", str(out), *args]) == 0
    return out


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("dit"))


def test_a_dit_config_trains_and_samples_through_the_cli(dit_run, tmp_path):
    from difflab.sampling import load_run

    run = load_run(dit_run)
    assert isinstance(run.net, DiT) and run.net.config.num_classes == 10
    assert run.net.config.image_size == 8 and run.denoiser.learned_variance
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(dit_run), "--n", "4", "--steps", "3", "--class", "3",
                     "--guidance", "cfg:2", "--sampler", "ddpm", "--option", "variance=learned",
                     "--out", str(out)]) == 0
    assert out.is_file()


SKIP = ("npr_ddpm", "sn_ddpm")  # these need a trained residual head, not a network


@pytest.mark.filterwarnings("ignore:.*fewer than its order")
def test_a_dit_run_samples_with_every_sampler(dit_run):
    from difflab.samplers import SAMPLERS
    from difflab.sampling import SampleRequest, generate

    for name in sorted(set(SAMPLERS) - set(SKIP)):
        out = generate(SampleRequest(dit_run, sampler=name, steps=3, n=2, labels=[1],
                                     guidance="cfg:1.5"))
        assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all(), name


def test_a_dit_trains_and_samples_on_latents(tmp_path):
    from difflab.config import load_config
    from difflab.sampling import SampleRequest, generate
    from difflab.training import train

    codec = tmp_path / "ae"
    train(load_config(None, ["task.kind='autoencoder'", "model.arch='autoencoder_kl'",
                             "model.preset='tiny'", "model.block_channels=[8, 16]",
                             "objective.name='autoencoder'", "train.steps=2",
                             "train.batch_size=8", "train.tensorboard=false",
                             "train.checkpoint_every=2"]), codec, progress=False)
    text = CONFIG.replace('[sample]', f'[codec]\nrun = "{codec}"\n[sample]\nclip_x0 = false')
    run = train_run(tmp_path, "model.patch_size=1", text=text)
    from difflab.sampling import load_run

    loaded = load_run(run)
    assert loaded.net.config.in_channels == 4 and loaded.net.config.image_size == 4
    out = generate(SampleRequest(run, sampler="ddim", steps=3, n=2, labels=[5]))
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()
