"""DiffPure (difflab.recipes.diffpure) and the attacks (difflab.recipes.attacks).

Known answers: PGD on a linear classifier reaches the closed-form worst case (L-inf:
``eps sign(w)``, L2: ``eps w / |w|``); purification with the exact Gaussian-mixture oracle is
nearly the identity at a tiny ``t*`` and ignores its input at ``t* = 1`` on a zero-terminal-SNR
path; a one-step purification is the oracle's posterior mean at ``sqrt(abar) x + sqrt(1 - abar)
z`` computed by hand; the checkpointed gradient equals the plain one bit for bit; BPDA's
gradient is the classifier's at the purified point; EOT's is the mean of its draws' gradients.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.latent.codec import IdentityCodec, IdentityConfig
from difflab.paths import VP
from difflab.recipes import attacks
from difflab.recipes.diffpure import (
    ONE_STEP_SAMPLERS,
    Purifier,
    check_t_star,
    cmd_diffpure,
    purify,
    register_cli,
)
from difflab.recipes.robustness import Attack, evaluate
from difflab.samplers import PerSampleNoise, sample


# ----- helpers -----------------------------------------------------------------------------------
def linear_classifier(w: torch.Tensor):
    """Two classes with logits ``(w . x, 0)``: for label 0 the loss grows as ``w . x`` falls."""

    def classify(x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ w.flatten().to(x.dtype)
        return torch.stack([s, torch.zeros_like(s)], 1)

    return classify


class TinyNet(nn.Module):
    """A small eps-network ``net(x, t, cond)`` (for gradients through a real network)."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        h = torch.tanh(self.conv1(x) + t.to(x.dtype).view(-1, 1, 1, 1))
        return self.conv2(h)


def tiny_classifier(d: int = 32, k: int = 3):
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(d, 16, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(16, k, generator=g, dtype=torch.float64) / 4.0

    def classify(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1).double() @ w1) @ w2

    return classify


def data(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 4, 4, generator=g, dtype=torch.float64) * 1.6 - 0.8
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def tiny_denoiser(path=None) -> tuple[Denoiser, TinyNet]:
    net = TinyNet().double()
    net.requires_grad_(False)
    return Denoiser(net, path or VP.discrete_linear(N=100), "eps", time_input=lambda t: t), net


# ----- PGD: closed-form worst cases --------------------------------------------------------------
@pytest.mark.parametrize("random_init", [False, True])
def test_pgd_linf_reaches_the_corner(random_init):
    """For logits ``(w.x, 0)`` the L-inf worst case is ``x -+ eps sign(w)`` (label 0: minus)."""
    w = torch.tensor([[1.0, -2.0], [0.5, -0.1]], dtype=torch.float64)
    classify = linear_classifier(w)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    adv = attacks.pgd_linf(classify, x, y, eps=0.2, steps=10, random_init=random_init,
                           generator=g)
    expected = torch.stack([-0.2 * w.sign(), 0.2 * w.sign()]).unsqueeze(1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)


