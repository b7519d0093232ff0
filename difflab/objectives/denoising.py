"""Denoising losses: one class for DDPM's ``L_simple``, x0 / v / score / velocity regression,
denoising score matching, flow matching and EDM's loss.

For data ``x0``, a time ``t`` and noise ``eps``, ``x_t = alpha x0 + sigma eps`` and

    L(t) = w_k(t) * mean_dims | pred.as_kind(k) - true.as_kind(k) |^2

where ``true = Prediction(x_t, t, x0, eps)`` holds the true clean data and noise, ``pred`` is the
denoiser's answer and ``k`` is the target. Every conversion goes through :class:`Prediction`, so
the network's own parameterization (``den.prediction``) and the loss target are independent: an
eps-network can be trained on an x0 target and the loss is the same function of ``x0_hat``.
"""

from __future__ import annotations

import torch

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.objectives.base import (
    check_reduce,
    check_x0,
    draw_noise,
    per_sample,
    prepare,
)
from difflab.objectives.time import (
    LogNormalTime,
    TimeSampler,
    UniformTime,
    as_time_sampler,
    build_time_sampler,
)
from difflab.objectives.weighting import Weighting, build_weighting
from difflab.paths.base import as_time
from difflab.prediction import Prediction, check_kind


class DenoisingLoss:
    """Weighted regression of a denoiser onto the true ``x0`` / ``eps`` / ``v`` / score / velocity.

    Args:
        target: the regression target ``k``: ``eps``, ``x0``, ``v``, ``score`` or ``velocity``.
        weighting: ``uniform``, ``snr``, ``min_snr``, ``edm``, ``sigma2`` or a
            :class:`~difflab.objectives.weighting.Weighting` (see that module for the math).
        time_sampler: a :class:`TimeSampler`, a name (``discrete``, ``uniform``, ``lognormal``),
            or None for the path's default (discrete paths: DDPM's uniform steps; otherwise
            uniform in ``[t_min, t_max]``).
        gamma: min-SNR's clamp (Hang et al. 2023 use 5).
        sigma_data: EDM's data standard deviation (Karras et al. 2022 use 0.5).
        reduce: ``mean`` (default) or ``sum`` over the data dimensions.
    """

    def __init__(
        self,
        target: str = "eps",
        weighting: str | Weighting = "uniform",
        time_sampler: TimeSampler | str | None = None,
        gamma: float = 5.0,
        sigma_data: float = 0.5,
        reduce: str = "mean",
    ) -> None:
        self.target = check_kind(target, "target")
        self.weighting = build_weighting(weighting, gamma=gamma, sigma_data=sigma_data)
        # names are resolved now (a typo fails here, not at the first step); None stays None
        # and means the default of whatever path the denoiser has
        self.time_sampler = (build_time_sampler(time_sampler) if isinstance(time_sampler, str)
                             else time_sampler)
        self.reduce = check_reduce(reduce)

    def __call__(self, den: DenoiserBase, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample losses ``(B,)``: draws ``t`` (float64) then ``eps`` from ``generator``."""
        x0 = check_x0(x0)
        den = prepare(den, cond)
        sampler = as_time_sampler(self.time_sampler, den.path)
        t = sampler.sample(den.path, x0.shape[0], generator).to(x0.device)
        eps = draw_noise(x0, generator)
        return self.loss_at(den, x0, t, eps)

    def loss_at(self, den: DenoiserBase, x0: torch.Tensor, t: torch.Tensor | float,
                eps: torch.Tensor) -> torch.Tensor:
        """The per-sample loss at given times ``t`` ``(B,)`` and noise ``eps`` (no randomness)."""
        x0 = check_x0(x0)
        path = den.path
        t = as_time(t).to(x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        x_t = path.add_noise(x0, eps, t)
        pred = den(x_t, t)
        true = Prediction(x_t=x_t, t=pred.t, x0=x0, eps=eps, path=path)
        err = pred.as_kind(self.target) - true.as_kind(self.target)
        mse = per_sample(err * err, self.reduce)
        return self.weighting(true, self.target).to(mse) * mse

    def __repr__(self) -> str:
        return (f"DenoisingLoss(target={self.target!r}, weighting={self.weighting!r}, "
                f"time_sampler={self.time_sampler!r}, reduce={self.reduce!r})")


def dsm_loss(time_sampler: TimeSampler | str | None = None, reduce: str = "mean") -> DenoisingLoss:
    """Denoising score matching (Vincent 2011; Song & Ermon 2019, eq. 2 and 6).

    ``sigma^2 |s_theta(x_t, t) - grad log q(x_t | x0)|^2`` with ``grad log q = -eps / sigma``:
    target ``score`` with NCSN's ``lambda(sigma) = sigma^2``. Algebraically it equals the
    eps-MSE, ``|sigma s_theta + eps|^2``.
    """
    return DenoisingLoss(target="score", weighting="sigma2", time_sampler=time_sampler,
                         reduce=reduce)


def flow_matching_loss(time_sampler: TimeSampler | str | None = None,
                       reduce: str = "mean") -> DenoisingLoss:
    """Conditional flow matching (Lipman et al. 2023, eq. 9 and 23; Liu et al. 2023, eq. 1;
    Ma et al. 2024 SiT, eq. 5): regress the interpolant's velocity
    ``d x_t / dt = d_alpha x0 + d_sigma eps`` with unit weight at ``t ~ U[t_min, t_max]``."""
    return DenoisingLoss(target="velocity", weighting="uniform",
                         time_sampler=UniformTime() if time_sampler is None else time_sampler,
                         reduce=reduce)


def edm_loss(p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5,
             reduce: str = "mean") -> DenoisingLoss:
    """EDM's training loss (Karras et al. 2022, eq. 8 and Table 1): x0 target, weight
    ``lambda(sigma~)``, ``ln sigma~ ~ N(P_mean, P_std^2)``. Pair it with ``EDMPrecond`` of the
    same ``sigma_data``."""
    return DenoisingLoss(target="x0", weighting="edm", time_sampler=LogNormalTime(p_mean, p_std),
                         sigma_data=sigma_data, reduce=reduce)
