"""diffusers component folders in and out of difflab: a tiny random-weight UNet2DConditionModel
(SD v1's 1x1-convolution projections with a head count, SD v2's linear projections with a head
width) and AutoencoderKL, built locally with diffusers, give the same outputs after
``difflab.load`` as in diffusers; ``save_diffusers`` writes folders ``from_pretrained`` reads;
``difflab convert`` does both from the command line; bad folders are named, never half read."""

from __future__ import annotations

import json

import pytest
import torch

import difflab
from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.interop.diffusers import load_diffusers, save_diffusers
from difflab.latent import AutoencoderKL
from difflab.networks.unet import UNet
from difflab.testing.sd import jitter, tiny_unet, tiny_vae

ATOL = 1e-5


_jitter = jitter


def sd_unet(v2: bool = False, **kw):
    return tiny_unet(v2, **kw)


def unet_inputs(batch: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([981.0, 3.0])[:batch]
    ctx = torch.randn(batch, 7, 24, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("v2", [False, True], ids=["sd1_conv_heads", "sd2_linear_width"])
def test_unet_folder_loads_with_the_same_outputs(tmp_path, v2):
    peer = sd_unet(v2)
    peer.save_pretrained(tmp_path / "unet")
    ours = difflab.load(tmp_path / "unet")
    assert isinstance(ours, UNet) and ours.config.context_dim == 24
    c = ours.config
    if v2:
        assert c.num_head_channels == 16  # 32 / 2 = 64 / 4
    else:
        assert c.num_heads == 4 and c.num_head_channels == -1
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, Cond(context=ctx))
    assert float((got - ref).abs().max()) <= ATOL


def test_unet_round_trip_through_diffusers_layout(tmp_path):
    from diffusers import UNet2DConditionModel

    peer = sd_unet()
    peer.save_pretrained(tmp_path / "in")
    ours = load_diffusers(tmp_path / "in")
    save_diffusers(ours, tmp_path / "out")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx).sample
        out = again(x, t, encoder_hidden_states=ctx).sample
    assert float((out - ref).abs().max()) <= ATOL
    # and difflab reads what it wrote back to the same weights
    back = load_diffusers(tmp_path / "out")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_a_trained_difflab_unet_writes_a_diffusers_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    net = _jitter(difflab.build("unet", image_size=8, in_channels=4, out_channels=4,
                                model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                attention_resolutions=(4,), num_head_channels=16,
                                context_dim=12, use_scale_shift_norm=False), seed=4)
    save_diffusers(net, tmp_path / "unet")
    peer = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 12, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx).sample
        got = net(x, t, Cond(context=ctx))
    assert float((got - ref).abs().max()) <= ATOL
    # what SD's layout cannot hold is named
    bad = difflab.build("unet", image_size=8, model_channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(4,), num_classes=3)
    with pytest.raises(DifflabError, match="num_classes.*use_scale_shift_norm.*context_dim"):
        save_diffusers(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_vae_folder_loads_with_its_scaling_factor_and_the_same_outputs(tmp_path):
    peer = tiny_vae()
    peer.save_pretrained(tmp_path / "vae")
    ours = difflab.load(tmp_path / "vae")
    assert isinstance(ours, AutoencoderKL) and float(ours.scale_factor) == pytest.approx(0.3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref = peer.encode(x).latent_dist
        post = ours.encode(x)
        assert float((post.mean - ref.mean).abs().max()) <= ATOL
        assert float((post.logvar - ref.logvar).abs().max()) <= ATOL
        z = ref.mean
        assert float((ours.decode(z) - peer.decode(z).sample).abs().max()) <= ATOL
    save_diffusers(ours, tmp_path / "back")
    meta = json.loads((tmp_path / "back" / "config.json").read_text())
    assert meta["_class_name"] == "AutoencoderKL" and meta["scaling_factor"] == pytest.approx(0.3)
    from diffusers import AutoencoderKL as PeerVAE

    again = PeerVAE.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert float((again.decode(z).sample - peer.decode(z).sample).abs().max()) <= ATOL


def test_bin_weights_load_as_plain_tensors_only(tmp_path):
    peer = sd_unet()
    peer.save_pretrained(tmp_path / "u", safe_serialization=False)
    assert (tmp_path / "u" / "diffusion_pytorch_model.bin").is_file()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = peer(x, t, encoder_hidden_states=ctx).sample
        got = difflab.load(tmp_path / "u")(x, t, Cond(context=ctx))
    assert float((got - ref).abs().max()) <= ATOL

    class Boom:  # a pickle that would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"a": Boom()}, tmp_path / "u" / "diffusion_pytorch_model.bin")
    with pytest.raises(DifflabError, match="plain tensors"):
        difflab.load(tmp_path / "u")


def test_missing_unknown_and_misshapen_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    peer = sd_unet()
    peer.save_pretrained(tmp_path / "u")
    f = tmp_path / "u" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    gone = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    state.pop(gone)
    state["down_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(state, f)
    with pytest.raises(DifflabError) as e:
        difflab.load(tmp_path / "u")
    assert gone in str(e.value) and "down_blocks.0.extra.weight" in str(e.value)
    assert "missing 1" in str(e.value) and "unexpected 1" in str(e.value)


def test_unsupported_configs_are_refused_by_name(tmp_path):
    peer = sd_unet()
    peer.save_pretrained(tmp_path / "u")
    cfg_file = tmp_path / "u" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(addition_embed_type="text_time", resnet_time_scale_shift="scale_shift")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(DifflabError, match="addition_embed_type.*resnet_time_scale_shift"):
        difflab.load(tmp_path / "u")
    cfg_file.write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DifflabError, match="UNet2DModel"):
        difflab.load(tmp_path / "u")


def test_a_v2_checkpoint_under_a_v1_config_is_detected(tmp_path):
    """SD v2 weights (linear projections, a wider context) with SD v1's config.json."""
    sd_unet(v2=True, cross_attention_dim=32).save_pretrained(tmp_path / "v2")
    v1 = json.loads((tmp_path / "v2" / "config.json").read_text())
    v1.update(use_linear_projection=False, cross_attention_dim=24, attention_head_dim=4)
    (tmp_path / "v2" / "config.json").write_text(json.dumps(v1))
    with pytest.raises(DifflabError, match=r"v2.*cross_attention_dim.*32.*use_linear_projection"):
        difflab.load(tmp_path / "v2")


def test_convert_both_ways_from_the_command_line(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from difflab.cli import main

    peer = sd_unet()
    peer.save_pretrained(tmp_path / "sd")
    assert main(["convert", str(tmp_path / "sd"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    ours = difflab.load(tmp_path / "ours")
    assert isinstance(ours, UNet)
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    again = UNet2DConditionModel.from_pretrained(tmp_path / "back").eval()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        diff = again(x, t, encoder_hidden_states=ctx).sample - peer(
            x, t, encoder_hidden_states=ctx).sample
    assert float(diff.abs().max()) <= ATOL
    capsys.readouterr()
    # bad inputs: one line, exit 2, nothing written
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    for argv in (["convert", str(tmp_path / "nope"), str(tmp_path / "o1")],
                 ["convert", str(tmp_path / "sd"), str(tmp_path / "file")],
                 ["convert", str(tmp_path / "sd"), str(tmp_path / "full")],
                 ["convert", str(tmp_path / "full"), str(tmp_path / "o2")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip(), argv
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_latent_run_trains_and_samples_on_a_diffusers_vae(tmp_path):
    """``[codec] run`` may name SD's ``vae/`` folder: training encodes through it, sampling
    decodes, the checkpoint names it as a frozen part."""
    from pathlib import Path

    from difflab.config import load_config
    from difflab.runs import load_run
    from difflab.sampling import SampleRequest, generate
    from difflab.training import train

    emoji = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "emoji"
    assert emoji.is_dir(), f"the shared data folder {emoji} is missing"
    tiny_vae().save_pretrained(tmp_path / "vae")
    cfg = load_config(None, ["data.name='emoji'", f"data.root={str(emoji)!r}",
                             "data.image_size=16", f"codec.run={str(tmp_path / 'vae')!r}",
                             "model.preset='tiny'", "model.model_channels=8",
                             "model.num_heads=1", "train.steps=2", "train.batch_size=4",
                             "train.tensorboard=false", "train.checkpoint_every=2"])
    result = train(cfg, tmp_path / "run", progress=False)
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    assert manifest["frozen"]["codec"]["source"] == str((tmp_path / "vae").resolve())
    run = load_run(tmp_path / "run")
    assert run.sample_shape == (4, 8, 8)
    out = generate(SampleRequest(run, steps=2, n=2, sampler="ddim"))
    assert out.images.shape == (2, 3, 16, 16) and bool(torch.isfinite(out.images).all())


def test_sd2_depth_unet_takes_the_depth_map_as_concatenated_channels(tmp_path):
    """SD 2's depth model: 5 input channels, the latent's 4 and the depth map's 1."""
    from diffusers import UNet2DConditionModel

    peer = sd_unet(v2=True, in_channels=5)
    peer.save_pretrained(tmp_path / "depth")
    ours = difflab.load(tmp_path / "depth")
    assert (ours.config.in_channels, ours.config.concat_channels) == (4, 1)
    x, t, ctx = unet_inputs()
    depth = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        ref = peer(torch.cat([x, depth], 1), t, encoder_hidden_states=ctx).sample
        got = ours(x, t, Cond(context=ctx, concat=depth))
    assert float((got - ref).abs().max()) <= ATOL
    save_diffusers(ours, tmp_path / "back")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "back").eval()
    assert again.config.in_channels == 5
    with torch.no_grad():
        out = again(torch.cat([x, depth], 1), t, encoder_hidden_states=ctx).sample
    assert float((out - ref).abs().max()) <= ATOL
