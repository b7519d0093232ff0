"""Per-sample training losses: ``objective(den, x0, cond=None, generator=None) -> (B,)``.

An objective is assembled from a time sampler (:mod:`.time`), a target and a weighting
(:mod:`.weighting`) in :class:`DenoisingLoss`, or is improved DDPM's :class:`HybridLoss` built on
the variational-bound terms of :mod:`.vlb`. :func:`build_objective` makes them by name.
"""

from difflab.objectives.base import Objective, check_x0, draw_noise
from difflab.objectives.classifier import NoisyClassifierLoss
from difflab.objectives.contrastive import ContrastiveLoss
from difflab.objectives.denoising import DenoisingLoss, dsm_loss, edm_loss, flow_matching_loss
from difflab.objectives.registry import OBJECTIVES, build_objective, objective_options
from difflab.objectives.residual import ResidualHead, ResidualLoss
from difflab.objectives.time import (
    TIME_SAMPLERS,
    DiscreteUniformTime,
    LogNormalTime,
    TimeSampler,
    UniformTime,
    build_time_sampler,
    default_time_sampler,
)
from difflab.objectives.vlb import (
    HybridLoss,
    discretized_gaussian_log_likelihood,
    freeze_mean,
    gaussian_kl,
    prior_kl,
    reverse_log_variance,
    vlb_term,
    vlb_terms,
)
from difflab.objectives.weighting import (
    SNR,
    WEIGHTINGS,
    EDMWeighting,
    MinSNR,
    Sigma2,
    Uniform,
    Weighting,
    build_weighting,
)

__all__ = [
    "ContrastiveLoss",
    "NoisyClassifierLoss",
    "ResidualHead",
    "ResidualLoss",
    "OBJECTIVES",
    "SNR",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "DenoisingLoss",
    "DiscreteUniformTime",
    "EDMWeighting",
    "HybridLoss",
    "LogNormalTime",
    "MinSNR",
    "Objective",
    "Sigma2",
    "TimeSampler",
    "Uniform",
    "UniformTime",
    "Weighting",
    "build_objective",
    "build_time_sampler",
    "build_weighting",
    "check_x0",
    "default_time_sampler",
    "discretized_gaussian_log_likelihood",
    "draw_noise",
    "dsm_loss",
    "edm_loss",
    "flow_matching_loss",
    "freeze_mean",
    "gaussian_kl",
    "objective_options",
    "prior_kl",
    "reverse_log_variance",
    "vlb_term",
    "vlb_terms",
]
