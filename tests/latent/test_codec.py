"""The codec contract: the KL posterior against torch.distributions, the pixel-space codec,
latent scaling (estimate -> unit variance, to_latent / from_latent inverse), and a KL
autoencoder that matches diffusers' AutoencoderKL output for output with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import difflab
from difflab.errors import DifflabError
from difflab.latent import AutoencoderKL, DiagonalGaussian, IdentityCodec, estimate_scale
from difflab.latent.autoencoder import AutoencoderKLConfig
from difflab.latent.loading import load_codec


def test_diagonal_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, 5, generator=g)
    logvar = torch.randn(3, 4, 5, 5, generator=g)
    post = DiagonalGaussian(mean, logvar)
    ref = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)


def test_posterior_samples_have_the_posterior_moments_and_logvar_is_clamped():
    mean = torch.full((20000, 1, 1, 1), 1.5)
    post = DiagonalGaussian(mean, torch.full_like(mean, 2 * torch.tensor(0.3).log().item()))
    z = post.sample(torch.Generator().manual_seed(1))
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.3) < 0.01
    huge = DiagonalGaussian(torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 1e4))
    assert torch.isfinite(huge.kl()).all() and torch.isfinite(huge.sample()).all()
    assert huge.logvar.item() == 20.0
    point = DiagonalGaussian(mean)
    assert torch.equal(point.sample(), mean) and point.kl().abs().max() == 0


def test_identity_codec_is_pixel_space():
    codec = difflab.build("identity", channels=3)
    x = torch.randn(2, 3, 6, 6)
    assert codec.latent_shape((3, 6, 6)) == (3, 6, 6)
    assert torch.equal(codec.from_latent(codec.to_latent(x)), x)


def test_estimated_scale_gives_unit_variance_latents_and_from_latent_inverts_it():
    codec = IdentityCodec()
    x = 3.0 * torch.randn(256, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    scale, shift = estimate_scale(codec, x)
    assert shift == 0.0 and abs(scale - 1 / x.pow(2).mean().sqrt().item()) < 1e-6
    scale, shift = estimate_scale(codec, x, centre=True)
    codec.set_scale(scale, shift)
    z = codec.to_latent(x)
    assert abs(z.mean().item()) < 1e-5 and abs(z.pow(2).mean().item() - 1.0) < 1e-4
    torch.testing.assert_close(codec.from_latent(z), x)
    with pytest.raises(DifflabError, match="finite and positive"):
        codec.set_scale(0.0)
    with pytest.raises(DifflabError, match="standard deviation"):
        estimate_scale(codec, torch.zeros(4, 3, 2, 2))


def tiny_ae(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return difflab.build("autoencoder_kl", preset="tiny", **kw)


def test_autoencoder_shapes_factor_and_bad_inputs():
    ae = tiny_ae()
    assert ae.factor == 4 and ae.latent_shape((3, 16, 16)) == (4, 4, 4)
    x = torch.randn(2, 3, 16, 16)
    post = ae.encode(x)
    assert post.mean.shape == (2, 4, 4, 4) and ae.decode(post.mode()).shape == x.shape
    f8 = difflab.build("autoencoder_kl", block_channels=[8, 8, 8, 8], groups=4, image_size=32)
    assert f8.factor == 8 and f8.latent_shape((3, 32, 32)) == (4, 4, 4)
    with pytest.raises(ValueError, match="expected \\(B, 3, H, W\\)"):
        ae.encode(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of the factor 4"):
        ae.encode(torch.randn(2, 3, 18, 18))
    with pytest.raises(DifflabError, match="multiples of the codec's downsampling factor 4"):
        ae.latent_shape((3, 18, 18))
    with pytest.raises(DifflabError, match="groups"):
        difflab.build("autoencoder_kl", block_channels=[8, 12], groups=8)
    with pytest.raises(DifflabError, match="kl_weigth"):
        difflab.build("autoencoder_kl", kl_weigth=1.0)


def test_autoencoder_saves_and_loads_with_its_scale(tmp_path):
    ae = tiny_ae()
    ae.set_scale(0.25, 0.1)
    folder = difflab.save(ae, tmp_path / "codec")
    back = load_codec(folder)
    assert back.scale_factor.item() == 0.25 and abs(back.shift.item() - 0.1) < 1e-7
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(back.to_latent(x, sample=False), ae.eval().to_latent(x, sample=False))
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(DifflabError, match="does not exist"):
        load_codec(tmp_path / "nowhere")
    unet = difflab.save(difflab.build("unet", preset="tiny", model_channels=4, num_heads=1,
                                      image_size=8, in_channels=1, out_channels=1),
                        tmp_path / "unet")
    with pytest.raises(DifflabError, match="not a codec"):
        load_codec(unet)


def test_autoencoder_matches_diffusers_with_the_same_weights():
    from diffusers import AutoencoderKL as Peer

    torch.manual_seed(0)
    peer = Peer(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                block_out_channels=(8, 16, 16), layers_per_block=1, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3).eval()
    # random (non-default) norms and biases, so every parameter matters
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = AutoencoderKL(AutoencoderKLConfig(block_channels=(8, 16, 16), groups=4,
                                             image_size=16)).eval()
    state = dict(peer.state_dict())
    missing = set(ours.state_dict()) - set(state)
    assert missing == {"scale_factor", "shift"}
    state.update(scale_factor=ours.scale_factor, shift=ours.shift)
    ours.load_state_dict(state, strict=True)

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = peer.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, ref.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(post.logvar, ref.logvar, rtol=0, atol=1e-5)
        z = ref.mean
        torch.testing.assert_close(ours.decode(z), peer.decode(z).sample, rtol=0, atol=1e-5)


def test_stable_diffusions_scaled_linear_betas_match_diffusers():
    from diffusers import DDPMScheduler

    from difflab.paths import VP

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        num_train_timesteps=1000).alphas_cumprod.double()
    path = VP.discrete_scaled_linear()
    torch.testing.assert_close(path.alphas_cumprod.double(), ref, rtol=1e-6, atol=0)
