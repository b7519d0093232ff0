"""Runs, configs and trainings of the pre-redesign code (tests/fixtures/legacy, written by commit
6d79767) against the component / task / request layer: old runs load and sample the same
images, old weight layouts convert, old configs convert to the shipped ones, and the new
trainer reproduces the old trainer's losses step by step."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab import cli
from difflab.config import apply_overrides, config_from_dict, read_toml
from difflab.errors import DifflabError
from difflab.sampling import SampleRequest, generate, load_run
from difflab.training import read_metrics, train
from difflab.upgrade import is_legacy, upgrade_config

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def test_an_old_run_loads_and_samples_the_images_it_sampled_before(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("difflab"), "propagate", True)
    expected = load_file(str(LEGACY / "unet" / "expected.safetensors"))
    with caplog.at_level(logging.INFO, logger="difflab"):
        run = load_run(LEGACY / "unet")
    assert run.config.task.cond == "class" and run.config.task.p_uncond == 0.2
    for name, guidance in (("ddim_cfg2", "cfg:2"), ("ddim_plain", "none")):
        out = generate(SampleRequest(run, sampler="ddim", steps=5, seed=7, n=4,
                                     labels=[3, 1, 4, 1], guidance=guidance, clip_x0=True))
        torch.testing.assert_close(out.images, expected[name], rtol=0, atol=1e-5)
        assert out.nfe == 5  # cfg batches both branches into one call per step
    out = generate(SampleRequest(run, sampler="ddpm", steps=5, seed=3, n=4, guidance="none",
                                 labels=torch.tensor([0, 1, 2, 3]), clip_x0=False))
    torch.testing.assert_close(out.images, expected["ddpm_labels"], rtol=0, atol=1e-5)
    assert "difflab upgrade" in caplog.text  # the in-memory conversion says how to make it last


def test_retraining_the_old_run_gives_its_weights(tmp_path):
    old = read_toml(LEGACY / "unet" / "config.toml")
    assert is_legacy(old)
    cfg = config_from_dict(old, upgrade=True)
    train(cfg, tmp_path / "again", progress=False)
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "again" / "checkpoints" / "step_2" / f))
        b = load_file(str(LEGACY / "unet" / "checkpoints" / "step_2" / f))
        assert sorted(a) == sorted(b)
        for k in a:
            # float32 kernels differ in the last bits between CPUs (AVX2 / AVX-512), and Adam
            # normalises tiny gradients: 1e-4 is far below one step's change (lr 1e-3)
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)


def test_an_old_alignment_run_converts_its_weight_layout():
    expected = load_file(str(LEGACY / "alignment" / "expected.safetensors"))
    run = load_run(LEGACY / "alignment")
    assert run.config.task.kind == "contrastive" and not run.generative
    net, tin = run.net, run.path.time_input(expected["t"]).float()
    with torch.no_grad():
        torch.testing.assert_close(net.image_embed(expected["x"], tin), expected["image_embed"])
        torch.testing.assert_close(net.text_embed(expected["text"]), expected["text_embed"])
        for i, f in enumerate(net.image_features(expected["x"], tin)):
            torch.testing.assert_close(f, expected[f"feature_{i}"])
    with pytest.raises(DifflabError, match="does not generate images"):
        generate(SampleRequest(run))


@pytest.mark.parametrize("name", ["t2i_emoji", "cfg_mnist"])
def test_old_shipped_configs_convert_to_the_new_ones(name):
    old = read_toml(LEGACY / "configs" / f"{name}.toml")
    new = config_from_dict(upgrade_config(old))
    shipped = config_from_dict(read_toml(REPO / "configs" / f"{name}.toml"))
    assert new == shipped


def test_upgrade_command_rewrites_a_run_and_keeps_the_old_file(tmp_path, capsys):
    run = tmp_path / "unet"
    shutil.copytree(LEGACY / "unet", run)
    assert cli.main(["upgrade", str(run), "--dry-run"]) == 0
    assert "[task]" in capsys.readouterr().out and is_legacy(read_toml(run / "config.toml"))
    assert cli.main(["upgrade", str(run)]) == 0
    assert not is_legacy(read_toml(run / "config.toml"))
    assert is_legacy(read_toml(run / "config.toml.v1"))
    assert cli.main(["upgrade", str(run)]) == 2  # nothing left to convert
    assert "already uses the version-2 layout" in capsys.readouterr().err
    assert load_run(run).config == load_run(LEGACY / "unet").config
    # an old config file given to train is refused with the command that converts it
    assert cli.main(["train", str(run / "config.toml.v1"), "--out", str(tmp_path / "x")]) == 2
    assert "difflab upgrade FILE" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["classifier", "t2i", "hybrid", "edm"])
def test_the_new_trainer_reproduces_the_old_losses(name, tmp_path):
    record = json.loads((LEGACY / "losses.json").read_text())[name]
    sets = [s.replace("'../shared/data/emoji'", repr(str(SHARED / "emoji")))
            for s in record["overrides"]]
    cfg = config_from_dict(upgrade_config(apply_overrides({}, sets)))
    torch.set_num_threads(1)
    train(cfg, tmp_path / name, progress=False)
    got = read_metrics(tmp_path / name)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]),
                               torch.tensor(record["losses"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in got]),
                               torch.tensor(record["grad_norms"]), rtol=1e-3, atol=1e-6)
