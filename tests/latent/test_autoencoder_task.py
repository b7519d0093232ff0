"""The first-stage task: a KL autoencoder trains on real images with L1, KL, a perceptual
distance and a patch discriminator; its checkpoints hold the discriminator and name the frozen
perceptual network; resume is bit-exact; the saved codec carries a scale that brings its
latents to unit variance; bad settings are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.latent import load_codec
from difflab.training import Trainer, train

MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"



def ae_config(*more: str, arch: str = "autoencoder_kl"):
    """Digits (8x8, ships with scikit-learn), the tiny KL autoencoder (f = 4: 2x2 latents)."""
    model = [f"model.arch={arch!r}"] + (["model.preset='tiny'"] if arch != "identity" else [])
    return load_config(None, ["task.kind='autoencoder'", *model, "objective.name='autoencoder'",
                              "train.batch_size=16", "train.tensorboard=false",
                              "train.lr=2e-3", "train.sample_every=0",
                              "data.holdout_fraction=0.2", *more])


GAN = ("objective.disc_weight=0.5", "objective.disc_start=2", "objective.disc_layers=1",
       "objective.disc_width=8")


def test_an_autoencoder_run_with_a_discriminator_resumes_bit_exactly(tmp_path):
    straight = train(ae_config(*GAN, "train.steps=4", "train.checkpoint_every=2"),
                     tmp_path / "straight", progress=False)
    ckpt = straight.checkpoint
    files = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "ema.safetensors", "discriminator.safetensors",
            "discriminator-ema.safetensors"} <= files
    half = tmp_path / "half"
    train(ae_config(*GAN, "train.steps=2", "train.checkpoint_every=2"), half, progress=False)
    train(ae_config(*GAN, "train.steps=4", "train.checkpoint_every=2"), half, resume=True,
          progress=False)
    for f in ("model.safetensors", "ema.safetensors", "discriminator.safetensors"):
        a, b = load_file(str(ckpt / f)), load_file(str(half / "checkpoints" / "step_4" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # the discriminator trained from step 2 on (hinge loss on real and fake patches)
    d2 = load_file(str(half / "checkpoints" / "step_2" / "discriminator.safetensors"))
    d4 = load_file(str(ckpt / "discriminator.safetensors"))
    assert any(not torch.equal(d2[k], d4[k]) for k in d2)


def test_training_lowers_held_out_error_and_the_codec_carries_a_unit_variance_scale(tmp_path):
    from difflab.data import build_dataset

    run = tmp_path / "ae"
    train(ae_config("train.steps=150", "train.checkpoint_every=150", "train.ema_decay=0.9",
                    "train.warmup_steps=0"), run, progress=False)
    trained = load_codec(run)
    torch.manual_seed(0)
    untrained = difflab.build("autoencoder_kl", preset="tiny", image_size=8,
                              in_channels=1).eval()
    data = build_dataset("digits", split="test")
    x = torch.stack([data[i][0] for i in range(200)])
    with torch.no_grad():
        err = [(ae.decode(ae.encode(x).mode()) - x).abs().mean().item()
               for ae in (untrained, trained)]
    assert err[1] < 0.5 * err[0], err
    # the saved scale makes the training latents unit-variance
    assert trained.scale_factor.item() != 1.0
    train_x = torch.stack([d[0] for d in build_dataset("digits", split="train")][:512])
    z = trained.to_latent(train_x, generator=torch.Generator().manual_seed(0))
    assert abs(z.pow(2).mean().sqrt().item() - 1.0) < 0.1
    # an exported autoencoder run is a self-describing codec
    out = tmp_path / "codec"
    from difflab.cli import main

    assert main(["export", str(run), str(out)]) == 0
    again = load_codec(out)
    assert torch.equal(again.scale_factor, trained.scale_factor)


def test_the_perceptual_network_is_a_frozen_part_trained_on_the_runs_data(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    result = train(ae_config("data.name='mnist'", f"data.root={str(MNIST)!r}",
                             "data.split='test'", "data.holdout_fraction=0.97",
                             "data.image_size=16", "objective.perceptual='mnist-perceptual'",
                             "train.steps=2", "train.checkpoint_every=2", "train.batch_size=4"),
                   tmp_path / "run", progress=False)
    frozen = json.loads((result.checkpoint / "manifest.json").read_text())["frozen"]
    assert set(frozen) == {"perceptual"}
    assert frozen["perceptual"]["source"].startswith("extractor:mnist-perceptual")
    assert not any("perceptual" in p.name for p in result.checkpoint.iterdir())


@pytest.mark.parametrize("sets, message", [
    (["objective.disc_weight=0.5", "objective.disc_layers=3"], "leaves no patch of a 8x8"),
    (["objective.l1=0"], "at least one reconstruction term"),
    (["objective.kl_weight=-1"], "objective.kl_weight"),
    (["objective.perceptual='emoji-perceptual'"], "3-channel"),
])
def test_bad_autoencoder_settings_are_named(tmp_path, monkeypatch, sets, message):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DifflabError, match=message):
        Trainer(ae_config(*sets, "train.steps=1"), tmp_path / "run")


def test_codec_families_and_the_autoencoder_task_do_not_mix_with_diffusion(tmp_path):
    with pytest.raises(DifflabError, match="no weights to train"):
        Trainer(ae_config("train.steps=1", arch="identity"), tmp_path / "i")
    with pytest.raises(DifflabError, match="autoencoder_kl"):
        Trainer(load_config(None, ["model.arch='autoencoder_kl'", "train.steps=1"]),
                tmp_path / "a")
    with pytest.raises(DifflabError, match="objective"):
        Trainer(ae_config("objective.name='eps'", "train.steps=1"), tmp_path / "b")
    with pytest.raises(DifflabError, match="disc_strat"):
        Trainer(ae_config("objective.disc_strat=3", "train.steps=1"), tmp_path / "c")
