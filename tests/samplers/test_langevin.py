"""NCSN's annealed Langevin dynamics (Song & Ermon 2019, Alg. 1; NCSNv2's final denoising step).

* with the exact mixture score it reproduces the data on a VE and a VP path;
* with the noise switched off, on Gaussian data (where the score is linear), the iterates follow
  the closed-form recursion of Alg. 1 with ``alpha_i = eps sigma_i^2 / sigma_L^2`` and the final
  step is Tweedie's denoiser.
"""

from __future__ import annotations

import pytest
import torch

from difflab.errors import DifflabError
from difflab.paths import VE, VP
from difflab.samplers import GeneratorNoise, Hooks, sample, timesteps
from difflab.samplers import langevin as langevin_mod  # registers annealed_langevin
from difflab.testing import GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3000

@pytest.fixture(scope="module")
def mix4() -> GaussianMixture:
    """Three well-separated components in 4-D (means >= 3.9 apart, stds <= 0.5), weights
    0.5/0.3/0.2: the tolerances below were calibrated on it."""
    means = torch.tensor([[-2.0, -2.0, 1.5, 0.0], [2.0, 0.5, -1.5, 1.0], [0.0, 2.5, 1.5, -1.0]])
    stds = torch.tensor([[0.4, 0.3, 0.5, 0.4], [0.5, 0.4, 0.3, 0.3], [0.3, 0.5, 0.4, 0.5]])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])



def assert_reproduces(mix, x: torch.Tensor, what: str) -> None:
    """Weights within 3 points, means within 8 % of the std, variances within 8 %."""
    w = mix.weights
    mean = w @ mix.means
    total_var = w @ (mix.vars + mix.means**2) - mean**2
    assert bool(torch.isfinite(x).all()), what
    logp = torch.log(w) - 0.5 * (((x[:, None] - mix.means) ** 2 / mix.vars)
                                 + torch.log(mix.vars)).sum(-1)
    freq = torch.bincount(logp.argmax(1), minlength=mix.K).double() / x.shape[0]
    assert float((freq - w).abs().max()) < 0.03, f"{what}: weights {freq.tolist()}"
    assert float(((x.mean(0) - mean).abs() / total_var.sqrt()).max()) < 0.08, f"{what}: means"
    assert float((x.var(0) / total_var - 1).abs().max()) < 0.08, (
        f"{what}: variances {x.var(0).tolist()} vs {total_var.tolist()}")


@pytest.mark.parametrize("path", [VE(0.01, 50.0), VP.linear()], ids=["ve", "vp_linear"])
def test_annealed_langevin_reproduces_the_mixture(mix4, path):
    """40 geometric levels from ``t_max`` down to ``sigma~ = 0.01``, 20 steps each; ``step_lr``
    ``= sigma_L^2`` (each level's step is its own variance times 1: ULA's bias is O(step / var)
    and small once the level's variance exceeds sigma~^2 by the data's), then the denoising step.
    """
    t_end = max(float(path.t_from_sigma_ve(0.01)), path.t_min)
    grid = timesteps.log_snr(path, 40, t_end=t_end)
    noise = GeneratorNoise.seeded(21)
    x = path.prior_sample((N, 4), noise, dtype=torch.float64)
    out = sample("annealed_langevin", mix4.denoiser(path), x, grid, n_steps_each=20,
                 step_lr=0.01**2, noise=noise)
    assert_reproduces(mix4, out, f"annealed Langevin on {path!r}")


class Zeros:
    def randn_like(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("path", [VE(0.05, 20.0), VP.linear()], ids=["ve", "vp_linear"])
def test_iterates_follow_algorithm_one(path):
    """Data ``N(0, s^2)``: the score in ``y = x / alpha`` at level ``sigma~`` is
    ``-y / (s^2 + sigma~^2)``, so without noise each step multiplies ``y`` by
    ``1 - alpha_i / (2 (s^2 + sigma~_i^2))``; the final step multiplies by
    ``s^2 / (s^2 + sigma~_L^2)`` (Tweedie)."""
    s = 0.7
    data = GaussianMixture([[0.0, 0.0]], s)
    grid = torch.tensor([path.t_max, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    x = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    eps, n_each = 3e-4, 7
    out = sample("annealed_langevin", data.denoiser(path), x, grid, n_steps_each=n_each,
                 step_lr=eps, noise=Zeros())
    levels = [float(path.sigma_ve(t)) for t in grid[1:-1]]
    y = x / float(path.alpha(path.t_max))
    for sig in levels:
        alpha_i = eps * sig**2 / levels[-1] ** 2
        y = y * (1 - alpha_i / (2 * (s * s + sig * sig))) ** n_each
    expected = y * s * s / (s * s + levels[-1] ** 2)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_without_final_zero_the_state_is_returned_at_the_last_time():
    path = VP.linear()
    data = GaussianMixture([[0.0]], 0.5)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    grid = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = sample("annealed_langevin", data.denoiser(path), x, grid, n_steps_each=3,
                 step_lr=1e-3, noise=Zeros())
    a0, a1, sig = float(path.alpha(1.0)), float(path.alpha(0.5)), float(path.sigma_ve(0.5))
    y = x / a0 * (1 - 1e-3 / (2 * (0.25 + sig * sig))) ** 3
    torch.testing.assert_close(out, a1 * y)


def test_default_step_is_ncsnv2_ratio_and_callback_sees_every_step():
    path = VE(0.01, 10.0)
    data = GaussianMixture([[0.0]], 0.5)
    grid = timesteps.uniform(path, 4)
    seen = []
    x = torch.ones(1, 1, dtype=torch.float64)
    out = sample("annealed_langevin", data.denoiser(path), x, grid, noise=Zeros(),
                 hooks=Hooks(callback=seen.append))
    assert [s.t for s in seen] == grid[:-1].tolist()
    assert [s.t_next for s in seen] == grid[1:].tolist()
    sig = path.sigma_ve(grid[1:-1]).tolist()
    eps = langevin_mod.DEFAULT_STEP_RATIO * sig[-1] ** 2  # 6.2e-6 at sigma_L = 0.01
    y = 1.0
    for v in sig:
        y *= (1 - eps * v * v / sig[-1] ** 2 / (2 * (0.25 + v * v))) ** 5
    assert abs(float(out) - y * 0.25 / (0.25 + sig[-1] ** 2)) < 1e-12


@pytest.mark.parametrize("options,pattern", [({"n_steps_each": 0}, "n_steps_each"),
                                             ({"step_lr": -1.0}, "step_lr")])
def test_bad_options(options, pattern):
    path = VE()
    data = GaussianMixture([[0.0]], 0.5)
    with pytest.raises(DifflabError, match=pattern):
        sample("annealed_langevin", data.denoiser(path), torch.zeros(2, 1),
               timesteps.uniform(path, 3), **options)
