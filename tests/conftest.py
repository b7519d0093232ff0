"""Shared fixtures: every forward path, small Gaussian-mixture oracles, the oracle as a network.

The core tests (``tests/core``) check the engine against answers known independently of it:
closed forms, quadrature, finite differences, convergence slopes and round trips. The fixtures
here only build inputs; nothing in them computes an expected value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from difflab.denoiser import Denoiser
from difflab.paths import EDM, GVP, VE, VP, GaussianPath, Linear, SubVP
from difflab.prediction import Prediction
from difflab.testing import GaussianMixture

# Every concrete path with its default parameters, by a stable test id.
PATH_FACTORIES: dict[str, Callable[[], GaussianPath]] = {
    "vp_discrete_linear": lambda: VP.discrete_linear(),
    "vp_discrete_cosine": lambda: VP.discrete_cosine(1000),
    "vp_linear": lambda: VP.linear(),
    "vp_cosine": lambda: VP.cosine(),
    "subvp": lambda: SubVP(),
    "ve": lambda: VE(),
    "edm": lambda: EDM(),
    "linear": lambda: Linear(),
    "gvp": lambda: GVP(),
}
PATH_NAMES = list(PATH_FACTORIES)


@pytest.fixture(scope="session", params=PATH_NAMES)
def any_path(request) -> GaussianPath:
    """Each of the nine paths in turn."""
    return PATH_FACTORIES[request.param]()


@pytest.fixture(scope="session")
def make_path() -> Callable[[str], GaussianPath]:
    """Build a path from its test id (for tests parametrized over a subset of paths)."""
    return lambda name: PATH_FACTORIES[name]()


@pytest.fixture
def one_thread():  # kept for tests that ask for it explicitly; the session already runs on one
    """Run a test with one intra-op thread.

    The oracle works on tiny tensors, where intra-op threads only add synchronisation: on two
    shared cores with two pytest-xdist workers, two threads each make an oracle call ~15x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mixture4d() -> GaussianMixture:
    """Three well-separated components in 4-D with unequal weights and per-dimension stds.

    The component means are at least 5.3 apart while no std exceeds 0.5, so assigning a sample
    to its most likely component is almost never wrong, and every coordinate's variance is
    dominated by the spread of the means (a low-noise statistic for the sampler tests).
    """
    means = torch.tensor([[-2.0, -2.0, 1.5, 0.0], [2.0, 0.5, -1.5, 2.0], [0.0, 2.5, 1.5, -2.0]])
    stds = torch.tensor([[0.4, 0.3, 0.5, 0.4], [0.5, 0.4, 0.3, 0.3], [0.3, 0.5, 0.4, 0.5]])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


@pytest.fixture(scope="session")
def mixture1d() -> GaussianMixture:
    """A 1-D mixture for quadrature checks (overlapping components, unequal weights)."""
    return GaussianMixture([[-1.5], [0.5], [2.0]], [[0.4], [0.8], [0.3]], [0.2, 0.5, 0.3])


@pytest.fixture(scope="session")
def image_mixture() -> GaussianMixture:
    """A two-component mixture over ``(2, 4, 4)`` images (the sampler contract's data)."""
    g = torch.Generator().manual_seed(1234)
    means = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.3, 0.6], [0.4, 0.6])


def oracle_network(mixture: GaussianMixture, path: GaussianPath, kind: str,
                   var_frac: float | None = None) -> Callable:
    """``net(x_in, t_in, cond)`` returning the exact posterior in parameterization ``kind``.

    ``t_in`` must be the plain time (``time_input=lambda t: t``). With ``var_frac`` the network
    also returns improved DDPM's raw variance output ``v = 2 f - 1`` as extra channels.
    """

    def net(x_in: torch.Tensor, t_in: torch.Tensor, cond) -> torch.Tensor:
        x0 = mixture.posterior_mean(x_in, t_in, path)
        out = Prediction.from_x0(x0, x_in, t_in, path).as_kind(kind)
        if var_frac is None:
            return out
        raw = torch.full_like(out, 2.0 * var_frac - 1.0)
        return torch.cat([out, raw], dim=1)

    return net


@pytest.fixture(scope="session")
def oracle_denoiser() -> Callable[..., Denoiser]:
    """``make(mixture, path, kind, var_frac=None)``: the exact oracle seen through ``Denoiser``."""

    def make(mixture: GaussianMixture, path: GaussianPath, kind: str = "eps",
             var_frac: float | None = None) -> Denoiser:
        net = oracle_network(mixture, path, kind, var_frac)
        return Denoiser(net, path, prediction=kind, time_input=lambda t: t,
                        learned_variance=var_frac is not None)

    return make


def pytest_configure(config):
    """One intra-op thread for the whole suite.

    `make test` runs two xdist workers on two cores; more threads per worker only oversubscribe
    the cores (the oracle's tiny tensors were ~15x slower with two threads each).
    """
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one intra-op thread and leaves the count as it found it (some
    commands under test set ``--threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny DDPM run on the 8x8 digits, trained through the CLI: the CLI and run-level tests need
# a real run folder and not a good model.
TINY_RUN = ["model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
            "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
            "train.tensorboard=false", "sample.steps=3", "train.steps=2"]


@pytest.fixture(scope="session")
def train_tiny_run(tmp_path_factory) -> Callable[..., Path]:
    """``train_tiny_run(name, *sets)``: train ``configs/ddpm_digits.toml`` two steps with
    ``TINY_RUN`` and the extra ``--set`` items into a fresh folder; returns the run folder."""
    from difflab import cli

    config = Path(__file__).resolve().parents[1] / "configs" / "ddpm_digits.toml"

    def train(name: str, *sets: str) -> Path:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        out = tmp_path_factory.mktemp(name) / "run"
        args = [a for item in (*TINY_RUN, *sets) for a in ("--set", item)]
        try:
            assert cli.main(["train", str(config), "--out", str(out), *args]) == 0
        finally:
            torch.set_num_threads(before)
        return out

    return train
