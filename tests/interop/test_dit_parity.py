"""Published DiT layouts in and out of difflab: a tiny random diffusers ``DiTTransformer2DModel``
built locally gives the same outputs as difflab's DiT after ``difflab.load`` of its folder
(float32, max abs diff <= 1e-5, with and without learned sigma) and back through
``save_diffusers``; the facebookresearch/DiT state-dict layout round-trips exactly, a ``.pt``
written with ``torch.save`` loads through ``difflab.load`` and samples through ``difflab sample``
(in pixel space, on latents with a VAE beside it, and as a diffusers ``DiTPipeline``); checkpoints
of another patch size or depth fail naming the tensors; a pickle that needs code is never run."""

from __future__ import annotations

import pytest
import torch

import difflab
from difflab import cli
from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.interop.dit import (
    config_from_facebook,
    dit_to_facebook_state,
    load_dit_checkpoint,
    save_dit_checkpoint,
)
from difflab.networks.dit import DiT
from difflab.testing.sd import jitter, tiny_vae

ATOL = 1e-5



def peer_dit(learn_sigma: bool, tie: bool = True, in_channels: int = 3):
    """A random ``DiTTransformer2DModel`` (2 blocks of width 32, patch 2 over 8x8, 5 classes),
    its per-block time and class embedders tied to block 0's as in every converted DiT."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    peer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=in_channels * (2 if learn_sigma else 1), num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=5)
    jitter(peer, seed=2)
    if tie:
        state = peer.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                    v.copy_(state["transformer_blocks.0." + k.split(".", 2)[2]])
    return peer.eval()


def peer_inputs(C: int = 3):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, 8, 8, generator=g)
    return x, torch.tensor([3.0, 500.5, 999.0]), torch.tensor([0, 4, 5])  # 5: the null class


def ours_random(learn_sigma: bool = True, **kw) -> DiT:
    net = difflab.build("dit", preset="tiny", hidden_size=128, num_heads=2, in_channels=3,
                        out_channels=3, num_classes=5, learn_sigma=learn_sigma, **kw)
    return jitter(net, seed=1)


@pytest.mark.parametrize("learn_sigma", [False, True], ids=["eps", "learn_sigma"])
def test_a_diffusers_dit_folder_loads_with_the_same_outputs(tmp_path, learn_sigma):
    peer = peer_dit(learn_sigma)
    peer.save_pretrained(tmp_path / "dit")
    ours = difflab.load(tmp_path / "dit")
    c = ours.config
    assert isinstance(ours, DiT) and (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (
        2, 32, 2, 2)
    assert c.num_classes == 5 and c.learn_sigma == learn_sigma and c.time_freq_shift == 1
    x, t, y = peer_inputs()
    with torch.no_grad():
        ref = peer(x, t, y).sample
        got = ours(x, t, Cond(labels=y))
    assert got.shape == ref.shape == (3, 6 if learn_sigma else 3, 8, 8)
    assert float((got - ref).abs().max()) <= ATOL
    # and back: difflab writes a folder diffusers reads to the same outputs
    difflab.interop.diffusers.save_diffusers(ours, tmp_path / "back")
    from diffusers import DiTTransformer2DModel

    again = DiTTransformer2DModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert float((again(x, t, y).sample - ref).abs().max()) <= ATOL
    for k, v in peer.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_untied_per_block_embedders_are_refused_by_name(tmp_path):
    peer_dit(False, tie=False).save_pretrained(tmp_path / "dit")
    with pytest.raises(DifflabError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder"):
        difflab.load(tmp_path / "dit")


def test_unsupported_diffusers_settings_are_named(tmp_path):
    from diffusers import DiTTransformer2DModel

    peer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
                                 activation_fn="gelu")
    peer.save_pretrained(tmp_path / "dit")
    with pytest.raises(DifflabError, match="activation_fn='gelu'.*gelu-approximate"):
        difflab.load(tmp_path / "dit")


FB_KEYS = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
           "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
           "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
           "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
           "final_layer.linear.weight", "final_layer.linear.bias"} | {
    f"blocks.{i}.{m}.{s}" for i in range(2) for s in ("weight", "bias")
    for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}


def test_the_facebookresearch_layout_round_trips_exactly(tmp_path):
    ours = ours_random()
    state = dit_to_facebook_state(ours)
    assert set(state) == FB_KEYS
    assert state["blocks.0.attn.qkv.weight"].shape == (384, 128)
    assert state["y_embedder.embedding_table.weight"].shape == (6, 128)  # + the null class
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 6, 128)  # p p 2C
    c = config_from_facebook(state)
    assert c == ours.config  # depth, width, patch, classes, learn_sigma read off the tensors
    f = save_dit_checkpoint(ours, tmp_path / "DiT-tiny.pt")
    back = difflab.load(f)
    assert isinstance(back, DiT) and back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x, t, y = peer_inputs()
    with torch.no_grad():
        assert torch.equal(back(x, t, Cond(labels=y)), ours(x, t, Cond(labels=y)))
    # a train.py checkpoint nests the weights: its EMA ones are read
    torch.save({"model": state, "ema": state, "opt": {}}, tmp_path / "0001000.pt")
    assert torch.equal(difflab.load(tmp_path / "0001000.pt").state_dict()["final.linear.weight"],
                       ours.state_dict()["final.linear.weight"])
    # a facebookresearch file of the same weights keeps them after difflab.save / load
    difflab.save(back, tmp_path / "component")
    again = difflab.load(tmp_path / "component")
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_a_checkpoint_of_another_patch_size_or_depth_names_the_tensors(tmp_path):
    f = save_dit_checkpoint(ours_random(), tmp_path / "p2.pt")
    other_patch = ours_random(patch_size=4).config
    with pytest.raises(DifflabError, match=r"patch_size=4.*x_embedder\.proj\.weight "
                       r"\(128, 3, 2, 2\) \(config gives \(128, 3, 4, 4\)\).*"
                       r"final_layer\.linear\.weight.*pos_embed \(1, 16, 128\)"):
        load_dit_checkpoint(f, config=other_patch)
    deeper = ours_random(depth=3).config
    with pytest.raises(DifflabError, match=r"depth=3.*missing 10: blocks\.2\.adaLN_modulation"):
        load_dit_checkpoint(f, config=deeper)
    state = torch.load(f, weights_only=True)
    state["blocks.2.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(DifflabError, match=r"unexpected 1: blocks\.2\.attn\.qkv\.weight"):
        load_dit_checkpoint(tmp_path / "extra.pt", config=ours_random().config)


def test_heads_are_table_1s_unless_given(tmp_path):
    net = difflab.build("dit", preset="tiny", num_classes=2)  # width 32: no Table 1 layout
    f = save_dit_checkpoint(net, tmp_path / "w32.pt")
    with pytest.raises(DifflabError, match="width 32.*give num_heads"):
        difflab.load(f)
    assert difflab.load(f, num_heads=2).config == net.config
    assert config_from_facebook(dit_to_facebook_state(ours_random())).num_heads == 2  # 64 wide


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # what a malicious pickle would do on load


def test_loading_never_runs_code(tmp_path):
    state = dit_to_facebook_state(ours_random())
    marker = tmp_path / "ran"
    torch.save({"ema": state, "args": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(DifflabError, match="weights_only"):
        load_dit_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(DifflabError):
        difflab.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_difflab_sample_takes_a_dit_file_on_the_papers_path(tmp_path):
    from difflab.sampling import load_run

    f = save_dit_checkpoint(ours_random(), tmp_path / "DiT-tiny.pt")
    run = load_run(f)
    betas = run.path.betas  # DDPM's linear betas (DiT Sec. 4)
    torch.testing.assert_close(betas, torch.linspace(1e-4, 0.02, 1000, dtype=betas.dtype))
    assert run.denoiser.learned_variance and run.codec is None
    assert run.config.task.prediction == "eps" and run.net.config.num_classes == 5
    assert run.config.sample.sampler == "ddpm" and run.config.sample.steps == 250
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(f), "--n", "2", "--steps", "3", "--class", "1",
                     "--out", str(out)]) == 0
    assert out.is_file()
    with pytest.raises(DifflabError, match="options.*tokenizer.*Stable Diffusion"):
        load_run(f, single_file={"tokenizer": tmp_path})


def test_a_latent_dit_samples_through_the_vae_beside_it(tmp_path):
    from difflab.sampling import SampleRequest, generate, load_run

    net = jitter(difflab.build("dit", preset="tiny", hidden_size=64, num_heads=1, in_channels=4,
                               out_channels=4, num_classes=5, learn_sigma=True), seed=4)
    f = save_dit_checkpoint(net, tmp_path / "latent.pt")
    with pytest.raises(DifflabError, match="4-channel latents.*needs the VAE"):
        load_run(f)
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = generate(SampleRequest(load_run(f), sampler="ddim", steps=3, n=2, labels=[2]))
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    # a diffusers DiTPipeline folder of the same parts samples too
    from diffusers import DDIMScheduler, DiTPipeline

    from difflab.interop.diffusers import save_diffusers

    save_diffusers(load_dit_checkpoint(f), tmp_path / "transformer")
    from diffusers import DiTTransformer2DModel

    pipe = DiTPipeline(DiTTransformer2DModel.from_pretrained(tmp_path / "transformer"),
                       tiny_vae(), DDIMScheduler(beta_schedule="linear"))
    pipe.save_pretrained(tmp_path / "pipe")
    run = load_run(tmp_path / "pipe")
    assert isinstance(run.net, DiT) and run.codec is not None
    assert cli.main(["sample", str(tmp_path / "pipe"), "--n", "2", "--steps", "2",
                     "--out", str(tmp_path / "p.png")]) == 0
