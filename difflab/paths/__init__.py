"""Forward processes: ``x_t = alpha(t) x0 + sigma(t) eps`` (see ``GaussianPath``)."""

from difflab.paths.base import GaussianPath, as_time, expand_like, same_marginals
from difflab.paths.other import EDM, GVP, VE, Linear
from difflab.paths.vp import VP, CosineVP, DiscreteVP, LinearVP, SubVP

__all__ = [
    "EDM",
    "GVP",
    "VE",
    "VP",
    "CosineVP",
    "DiscreteVP",
    "GaussianPath",
    "Linear",
    "LinearVP",
    "SubVP",
    "as_time",
    "expand_like",
    "same_marginals",
]
