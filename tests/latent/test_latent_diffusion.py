"""Latent diffusion (LDM, Rombach et al. 2022): a diffusion run with a [codec] section trains on
the frozen codec's scaled latents and samples images through its decoder, with any sampler and
classifier-free guidance. Cached latents (posterior moments encoded once) train exactly the
weights that encoding every batch does; the codec is a frozen part of every checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.latent import load_codec
from difflab.sampling import SampleRequest, generate, load_run
from difflab.training import Trainer, train


def ae_config(steps: int = 20):
    """A two-stage KL autoencoder (f = 2) on the 8x8 digits: 4x4x4 latents."""
    return load_config(None, ["task.kind='autoencoder'", "model.arch='autoencoder_kl'",
                              "model.preset='tiny'", "model.block_channels=[8, 16]",
                              "objective.name='autoencoder'", f"train.steps={steps}",
                              "train.batch_size=16", "train.tensorboard=false",
                              f"train.checkpoint_every={steps}", "train.lr=2e-3"])


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("codec") / "ae"
    train(ae_config(), run, progress=False)
    return run


def ldm_config(codec, *more):
    return load_config(None, ["model.preset='tiny'", "model.model_channels=8",
                              "model.num_heads=1", f"codec.run={str(codec)!r}",
                              "train.steps=4", "train.batch_size=8", "train.tensorboard=false",
                              "train.checkpoint_every=4", *more])


def test_a_latent_run_trains_on_latents_and_samples_decoded_images(codec_run, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    plain = train(ldm_config(codec_run), tmp_path / "plain", progress=False)
    cached = train(ldm_config(codec_run, "codec.cache=true"), tmp_path / "cached",
                   progress=False)
    # the network is sized for the latents: 4 channels of 4x4
    cfg = load_run(tmp_path / "plain").config
    assert cfg.model.values()["in_channels"] == 4 and cfg.model.values()["image_size"] == 4
    # the codec is a frozen part named by its checkpoint folder and hash, never copied
    ckpt = codec_run / "checkpoints" / "step_20"
    frozen = json.loads((plain.checkpoint / "manifest.json").read_text())["frozen"]
    assert frozen["codec"]["source"] == str(ckpt.resolve())
    assert not any("codec" in p.name for p in plain.checkpoint.iterdir())
    # posterior moments encoded once give the same draws as encoding every batch: the weights
    # after 4 Adam steps agree to float rounding (one Adam step moves a weight by ~lr = 2e-4;
    # the encoder's batch-size-dependent rounding reaches 1e-6)
    (cache_file,) = (tmp_path / "cache" / "latents").iterdir()
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(plain.checkpoint / f)), load_file(str(cached.checkpoint / f))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # a second run reads the cache instead of encoding again
    import difflab.latent.data as ld

    monkeypatch.setattr(ld, "encode_moments", lambda *a, **k: pytest.fail("encoded again"))
    train(ldm_config(codec_run, "codec.cache=true", "train.steps=1"), tmp_path / "again",
          progress=False)

    # sampling decodes: pixel-space images, equal to decoding the latents by hand
    codec = load_codec(ckpt)
    out = generate(SampleRequest(tmp_path / "plain", sampler="ddim", steps=4, n=3, seed=1))
    assert out.images.shape == (3, 1, 8, 8)
    z = generate(SampleRequest(tmp_path / "plain", sampler="ddim", steps=4, n=3, seed=1,
                               decode=False)).images
    assert z.shape == (3, 4, 4, 4)
    torch.testing.assert_close(out.images, codec.from_latent(z), rtol=0, atol=1e-6)
    assert load_run(tmp_path / "plain").image_shape == (1, 8, 8)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "heun", "analytic_ddim"])
def test_every_kind_of_sampler_runs_on_latents(codec_run, tmp_path, sampler):
    run = tmp_path / "run"
    train(ldm_config(codec_run, "train.steps=2", "train.checkpoint_every=2"), run,
          progress=False)
    out = generate(SampleRequest(run, sampler=sampler, steps=3, n=2))
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()


@pytest.fixture(scope="module")
def v_zero_snr_run(codec_run, tmp_path_factory):
    """ldm_v_emoji.toml's recipe at test size: v-prediction on a zero-terminal-SNR path."""
    run = tmp_path_factory.mktemp("vzsnr") / "run"
    train(ldm_config(codec_run, "path.kind='discrete_scaled_linear'", "path.zero_snr=true",
                     "task.prediction='v'", "objective.target='v'", "task.cond='class'",
                     "task.p_uncond=0.2", "sample.grid='discrete'",
                     "sample.grid_options={spacing='trailing'}", "train.steps=2",
                     "train.checkpoint_every=2"), run, progress=False)
    return run


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler", "unipc_bh2",
                                     "analytic_ddim"])
