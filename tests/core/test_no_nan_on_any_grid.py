"""No registered sampler returns NaN or infinity on any grid a user can request: every grid
kind, one to seven steps, ending at exactly 0 or at ``t_min``, on a discrete VP path, the
zero-terminal-SNR one, EDM's and the Linear path. A sampler may refuse a grid with a
``DifflabError``; it may never return a non-finite sample."""

from __future__ import annotations

import warnings

import pytest
import torch

from difflab.errors import DifflabError
from difflab.paths import EDM, VP, Linear
from difflab.samplers import SAMPLERS, sample, timesteps

SPECS = sorted(SAMPLERS.values(), key=lambda s: s.name)
NAMES = [s.name for s in SPECS if not s.needs_learned_variance and not s.needs_extra]
PATHS = {"vp_discrete": lambda: VP.discrete_linear(),
         "vp_zero_snr": lambda: VP.discrete_linear(zero_snr=True),
         "edm": lambda: EDM(), "linear": lambda: Linear()}


def grids(path):
    kinds = ["uniform", "quadratic", "log_snr", "karras"]
    for kind in kinds:
        for steps in (1, 2, 3, 7):
            for to_zero in (True, False):
                yield f"{kind}-{steps}-{'zero' if to_zero else 'tmin'}", timesteps.make_grid(
                    kind, path, steps, to_zero=to_zero)
    if hasattr(path, "N"):
        for spacing in ("leading", "trailing", "linspace"):
            for steps in (1, 2, 7):
                yield f"discrete-{spacing}-{steps}", timesteps.discrete(path, steps, spacing)


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("name", NAMES)
def test_no_sampler_returns_non_finite_samples(name, path_name, image_mixture, oracle_denoiser,
                                               one_thread):
    path = PATHS[path_name]()
    den = oracle_denoiser(image_mixture, path, "v" if path_name == "vp_zero_snr" else "eps")
    torch.manual_seed(0)
    x = path.prior_sample((2, 3, 2, 4, 4)[1:], dtype=torch.float32)
    bad, ran, all_grids = [], 0, list(grids(path))
    for label, grid in all_grids:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                out = sample(name, den, x.clone(), grid)
        except DifflabError:
            continue  # refused with a clear error: allowed
        ran += 1
        if not bool(torch.isfinite(out).all()):
            bad.append(label)
    assert ran >= len(all_grids) // 2, f"{name} refused {len(all_grids) - ran} grids"
    assert not bad, f"{name} on {path_name}: non-finite samples on grids {bad}"
