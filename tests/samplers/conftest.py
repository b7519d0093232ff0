"""Fixtures shared by the sampler tests; they only build inputs and references."""

from __future__ import annotations

import pytest
import torch

from difflab.paths import VP
from difflab.testing import GaussianMixture, probability_flow_reference


@pytest.fixture(scope="module")
def adaptive_problem():
    """The adaptive solvers' problem: three overlapping 3-D components on DDPM's path, 16
    starting points at ``t = 1`` and the exact probability-flow solution at ``t = 0.1``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(torch.randn(3, 3, generator=g, dtype=torch.float64),
                              [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])
    den = mixture.denoiser(VP.discrete_linear())
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = probability_flow_reference(den, x, 1.0, 0.1)
    torch.set_num_threads(before)
    return den, x, ref
