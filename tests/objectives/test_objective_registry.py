"""``build_objective``: every name builds the documented objective; bad names/options fail."""

from __future__ import annotations

import pytest
import torch

from difflab import EDM, VP, Denoiser, DifflabError
from difflab.objectives import (
    OBJECTIVES,
    DenoisingLoss,
    DiscreteUniformTime,
    HybridLoss,
    LogNormalTime,
    Objective,
    UniformTime,
    build_objective,
    dsm_loss,
    edm_loss,
    flow_matching_loss,
    objective_options,
)
from difflab.objectives.weighting import EDMWeighting, MinSNR, Sigma2, Uniform


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors run fastest on one thread; OpenMP barriers stall on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(x, t_in, cond):
    return 0.5 * x + 0.1 * t_in[:, None].to(x.dtype)


def test_registry_names():
    assert set(OBJECTIVES) == {"denoising", "dsm", "flow_matching", "edm", "hybrid", "classifier",
                               "contrastive", "autoencoder", "elbo", "gan", "residual"}


def test_denoising_options_reach_the_loss():
    loss = build_objective("denoising", target="v", weighting="min_snr", gamma=3.0,
                           time_sampler="lognormal", p_mean=0.2, p_std=0.7, reduce="sum")
    assert isinstance(loss, DenoisingLoss)
    assert loss.target == "v" and loss.weighting == MinSNR(3.0) and loss.reduce == "sum"
    assert loss.time_sampler == LogNormalTime(0.2, 0.7)
    loss = build_objective("denoising", weighting="edm", sigma_data=1.0, time_sampler="uniform",
                           t_min=0.1, t_max=0.5)
    assert loss.weighting == EDMWeighting(1.0) and loss.time_sampler == UniformTime(0.1, 0.5)
    assert build_objective("denoising").time_sampler is None  # the path's default
    assert build_objective("denoising", time_sampler="discrete").time_sampler == \
        DiscreteUniformTime()


def test_named_objectives_are_the_documented_ones():
    dsm = build_objective("dsm")
    assert dsm.target == "score" and dsm.weighting == Sigma2()
    fm = build_objective("flow_matching", t_min=0.01)
    assert fm.target == "velocity" and fm.weighting == Uniform()
    assert fm.time_sampler == UniformTime(0.01, None)
    edm = build_objective("edm", sigma_data=0.25)
    assert edm.target == "x0" and edm.weighting == EDMWeighting(0.25)
    assert edm.time_sampler == LogNormalTime(-1.2, 1.2)
    hybrid = build_objective("hybrid", lam=0.01)
    assert isinstance(hybrid, HybridLoss) and hybrid.lam == 0.01


@pytest.mark.parametrize("name,direct,path", [
    ("dsm", dsm_loss(), VP.linear()),
    ("flow_matching", flow_matching_loss(), VP.linear()),
    ("edm", edm_loss(), EDM()),
    ("denoising", DenoisingLoss(), VP.discrete_linear(20)),
])
def test_registry_objectives_compute_the_same_losses(name, direct, path):
    den = Denoiser(net, path)
    x0 = torch.randn(8, 3, generator=gen(0))
    built = build_objective(name)
    assert isinstance(built, Objective)
    got = built(den, x0, generator=gen(1))
    assert got.shape == (8,)
    assert torch.equal(got, direct(den, x0, generator=gen(1)))


def test_unknown_names_and_options_list_what_is_accepted():
    with pytest.raises(DifflabError, match="objective='ddpm'.*'denoising', 'dsm'"):
        build_objective("ddpm")
    with pytest.raises(DifflabError, match=r"unknown option\(s\) \['beta'\].*'lam'"):
        build_objective("hybrid", beta=1.0)
    with pytest.raises(DifflabError, match=r"\['target'\].*accepted are"):
        build_objective("edm", target="eps")
    with pytest.raises(DifflabError, match=r"does not take \['p_mean'\]"):
        build_objective("denoising", time_sampler="uniform", p_mean=0.0)
    with pytest.raises(DifflabError, match="without time_sampler"):
        build_objective("dsm", t_min=0.1)
    with pytest.raises(DifflabError, match="weighting='p2'"):
        build_objective("denoising", weighting="p2")
    assert objective_options("hybrid") == ["lam"]