def test_pgd_l2_reaches_eps_along_w():
    """The L2 worst case is ``x -+ eps w / |w|``."""
    w = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    classify = linear_classifier(w)
    x = torch.full((2, 1, 2, 2), 0.1, dtype=torch.float64)
    y = torch.tensor([0, 1])
    adv = attacks.pgd_l2(classify, x, y, eps=0.5, steps=10, random_init=False)
    u = w / w.norm()
    expected = x + torch.stack([-0.5 * u, 0.5 * u]).unsqueeze(1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # from a random start the off-direction part decays: close after more steps
    adv = attacks.pgd_l2(classify, x, y, eps=0.5, steps=60, step_size=0.1,
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_the_box(norm):
    classify = tiny_classifier()
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(16, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1).clamp(-0.95, 0.95)
    x[:, 0] = x[:, 0].sign()  # half the pixels on the boundary of [-1, 1]
    y = classify(x).argmax(1)
    eps = 0.5 if norm == "linf" else 2.0
    adv = attacks.pgd(x, y, attacks.classifier_gradient(classify), eps=eps, norm=norm, steps=15,
                      generator=g)
    d = (adv - x).flatten(1)
    assert float(adv.min()) >= -1 and float(adv.max()) <= 1
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert float(size.max()) <= eps + 1e-9
    loss = F.cross_entropy(classify(adv), y, reduction="none")
    assert bool((loss > F.cross_entropy(classify(x), y, reduction="none")).all())


def test_pgd_zero_budget_and_pixel_units():
    x, y = data()
    assert torch.equal(attacks.pgd_linf(tiny_classifier(), x, y, eps=0.0), x)
    assert attacks.pixel_budget(0.3) == pytest.approx(0.6)  # [0, 1] pixels -> [-1, 1] images


# ----- the purifier ------------------------------------------------------------------------------
def test_small_t_star_returns_nearly_the_input(oracle_denoiser, image_mixture):
    path = VP.discrete_linear()
    den = oracle_denoiser(image_mixture, path)
    x = image_mixture.sample(8, torch.Generator().manual_seed(0))
    near = purify(den, x, 0.002, noise=PerSampleNoise(range(8)), clip_x0=False)
    far = purify(den, x, 0.3, steps=10, noise=PerSampleNoise(range(8)), clip_x0=False)
    sigma = float(path.sigma(torch.tensor([0.002], dtype=torch.float64)))  # 0.017
    assert float((near - x).abs().max()) < 4 * sigma
    assert float((far - x).abs().mean()) > 10 * float((near - x).abs().mean())


def test_t_star_one_ignores_the_input(oracle_denoiser, image_mixture):
    """On a zero-terminal-SNR path ``x(1) = eps``: two inputs, same noise, same output."""
    path = VP.discrete_linear(N=100, zero_snr=True)
    den = oracle_denoiser(image_mixture, path, "x0")
    a = image_mixture.sample(4, torch.Generator().manual_seed(0))
    b = -3 * a + 1
    kw = dict(steps=5, clip_x0=False)
    out_a = purify(den, a, 1.0, noise=PerSampleNoise(range(4)), **kw)
    out_b = purify(den, b, 1.0, noise=PerSampleNoise(range(4)), **kw)
    assert torch.equal(out_a, out_b)
    assert Purifier(den, 1.0, steps=5).t_start == 1.0  # the path's last step
    half_a = purify(den, a, 0.5, noise=PerSampleNoise(range(4)), **kw)
    half_b = purify(den, b, 0.5, noise=PerSampleNoise(range(4)), **kw)
    assert not torch.allclose(half_a, half_b)


def test_one_step_is_the_posterior_mean_at_the_diffused_input(oracle_denoiser, image_mixture):
    """DiffPure eq. 4 by hand: ``x(t*) = sqrt(abar) x + sqrt(1 - abar) z`` at the 100th of 1000
    linear betas, then one DDPM step to 0 returns ``E[x0 | x(t*)]``."""
    path = VP.discrete_linear()
    den = oracle_denoiser(image_mixture, path)
    x = image_mixture.sample(3, torch.Generator().manual_seed(2))
    out = purify(den, x, 0.1, steps=1, noise=PerSampleNoise([7, 8, 9]), clip_x0=False)
    abar = torch.prod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)[:100])
    z = PerSampleNoise([7, 8, 9]).randn_like(x)
    xt = abar.sqrt() * x + (1 - abar).sqrt() * z
    t = torch.full((3,), 0.1, dtype=torch.float64)
    torch.testing.assert_close(out, image_mixture.posterior_mean(xt, t, path))


def test_default_steps_are_the_paths_own():
    den, _ = tiny_denoiser(VP.discrete_linear())
    p = Purifier(den, 0.1)
    assert p.times.numel() == 101 and p.t_start == pytest.approx(0.1)
    assert p.nfe == 100
    assert Purifier(den, 0.1, steps=10).times.numel() == 11


def test_latent_purification_goes_through_the_codec(oracle_denoiser, image_mixture):
    codec = IdentityCodec(IdentityConfig(channels=2))
    codec.set_scale(2.0)
    den = oracle_denoiser(image_mixture, VP.discrete_linear())
    x = image_mixture.sample(3, torch.Generator().manual_seed(4)) / 2
    kw = dict(steps=3, clip_x0=False)
    latent = purify(den, x, 0.2, noise=PerSampleNoise(range(3)), codec=codec, **kw)
    direct = purify(den, 2 * x, 0.2, noise=PerSampleNoise(range(3)), **kw) / 2
    torch.testing.assert_close(latent, direct)


# ----- gradient checkpointing --------------------------------------------------------------------
def _grad(purifier: Purifier, x: torch.Tensor, y: torch.Tensor, seeds) -> torch.Tensor:
    classify = tiny_classifier()
    return attacks.loss_gradient(lambda v: classify(purifier(v, PerSampleNoise(seeds))), x, y)


def test_checkpointed_gradient_equals_the_plain_one():
    den, net = tiny_denoiser()
    x, y = data(4)
    plain = Purifier(den, 0.5, steps=6, clip_x0=False)
    ckpt = Purifier(den, 0.5, steps=6, clip_x0=False, checkpoint=True)
    g_plain = _grad(plain, x, y, range(4))
    net.calls = 0
    g_ckpt = _grad(ckpt, x, y, range(4))
    assert net.calls == 12  # every step ran twice: forward, then recomputed in the backward
    assert torch.equal(g_ckpt, g_plain)
    assert not torch.allclose(_grad(plain, x, y, range(10, 14)), g_plain)  # the noise matters


