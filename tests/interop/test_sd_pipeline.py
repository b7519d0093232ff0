"""A whole Stable Diffusion pipeline folder (tiny, random weights, built locally with diffusers and
transformers) sampled by difflab gives the image diffusers' StableDiffusionPipeline gives with
the same scheduler, seed noise and steps: SD v1 (eps, 1x1-convolution projections) and SD v2
(v-prediction, linear projections), with classifier-free guidance and a negative prompt."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import difflab
from difflab.errors import DifflabError
from difflab.paths import VP
from difflab.samplers import PerSampleNoise, timesteps
from difflab.sampling import SampleRequest, generate, sample_seeds
from difflab.testing.sd import MAX_TOKENS, tiny_pipeline, tiny_vae

PROMPTS = ["red apple", "a cat on a red apple"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "sd1"
    return tiny_pipeline(folder), folder


def _start(run, n: int, seed: int) -> torch.Tensor:
    """The prior draw difflab starts sample i from (its own noise stream per seed)."""
    noise = PerSampleNoise(sample_seeds(seed, n))
    return run.denoiser.path.prior_sample((n, *run.sample_shape), noise=noise)


@pytest.mark.parametrize("v2", [False, True], ids=["sd1_eps", "sd2_v"])
def test_pipeline_folder_samples_the_image_diffusers_samples(tmp_path, v2):
    pipe = tiny_pipeline(tmp_path / "sd", v2=v2)
    run = difflab.load(tmp_path / "sd")
    assert run.config.task.prediction == ("v" if v2 else "eps")
    assert run.codec.factor == 2 and run.image_shape == (3, 32, 32)
    kw = dict(prompts=PROMPTS, steps=6, sampler="ddim", guidance="cfg:4", n=2, seed=3,
              negative_prompt="cat")
    ours = generate(SampleRequest(run, **kw))
    x = _start(run, 2, 3)
    ref_kw = dict(num_inference_steps=6, guidance_scale=4.0, negative_prompt=["cat", "cat"])
    ref = pipe(PROMPTS, latents=x.clone(), output_type="pt", **ref_kw).images
    assert ref.shape == ours.images.shape
    assert float((((ours.images + 1) / 2).clamp(0, 1) - ref).abs().max()) <= 1e-5
    # the latents themselves, before the decoder
    lat = generate(SampleRequest(run, decode=False, **kw)).images
    ref_lat = pipe(PROMPTS, latents=x.clone(), output_type="latent", **ref_kw).images
    assert float((lat - ref_lat).abs().max()) <= 1e-5 * max(1.0, float(ref_lat.abs().max()))
    assert ours.nfe == 6  # both guidance branches in one batched call per step


def test_text_encoder_follows_sds_convention(sd1):
    """77 (here 16) tokens, no padding mask: the context diffusers' encode_prompt gives."""
    pipe, folder = sd1
    run = difflab.load(folder)
    enc = run.conditioner.encoder
    tokens, mask = enc.encode(PROMPTS)
    assert tokens.shape == (2, MAX_TOKENS, 24) and bool(mask.all())
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert float((tokens - ref).abs().max()) <= 1e-5


def test_any_difflab_sampler_runs_on_the_pipeline(sd1):
    _, folder = sd1
    run = difflab.load(folder)
    for sampler in ("dpmpp_2m", "euler", "unipc_bh2", "pndm", "dpmpp_2m_sde"):
        out = generate(SampleRequest(run, prompts=["red apple"], steps=4, sampler=sampler,
                                     grid="log_snr" if sampler == "dpmpp_2m" else None,
                                     guidance="cfg:2", n=1))
        assert out.images.shape == (1, 3, 32, 32) and bool(torch.isfinite(out.images).all())


def test_scheduler_config_maps_onto_the_grid_diffusers_steps(sd1):
    from diffusers import DDIMScheduler

    _, folder = sd1
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    run = difflab.load(folder)
    path = run.denoiser.path
    torch.testing.assert_close(path.alphas_cumprod.double(), sched.alphas_cumprod.double(),
                               rtol=1e-6, atol=0)
    opts = run.config.sample.grid_options
    assert opts == {"spacing": "leading", "steps_offset": 1, "final": "first"}
    for steps in (50, 7, 20):
        sched.set_timesteps(steps)
        g = timesteps.discrete(path, steps, **opts)
        assert [round(float(t) * 1000) - 1 for t in g[:-1]] == sched.timesteps.tolist()
        assert round(float(g[-1]) * 1000) - 1 == 0  # set_alpha_to_one=False: alpha_bar_0
    with pytest.raises(DifflabError, match="steps_offset"):
        timesteps.discrete(VP.discrete_scaled_linear(), 10, "trailing", steps_offset=1)
    with pytest.raises(DifflabError, match="final"):
        timesteps.discrete(VP.discrete_scaled_linear(), 10, final="one")


def test_sample_command_runs_a_pipeline_folder(sd1, tmp_path, capsys):
    from PIL import Image

    from difflab.cli import main

    _, folder = sd1
    out = tmp_path / "apple.png"
    assert main(["sample", str(folder), "--prompt", "red apple", "--steps", "3",
                 "--sampler", "dpmpp_2m", "--guidance", "cfg:5", "--n", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 32
    capsys.readouterr()
    # a single component is not a model to sample: the message says what to give
    assert main(["sample", str(folder / "unet"), "--prompt", "x", "--steps", "2",
                 "--out", str(tmp_path / "u.png")]) == 2
    assert "pipeline folder" in capsys.readouterr().err


def test_broken_pipelines_are_named(sd1, tmp_path):
    _, folder = sd1
    bad = tmp_path / "nov"
    shutil.copytree(folder, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(DifflabError, match="vae/"):
        difflab.load(bad)
    # a VAE with 3 latent channels under a U-Net that samples 4
    wide = tmp_path / "wide"
    shutil.copytree(folder, wide)
    shutil.rmtree(wide / "vae")
    from diffusers import AutoencoderKL

    vae = tiny_vae()
    AutoencoderKL(**{**vae.config, "latent_channels": 3}).save_pretrained(wide / "vae")
    with pytest.raises(DifflabError, match="3 latent channels.*4-channel"):
        difflab.load(wide)
    # scheduler settings difflab cannot follow are named
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    f = odd / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "beta_schedule": "sigmoid"}))
    with pytest.raises(DifflabError, match="beta_schedule='sigmoid'"):
        difflab.load(odd)
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(DifflabError, match="FluxPipeline"):
        difflab.load(odd)
