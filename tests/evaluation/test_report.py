"""Reports, plots, option parsing, and the ``eval`` / ``compare`` commands end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.evaluation.command import (
    Setting,
    check_request,
    parse_guidance,
    parse_metrics,
    parse_samplers,
)
from difflab.evaluation.metrics import Score
from difflab.evaluation.report import read_report, write_comparison, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _score(name, value, n=5000, stderr=None):
    return Score(name, value, n_fake=n, n_real=n, stderr=stderr).to_dict()


def _report(run="runs/a", offset=0.0):
    settings = []
    for sampler, steps in (("ddim", 10), ("ddim", 50), ("ddpm", 1000)):
        for scale in (1.0, 3.0):
            fid = 50.0 / steps + scale + offset
            settings.append({
                "sampler": sampler, "steps": steps, "nfe": steps, "guidance": f"cfg:{scale:g}",
                "scale": scale, "n": 5000,
                "scores": {"fid": _score("FID", fid), "kid": _score("KID", fid / 1e3, stderr=1e-4),
                           "precision": _score("precision", 0.6 + 0.1 * scale),
                           "recall": _score("recall", 0.8 - 0.1 * scale)}})
    return {"run": run, "step": 3000, "n": 5000, "n_reference": 5000,
            "extractor": {"name": "mnist-lenet", "score": 0.985, "score_kind": "accuracy"},
            "floor": {"fid": _score("FID floor", 1.25), "kid": _score("KID floor", 1e-4),
                      "precision": _score("precision floor", 0.9),
                      "recall": _score("recall floor", 0.9)},
            "likelihood": {"name": "NLL (discrete VLB)", "value": 1.23, "stderr": 0.01,
                           "n_real": 256},
            "settings": settings}


def test_report_files_table_floor_and_plots(tmp_path):
    paths = write_report(_report(), tmp_path)
    md = paths["markdown"].read_text()
    # every FID cell carries the floor and the sample counts
    fid_cells = [line for line in md.splitlines() if line.startswith("| ddim") or
                 line.startswith("| ddpm")]
    assert len(fid_cells) == 6
    assert all("(floor 1.25) [n=5000 vs 5000]" in line for line in fid_cells)
    row = "| ddim | 10 | 10 | cfg:3 | 5000 | 8 (floor 1.25) [n=5000 vs 5000] | 0.008 ± 0.0001 |"
    assert row in md
    assert "held-out accuracy 98.50%" in md and "1.23 ± 0.01 bits/dim on 256" in md
    assert {p.name for p in paths["plots"]} == {"fid_vs_nfe.png", "kid_vs_nfe.png",
                                                 "precision_recall.png"}
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
        assert f"]({p.name})" in md
    back = json.loads(paths["json"].read_text())
    assert back["settings"] == _report()["settings"]
    assert read_report(tmp_path) == back


def test_unavailable_metric_is_reported_not_hidden(tmp_path):
    rep = _report()
    rep["likelihood"] = {"value": None, "note": "difflab.likelihood unavailable"}
    md = write_report(rep, tmp_path)["markdown"].read_text()
    assert "n/a (difflab.likelihood unavailable)" in md


def test_comparison_has_one_table_and_one_plot(tmp_path):
    paths = write_comparison([_report("runs/a"), _report("runs/b", offset=2.0)], tmp_path)
    md = paths["markdown"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| runs/")]
    assert len(rows) == 12 and sum("runs/b" in r for r in rows) == 6
    assert md.count("| run | sampler |") == 1  # one table
    assert paths["plot"].read_bytes()[:8] == PNG_MAGIC
    assert "FID: 1.25" in md  # each run's floor listed


def test_option_parsing():
    assert parse_samplers("ddim:10, ddpm:1000,dpmpp_2m:20:log_snr") == [
        ("ddim", 10, None), ("ddpm", 1000, None), ("dpmpp_2m", 20, "log_snr")]
    with pytest.raises(DifflabError, match="GRID one of uniform"):
        parse_samplers("ddim:10:loglog")
    assert parse_guidance("none,cfg:1,cfg:3.5,classifier:runs/c:2") == [
        None, "cfg:1", "cfg:3.5", "classifier:runs/c:2"]
    assert parse_guidance(None) == [None]
    assert parse_metrics("FID,kid,pr,nll") == ["fid", "kid", "pr", "nll"]
    with pytest.raises(DifflabError, match=r"--samplers='nope:10'.*NAME one of"):
        parse_samplers("nope:10")
    with pytest.raises(DifflabError, match="STEPS a positive int"):
        parse_samplers("ddim:x")
    with pytest.raises(DifflabError, match=r"--guidance='pag:2'.*cfg:SCALE.*classifier:RUN"):
        parse_guidance("pag:2")
    with pytest.raises(DifflabError, match=r"--metrics='lpips'"):
        parse_metrics("fid,lpips")
    assert Setting("ddim", 10, "cfg:3").slug == "ddim-10_cfg-3"
    assert Setting("ddim", 10, "cfg:3").scale == 3.0
    assert Setting("ddim", 10, "classifier:runs/c:2").slug == "ddim-10_classifier-runs_c-2"
    assert Setting("ddpm", 1000).guidance == "none"
    assert Setting("ddim", 10, "cfg:3", "karras").slug == "ddim-10-karras_cfg-3"
    assert Setting("ddim", 10, None, "karras").label == "ddim[karras]"


def test_guidance_on_an_unconditional_run_is_a_clear_error(tmp_path):
    from difflab.config import load_config
    from difflab.evaluation.command import generate, load_run
    from difflab.training import train

    cfg = load_config("configs/ddpm_digits.toml", [
        "train.steps=1", "train.sample_every=0", "train.tensorboard=false",
        'sample.sampler="ddpm"', 'sample.options={variance="large"}'])
    train(cfg, tmp_path / "u", progress=False)
    run = load_run(tmp_path / "u")
    with pytest.raises(DifflabError, match="cfg:3 needs a conditional model"):
        generate(run, Setting("ddim", 2, "cfg:3"), 4, 0, 4, False)
    x = generate(run, Setting("ddim", 4), 4, 0, 4, False)
    assert x.shape == (4, 1, 8, 8)
    # a grid in the setting reaches the sampler: the same samples as asking for it directly
    from difflab.sampling import draw

    def direct(den, shape, n, *, sampler, steps, seed, batch_size, clip_x0, grid="auto",
               options=None):
        return draw(den, shape, n, sampler=sampler, steps=steps, grid=grid, grid_options={},
                    options=options or {}, seed=seed, batch_size=batch_size, cond=None,
                    null_cond=None, guide=None, clip_x0=clip_x0)[0]

    on_log_snr = generate(run, Setting("ddim", 4, None, "log_snr"), 4, 0, 4, False)
    want = direct(run.denoiser, run.shape, 4, sampler="ddim", steps=4, grid="log_snr", seed=0,
                  batch_size=4, clip_x0=run.config.sample.clip_x0).float().clamp(-1, 1)
    assert torch.equal(on_log_snr, want) and not torch.equal(on_log_snr, x)
    # the run's own sampler keeps its configured options: ddpm with variance="large"
    ddpm = generate(run, Setting("ddpm", 3), 4, 0, 4, False)
    for variance, same in (("large", True), ("small", False)):
        want = direct(run.denoiser, run.shape, 4, sampler="ddpm", steps=3, seed=0, batch_size=4,
                      options={"variance": variance}, clip_x0=run.config.sample.clip_x0)
        assert torch.equal(ddpm, want.float().clamp(-1, 1)) == same
    # NFE are counted network calls per sample, not steps: F-PNDM's three Runge-Kutta warm-up
    # steps take 4 evaluations each and PLMS's first step 2 (then 1 per step, the last step to
    # t = 0 included); batches of 2 out of 4 samples count per sample
    for sampler, steps, nfe in (("ddim", 4, 4), ("plms", 4, 5), ("pndm", 5, 14),
                                ("heun", 3, 5)):
        counts: dict = {}
        generate(run, Setting(sampler, steps), 4, 0, 2, False, counts=counts)
        assert counts["nfe"] == nfe, sampler


def test_impossible_requests_fail_before_sampling():
    lenet = SimpleNamespace(name="mnist-lenet", dim=128, has_logits=True)
    with pytest.raises(DifflabError, match=r"--n 100 is too small for FID.*--n > 128.*kid"):
        check_request(["fid", "kid"], 100, lenet)
    check_request(["kid", "pr"], 100, lenet)  # no FID: any n works
    ae = SimpleNamespace(name="emoji-ae", dim=64, has_logits=False)
    with pytest.raises(DifflabError, match="no class logits"):
        check_request(["fid", "is"], 1000, ae)


def test_eval_and_compare_commands_end_to_end(tmp_path, monkeypatch, digits_mlp,
                                              extractor_cache):
    from difflab.cli import build_parser
    from difflab.config import load_config
    from difflab.training import train

    monkeypatch.setenv("DIFFLAB_CACHE", str(extractor_cache))  # digits-mlp is cached there
    cfg = load_config("configs/ddpm_digits.toml", [
        "train.steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0",
        "train.tensorboard=false", "task.cond='class'", "task.p_uncond=0.2"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    parser = build_parser()  # the real `difflab` command line, so its wiring is tested too
    argv = ["eval", str(run), "--samplers", "ddim:3,ddpm:4", "--guidance", "cfg:1,cfg:3",
            "--metrics", "fid,kid,pr,is,nll", "--n", "100", "--nll-n", "4", "--nll-steps", "5",
            "--kid-subsets", "5", "--train-extractor", "--no-progress"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    rep = read_report(run)
    assert [(s["sampler"], s["steps"], s["guidance"]) for s in rep["settings"]] == [
        ("ddim", 3, "cfg:1"), ("ddim", 3, "cfg:3"), ("ddpm", 4, "cfg:1"), ("ddpm", 4, "cfg:3")]
    for s in rep["settings"]:
        assert set(s["scores"]) == {"fid", "kid", "precision", "recall", "is"}
        assert s["scores"]["fid"]["n_fake"] == 100
        x = np.load(run / "eval" / s["samples"])
        assert x.shape == (100, 1, 8, 8) and np.abs(x).max() <= 1
        assert (run / "eval" / s["grid"]).read_bytes()[:8] == PNG_MAGIC
    assert rep["floor"]["fid"]["n_fake"] == 100 and rep["likelihood"]["value"] > 0
    # the likelihood is of digits the run never trained on (the digits' 20% hold-out)
    from difflab.builders import build_dataset, build_held_out
    from difflab.evaluation.command import likelihood, load_run
    from difflab.evaluation.features import dataset_tensors

    assert rep["likelihood"]["data"] == "held-out images"
    loaded = load_run(run)
    held = dataset_tensors(build_held_out(loaded.config))[0]
    train_x = dataset_tensors(build_dataset(loaded.config))[0]
    on_held = likelihood(loaded, held, 4, 5)["value"]
    on_train = likelihood(loaded, train_x, 4, 5)["value"]
    assert rep["likelihood"]["value"] == pytest.approx(on_held, rel=1e-12)
    assert on_train != pytest.approx(on_held, rel=1e-12)
    assert rep["extractor"]["key"] == digits_mlp.meta["key"]  # the cached one, not retrained
    md = (run / "eval" / "report.md").read_text()
    assert "(floor " in md and "[n=100 vs " in md
    # samples are generated once: a second call reuses them (0 s of sampling)
    args = parser.parse_args(argv[:-2] + ["--metrics", "fid", "--no-progress"])
    assert args.func(args) == 0
    assert all(s["seconds"] == 0.0 for s in read_report(run)["settings"])
    # the run samples with clip_x0 = true (its config); turning it off is another sample set
    meta = json.loads((run / "eval" / "samples" / "ddim-3_cfg-1.json").read_text())
    assert meta["clip_x0"] is True
    args = parser.parse_args(argv[:-2] + ["--metrics", "kid", "--no-progress", "--no-clip-x0"])
    assert args.func(args) == 0
    assert all(s["seconds"] > 0.0 for s in read_report(run)["settings"])
    args = parser.parse_args(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")])
    assert args.func(args) == 0
    assert (tmp_path / "cmp" / "compare.md").is_file()


def test_eval_resizes_a_run_at_another_resolution_for_the_extractor(tmp_path, monkeypatch,
                                                                    digits_mlp, extractor_cache):
    """A run trained on 16x16 digits is judged by the 8x8 digits-mlp: real and generated images
    are resized alike, the extractor is the one trained on the native data, and it is said."""
    from difflab.cli import build_parser
    from difflab.config import load_config
    from difflab.training import train

    monkeypatch.setenv("DIFFLAB_CACHE", str(extractor_cache))
    cfg = load_config("configs/ddpm_digits.toml", [
        "train.steps=1", "train.checkpoint_every=1", "train.sample_every=0",
        "train.tensorboard=false", "data.image_size=16"])
    run = tmp_path / "run16"
    train(cfg, run, progress=False)
    args = build_parser().parse_args(["eval", str(run), "--samplers", "ddim:2", "--metrics",
                                      "kid", "--n", "20", "--kid-subsets", "2", "--no-progress"])
    assert args.func(args) == 0
    rep = read_report(run)
    assert rep["extractor"]["key"] == digits_mlp.meta["key"]
    assert any("resized to 8x8" in note for note in rep["notes"])
    x = np.load(run / "eval" / rep["settings"][0]["samples"])
    assert x.shape == (20, 1, 16, 16)
    ext = digits_mlp
    ext.resize_inputs = False
    with pytest.raises(DifflabError, match="resize_inputs"):
        ext.features(torch.zeros(2, 1, 16, 16))
    ext.resize_inputs = True
    try:  # resizing a constant image keeps it constant: same features as the native one
        torch.testing.assert_close(ext.features(torch.full((1, 1, 16, 16), 0.3)),
                                   ext.features(torch.full((1, 1, 8, 8), 0.3)))
    finally:
        ext.resize_inputs = False