def test_the_backward_pass_draws_no_noise():
    """Checkpointed steps replay their noise: after the backward pass the caller's generator
    streams are where the forward pass left them. A naive checkpoint (the stream passed
    straight in; ``preserve_rng_state`` covers only the global RNG) draws again when it
    recomputes a whole step (here forced: without early stopping, torch reruns the step to its
    end)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    den, _ = tiny_denoiser()
    x, _ = data(4)
    x.requires_grad_(True)
    p = Purifier(den, 0.5, steps=6, clip_x0=False, checkpoint=True)

    def states(noise: PerSampleNoise) -> list[torch.Tensor]:
        return [g.get_state() for g in noise.generators]

    def naive(v: torch.Tensor, noise: PerSampleNoise) -> torch.Tensor:
        for i in range(6):
            v = checkpoint(lambda u, i=i: sample("ddpm", den, u, p.times[i:i + 2], noise=noise),
                           v, use_reentrant=False)
        return v

    moved = []
    for purify_fn in (p, naive):
        noise = PerSampleNoise(range(4))
        with set_checkpoint_early_stop(False):
            out = purify_fn(x, noise)
            after_forward = states(noise)
            out.sum().backward()
        moved.append(not all(torch.equal(a, b)
                             for a, b in zip(states(noise), after_forward, strict=True)))
    assert moved == [False, True]


@pytest.mark.parametrize("name", ONE_STEP_SAMPLERS)
def test_one_step_samplers_run_the_same_over_sub_grids(name, oracle_denoiser, image_mixture):
    den = oracle_denoiser(image_mixture, VP.discrete_linear())
    x = image_mixture.sample(3, torch.Generator().manual_seed(1))
    outs = [purify(den, x, 0.6, sampler=name, steps=4, clip_x0=False, checkpoint=c,
                   noise=PerSampleNoise(range(3))) for c in (False, True)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:dpmpp_2m was given")
def test_multistep_samplers_are_refused_with_checkpointing(oracle_denoiser, image_mixture):
    den = oracle_denoiser(image_mixture, VP.discrete_linear())
    x = image_mixture.sample(3, torch.Generator().manual_seed(1))
    with pytest.raises(DifflabError, match="dpmpp_2m"):
        Purifier(den, 0.6, "dpmpp_2m", 4, checkpoint=True)
    # and rightly: over one-step sub-grids a multistep solver computes something else
    times = Purifier(den, 0.6, "dpmpp_2m", 4).times
    full = sample("dpmpp_2m", den, x, times)
    z = x
    for i in range(4):
        z = sample("dpmpp_2m", den, z, times[i:i + 2])
    assert not torch.allclose(z, full)


# ----- BPDA and EOT ------------------------------------------------------------------------------
def test_bpda_gradient_is_the_classifiers_at_the_purified_point():
    den, _ = tiny_denoiser()
    x, y = data(4)
    classify = tiny_classifier()
    p = Purifier(den, 0.4, steps=4, clip_x0=False, seed=3)
    idx = range(4)
    grad = attacks.eot_gradient(classify, lambda v, d: p.draw(v, d, idx), 1, bpda=True)
    g = grad(x, y, 5)  # step 5 of a 1-sample EOT uses draw 5
    with torch.no_grad():
        purified = p.draw(x, 5, idx)
    torch.testing.assert_close(g, attacks.loss_gradient(classify, purified, y), rtol=0, atol=0)
    full = attacks.eot_gradient(classify, lambda v, d: p.draw(v, d, idx), 1)(x, y, 5)
    assert not torch.allclose(g, full)


def test_eot_averages_k_different_purifications():
    den, _ = tiny_denoiser()
    x, y = data(3)
    classify = tiny_classifier()
    p = Purifier(den, 0.4, steps=4, clip_x0=False)
    idx = range(3)
    seen: list[tuple[int, torch.Tensor]] = []

    def transform(v: torch.Tensor, draw: int) -> torch.Tensor:
        out = p.draw(v, draw, idx)
        seen.append((draw, out.detach()))
        return out

    g = attacks.eot_gradient(classify, transform, samples=3)(x, y, 2)
    assert [d for d, _ in seen] == [6, 7, 8]  # step 2 of a 3-sample EOT: fresh draws
    outs = [o for _, o in seen]
    assert all(not torch.allclose(outs[i], outs[j]) for i in range(3) for j in range(i))
    each = [attacks.loss_gradient(lambda v, d=d: classify(p.draw(v, d, idx)), x, y)
            for d in (6, 7, 8)]
    torch.testing.assert_close(g, sum(each) / 3)
    assert not torch.allclose(g, each[0])


def test_evaluate_does_not_depend_on_the_batch_size():
    den, _ = tiny_denoiser()
    x, y = data(5)
    classify = tiny_classifier()
    p = Purifier(den, 0.3, steps=3, clip_x0=False)
    a = Attack("eot", eps=0.2, steps=2, eot=2)
    r1 = evaluate(classify, x, y, p, a, batch_size=5)
    r2 = evaluate(classify, x, y, p, a, batch_size=2)
    keys = ("clean_accuracy", "robust_accuracy", "undefended_robust_accuracy", "linf", "l2")
    assert {k: r1[k] for k in keys} == pytest.approx({k: r2[k] for k in keys}, abs=1e-12)
    assert r1["eps_model"] == pytest.approx(0.4) and r1["linf"] <= 0.2 + 1e-9


# ----- bad values --------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("eps", -0.1), ("eps", float("nan")), ("steps", 0),
                                         ("eot", 0), ("step_size", -1.0)])
def test_bad_attack_settings_are_named(field, value):
    name = {"steps": "attack_steps"}.get(field, field)
    with pytest.raises(DifflabError, match=name):
        Attack("eot", **{field: value}).resolved()


@pytest.mark.parametrize("t_star", [0, 0.0, 1.5, -0.1, float("nan"), True])
def test_t_star_outside_the_unit_interval_is_refused(t_star):
    with pytest.raises(DifflabError, match="t_star"):
        check_t_star(t_star)
    den, _ = tiny_denoiser()
    with pytest.raises(DifflabError, match="t_star"):
        Purifier(den, t_star)


def test_attack_contradictions_are_refused():
    with pytest.raises(DifflabError, match="eot"):
        Attack("full", eot=3).resolved()
    with pytest.raises(DifflabError, match="norm"):
        Attack("pgd_linf", norm="l2").resolved()
    with pytest.raises(DifflabError, match="attack"):
        Attack("fgsm").resolved()


def cli(argv: list[str]) -> int:
    """``difflab edit diffpure ...`` on a parser of its own, with ``difflab.cli.main``'s
    handling of input errors (a DifflabError: one line on stderr, status 2)."""
    parser = argparse.ArgumentParser(prog="difflab edit")
    register_cli(parser.add_subparsers(dest="recipe", required=True))
    args = parser.parse_args(argv)
    assert args.func is cmd_diffpure
    try:
        return args.func(args)
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2


@pytest.mark.parametrize("flags,named", [
    (["--eps", "-0.1"], "--eps"), (["--t-star", "0"], "--t-star"),
    (["--t-star", "1.5"], "--t-star"), (["--attack-steps", "0"], "--attack-steps"),
    (["--eot", "0"], "--eot"), (["--attack", "fgsm"], "--attack")])
def test_cli_refuses_bad_values_with_status_2(flags, named, capsys, tmp_path):
    argv = ["diffpure", str(tmp_path), "--t-star", "0.1", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        cli(argv + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and flags[1] in err and "Traceback" not in err
    if named == "--t-star":
        assert "(0, 1]" in err
    assert not (tmp_path / "r.json").exists()


def test_cli_scores_a_tiny_run_and_purifies_files(train_tiny_run, tmp_path, monkeypatch,
                                                  capsys):
    from difflab.data import save_image_grid

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    run = train_tiny_run("diffpure")
    out = tmp_path / "report.json"
    base = ["diffpure", str(run), "--t-star", "0.3", "--steps", "2", "--n", "6",
            "--batch-size", "4", "--train-extractor", "--no-progress"]
    assert cli(base + ["--attack", "full", "--eot", "3", "--out", str(out)]) == 2
    assert "eot=3" in capsys.readouterr().err and not out.exists()
    assert cli(base + ["--attack", "eot", "--eot", "2", "--attack-steps", "2",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["attack"] == "eot" and report["eot_samples"] == 2
    assert report["attack_steps"] == 2 and report["n"] == 6
    assert report["eps"] == pytest.approx(0.3) and report["eps_model"] == pytest.approx(0.6)
    assert report["classifier"] == "digits-mlp" and report["purifier"]["checkpoint"] is True
    assert report["purifier"]["steps"] == 2 and "held-out" in report["images"]
    for k in ("clean", "robust", "undefended_clean", "undefended_robust"):
        assert 0 <= report[f"{k}_accuracy"] <= 1
    assert report["linf"] <= 0.3 + 1e-6
    # purify files
    img = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    save_image_grid(img, tmp_path / "a.png", padding=0)
    dest = tmp_path / "purified"
    assert cli(["diffpure", str(run), "--t-star", "0.2", "--steps", "2", "--input",
                str(tmp_path / "a.png"), "--out-dir", str(dest)]) == 0
    assert (dest / "a_purified.png").is_file()
    assert cli(["diffpure", str(run), "--t-star", "0.2", "--out-dir", str(dest)]) == 2
