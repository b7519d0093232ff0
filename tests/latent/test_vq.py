"""VQGAN's vector-quantised first stage: nearest-code quantisation against brute force, the
straight-through gradient, the VQ loss and the EMA codebook update against their formulas,
codebook usage, output equality with diffusers' VQModel, and a VQ run that trains, resumes
bit-exactly and serves as a latent-diffusion codec."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.latent.vq import VectorQuantizer, VQModel, VQModelConfig
from difflab.sampling import SampleRequest, generate
from difflab.training import train


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.embedding.weight.detach()).argmin(1).reshape(2, 4, 4)
    assert torch.equal(out.indices, brute)
    q = vq.embedding.weight.detach()[brute].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q, q)
    # VQ-VAE eq. 3: ||sg[z] - e||^2 + beta ||z - sg[e]||^2, per example (latent means)
    d = (z.detach() - q).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out.loss, 1.25 * d)
    # the straight-through estimator: d z_q / d z is the identity
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad((out.z_q * g).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad, g)
    # the codebook term moves the codes towards the encodings, the commitment term the encoder
    (ge,) = torch.autograd.grad(out.loss.sum(), vq.embedding.weight)
    assert ge.abs().sum() > 0


def test_ema_codebook_update_follows_the_moving_averages():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, beta=0.25, ema=True, decay=0.9, eps=1e-5).train()
    e0 = vq.embedding.weight.detach().clone()
    z = torch.randn(3, 2, 2, 2)
    with torch.enable_grad():
        out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    idx = torch.cdist(flat, e0).argmin(1)
    onehot = torch.nn.functional.one_hot(idx, 4).float()
    n_k = 0.1 * onehot.sum(0)
    m_k = 0.9 * e0 + 0.1 * onehot.t() @ flat
    n = n_k.sum()
    smoothed = (n_k + 1e-5) / (n + 4e-5) * n
    torch.testing.assert_close(vq.cluster_size, n_k)
    torch.testing.assert_close(vq.embedding.weight, m_k / smoothed[:, None])
    assert not vq.embedding.weight.requires_grad
    # only the commitment term remains in the loss; this batch is quantised with the codes
    # before the update (as Sonnet's VectorQuantizerEMA)
    q = e0[idx.reshape(3, 2, 2)].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.loss, 0.25 * (z - q).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(out.z_q, q)
    # no update outside training
    before = vq.embedding.weight.clone()
    vq.eval()(z)
    assert torch.equal(before, vq.embedding.weight)


def test_codebook_usage_counts_the_codes():
    torch.manual_seed(0)
    m = difflab.build("vq", preset="tiny").eval()
    u = m.codebook_usage(torch.rand(8, 3, 16, 16) * 2 - 1)
    assert 1 <= u["used"] <= 16 and u["used_fraction"] == u["used"] / 16
    assert 1.0 <= u["perplexity"] <= u["used"] + 1e-9
    # one code everywhere: perplexity 1
    with torch.no_grad():
        m.quantize.embedding.weight.copy_(torch.arange(16.0)[:, None].expand(16, 3) * 100)
    assert m.codebook_usage(torch.rand(4, 3, 16, 16))["perplexity"] == pytest.approx(1.0)


def test_vq_model_matches_diffusers_with_the_same_weights():
    from diffusers import VQModel as Peer

    torch.manual_seed(0)
    peer = Peer(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=16,
                vq_embed_dim=5, norm_num_groups=4, block_out_channels=(8, 16, 16),
                layers_per_block=1, sample_size=16,
                down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = VQModel(VQModelConfig(block_channels=(8, 16, 16), groups=4, image_size=16,
                                 num_embeddings=16, embed_dim=5)).eval()
    state = dict(peer.state_dict())
    state.update(scale_factor=ours.scale_factor, shift=ours.shift)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = peer.encode(x).latents
        torch.testing.assert_close(ours.encode(x).mean, h, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(h), peer.decode(h).sample, rtol=0, atol=1e-5)
        assert ours.latent_shape((3, 16, 16)) == (5, 4, 4)


def test_bad_vq_settings_are_named():
    for kw, msg in (({"num_embeddings": 1}, "at least 2 codes"), ({"ema_decay": 1.0}, "decay"),
                    ({"beta": -1.0}, "beta")):
        with pytest.raises(DifflabError, match=msg):
            difflab.build("vq", preset="tiny", **kw)


def vq_config(*more):
    return load_config(None, ["task.kind='autoencoder'", "model.arch='vq'",
                              "model.preset='tiny'", "model.block_channels=[8, 16]",
                              "objective.name='autoencoder'", "train.batch_size=16",
                              "train.tensorboard=false", "train.lr=2e-3", *more])


@pytest.mark.parametrize("ema", [False, True])
def test_a_vq_run_resumes_bit_exactly_and_is_a_latent_codec(tmp_path, ema):
    sets = (f"model.ema={str(ema).lower()}", "train.checkpoint_every=2")
    straight = train(vq_config(*sets, "train.steps=4"), tmp_path / "a", progress=False)
    half = tmp_path / "b"
    train(vq_config(*sets, "train.steps=2"), half, progress=False)
    train(vq_config(*sets, "train.steps=4"), half, resume=True, progress=False)
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight.checkpoint / f))
        b = load_file(str(half / "checkpoints" / "step_4" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # latent diffusion on its pre-quantisation latents; decoding quantises
    ldm = tmp_path / "ldm"
    train(load_config(None, ["model.preset='tiny'", "model.model_channels=8",
                             "model.num_heads=1", f"codec.run={str(tmp_path / 'a')!r}",
                             "train.steps=2", "train.batch_size=8", "train.tensorboard=false",
                             "train.checkpoint_every=2"]), ldm, progress=False)
    out = generate(SampleRequest(ldm, steps=3, n=2))
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()
    assert math.isfinite(load_file(str(straight.checkpoint / "ema.safetensors"))[
        "scale_factor"].item())


def _ema_rank(rank: int, world: int, init_file: str, z: torch.Tensor, out: str) -> None:
    """One process of a gloo group: quantise its half of the batch with the EMA update."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        q = VectorQuantizer(8, 4, ema=True, decay=0.9).train()
        for _ in range(3):
            q(z.chunk(world)[rank])
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ema_codebook_under_data_parallel_equals_one_process_on_the_global_batch(tmp_path):
    # Two processes each see half of the batch; the EMA statistics are summed across them,
    # so both end with the codebook one process reaches on the whole batch.
    import torch.multiprocessing as mp

    z = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    one = VectorQuantizer(8, 4, ema=True, decay=0.9).train()
    for _ in range(3):
        one(z)
    out = str(tmp_path / "state")
    mp.spawn(_ema_rank, args=(2, str(tmp_path / "init"), z, out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k, v in one.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=f"{k} rank {rank}")
    # and the statistics did move (the test can fail): half a batch gives another codebook
    torch.manual_seed(0)
    half = VectorQuantizer(8, 4, ema=True, decay=0.9).train()
    for _ in range(3):
        half(z.chunk(2)[0])
    assert not torch.allclose(half.embedding.weight, one.embedding.weight, atol=1e-4)
