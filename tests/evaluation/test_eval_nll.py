"""``difflab eval --metrics nll`` draws no samples and says what its number is; ``difflab
compare`` writes well-formed tables across reports with different metrics (issue 18, 12-13)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from difflab import cli
from difflab.evaluation import command
from difflab.evaluation.metrics import Score
from difflab.evaluation.report import KID_NOTE, read_report, write_comparison, write_report


@pytest.fixture(scope="module")
def run(train_tiny_run) -> Path:
    return train_tiny_run("nll", "data.holdout_fraction=0.5")


def test_nll_alone_draws_no_samples_and_says_it_is_a_bound(run, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("--metrics nll must not draw samples or build features")

    for name in ("generate", "cached_samples", "get_extractor", "RealReference"):
        monkeypatch.setattr(command, name, forbidden)
    out = tmp_path / "eval"
    assert cli.main(["eval", str(run), "--metrics", "nll", "--nll-n", "8", "--nll-steps", "10",
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "an upper bound" in printed
    rep = read_report(out)
    lik = rep["likelihood"]
    assert lik["bound"] == "upper" and lik["steps"] == 10 and lik["variance"] == "small"
    assert lik["path_steps"] == 1000 and lik["n_real"] == 8 and lik["value"] > 0
    assert "settings" not in rep and "floor" not in rep
    md = (out / "report.md").read_text()
    assert "upper bound on the NLL" in md and "here 10 of the path's 1000" in md
    assert "--nll-variance analytic" in md
    assert "floor" not in md.lower() and "## Results" not in md
    assert not (out / "samples").exists() and not (out / "grids").exists()
    # the means are clipped like the run's sampling (sample.clip_x0 = true), and it is said
    assert lik["clip_x0"] is True and "x0_hat clipped to [-1, 1]" in md
    assert cli.main(["eval", str(run), "--metrics", "nll", "--nll-n", "8", "--nll-steps", "10",
                     "--out", str(tmp_path / "raw"), "--no-clip-x0", "--no-progress"]) == 0
    raw = read_report(tmp_path / "raw")["likelihood"]
    assert raw["clip_x0"] is False and "not clipped" in raw["note"]
    assert raw["value"] != lik["value"]


def test_nll_variance_choices_and_the_analytic_bound(run, tmp_path, monkeypatch, capsys):
    """small, large and analytic are three bounds on the same images; analytic estimates
    Gamma_t once (cached in RUN/moments) and names the file in the report."""
    values = {}
    for variance in ("small", "large", "analytic"):
        out = tmp_path / variance
        assert cli.main(["eval", str(run), "--metrics", "nll", "--nll-n", "8", "--nll-steps",
                         "10", "--nll-variance", variance, "--out", str(out),
                         "--no-progress"]) == 0
        lik = read_report(out)["likelihood"]
        assert lik["variance"] == variance and f"{variance} variance" in lik["name"]
        values[variance] = lik["value"]
    assert len(set(values.values())) == 3
    moments = read_report(tmp_path / "analytic")["likelihood"]["moments"]
    assert Path(moments).parent == run / "moments" and Path(moments).is_file()
    assert "Analytic-DPM moments" in (tmp_path / "analytic" / "report.md").read_text()
    # a second call reads the cached moments instead of evaluating the network again
    from difflab.samplers import analytic

    monkeypatch.setattr(analytic, "estimate_gamma", lambda *a, **k: 1 / 0)
    again = tmp_path / "again"
    assert cli.main(["eval", str(run), "--metrics", "nll", "--nll-n", "8", "--nll-steps", "10",
                     "--nll-variance", "analytic", "--out", str(again), "--no-progress"]) == 0
    assert read_report(again)["likelihood"]["value"] == values["analytic"]
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--metrics", "kid", "--nll-variance", "small",
                     "--out", str(tmp_path / "x")]) == 2
    assert "add nll to --metrics" in capsys.readouterr().err


def _score(name, value, stderr=None):
    return Score(name, value, n_fake=100, n_real=100, stderr=stderr).to_dict()


def _report(run, metrics):
    scores = {"fid": _score("FID", 12.5), "kid": _score("KID", 0.0123, 1e-3),
              "precision": _score("precision", 0.7), "recall": _score("recall", 0.6),
              "is": _score("IS", 3.2)}
    return {"run": run, "step": 10, "n": 100, "n_reference": 100,
            "settings": [{"sampler": "ddim", "steps": 10, "nfe": 10, "guidance": "none",
                          "scale": None, "n": 100,
                          "scores": {m: scores[m] for m in metrics}}]}


def _table(md: str) -> list[list[str]]:
    """Each table row's cells, split at the '|' that are not escaped."""
    rows = [ln.strip() for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln[1:-1])] for ln in rows]


def test_compare_table_has_one_cell_per_header_across_mixed_metrics(tmp_path):
    a = _report("runs/a", ["fid", "kid"])
    b = _report("runs/b|c", ["kid", "precision", "recall", "is"])
    md = write_comparison([a, b], tmp_path, metric="kid")["markdown"].read_text()
    table = _table(md)
    header, rule, *rows = table
    assert len(rows) == 2
    assert all(len(r) == len(header) for r in (rule, *rows)), table
    assert any(h.startswith("KID (raw MMD^2") for h in header), header
    for name in ("FID", "KID", "precision", "recall", "IS"):
        assert any(name in h for h in header), header
    fid = next(i for i, h in enumerate(header) if "FID" in h)
    assert rows[1][fid] in ("", "-", "n/a")  # run b has no FID
    assert "runs/b\\|c" in md  # a '|' in a cell is escaped, not a column break
    assert KID_NOTE in md and "not multiplied by 10^3" in KID_NOTE


def test_a_single_report_states_kid_units(tmp_path):
    md = write_report(_report("runs/a", ["kid"]), tmp_path)["markdown"].read_text()
    assert KID_NOTE in md
    assert all(len(r) == len(_table(md)[0]) for r in _table(md))
