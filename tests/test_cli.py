"""The ``difflab`` command: help texts, error format, train / resume / sample end to end."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab import cli
from difflab.training import list_checkpoints, read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
    "train.tensorboard=false", "data.holdout_fraction=0.96", "sample.steps=3",
]



def sets(*items: str) -> list[str]:
    return [a for item in (*TINY, *items) for a in ("--set", item)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step run trained through the CLI."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(out),
                     *sets("train.steps=2")]) == 0
    return out


# ----- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    ([], ["train", "sample", "demo"]),
    (["train"], ["--set", "--resume", "--out", "KEY=VALUE", "examples"]),
    (["sample"], ["--sampler", "--steps", "--n", "--seed", "--grid", "--option", "--out-dir",
                  "--no-ema", "--checkpoint"]),
    (["demo"], ["--out", "--minutes", "classifier"]),
])
def test_every_command_has_help(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for w in words:
        assert w in text


def test_commands_are_pluggable(capsys):
    def register_hello(sub):
        p = sub.add_parser("hello", help="say hello")
        p.set_defaults(func=lambda args: print("hello") or 0)

    cli.add_command(register_hello)
    try:
        assert cli.main(["hello"]) == 0
        assert capsys.readouterr().out == "hello\n"
    finally:
        cli.COMMANDS.remove(register_hello)


# ----- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["train", "configs/ddpm_digits.toml", "--set", "train.lrr=1"], ["train.lrr", "lr"]),
    (["train", "configs/ddpm_digits.toml", "--set", "train.lr=-1"], ["train.lr", "greater"]),
    (["train", "missing.toml"], ["missing.toml", "does not exist"]),
    (["train"], ["CONFIG"]),
    (["sample", "nowhere", "--out", "x.png"], ["nowhere", "config.toml"]),
])
def test_difflab_errors_are_one_line_with_exit_status_2(argv, words, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_error_as_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "difflab.cli", "train",
                           str(REPO / "configs" / "ddpm_digits.toml"), "--set", "train.lrr=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("difflab: error: ") and "Traceback" not in proc.stderr


# ----- train / resume / sample --------------------------------------------------------------------
def test_train_writes_a_run(run):
    assert (run / "config.toml").is_file()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resume_continues_with_the_runs_config(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert cli.main(["train", "--resume", str(copy), "--set", "train.steps=4"]) == 0
    assert [s for s, _ in list_checkpoints(copy / "checkpoints")][-1] == 4
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4]
    assert cli.main(["train", "--resume", str(copy), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("n, nrow, size", [(4, None, (22, 22)), (6, 3, (32, 22)),
                                           (5, None, (32, 22)), (9, None, (32, 32))])
def test_sample_writes_a_grid_of_the_right_size(run, tmp_path, n, nrow, size):
    """n 8x8 images, ``nrow`` (default ceil(sqrt(n))) per row, 2 px padding around each."""
    out = tmp_path / "grid.png"
    argv = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--n", str(n), "--seed",
            "1", "--out", str(out)]
    assert cli.main(argv + (["--nrow", str(nrow)] if nrow else [])) == 0
    img = Image.open(out)
    assert img.size == size and img.mode == "L"


def test_sample_is_reproducible_and_batch_independent(run, tmp_path):
    base = ["sample", str(run), "--sampler", "ddpm", "--steps", "4", "--n", "3", "--seed", "5"]
    assert cli.main([*base, "--out-dir", str(tmp_path / "a")]) == 0
    assert cli.main([*base, "--out-dir", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    assert cli.main([*base, "--out-dir", str(tmp_path / "c"), "--seed", "6"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["sample_00000.png", "sample_00001.png", "sample_00002.png"]
    for name in files:
        a = Image.open(tmp_path / "a" / name)
        assert a.size == (8, 8)
        assert a.tobytes() == Image.open(tmp_path / "b" / name).tobytes()
    assert any(Image.open(tmp_path / "a" / f).tobytes() !=
               Image.open(tmp_path / "c" / f).tobytes() for f in files)


def test_sample_options_ema_and_checkpoint_choices(run, tmp_path, capsys):
    base = ["sample", str(run), "--steps", "3", "--n", "2", "--out", str(tmp_path / "g.png")]
    assert cli.main([*base, "--option", "eta=1.0", "--no-ema", "--checkpoint", "step_2"]) == 0
    assert "raw weights of step_2" in capsys.readouterr().err
    assert cli.main([*base, "--option", "etaa=1.0"]) == 2
    assert "etaa" in capsys.readouterr().err
    assert cli.main([*base, "--checkpoint", "step_99"]) == 2
    assert "step_99" in capsys.readouterr().err
    assert cli.main([*base, "--sampler", "nope"]) == 2
    assert "ddim" in capsys.readouterr().err
    assert cli.main([*base, "--label", "3"]) == 2  # unconditional model


def test_parser_builds_every_registered_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"train", "sample", "demo"} <= set(sub.choices)


# ----- finding your way ---------------------------------------------------------------------------
def test_samplers_lists_every_sampler_with_what_it_needs(capsys):
    from difflab.samplers import SAMPLERS

    assert cli.main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = {ln.split(":")[0]: ln for ln in lines if not ln.startswith(" ")}
    assert set(heads) == set(SAMPLERS) and len(SAMPLERS) >= 29
    # facts from the papers, not from the registry: DDIM is first order and deterministic at
    # eta = 0; DDPM's ancestral step draws noise; DPM-Solver++(2M) is second order with one
    # evaluation per step; EDM's Heun takes two; DPM-Solver-3 is third order with three
    want = {"ddim": "order 1, 1 NFE per step, deterministic (stochastic when eta > 0)",
            "ddpm": "order 1, 1 NFE per step, stochastic",
            "dpmpp_2m": "order 2, 1 NFE per step, deterministic",
            "heun": "order 2, 2 NFE per step, deterministic (stochastic when S_churn > 0)",
            "dpm_solver_3": "order 3, 3 NFE per step, deterministic"}
    for name, text in want.items():
        assert heads[name] == f"{name}: {text}"
    assert "needs Gamma_t" in heads["analytic_ddpm"]
    assert "--option residual=RUN" in heads["npr_ddpm"]
    assert "learned-variance" not in heads["ddpm"]
    body = "\n".join(lines)
    assert "options: eta" in body and "Ho et al. 2020" in body


def test_sample_help_points_to_the_sampler_list(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    out = capsys.readouterr().out
    assert "difflab samplers" in out and "--threads" in out and "--progress" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "samplers" in capsys.readouterr().out


def test_sample_progress_bar_and_threads(run, tmp_path, capsys, monkeypatch):
    base = ["sample", str(run), "--sampler", "ddim", "--steps", "3", "--n", "2", "--out",
            str(tmp_path / "g.png")]
    assert cli.main([*base, "--progress", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "sampling ddim:" in err and "/3 [" in err and torch.get_num_threads() == 1
    assert cli.main([*base, "--no-progress"]) == 0
    assert "sampling ddim:" not in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert cli.main([*base, "--no-progress", "--threads", "2"]) == 0
    assert seen == [2]
