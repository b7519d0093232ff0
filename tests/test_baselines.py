"""The baselines diffusion is compared with: a Gaussian VAE whose loss is the negative ELBO in
closed form, and a DCGAN whose one-step update gives each player exactly its own gradient;
both train with the Trainer, sample through SampleRequest and the CLI, and refuse what does not
apply to them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import difflab
from difflab.baselines import DCGAN, DCGANConfig, GaussianVAE, VAEConfig
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.runs import load_run
from difflab.sampling import SampleRequest, generate
from difflab.training import train


def test_the_vae_loss_is_the_negative_elbo():
    torch.manual_seed(0)
    vae = GaussianVAE(VAEConfig(image_size=8, in_channels=1, latent_dim=4, width=8))
    with torch.no_grad():
        vae.log_scale.fill_(-1.3)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    got = vae.neg_elbo(x, torch.Generator().manual_seed(5), beta=0.5)
    mu, logvar = vae.encode(x)
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(5))
    z = mu + (0.5 * logvar).exp() * eps
    rec = -Normal(vae.decode(z), math.exp(-1.3)).log_prob(x).flatten(1).sum(1)
    kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(got, rec + 0.5 * kl, rtol=1e-5, atol=1e-4)


def test_one_gan_step_gives_each_player_its_own_gradient():
    torch.manual_seed(0)
    gan = DCGAN(DCGANConfig(image_size=8, in_channels=1, latent_dim=6, width=8))
    ref = copy.deepcopy(gan)
    z, real = torch.randn(5, 6), torch.rand(5, 1, 8, 8) * 2 - 1
    gan(z, real).sum().backward()
    # the generator's reference: -log D(G(z)) with D frozen
    sp = torch.nn.functional.softplus
    ref_g = copy.deepcopy(ref)
    fake = ref_g.generator(z)
    for p in ref_g.discriminator.parameters():
        p.requires_grad_(False)
    sp(-ref_g.discriminator(fake)).sum().backward()
    for (name, p), q in zip(gan.generator.named_parameters(), ref_g.generator.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the discriminator's: -log D(x) - log(1 - D(G(z))) with G(z) a constant
    ref_d = copy.deepcopy(ref)
    with torch.no_grad():
        fake = ref_d.generator(z)
    d = ref_d.discriminator
    (sp(-d(real)) + sp(d(fake))).sum().backward()
    for (name, p), q in zip(gan.discriminator.named_parameters(), d.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    out = {}
    for kind, arch, objective in (("vae", "vae", "elbo"), ("gan", "dcgan", "gan")):
        out[kind] = root / kind
        train(load_config(None, [f"model.arch='{arch}'", f"task.kind='{kind}'",
                                 f"objective.name='{objective}'", "model.width=8",
                                 "train.steps=40", "train.batch_size=32", "train.log_every=10",
                                 "train.tensorboard=false", "train.checkpoint_every=40"]),
              out[kind], progress=False)
    return out


def test_the_vae_learns_and_both_sample_by_seed(runs):
    import json

    rows = [json.loads(line) for line in open(runs["vae"] / "metrics.jsonl") if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for kind in ("vae", "gan"):
        run = load_run(runs[kind])
        a = generate(SampleRequest(run, n=6, seed=3, batch_size=6))
        b = generate(SampleRequest(run, n=6, seed=3, batch_size=4))
        assert a.images.shape == (6, 1, 8, 8) and a.nfe == 1
        # sample i depends on (seed, i) only (up to the convolutions' batch-size rounding)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)
        assert not torch.equal(a.images[0], a.images[1])
        with pytest.raises(DifflabError, match="do not apply"):
            generate(SampleRequest(run, n=2, guidance="cfg:2"))


def test_baselines_from_the_command_line_and_as_components(runs, tmp_path):
    from difflab.cli import main

    for kind in ("vae", "gan"):
        assert main(["sample", str(runs[kind]), "--n", "4", "--out",
                     str(tmp_path / f"{kind}.png")]) == 0
        assert main(["export", str(runs[kind]), str(tmp_path / f"{kind}_exported")]) == 0
        assert (tmp_path / f"{kind}.png").is_file()
        module = difflab.load(tmp_path / f"{kind}_exported")
        assert isinstance(module, GaussianVAE if kind == "vae" else DCGAN)


def test_a_baseline_task_takes_only_its_family():
    with pytest.raises(DifflabError, match="vae"):
        load_config(None, ["task.kind='vae'", "objective.name='elbo'"])  # arch unet
    with pytest.raises(DifflabError, match="gan"):
        load_config(None, ["model.arch='dcgan'", "task.kind='vae'", "objective.name='elbo'"])
    with pytest.raises(DifflabError):
        DCGANConfig(image_size=10)
    from difflab.objectives import build_objective

    with pytest.raises(DifflabError, match="non_saturating"):
        build_objective("gan", loss="wasserstein")
    with pytest.raises(DifflabError, match="beta"):
        build_objective("elbo", beta=0)
