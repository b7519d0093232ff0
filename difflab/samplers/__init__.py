"""Samplers: functions over a time grid that own their loop (see ARCHITECTURE.md, "Samplers").

Importing this package registers every sampler; look them up with ``get_sampler(name)`` or run
one with ``sample(name, den, x_init, grid, **options)``.
"""

from difflab.samplers import (
    analytic,
    deis,
    dpm_adaptive,
    dpm_solver,
    edm,
    langevin,
    pndm,
    restart,
    sde,
    sit,
    thresholding,
    timesteps,
    unipc,
)
from difflab.samplers.analytic import AnalyticMoments, estimate_gamma
from difflab.samplers.ancestral import ddim, ddim_invert, ddpm
from difflab.samplers.base import (
    SAMPLERS,
    Hooks,
    SamplerSpec,
    StepInfo,
    check_grid,
    get_sampler,
    register,
    sample,
)
from difflab.samplers.noise import GeneratorNoise, PerSampleNoise, as_noise

__all__ = [
    "AnalyticMoments",
    "analytic",
    "deis",
    "estimate_gamma",
    "langevin",
    "sde",
    "sit",
    "dpm_adaptive",
    "dpm_solver",
    "edm",
    "pndm",
    "restart",
    "thresholding",
    "unipc",
    "SAMPLERS",
    "GeneratorNoise",
    "Hooks",
    "PerSampleNoise",
    "SamplerSpec",
    "StepInfo",
    "as_noise",
    "check_grid",
    "ddim",
    "ddim_invert",
    "ddpm",
    "get_sampler",
    "register",
    "sample",
    "timesteps",
]
