"""``difflab eval`` of the VAE and GAN baselines: one setting (one network pass), FID / KID on
the same features with the same real-versus-real floor as a diffusion run gets."""

from __future__ import annotations

import pytest

from difflab.evaluation.report import read_report


@pytest.mark.parametrize("kind,arch,objective", [("vae", "vae", "elbo"), ("gan", "dcgan", "gan")])
def test_eval_of_a_baseline_has_one_setting_and_the_floor(tmp_path, monkeypatch, digits_mlp,
                                                          extractor_cache, kind, arch, objective):
    from difflab.cli import build_parser
    from difflab.config import load_config
    from difflab.training import train

    monkeypatch.setenv("DIFFLAB_CACHE", str(extractor_cache))
    run = tmp_path / kind
    train(load_config(None, [f"model.arch='{arch}'", f"task.kind='{kind}'",
                             f"objective.name='{objective}'", "model.width=8", "train.steps=3",
                             "train.batch_size=16", "train.tensorboard=false",
                             "train.checkpoint_every=3"]), run, progress=False)
    args = build_parser().parse_args(["eval", str(run), "--metrics", "fid,kid", "--n", "100",
                                      "--kid-subsets", "5", "--no-progress"])
    assert args.func(args) == 0
    rep = read_report(run)
    (setting,) = rep["settings"]
    assert (setting["sampler"], setting["steps"], setting["nfe"]) == ("one_pass", 1, 1)
    assert setting["scores"]["fid"]["n_fake"] == 100 and rep["floor"]["fid"]["value"] > 0
    # an untrained-for-long model is far from the data; the floor is what real images score
    assert setting["scores"]["fid"]["value"] > rep["floor"]["fid"]["value"]
