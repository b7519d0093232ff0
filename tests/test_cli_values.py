"""Every sub-command against a table of bad values: zero, negative, non-numeric, unknown names,
missing paths, folders for files. Each must end with exit status 2 and one line that names what
was wrong, with no Python traceback and nothing written (issue 18, items 5 to 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab import cli

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs" / "ddpm_digits.toml")
TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
    "train.tensorboard=false", "data.holdout_fraction=0.96", "sample.steps=3",
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """A 2-step run trained through the CLI, an empty folder and an existing plain file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("values")
    run = root / "run"
    sets = [a for item in (*TINY, "train.steps=2") for a in ("--set", item)]
    assert cli.main(["train", CFG, "--out", str(run), *sets]) == 0
    folder = root / "folder"
    folder.mkdir()
    file = root / "file.txt"
    file.write_text("not a folder\n")
    return {"run": run, "dir": folder, "file": file, "tmp": root}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for r in roots for p in sorted(r.rglob("*"))}


S = ["sample", "{run}", "--steps", "2", "--n", "2", "--out", "{tmp}/never.png"]
E = ["eval", "{run}", "--metrics", "nll", "--nll-n", "4", "--nll-steps", "2"]
CASES = [
    # train
    (["train", CFG, "--minutes", "-1"], ["--minutes", "positive"]),
    (["train", CFG, "--minutes", "0"], ["--minutes", "positive"]),
    (["train", CFG, "--minutes", "soon"], ["--minutes", "'soon'"]),
    (["train", CFG, "--minutes", "nan"], ["--minutes"]),
    (["train", CFG, "--threads", "0"], ["--threads", "positive integer"]),
    (["train", "{tmp}/missing.toml"], ["missing.toml", "does not exist"]),
    (["train", "{dir}"], ["folder"]),
    (["train", CFG, "--set", "train.steps=0"], ["train.steps"]),
    (["train", CFG, "--set", "train.steps"], ["train.steps", "KEY=VALUE"]),
    (["train", "--resume", "{tmp}/nowhere"], ["nowhere"]),
    (["train", "--resume", "{file}"], ["file.txt"]),
    # sample
    ([*S, "--steps", "0"], ["--steps", "positive integer", "0"]),
    ([*S, "--steps", "-3"], ["--steps", "positive integer"]),
    ([*S, "--steps", "ten"], ["--steps", "'ten'"]),
    ([*S, "--n", "0"], ["--n", "positive integer"]),
    ([*S, "--batch-size", "0"], ["--batch-size", "positive integer"]),
    ([*S, "--nrow", "0"], ["--nrow", "positive integer"]),
    ([*S, "--strength", "1.5"], ["--strength", "(0, 1]"]),
    ([*S, "--strength", "0"], ["--strength"]),
    ([*S, "--strength", "half"], ["--strength", "'half'"]),
    ([*S, "--init", "{tmp}/missing.png"], ["missing.png", "does not exist"]),
    ([*S, "--strength", "0.5"], ["strength", "init"]),
    ([*S, "--seed", "-1"], ["--seed", ">= 0"]),
    ([*S, "--threads", "0"], ["--threads"]),
    ([*S, "--label", "-1"], ["--label"]),
    ([*S, "--option", "eta=abc"], ["eta", "'abc'", "number", "ddim"]),
    ([*S, "--option", "eta"], ["--option", "KEY=VALUE"]),
    ([*S, "--option", "etaa=1"], ["etaa", "accepted"]),
    ([*S, "--grid-option", "rho"], ["--grid-option", "KEY=VALUE"]),
    ([*S, "--device", "banana"], ["--device", "banana", "cpu"]),
    ([*S, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], ["--device", "cuda"]),
    ([*S, "--out", "{dir}"], ["--out", "not a folder"]),
    ([*S, "--out", "{tmp}/never.jpg"], ["--out", ".png"]),
    ([*S, "--out", "{file}/x.png"], ["--out"]),
    (["sample", "{run}", "--out-dir", "{file}"], ["--out-dir", "existing file"]),
    ([*S, "--sampler", "banana"], ["banana", "ddim", "difflab samplers"]),
    ([*S, "--grid", "banana"], ["banana", "uniform"]),
    ([*S, "--guidance", "banana"], ["banana", "cfg"]),
    ([*S, "--checkpoint", "step_99"], ["step_99", "step_2"]),
    (["sample", "{tmp}/nowhere", "--out", "{tmp}/never.png"], ["nowhere"]),
    (["sample", "{file}", "--out", "{tmp}/never.png"], ["file.txt"]),
    # samplers / families take no arguments
    (["samplers", "ddim"], ["unrecognized", "ddim"]),
    (["families", "unet"], ["unrecognized", "unet"]),
    # demo (rejected before training starts)
    (["demo", "--out", "{tmp}/demo", "--minutes", "0"], ["--minutes", "positive"]),
    (["demo", "--out", "{tmp}/demo", "--n", "0"], ["--n", "positive integer"]),
    (["demo", "--out", "{tmp}/demo", "--threads", "-2"], ["--threads"]),
    (["demo", "--out", "{tmp}/demo", "--config", "{tmp}/missing.toml"], ["missing.toml"]),
    (["demo", "--out", "{file}"], ["--out", "existing file"]),
    # eval
    ([*E, "--n", "0"], ["--n", "positive integer"]),
    ([*E, "--nll-n", "0"], ["--nll-n", "positive integer"]),
    ([*E, "--nll-steps", "0"], ["--nll-steps", "positive integer"]),
    ([*E, "--batch-size", "0"], ["--batch-size", "positive integer"]),
    ([*E, "--kid-subsets", "0"], ["--kid-subsets", "positive integer"]),
    ([*E, "--seed", "-1"], ["--seed", ">= 0"]),
    ([*E, "--metrics", "banana"], ["banana", "fid"]),
    ([*E, "--nll-variance", "banana"], ["--nll-variance", "banana", "analytic"]),
    (["eval", "{run}", "--samplers", "banana:10"], ["banana"]),
    (["eval", "{run}", "--samplers", "ddim:0"], ["ddim:0"]),
    (["eval", "{run}", "--samplers", "ddim:ten"], ["ddim:ten"]),
    ([*E, "--out", "{file}"], ["--out", "existing file"]),
    ([*E, "--checkpoint", "step_99"], ["step_99"]),
    (["eval", "{tmp}/nowhere"], ["nowhere"]),
    # compare
    (["compare", "{tmp}/nowhere", "--out", "{tmp}/cmp"], ["nowhere"]),
    (["compare", "{run}", "--metric", "banana", "--out", "{tmp}/cmp"], ["--metric", "banana"]),
    (["compare", "{run}", "--out", "{file}"], ["--out", "existing file"]),
    (["compare", "{file}", "--out", "{tmp}/cmp"], ["file.txt"]),
    # export / upgrade
    (["export", "{tmp}/nowhere", "{tmp}/exp"], ["nowhere"]),
    (["export", "{run}", "{file}"], ["file.txt"]),
    (["export", "{run}", "{tmp}/exp", "--checkpoint", "step_99"], ["step_99"]),
    (["upgrade", "{tmp}/nowhere"], ["nowhere"]),
    (["upgrade", "{file}"], ["file.txt"]),
    (["upgrade", "{dir}"], ["folder"]),
    # the top level
    (["banana"], ["banana", "invalid choice"]),
]


def ids(case) -> str:
    argv = case[0]
    return " ".join(a.replace("{", "").replace("}", "") for a in argv[:1] + argv[-2:])


@pytest.mark.parametrize("argv, words", CASES, ids=[ids(c) for c in CASES])
def test_a_bad_value_is_one_line_exit_2_and_writes_nothing(places, argv, words, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(places["tmp"])
    argv = [a.format(**places) for a in argv]
    before = snapshot(places["tmp"])
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own checks exit from parse_args
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert errors[0].startswith("difflab")
    for w in words:
        assert w.format(**places) in errors[0], (w, errors[0])
    assert snapshot(places["tmp"]) == before, "a refused command wrote or changed files"


@pytest.mark.parametrize("argv, word", [
    (["sample", "{run}", "--steps", "0"], "--steps"),
    (["sample", "{run}", "--option", "eta=abc", "--out", "{tmp}/never.png"], "eta"),
    (["sample", "{run}", "--device", "banana"], "--device"),
])
def test_as_a_real_process_no_traceback(places, argv, word):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "difflab.cli", *[a.format(**places)
                                                                  for a in argv]],
                          capture_output=True, text=True, cwd=places["tmp"], timeout=300,
                          env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and word in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