def test_a_v_prediction_zero_snr_run_samples_from_t_T_without_nan(v_zero_snr_run, sampler):
    run = load_run(v_zero_snr_run)
    assert run.path.zero_terminal_snr and float(run.path.alpha(1.0)) == 0.0
    from difflab.samplers import Hooks

    for grid, options in (("discrete", {"spacing": "trailing"}), ("karras", {})):
        times = []
        out = generate(SampleRequest(run, sampler=sampler, steps=4, n=2, grid=grid,
                                     grid_options=options, labels=[1], guidance="cfg:2",
                                     hooks=Hooks(callback=lambda info, seen=times:
                                                 seen.append(info.t))))
        assert times[0] == 1.0, (grid, times)  # the first step is taken at alpha = 0
        assert out.images.shape == (2, 1, 8, 8) and bool(torch.isfinite(out.images).all())


def test_classifier_free_guidance_on_latents(codec_run, tmp_path):
    run = tmp_path / "cfg"
    train(ldm_config(codec_run, "task.cond='class'", "task.p_uncond=0.2", "train.steps=2",
                     "train.checkpoint_every=2"), run, progress=False)
    a = generate(SampleRequest(run, steps=3, n=2, labels=[3], guidance="cfg:3")).images
    b = generate(SampleRequest(run, steps=3, n=2, labels=[3], guidance="none")).images
    assert a.shape == b.shape == (2, 1, 8, 8) and not torch.equal(a, b)


def test_the_cli_samples_a_latent_run(codec_run, tmp_path):
    from difflab.cli import main

    run = tmp_path / "run"
    train(ldm_config(codec_run, "train.steps=2", "train.checkpoint_every=2"), run,
          progress=False)
    out = tmp_path / "png"
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--out-dir", str(out)]) == 0
    from PIL import Image

    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (8, 8)


