"""Static and dynamic thresholding against direct numpy computations, and as ``correct_x0`` hooks
composed with every sampler of the family."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import difflab.samplers.dpm_solver  # noqa: F401  (registers the solvers)
import difflab.samplers.edm  # noqa: F401
import difflab.samplers.pndm  # noqa: F401
import difflab.samplers.unipc  # noqa: F401
from difflab.errors import DifflabError
from difflab.paths import EDM, VP
from difflab.samplers import Hooks, sample, timesteps
from difflab.samplers.thresholding import (
    DynamicThreshold,
    StaticThreshold,
    dynamic_threshold,
    static_threshold,
)
from difflab.testing import CountingDenoiser, GaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_static_threshold_clips():
    x = torch.tensor([[-3.0, -1.0, 0.2, 1.0, 2.5]])
    expected = torch.tensor([[-1.0, -1.0, 0.2, 1.0, 1.0]])
    torch.testing.assert_close(StaticThreshold()(x, None), expected)
    torch.testing.assert_close(static_threshold(x), expected)
    torch.testing.assert_close(StaticThreshold(0.0, 2.0)(x), x.clamp(0.0, 2.0))
    with pytest.raises(DifflabError, match="lo"):
        StaticThreshold(1.0, -1.0)


@pytest.mark.parametrize("p", [0.9, 0.995, 1.0])
def test_dynamic_threshold_matches_numpy(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) * torch.tensor(
        [0.3, 0.8, 1.5, 2.0, 3.0, 0.1], dtype=torch.float64).reshape(-1, 1, 1, 1)
    a = x.numpy().reshape(6, -1)
    s = np.maximum(1.0, np.percentile(np.abs(a), 100 * p, axis=1))[:, None]  # Imagen Sec. 2.3
    expected = (np.clip(a, -s, s) / s).reshape(x.shape)
    np.testing.assert_allclose(DynamicThreshold(p)(x, None).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(dynamic_threshold(p)(x).numpy(), expected, rtol=1e-12)
    small = x[:1]  # every |x| < 1: s = 1, nothing changes
    torch.testing.assert_close(DynamicThreshold(p)(small), small)
    assert DynamicThreshold(p)(x.float()).dtype == torch.float32


def test_dynamic_threshold_rejects_bad_percentiles():
    for p in (0.0, 1.5, 99.5):
        with pytest.raises(DifflabError, match="p="):
            DynamicThreshold(p)



SAMPLERS = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m",
            "dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m_sde", "dpm_adaptive", "unipc_bh1",
            "unipc_bh2", "plms", "pndm", "euler", "heun", "euler_ancestral"]


@pytest.mark.parametrize("path", [VP.discrete_linear(), EDM()], ids=["vp", "edm"])
@pytest.mark.parametrize("hook", [StaticThreshold(), DynamicThreshold(0.9)],
                         ids=["static", "dynamic"])
def test_thresholds_compose_with_every_sampler(path, hook):
    """Data outside [-1, 1]: the hook sees every clean-data estimate (one call per evaluation)
    and the sample, the clean-data estimate at the last step, lies in [-1, 1]."""
    mixture = GaussianMixture(torch.tensor([[-1.5, 1.5], [1.5, -1.5]]), 0.3)
    x = torch.randn(8, 2, dtype=torch.float64) * path.prior_std
    grid = timesteps.log_snr(path, 8)
    for name in SAMPLERS:
        seen = []

        def counting_hook(x0, t, seen=seen):
            seen.append(float(t[0]))
            return hook(x0, t)

        den = CountingDenoiser(mixture.denoiser(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = sample(name, den, x, grid, hooks=Hooks(correct_x0=counting_hook), noise=0)
        assert len(seen) == den.calls > 0, name
        assert float(out.abs().max()) <= 1.0 + 1e-12, name
