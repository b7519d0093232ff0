"""Analytic-DPM's ``Gamma_t`` of a run: estimated with per-row conditions, cached in the run and
reused, so ``analytic_ddpm`` / ``analytic_ddim`` work from ``difflab sample`` (issue 18, 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from difflab import cli
from difflab.cond import Cond
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.paths import VP
from difflab.samplers import analytic, timesteps


def test_conditional_gamma_matches_its_closed_form():
    """``eps_hat(x_t, t, y) = c_y x_t`` has ``E ||eps_hat||^2 / d = c_y^2 (alpha_t^2 E x0^2 / d
    + sigma_t^2)``; with half the rows of each class the estimate must average the two."""
    path = VP.linear()
    scale = torch.tensor([0.5, 2.0], dtype=torch.float64)
    net = lambda x, t, cond: scale[cond.labels].view(-1, 1) * x  # noqa: E731
    den = Denoiser(net, path, prediction="eps", time_input=lambda t: t)
    g = torch.Generator().manual_seed(0)
    n, d = 4096, 16
    x0 = 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % 2
    times = timesteps.uniform(path, 6)
    mom = analytic.estimate_gamma(den, x0, times, generator=g, batch_size=512,
                                  cond=Cond(labels=labels))
    m2 = x0.pow(2).mean(1)
    a, s = path.alpha(mom.times), path.sigma(mom.times)
    c2 = scale[labels].pow(2)
    closed = torch.stack([(c2 * (ai**2 * m2 + si**2)).mean() for ai, si in zip(a, s)])
    assert bool(((mom.gamma - closed).abs() <= 4 * mom.stderr).all()), (mom.gamma, closed)
    # all rows of one class: the bound denoiser's estimate, the same draws, bit for bit
    ones = torch.ones(n, dtype=torch.long)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    per_row = analytic.estimate_gamma(den, x0, times, generator=g1, batch_size=512,
                                      cond=Cond(labels=ones))
    bound = analytic.estimate_gamma(den.bind(Cond(labels=ones[:512])), x0, times, generator=g2,
                                    batch_size=512)
    assert torch.equal(per_row.gamma, bound.gamma)
    with pytest.raises(DifflabError, match="one condition per row"):
        analytic.estimate_gamma(den, x0, times, cond=Cond(labels=labels[:10]))


@pytest.fixture(scope="module")
def run(train_tiny_run) -> Path:
    return train_tiny_run("moments", "data.holdout_fraction=0.96")


def pixels(file: Path) -> bytes:
    return Image.open(file).tobytes()


@pytest.mark.parametrize("sampler", ["analytic_ddpm", "analytic_ddim"])
def test_analytic_samplers_from_the_cli_estimate_once_and_reuse(run, tmp_path, sampler,
                                                                monkeypatch, capsys):
    folder = run / "moments"
    before = set(folder.glob("*")) if folder.is_dir() else set()
    base = ["sample", str(run), "--sampler", sampler, "--steps", "4", "--n", "3", "--seed", "2"]
    assert cli.main([*base, "--out", str(tmp_path / "a.png")]) == 0
    new = set(folder.glob("*.safetensors")) - before
    if sampler == "analytic_ddpm":  # the first of the two: estimated here
        assert len(new) == 1
    cached = sorted(folder.glob("step_2-ema-*.safetensors"))
    assert cached
    stamp = {f: f.stat().st_mtime_ns for f in cached}
    mom = analytic.AnalyticMoments.load(cached[0])
    assert mom.n_samples >= 2 and bool((mom.gamma > 0).all())

    def never(*args, **kwargs):
        raise AssertionError("Gamma_t estimated again although it is cached")

    monkeypatch.setattr(analytic, "estimate_gamma", never)
    assert cli.main([*base, "--out", str(tmp_path / "b.png")]) == 0
    assert pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")
    assert {f: f.stat().st_mtime_ns for f in cached} == stamp
    # the cached file is what --option moments=FILE reads: the same images
    assert cli.main([*base, "--option", f"moments={cached[0]}", "--out",
                     str(tmp_path / "c.png")]) == 0
    assert pixels(tmp_path / "a.png") == pixels(tmp_path / "c.png")
    # another grid needs Gamma_t at other times: estimated (here: refused by the stub)
    with pytest.raises(AssertionError, match="estimated again"):
        cli.main([*base[:-4], "--steps", "5", "--n", "3", "--out", str(tmp_path / "d.png")])
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main([*base, "--option", f"moments={tmp_path / 'none.safetensors'}",
                     "--out", str(tmp_path / "e.png")]) == 2
    assert "AnalyticMoments.save" in capsys.readouterr().err


def test_moments_cache_is_per_weights_and_deterministic(run, tmp_path):
    from difflab.moments import run_moments
    from difflab.runs import load_run

    grid = timesteps.discrete(load_run(run).denoiser.path, 3)
    ema, f_ema = run_moments(load_run(run), grid, n_samples=16)
    raw, f_raw = run_moments(load_run(run, ema=False), grid, n_samples=16)
    assert f_ema != f_raw and "-ema-" in f_ema.name and "-raw-" in f_raw.name
    assert not torch.equal(ema.gamma, raw.gamma)
    f_ema.unlink()  # estimated again from scratch: the same numbers, the same file name
    again, f_again = run_moments(load_run(run), grid, n_samples=16)
    assert f_again == f_ema
    back = analytic.AnalyticMoments.load(f_again)
    for a, b in ((again, ema), (back, ema)):
        assert torch.equal(a.gamma, b.gamma) and torch.equal(a.stderr, b.stderr)
        assert torch.equal(a.times, b.times)
