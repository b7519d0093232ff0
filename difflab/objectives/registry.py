"""Objectives by name, for configs and the CLI: ``build_objective("edm", sigma_data=0.5)``.

Each entry of :data:`OBJECTIVES` is a factory with keyword-only options; unknown names and
unknown options fail with the list of what is accepted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from difflab.errors import DifflabError, bad_value
from difflab.objectives.autoencoder import _autoencoder
from difflab.objectives.base import Objective
from difflab.objectives.baselines import _elbo, _gan
from difflab.objectives.classifier import _classifier
from difflab.objectives.contrastive import _contrastive
from difflab.objectives.denoising import DenoisingLoss, dsm_loss, edm_loss, flow_matching_loss
from difflab.objectives.residual import ResidualLoss
from difflab.objectives.time import optional_time_sampler as _sampler
from difflab.objectives.vlb import HybridLoss


def _denoising(*, target: str = "eps", weighting: str = "uniform",
               time_sampler: str | None = None, t_min: float | None = None,
               t_max: float | None = None, p_mean: float | None = None,
               p_std: float | None = None, gamma: float = 5.0, sigma_data: float = 0.5,
               reduce: str = "mean") -> DenoisingLoss:
    sampler = _sampler(time_sampler, t_min=t_min, t_max=t_max, p_mean=p_mean, p_std=p_std)
    return DenoisingLoss(target=target, weighting=weighting, time_sampler=sampler, gamma=gamma,
                         sigma_data=sigma_data, reduce=reduce)


def _dsm(*, time_sampler: str | None = None, t_min: float | None = None,
         t_max: float | None = None, p_mean: float | None = None, p_std: float | None = None,
         reduce: str = "mean") -> DenoisingLoss:
    sampler = _sampler(time_sampler, t_min=t_min, t_max=t_max, p_mean=p_mean, p_std=p_std)
    return dsm_loss(time_sampler=sampler, reduce=reduce)


def _flow_matching(*, time_sampler: str = "uniform", t_min: float | None = None,
                   t_max: float | None = None, p_mean: float | None = None,
                   p_std: float | None = None, reduce: str = "mean") -> DenoisingLoss:
    sampler = _sampler(time_sampler, t_min=t_min, t_max=t_max, p_mean=p_mean, p_std=p_std)
    return flow_matching_loss(time_sampler=sampler, reduce=reduce)


def _edm(*, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
         reduce: str = "mean") -> DenoisingLoss:
    return edm_loss(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data, reduce=reduce)


def _hybrid(*, lam: float = 0.001) -> HybridLoss:
    return HybridLoss(lam=lam)


def _residual(*, kind: str = "npr", time_sampler: str | None = None,
              t_min: float | None = None, t_max: float | None = None) -> ResidualLoss:
    sampler = _sampler(time_sampler, t_min=t_min, t_max=t_max)
    return ResidualLoss(None, kind=kind, time_sampler=sampler)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "denoising": _denoising,
    "dsm": _dsm,
    "flow_matching": _flow_matching,
    "edm": _edm,
    "hybrid": _hybrid,
    "residual": _residual,
    "classifier": _classifier,
    "contrastive": _contrastive,
    "autoencoder": _autoencoder,
    "elbo": _elbo,
    "gan": _gan,
}


def objective_options(name: str) -> list[str]:
    """The keyword options ``build_objective(name, ...)`` accepts."""
    return list(inspect.signature(_factory(name)).parameters)


def _factory(name: str) -> Callable[..., Objective]:
    if name not in OBJECTIVES:
        raise bad_value("objective", name, "one of " + ", ".join(repr(k) for k in OBJECTIVES))
    return OBJECTIVES[name]


def build_objective(name: str, **kwargs) -> Objective:
    """An objective by name.

    * ``denoising``: target, weighting, time_sampler (``discrete`` | ``uniform`` | ``lognormal``)
      with t_min, t_max (uniform) or p_mean, p_std (lognormal), gamma, sigma_data, reduce;
    * ``dsm``: time_sampler and its options, reduce;
    * ``flow_matching``: time_sampler (default ``uniform``) and its options, reduce;
    * ``edm``: p_mean, p_std, sigma_data, reduce;
    * ``hybrid``: lam;
    * ``residual``: kind (``npr`` | ``sn``, Bao et al. 2022b eq. 9-10), time_sampler and its
      t_min, t_max (the head is bound by the residual task).
    """
    factory = _factory(name)
    accepted = objective_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DifflabError(
            f"objective {name!r} got unknown option(s) {unknown}: accepted are {accepted}"
        )
    return factory(**kwargs)