def test_resuming_after_the_codec_run_trained_on_is_refused(tmp_path):
    ae = tmp_path / "ae"
    train(ae_config(4), ae, progress=False)
    run = tmp_path / "ldm"
    train(ldm_config(ae, "train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    train(ae_config(8), ae, resume=True, progress=False)  # the codec trains on
    with pytest.raises(DifflabError, match="frozen part 'codec' has changed"):
        Trainer(ldm_config(ae, "train.steps=4"), run, resume=True)


def test_bad_codec_settings_are_named(codec_run, tmp_path):
    with pytest.raises(DifflabError, match="does not exist"):
        Trainer(ldm_config(tmp_path / "nowhere"), tmp_path / "a")
    with pytest.raises(DifflabError, match="clip_x0"):
        ldm_config(codec_run, "sample.clip_x0=true")
    with pytest.raises(DifflabError, match="does not train on latents"):
        load_config(None, ["task.kind='classifier'", "model.arch='classifier'",
                           f"codec.run={str(codec_run)!r}"])
    with pytest.raises(DifflabError, match="codec.rnu"):
        load_config(None, [f"codec.rnu={str(codec_run)!r}"])
    with pytest.raises(DifflabError, match="codec.scale"):
        ldm_config(codec_run, "codec.scale=0")
    # a codec for 3-channel images on 1-channel digits
    rgb = difflab.save(difflab.build("autoencoder_kl", preset="tiny", image_size=8),
                       tmp_path / "rgb")
    with pytest.raises(DifflabError, match="encodes 3-channel images"):
        Trainer(ldm_config(rgb), tmp_path / "b")
    # 8x8 images do not divide by a factor-16 codec
    f16 = difflab.save(difflab.build("autoencoder_kl", in_channels=1, groups=4, image_size=16,
                                     block_channels=[4, 4, 4, 4, 4]), tmp_path / "f16")
    with pytest.raises(DifflabError, match="multiples of the codec's downsampling factor 16"):
        Trainer(ldm_config(f16), tmp_path / "c")
    # a diffusion run is no codec
    with pytest.raises(DifflabError, match="not a codec"):
        run = tmp_path / "px"
        train(load_config(None, ["model.preset='tiny'", "model.model_channels=8",
                                 "model.num_heads=1", "train.steps=1", "train.tensorboard=false"]),
              run, progress=False)
        Trainer(ldm_config(run), tmp_path / "d")
    # a codec scale override is used
    t = Trainer(ldm_config(codec_run, "codec.scale=0.5"), tmp_path / "e")
    assert t.task.codec.scale_factor.item() == 0.5
    shutil.rmtree(tmp_path / "e", ignore_errors=True)


# ----- image-to-image (SDEdit, Meng et al. 2022) through the request ----------------------------
def test_strength_keeps_the_last_steps_as_diffusers_img2img_does():
    from diffusers import DDIMScheduler

    from difflab.paths import VP
    from difflab.samplers import timesteps
    from difflab.sampling import strength_grid

    path = VP.discrete_scaled_linear()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          timestep_spacing="leading", steps_offset=0)
    for steps, strength in ((10, 0.5), (20, 0.75), (7, 0.3), (50, 1.0)):
        sched.set_timesteps(steps)
        keep = min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
        ref = sched.timesteps[steps - keep:].tolist()
        g = strength_grid(timesteps.discrete(path, steps, "leading"), strength)
        assert [round(float(t) * 1000) - 1 for t in g[:-1]] == ref and float(g[-1]) == 0.0
    with pytest.raises(DifflabError, match="runs no step"):
        strength_grid(timesteps.discrete(path, 4), 0.2)


def test_img2img_at_full_strength_on_zero_snr_is_plain_sampling(v_zero_snr_run):
    """At alpha_T = 0, x_T = alpha_T x0 + sigma_T eps is the prior draw itself: strength 1 from
    any image gives exactly the images sampled from noise with the same seeds."""
    init = torch.rand(1, 1, 8, 8) * 2 - 1
    kw = dict(sampler="ddim", steps=4, n=3, labels=[2], seed=5)
    plain = generate(SampleRequest(v_zero_snr_run, **kw)).images
    edit = generate(SampleRequest(v_zero_snr_run, init=init, strength=1.0, **kw))
    assert torch.equal(plain, edit.images) and edit.metadata["strength"] == 1.0


def test_img2img_at_low_strength_stays_near_its_image(tmp_path):
    """One step from the smallest noise level returns x0_hat(alpha x0 + sigma eps): within a
    few sigma of the init image, even for an untrained network (pixel space, DDIM, leading)."""
    run = tmp_path / "pix"
    train(load_config(None, ["model.preset='tiny'", "model.model_channels=8", "train.steps=2",
                             "train.batch_size=8", "train.tensorboard=false",
                             "train.checkpoint_every=2"]), run, progress=False)
    init = torch.rand(4, 1, 8, 8) * 2 - 1
    out = generate(SampleRequest(run, init=init, strength=0.02, steps=50, sampler="ddim"))
    assert out.images.shape == (4, 1, 8, 8) and out.nfe == 1
    assert float((out.images - init).abs().max()) < 0.1
    far = generate(SampleRequest(run, init=init, strength=1.0, steps=50, sampler="ddim")).images
    assert float((far - init).abs().mean()) > 5 * float((out.images - init).abs().mean())


def test_img2img_on_latents_from_files_and_the_cli(v_zero_snr_run, tmp_path):
    from PIL import Image

    from difflab.cli import main

    files = []
    for i in range(2):
        f = tmp_path / f"in{i}.png"
        Image.fromarray((torch.rand(20, 20) * 255).byte().numpy()).save(f)  # resized to 8x8
        files.append(str(f))
    out = generate(SampleRequest(v_zero_snr_run, init=files, strength=0.5, steps=6,
                                 labels=[1]))
    assert out.images.shape == (2, 1, 8, 8) and bool(torch.isfinite(out.images).all())
    assert out.nfe == 3
    dest = tmp_path / "png"
    assert main(["sample", str(v_zero_snr_run), "--init", files[0], "--strength", "0.5",
                 "--n", "2", "--steps", "4", "--class", "1", "--out-dir", str(dest)]) == 0
    assert len(list(dest.glob("*.png"))) == 2


@pytest.mark.parametrize("kw, pattern", [
    (dict(init=torch.zeros(1, 3, 8, 8)), "shape"),
    (dict(init=torch.zeros(3, 1, 8, 8), n=2), "3 init images for n=2"),
    (dict(init=torch.full((1, 1, 8, 8), float("nan"))), "NaN"),
    (dict(init=torch.zeros(1, 1, 8, 8), strength=0.0), "strength=0.0"),
    (dict(init=torch.zeros(1, 1, 8, 8), strength=1.5), "strength=1.5"),
    (dict(init="no/such.png"), "does not exist"),
    (dict(strength=0.5), "give init images"),
])
def test_bad_img2img_inputs_are_named(v_zero_snr_run, kw, pattern):
    with pytest.raises(DifflabError, match=pattern):
        generate(SampleRequest(v_zero_snr_run, steps=4, labels=[1], **kw))
