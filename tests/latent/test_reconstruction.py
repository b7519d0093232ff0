"""Reconstruction metrics of a codec: PSNR against its closed form, SSIM against torchmetrics'
implementation, and `difflab eval` of an autoencoder run (PSNR / SSIM / rFID on held-out
images, with the rFID floor)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.cli import main
from difflab.config import load_config
from difflab.latent.evaluate import psnr, reconstruction_report, ssim
from difflab.training import train


def test_psnr_closed_form():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    y = x + 0.1  # MSE 0.01 on a range of 2: 10 log10(4 / 0.01)
    torch.testing.assert_close(psnr(x, y), torch.full((3,), 10 * math.log10(400.0),
                                                       dtype=torch.float64))


def test_ssim_matches_torchmetrics():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(4, 3, 32, 32, generator=g)).clamp(-1, 1)
    ref, full = tm_ssim(y.double(), x.double(), data_range=2.0, reduction="none",
                        return_full_image=True)
    torch.testing.assert_close(ssim(y, x, padding="reflect"), ref, rtol=1e-6, atol=1e-8)
    # Wang et al.'s (and scikit-image's) mean over the windows inside the image: the interior
    # of torchmetrics' reflect-padded map, whose border windows reach outside
    valid = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    torch.testing.assert_close(ssim(y, x), valid, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(valid, ref)
    torch.testing.assert_close(ssim(x, x), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_identity_codec_reconstructs_perfectly():
    import difflab

    x = torch.rand(16, 1, 12, 12) * 2 - 1
    r = reconstruction_report(difflab.build("identity", channels=1), x)
    assert r["psnr_db"]["value"] > 150 and abs(r["ssim"]["value"] - 1) < 1e-9


def test_eval_of_an_autoencoder_run_reports_reconstruction(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    run = tmp_path / "ae"
    train(load_config(None, ["task.kind='autoencoder'", "model.arch='autoencoder_kl'",
                             "model.preset='tiny'", "objective.name='autoencoder'",
                             "train.steps=30", "train.batch_size=16", "train.lr=2e-3",
                             "train.tensorboard=false", "train.checkpoint_every=30"]),
          run, progress=False)
    assert main(["eval", str(run), "--n", "200", "--metrics", "fid", "--train-extractor",
                 "--no-progress"]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    r = report["reconstruction"]
    assert report["data"] == "held-out images" and r["n"] == 200
    assert 5 < r["psnr_db"]["value"] < 60 and r["rfid"]["value"] >= 0
    assert r["rfid_floor"]["n_real"] == 100 and r["latent"]["shape"] == [4, 2, 2]
    assert "rFID" in (run / "eval" / "report.md").read_text()
    assert "PSNR" in capsys.readouterr().out
    # an exported codec has no [data] to hold images out of
    assert main(["export", str(run), str(tmp_path / "codec")]) == 0
    assert main(["eval", str(tmp_path / "codec"), "--metrics", "fid"]) == 2
    assert "exported codec" in capsys.readouterr().err


def test_a_vq_codecs_report_has_its_codebook_usage():
    import difflab

    torch.manual_seed(0)
    m = difflab.build("vq", preset="tiny").eval()
    r = reconstruction_report(m, torch.rand(8, 3, 16, 16) * 2 - 1)
    assert r["codebook"]["codes"] == 16 and 1 <= r["codebook"]["used"] <= 16
