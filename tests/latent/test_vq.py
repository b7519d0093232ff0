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


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_restart_onto_the_worst_quantised_encoder_outputs(ema):
    vq = VectorQuantizer(4, 2, ema=ema, decay=0.9, restart_threshold=0.25).train()
    with torch.no_grad():  # two codes near the data, two far away (never chosen)
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0],
                                                [-50.0, 60.0]]))
        if ema:
            vq.embed_sum.copy_(vq.embedding.weight)
    pts = torch.tensor([[0.1, 0.0], [0.0, -0.2], [0.9, 0.1], [1.0, 0.3], [0.4, 0.6],
                        [-0.1, 0.1], [1.2, 0.0], [0.0, 0.05]])  # 8 vectors, B = 2, 2x2
    z = pts.reshape(2, 2, 2, 2).permute(0, 3, 1, 2).contiguous()
    before = vq.embedding.weight.detach().clone()
    with torch.enable_grad():
        out = vq(z)
    near = torch.cdist(pts, before).argmin(1)
    assert set(near.tolist()) == {0, 1}
    err = (pts - before[near]).pow(2).sum(1)
    worst = err.argsort(descending=True)[:2]  # (0.4, 0.6) then (1.0, 0.3)
    assert worst.tolist() == [4, 3]
    w = vq.embedding.weight.detach()
    torch.testing.assert_close(w[2:], pts[worst])
    usage = vq.cluster_size if ema else vq.usage
    torch.testing.assert_close(usage[2:], torch.tensor([0.25, 0.25]))
    counts = torch.bincount(near, minlength=4).float()  # 5 and 3 vectors: alive codes
    torch.testing.assert_close(usage[:2], 0.1 * counts[:2])
    if not ema:  # the straight-through codebook keeps its (gradient-trained) alive codes
        torch.testing.assert_close(w[:2], before[:2])
    else:  # the EMA codes are their moving averages; the restarted ones' sums match them
        torch.testing.assert_close(vq.embed_sum[2:], 0.25 * pts[worst])
    # the batch itself was quantised with the codes before the restart
    assert set(out.indices.flatten().tolist()) == {0, 1}


def test_alive_codes_are_left_alone_and_restarts_are_off_by_default():
    vq = VectorQuantizer(3, 2, decay=0.5, restart_threshold=1.0).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [9.0, 9.0]]))
    pts = torch.tensor([[0.0, 0.1], [0.1, 0.0], [1.0, 0.1], [0.9, 0.0]])
    z = pts.reshape(1, 2, 2, 2).permute(0, 3, 1, 2).contiguous()
    with torch.enable_grad():
        vq(z)  # usage 0.5 * 2 = 1.0 for codes 0 and 1: alive; code 2 dead
    w = vq.embedding.weight.detach()
    torch.testing.assert_close(w[:2], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    assert torch.cdist(w[2:], pts).min() == 0  # moved onto a batch vector
    off = VectorQuantizer(3, 2).train()
    assert not hasattr(off, "usage")
    with torch.no_grad():
        off.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [9.0, 9.0]]))
    with torch.enable_grad():
        off(z)
    assert torch.equal(off.embedding.weight[2], torch.tensor([9.0, 9.0]))


@pytest.mark.parametrize("ema", [False, True])
def test_restarts_undo_a_collapsed_codebook_on_separated_clusters(ema):
    # Eight tight clusters far from the initial codes: the code nearest to all of them takes
    # every vector (collapse); restarts move codes onto the clusters until each has its own.
    g = torch.Generator().manual_seed(0)
    centres = 10.0 + 4.0 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                                        torch.sin(torch.arange(8) * math.pi / 4)], 1)

    def used_after(threshold: float) -> tuple[int, float]:
        torch.manual_seed(0)
        vq = VectorQuantizer(8, 2, ema=ema, decay=0.9, restart_threshold=threshold).train()
        opt = torch.optim.SGD(vq.parameters(), lr=0.5) if not ema else None
        for _ in range(60):
            pts = centres[torch.randint(0, 8, (256,), generator=g)]
            pts = pts + 0.1 * torch.randn(pts.shape, generator=g)
            with torch.enable_grad():
                out = vq(pts.reshape(4, 8, 8, 2).permute(0, 3, 1, 2))
            if opt is not None:
                opt.zero_grad()
                out.loss.sum().backward()
                opt.step()
        e = vq.embedding.weight.detach()
        nearest = torch.cdist(centres, e).min(1).values  # each centre's closest code
        return len(set(torch.cdist(centres, e).argmin(1).tolist())), float(nearest.max())

    assert used_after(0.0)[0] <= 2  # collapsed
    used, far = used_after(1.0)
    assert used == 8 and far < 0.5


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
                    ({"beta": -1.0}, "beta"), ({"restart_threshold": -1.0}, "restart_threshold")):
        with pytest.raises(DifflabError, match=msg):
            difflab.build("vq", preset="tiny", **kw)


def vq_config(*more):
    return load_config(None, ["task.kind='autoencoder'", "model.arch='vq'",
                              "model.preset='tiny'", "model.block_channels=[8, 16]",
                              "objective.name='autoencoder'", "train.batch_size=16",
                              "train.tensorboard=false", "train.lr=2e-3", *more])


@pytest.mark.parametrize("ema, restart", [(False, 0.0), (True, 0.0), (False, 2.0)])
def test_a_vq_run_resumes_bit_exactly_and_is_a_latent_codec(tmp_path, ema, restart):
    sets = (f"model.ema={str(ema).lower()}", f"model.restart_threshold={restart}",
            "train.checkpoint_every=2")
    straight = train(vq_config(*sets, "train.steps=4"), tmp_path / "a", progress=False)
    half = tmp_path / "b"
    train(vq_config(*sets, "train.steps=2"), half, progress=False)
    train(vq_config(*sets, "train.steps=4"), half, resume=True, progress=False)
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(straight.checkpoint / f))
        b = load_file(str(half / "checkpoints" / "step_4" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
        assert ("quantize.usage" in a) == (restart > 0 and not ema)  # resumed with the run
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


def _ema_rank(rank: int, world: int, init_file: str, z: torch.Tensor, out: str,
              kw: dict) -> None:
    """One process of a gloo group: quantise its half of the batch with the EMA update."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        q = VectorQuantizer(8, 4, decay=0.9, **kw).train()
        for _ in range(3):
            with torch.enable_grad():
                q(z.chunk(world)[rank])
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kw", [{"ema": True}, {"ema": True, "restart_threshold": 0.3},
                                {"restart_threshold": 0.3}], ids=["ema", "ema-restart",
                                                                  "restart"])
def test_codebook_under_data_parallel_equals_one_process_on_the_global_batch(tmp_path, kw):
    # Two processes each see half of the batch; the EMA statistics and the code usage are
    # summed across them and the restart candidates gathered, so both end with the codebook
    # one process reaches on the whole batch.
    import torch.multiprocessing as mp

    z = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    one = VectorQuantizer(8, 4, decay=0.9, **kw).train()
    for _ in range(3):
        with torch.enable_grad():
            one(z)
    out = str(tmp_path / "state")
    mp.spawn(_ema_rank, args=(2, str(tmp_path / "init"), z, out, kw), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for k, v in one.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6, msg=f"{k} rank {rank}")
    # and the statistics did move (the test can fail): half a batch gives another codebook
    torch.manual_seed(0)
    half = VectorQuantizer(8, 4, decay=0.9, **kw).train()
    for _ in range(3):
        with torch.enable_grad():
            half(z.chunk(2)[0])
    assert not torch.allclose(half.embedding.weight, one.embedding.weight, atol=1e-4)
