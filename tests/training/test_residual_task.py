"""The residual task (SN-/NPR-DPM's variance head, Bao et al. 2022b): it trains a head on a
frozen diffusion run, starts from the base network, samples through npr_ddpm / sn_ddpm and
enters the VLB; bad inputs fail with messages that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflab import cli
from difflab.errors import DifflabError

TINY = ["train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
        "train.tensorboard=false", "train.steps=2", "train.sample_every=0"]


def _write(tmp: Path, base: Path, kind: str = "npr", extra: str = "") -> Path:
    f = tmp / f"{kind}.toml"
    f.write_text(f'[task]\nkind = "residual"\nbase = "{base}"\n{extra}\n'
                 f'[objective]\nname = "residual"\nkind = "{kind}"\n'
                 '[data]\nname = "digits"\n')
    return f


def _train(config: Path, out: Path, *sets: str) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = [a for item in (*TINY, *sets) for a in ("--set", item)]
        return cli.main(["train", str(config), "--out", str(out), *args])
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(train_tiny_run, tmp_path_factory):
    base = train_tiny_run("residual_base")
    tmp = tmp_path_factory.mktemp("residual")
    npr, sn = tmp / "npr", tmp / "sn"
    assert _train(_write(tmp, base, "npr"), npr) == 0
    assert _train(_write(tmp, base, "sn"), sn) == 0
    return base, npr, sn, tmp


def test_the_head_starts_from_the_base_network_with_a_zero_output(runs):
    from difflab.config import load_config
    from difflab.runs import load_run
    from difflab.tasks import make_task

    base, _, _, tmp = runs
    task = make_task(load_config(_write(tmp, base, "npr")))
    head = task.build_trainable()["model"]
    ref = load_run(base).net.state_dict()
    own = head.state_dict()
    assert own.keys() == ref.keys()
    for k, v in own.items():
        if k.startswith("out_conv."):
            assert torch.count_nonzero(v) == 0
        else:
            assert torch.equal(v, ref[k]), k
    x = torch.randn(3, *task.sample_shape)
    assert torch.count_nonzero(task.wrap(head)(x, torch.full((3,), 0.5))) == 0
    # the run takes the base's path and network, and names the base as a frozen part
    assert task.cfg.path == load_run(base).config.path
    assert "base" in task.frozen_parts()


def test_training_moves_the_head_and_leaves_the_base_alone(runs):
    from difflab.runs import load_run

    base, npr, _, tmp = runs
    before = {k: v.clone() for k, v in load_run(base).net.state_dict().items()}
    assert _train(_write(tmp, base, "npr"), tmp / "again", "train.steps=3",
                  "train.lr=1e-2") == 0
    head = load_run(tmp / "again", ema=False).net.state_dict()
    assert torch.count_nonzero(head["out_conv.weight"]) > 0  # the gradient reached the head
    after = load_run(base).net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = (npr / "config.toml").read_text()
    assert 'kind = "residual"' in meta and "[path]" in meta


def test_npr_and_sn_sample_through_a_request(runs):
    from difflab.runs import load_run
    from difflab.sampling import SampleRequest, generate

    base, npr, sn, _ = runs
    run = load_run(base)
    for sampler, head in (("npr_ddpm", npr), ("sn_ddpm", sn)):
        out = generate(SampleRequest(run, sampler=sampler, steps=4, n=3, seed=1,
                                     options={"residual": str(head)}))
        assert out.images.shape[0] == 3 and torch.isfinite(out.images).all()
        again = generate(SampleRequest(run, sampler=sampler, steps=4, n=3, seed=1,
                                       options={"residual": str(head)}))
        assert torch.equal(out.images, again.images)


def test_a_constant_npr_head_gives_the_analytic_bound():
    """NPR's variance with ``h = 1 - Gamma_t`` everywhere is Analytic-DPM's (Thm. 1): the two
    VLBs agree term by term, decoder step included."""
    from difflab import likelihood as lk
    from difflab.denoiser import Denoiser
    from difflab.paths import VP
    from difflab.samplers.analytic import AnalyticMoments
    from difflab.samplers.timesteps import discrete

    torch.manual_seed(0)
    path = VP.discrete_linear(N=100)
    net = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    den = Denoiser(lambda x, t, c: net(x) * 0.3, path)
    grid = discrete(path, 8, spacing="linspace")
    times = grid[grid > 0].flip(0)
    gamma = torch.linspace(0.2, 0.9, times.numel(), dtype=torch.float64)
    moments = AnalyticMoments(times, gamma, torch.zeros_like(gamma), 10)

    def head(x_t, t):
        return torch.full_like(x_t, 1.0 - moments.gamma_at(float(t.flatten()[0]), path))

    x0 = (torch.randint(0, 256, (4, 1, 6, 6)).double() / 127.5 - 1)
    a = lk.vlb(den, x0, grid=grid, variance="analytic", moments=moments,
               generator=torch.Generator().manual_seed(3))
    b = lk.vlb(den, x0, grid=grid, variance="npr", residual=head,
               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(b.terms["kl"], a.terms["kl"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.terms["decoder"], a.terms["decoder"], rtol=1e-10, atol=1e-12)
    # and the head matters: a larger residual is a different bound
    c = lk.vlb(den, x0, grid=grid, variance="npr", residual=lambda x, t: torch.ones_like(x),
               generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(c.bpd, a.bpd)


def test_eval_reports_the_npr_bound_and_samples_with_options(runs, tmp_path):
    import json

    base, npr, _, _ = runs
    out = tmp_path / "ev"
    assert cli.main(["eval", str(base), "--metrics", "nll", "--nll-variance", "npr",
                     "--nll-residual", str(npr), "--nll-n", "4", "--nll-steps", "5",
                     "--out", str(out)]) == 0
    lik = json.loads((out / "report.json").read_text())["likelihood"]
    assert lik["variance"] == "npr" and lik["residual"] == str(npr)
    assert lik["value"] == pytest.approx(lik["value"]) and lik["value"] > 0


@pytest.mark.parametrize("args, message", [
    (["--metrics", "nll", "--nll-variance", "npr"], "--nll-residual RUN"),
    (["--metrics", "nll", "--nll-residual", "X"], "--nll-variance npr or sn"),
    (["--samplers", "ddim:5", "--option", "residual=X", "--metrics", "kid"],
     "none of the samplers ddim takes it"),
])
def test_eval_rejects_residual_misuse(runs, capsys, args, message):
    base = runs[0]
    assert cli.main(["eval", str(base), *args]) == 2
    assert message in capsys.readouterr().err


def test_sampling_errors_name_the_fix(runs, capsys):
    base, npr, _, tmp = runs
    assert cli.main(["sample", str(base), "--sampler", "npr_ddpm", "--steps", "3",
                     "--out", str(tmp / "a.png")]) == 2
    assert "--option residual=RUN" in capsys.readouterr().err
    assert cli.main(["sample", str(base), "--sampler", "sn_ddpm", "--steps", "3",
                     "--option", f"residual={npr}", "--out", str(tmp / "a.png")]) == 2
    assert "trained with objective.kind='npr'" in capsys.readouterr().err
    assert cli.main(["sample", str(base), "--sampler", "npr_ddpm", "--steps", "3",
                     "--option", f"residual={base}", "--out", str(tmp / "a.png")]) == 2
    assert "not a residual run" in capsys.readouterr().err
    assert cli.main(["sample", str(npr), "--out", str(tmp / "a.png")]) == 2
    assert "--sampler npr_ddpm --option residual=" in capsys.readouterr().err


def test_bad_residual_configs_fail_before_training(runs, tmp_path, capsys):
    from difflab.config import load_config
    from difflab.tasks import make_task

    base, npr, _, _ = runs
    with pytest.raises(DifflabError, match="does not exist"):
        make_task(load_config(_write(tmp_path, tmp_path / "nowhere")))
    with pytest.raises(DifflabError, match="task.kind='residual' run"):
        make_task(load_config(_write(tmp_path, npr)))
    f = _write(tmp_path, base)
    f.write_text(f.read_text() + "[model]\ndropout = 0.2\n")
    with pytest.raises(DifflabError, match="task.init='base' starts the head"):
        make_task(load_config(f))
    f = _write(tmp_path, base)
    f.write_text(f.read_text() + '[path]\nkind = "discrete_linear"\n')
    with pytest.raises(DifflabError, match="differs from the base run"):
        make_task(load_config(f))
    f = tmp_path / "nobase.toml"
    f.write_text('[task]\nkind = "residual"\n[objective]\nname = "residual"\n')
    assert cli.main(["train", str(f), "--out", str(tmp_path / "x")]) == 2
    assert "needs task.base" in capsys.readouterr().err
    with pytest.raises(DifflabError, match="'npr' \\(noise residual\\) or 'sn'"):
        make_task(load_config(_write(tmp_path, base, "var")))
