"""``difflab tune-grid`` end to end on a tiny trained run: it saves a grid that ``--grid
tuned`` then samples with (the same images as the grid's times given as a custom grid), and
its bad inputs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflab import cli
from difflab.grid_tuning import TUNED_FILE
from difflab.sampling import SampleRequest, generate


@pytest.fixture(scope="module")
def tuned_run(train_tiny_run) -> Path:
    out = train_tiny_run("tune", "data.holdout_fraction=0.96")
    assert cli.main(["tune-grid", str(out), "--sampler", "dpmpp_2m", "--nfe", "4", "--n", "4",
                     "--val-n", "4", "--ref-steps", "20", "--sweeps", "1",
                     "--threads", "1"]) == 0
    return out


def test_tune_grid_saves_an_entry_with_its_evidence(tuned_run, capsys):
    data = json.loads((tuned_run / TUNED_FILE).read_text())
    (entry,) = data["grids"]
    assert entry["sampler"] == "dpmpp_2m" and entry["steps"] == 4 and entry["nfe"] == 4
    times = entry["times"]
    assert len(times) == 5 and times == sorted(times, reverse=True) and times[-1] == 0.0
    held = entry["error"]["held_out"]
    assert "tuned" in held and entry["error"]["best_fixed"] in held
    assert "karras[rho=3]" in held and "discrete[trailing]" in held
    # the search starts from the best fixed grid, so on the tuning noises it is never worse
    assert entry["error"]["tuning"] <= min(entry["error"]["fixed_tuning"].values())
    assert entry["search"]["solves"] >= len(entry["error"]["fixed_tuning"])


def test_grid_tuned_samples_on_the_saved_times(tuned_run):
    times = json.loads((tuned_run / TUNED_FILE).read_text())["grids"][0]["times"]
    a = generate(SampleRequest(tuned_run, sampler="dpmpp_2m", steps=4, grid="tuned", n=2,
                               clip_x0=False))
    b = generate(SampleRequest(tuned_run, sampler="dpmpp_2m", grid="custom",
                               grid_options={"times": times}, n=2, clip_x0=False))
    assert a.metadata["grid"] == "tuned" and b.metadata["steps"] == 4
    assert torch.equal(a.images, b.images)
    other = [0.5 * (t + u) if 0 < i < 3 else t for i, (t, u) in
             enumerate(zip(times, [*times[1:], 0.0]))]  # two interior times moved
    c = generate(SampleRequest(tuned_run, sampler="dpmpp_2m", grid="custom",
                               grid_options={"times": other}, n=2, clip_x0=False))
    assert not torch.equal(a.images, c.images)


def test_sample_and_eval_accept_the_tuned_grid(tuned_run, tmp_path):
    from difflab.evaluation.command import parse_samplers

    assert cli.main(["sample", str(tuned_run), "--sampler", "dpmpp_2m", "--steps", "4",
                     "--grid", "tuned", "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert parse_samplers("dpmpp_2m:4:tuned") == [("dpmpp_2m", 4, "tuned")]


def test_retuning_replaces_only_its_own_entry(tuned_run):
    assert cli.main(["tune-grid", str(tuned_run), "--sampler", "ddim", "--steps", "3",
                     "--n", "2", "--val-n", "2", "--ref-steps", "12", "--sweeps", "1"]) == 0
    keys = [(e["sampler"], e["steps"]) for e in
            json.loads((tuned_run / TUNED_FILE).read_text())["grids"]]
    assert keys == [("ddim", 3), ("dpmpp_2m", 4)]


@pytest.mark.parametrize("argv, words", [
    (["sample", "{run}", "--sampler", "dpmpp_2m", "--steps", "7", "--grid", "tuned", "--out",
      "{tmp}/x.png"], ["no tuned grid", "dpmpp_2m:4", "difflab tune-grid"]),
    (["sample", "{run}", "--grid", "custom", "--out", "{tmp}/x.png"], ["needs its times"]),
    (["sample", "{run}", "--grid", "custom", "--grid-option", "times=[0.2,0.5,0.0]",
      "--out", "{tmp}/x.png"], ["descending"]),
    (["tune-grid", "{run}", "--sampler", "ddpm", "--nfe", "5"], ["stochastic"]),
    (["tune-grid", "{run}", "--sampler", "ddim", "--nfe", "5", "--option", "eta=1"],
     ["stochastic", "eta=0"]),
    (["tune-grid", "{run}", "--sampler", "nope", "--nfe", "5"], ["sampler", "ddim"]),
    (["tune-grid", "{run}", "--sampler", "heun", "--nfe", "1"], ["fits no step"]),
    (["tune-grid", "{run}", "--sampler", "ddim", "--steps", "20", "--ref-steps", "30"],
     ["ref_steps"]),
    (["tune-grid", "{tmp}/nowhere", "--sampler", "ddim", "--nfe", "5"], ["config.toml"]),
])
def test_bad_values_are_one_line_errors(tuned_run, tmp_path, argv, words, capsys):
    argv = [a.format(run=tuned_run, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: ") and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_a_broken_tuned_file_is_a_clear_error(tuned_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tuned_run, run)
    (run / TUNED_FILE).write_text("{not json")
    assert cli.main(["sample", str(run), "--sampler", "dpmpp_2m", "--steps", "4", "--grid",
                     "tuned", "--out", str(tmp_path / "x.png")]) == 2
    assert "not a difflab tuned-grids file" in capsys.readouterr().err


def test_sampling_with_other_options_than_tuned_warns(tuned_run, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="difflab"):
        generate(SampleRequest(tuned_run, sampler="dpmpp_2m", steps=4, grid="tuned", n=1))
    assert not [r for r in caplog.records if "tuned with options" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="difflab"):
        generate(SampleRequest(tuned_run, sampler="dpmpp_2m", steps=4, grid="tuned", n=1,
                               options={"lower_order_final": False}))
    assert [r for r in caplog.records if "tuned with options" in r.getMessage()]
