"""The variational bound of a discrete chain and improved DDPM's hybrid loss.

DDPM's bound (Ho et al. 2020, eq. 5) is ``L_vlb = L_0 + L_1 + ... + L_{N-1} + L_N`` with

* ``L_n = KL(q(x_s | x_t, x0) || p(x_s | x_t))`` for a step ``t -> s > 0`` (both Gaussian), and
* ``L_0 = -log p(x0 | x_t)`` at the last step ``t -> 0``, DDPM's discretized Gaussian decoder
  (eq. 13): 256 bins of width ``2/255`` on ``[-1, 1]``, the edge bins extended to ``+-inf``;
* ``L_N = KL(q(x_T | x0) || prior)`` (:func:`prior_kl`), which has no parameters.

Everything is reported in **bits per dimension** (mean over data dims / ln 2), per sample. The
functions take any step ``t -> s`` of any path, so respaced grids work, and they are the building
blocks of the discrete VLB in :mod:`difflab.likelihood` as well as of :class:`HybridLoss`.

Reverse variance at the last step. The posterior variance ``beta_tilde`` of the step to ``s = 0``
is 0, so its log cannot be interpolated. Following improved DDPM (and DDPM's code), at ``s = 0``
``beta_tilde`` is replaced by the posterior variance of the step of the same size just above,
``(2t - s) -> t`` (for knots ``t_1 -> t_0``: ``beta_tilde_2`` in DDPM's 1-based notation, the
"clipped" log-variance): ``learned`` uses ``f log beta_1 + (1 - f) log beta_tilde_2``, and both
``small`` and ``large`` use ``beta_tilde_2``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.special import log_ndtr

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.objectives.base import check_x0, draw_noise, per_sample, prepare
from difflab.objectives.time import DiscreteUniformTime
from difflab.paths.base import GaussianPath, as_time, expand_like
from difflab.paths.vp import DiscreteVP
from difflab.prediction import Prediction

LN2 = math.log(2.0)
VARIANCES = ("learned", "small", "large")
_TINY_VAR = 1e-20  # floor for variances that are exactly 0 (the same floor as Prediction's)


# ----- building blocks ------------------------------------------------------------------------
def gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
                logvar2: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` per element, in nats (broadcasting).

    ``0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)``.
    """
    diff = mean1 - mean2
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + diff * diff * torch.exp(-logvar2) - 1.0)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^d)`` for ``d <= 0`` without cancellation (Maechler 2012), finite gradients."""
    d = d.clamp_max(0.0)
    near = d.clamp_min(-LN2)  # expm1 branch, accurate for d close to 0
    far = d.clamp_max(-LN2)  # log1p branch, accurate for d << 0
    tiny = torch.finfo(d.dtype).tiny
    return torch.where(d > -LN2, torch.log((-torch.expm1(near)).clamp_min(tiny)),
                       torch.log1p(-torch.exp(far)))


def _log_normal_interval(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for finite ``a < b``, stable in both tails.

    The interval is mirrored onto the left half-line (``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``),
    where ``log_ndtr`` keeps full precision, then ``log Phi(hi) + log(1 - Phi(lo)/Phi(hi))``.
    """
    flip = (a + b) > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, *, bins: int = 256,
    low: float = -1.0, high: float = 1.0,
) -> torch.Tensor:
    """``log P(bin of x)`` under ``N(mean, e^(2 log_scale))`` per element (DDPM eq. 13).

    The data take ``bins`` equally spaced values on ``[low, high]`` (8-bit images scaled to
    ``[-1, 1]``: bin half-width ``1/255``). A value's bin is ``[x - h, x + h]``; the first bin
    extends to ``-inf`` and the last to ``+inf``, so the ``bins`` probabilities sum to one.
    Computed as a log of a normal-CDF difference without cancellation in either tail; all
    intermediate values stay finite so gradients are finite too.
    """
    if not isinstance(bins, int) or bins < 2:
        raise bad_value("bins", bins, "an int >= 2 (256 for 8-bit data)")
    if not high > low:
        raise DifflabError(f"data range [low={low}, high={high}] is empty: expected low < high")
    half = 0.5 * (high - low) / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    a = (x - half - mean) * inv_scale
    b = (x + half - mean) * inv_scale
    interior = _log_normal_interval(a, b)
    first = x < low + half
    last = x > high - half
    return torch.where(first, log_ndtr(b), torch.where(last, log_ndtr(-a), interior))


def _as_batch_time(s, like: torch.Tensor) -> torch.Tensor:
    s = as_time(s).double().to(like.device)
    return s.expand(like.shape[0]) if s.ndim == 0 else s


def reverse_log_variance(pred: Prediction, s, variance: str = "learned") -> torch.Tensor:
    """``log var`` of ``p(x_s | x_t)`` broadcast like ``pred.x_t``.

    ``learned``: improved DDPM eq. 15, ``f log beta + (1 - f) log beta_tilde`` with ``f`` the
    model's ``var_frac``; ``small``: ``beta_tilde``; ``large``: ``beta`` (DDPM Sec. 3.2), with
    ``beta = sigma^2_{t|s}`` and ``beta_tilde`` the posterior variance of the step ``t -> s``.
    At ``s = 0`` the module's clipping convention applies (see the module docstring).
    """
    if variance not in VARIANCES:
        raise bad_value("variance", variance, "one of " + ", ".join(repr(v) for v in VARIANCES))
    path, t = pred.path, pred.t.double()
    s = _as_batch_time(s, pred.x_t)
    beta = path.transition(t, s)[1]
    at_data = s == 0
    t_up = torch.minimum(2.0 * t - s, torch.full_like(t, path.t_max))
    beta_tilde = torch.where(at_data, path.posterior(t_up, t)[2], path.posterior(t, s)[2])
    log_beta = torch.log(beta.clamp_min(_TINY_VAR))
    log_bt = torch.log(beta_tilde.clamp_min(_TINY_VAR))
    if variance == "small":
        return expand_like(log_bt, pred.x_t)
    if variance == "large":
        return expand_like(torch.where(at_data, log_bt, log_beta), pred.x_t)
    if pred.var_frac is None:
        raise DifflabError(
            "variance='learned' needs a model that learns its variance: build the Denoiser with "
            "learned_variance=True around a network with 2x output channels, or pass "
            "variance='small' / 'large'"
        )
    f = pred.var_frac
    return f * expand_like(log_beta, pred.x_t) + (1.0 - f) * expand_like(log_bt, pred.x_t)


def freeze_mean(pred: Prediction) -> Prediction:
    """The same prediction with ``x0`` / ``eps`` detached and ``var_frac`` still attached
    (improved DDPM Sec. 3.1: "we apply a stop-gradient to mu_theta for the L_vlb term")."""
    return replace(pred, x0=pred.x0.detach(), eps=pred.eps.detach())


def vlb_term(pred: Prediction, x0: torch.Tensor, s, *, variance: str = "learned",
             bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """The bound's term for the step ``pred.t -> s`` in bits/dim, per sample ``(B,)``.

    For ``s > 0``: ``KL(q(x_s | x_t, x0) || p(x_s | x_t))`` where both means use the posterior
    coefficients (DDPM eq. 6-7) — ``q`` with the true ``x0``, ``p`` with ``pred.x0`` — and ``p``'s
    variance is :func:`reverse_log_variance`. For ``s = 0``: ``-log p(x0 | x_t)`` under the
    discretized Gaussian decoder with mean ``pred.x0`` (the posterior mean at ``s = 0``).
    ``s`` may mix both cases within a batch.
    """
    path, x_t, t = pred.path, pred.x_t, pred.t.double()
    s = _as_batch_time(s, x_t)
    if bool(((s < 0) | (s >= t)).any()):
        raise DifflabError("s must satisfy 0 <= s < t for every sample (a step towards the data)")
    c_xt, c_x0, var_q = path.posterior(t, s)
    c_xt, c_x0 = expand_like(c_xt, x_t), expand_like(c_x0, x_t)
    mean_q = c_xt * x_t + c_x0 * x0
    mean_p = c_xt * x_t + c_x0 * pred.x0
    log_var_p = reverse_log_variance(pred, s, variance)
    log_var_q = expand_like(torch.log(var_q.clamp_min(_TINY_VAR)), x_t)
    kl = per_sample(gaussian_kl(mean_q, log_var_q, mean_p, log_var_p))
    low, high = data_range
    log_lik = discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p, bins=bins,
                                                  low=low, high=high)
    return torch.where(s.to(kl.device) == 0, -per_sample(log_lik), kl) / LN2


def vlb_terms(den: DenoiserBase, x0: torch.Tensor, t, s, *, eps: torch.Tensor | None = None,
              generator: torch.Generator | None = None, variance: str = "learned",
              bins: int = 256, data_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Noise ``x0`` to ``t`` (with ``eps``, or drawn from ``generator``), ask ``den``, and return
    :func:`vlb_term` for the step ``t -> s`` in bits/dim ``(B,)``."""
    x0 = check_x0(x0)
    t = _as_batch_time(t, x0)
    eps = draw_noise(x0, generator) if eps is None else eps
    pred = den(den.path.add_noise(x0, eps, t), t)
    return vlb_term(pred, x0, s, variance=variance, bins=bins, data_range=data_range)


def prior_kl(path: GaussianPath, x0: torch.Tensor) -> torch.Tensor:
    """``L_N = KL(q(x_T | x0) || N(0, prior_std^2 I))`` in bits/dim per sample (DDPM eq. 5).

    The prior is the path's own (``path.prior_std = sigma(t_max)``), the distribution samplers
    start from; on a VP chain that reaches the noise it is DDPM's ``N(0, I)`` up to
    ``alpha_bar_N``.
    """
    x0 = check_x0(x0)
    t = torch.full((x0.shape[0],), path.t_max, dtype=torch.float64, device=x0.device)
    mean = expand_like(path.alpha(t), x0) * x0
    log_var = expand_like(2.0 * torch.log(path.sigma(t)), x0)
    log_var_prior = torch.full_like(log_var, 2.0 * math.log(path.prior_std))
    return per_sample(gaussian_kl(mean, log_var, torch.zeros_like(mean), log_var_prior)) / LN2


# ----- improved DDPM's hybrid objective -------------------------------------------------------
class HybridLoss:
    """``L_hybrid = L_simple + lam * L_vlb`` (Nichol & Dhariwal 2021, Sec. 3.1, eq. 16).

    For a step ``n`` drawn uniformly (``t = (n+1)/N -> s = n/N``):
    ``L_simple = mean |eps_hat - eps|^2`` and ``L_vlb`` is estimated without bias by
    ``N * L_n`` with ``L_n`` the bound's term for that step (:func:`vlb_term`, bits/dim)
    evaluated with a stop-gradient on the model's mean, so ``L_vlb`` trains only the variance.
    With ``lam = 0.001`` this is the paper's objective (its code multiplies the per-step bits by
    ``N / 1000``, the same thing).

    Needs a discrete VP path and a denoiser with ``learned_variance=True``.
    """

    def __init__(self, lam: float = 0.001) -> None:
        if not (math.isfinite(lam) and lam >= 0):
            raise bad_value("lam", lam, "a number >= 0 (improved DDPM uses 0.001)")
        self.lam = float(lam)

    def __call__(self, den: DenoiserBase, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample hybrid losses ``(B,)``: draws the steps, then ``eps``, from ``generator``."""
        return self.terms(den, x0, cond, generator)["loss"]

    def terms(self, den: DenoiserBase, x0: torch.Tensor, cond: Cond | None = None,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss``, ``simple``, ``vlb`` (per-step ``L_n``, bits/dim) and ``t``, each ``(B,)``."""
        x0 = check_x0(x0)
        den = prepare(den, cond)
        path = self._check(den)
        steps = DiscreteUniformTime().sample_steps(path, x0.shape[0], generator).to(x0.device)
        return self.terms_at(den, x0, steps, draw_noise(x0, generator))

    def terms_at(self, den: DenoiserBase, x0: torch.Tensor, steps: torch.Tensor,
                 eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`terms` at given integer steps ``n`` ``(B,)`` and noise (no randomness)."""
        x0 = check_x0(x0)
        path = self._check(den)
        steps = torch.as_tensor(steps, device=x0.device)
        t = path.step_time(steps).to(x0.device)
        s = steps.double() / path.N
        pred = den(path.add_noise(x0, eps, t), t)
        if pred.var_frac is None:
            raise DifflabError(self._variance_message(den))
        simple = per_sample((pred.eps - eps) ** 2)
        vlb = vlb_term(freeze_mean(pred), x0, s, variance="learned")
        loss = simple + (self.lam * path.N) * vlb.to(simple)
        return {"loss": loss, "simple": simple, "vlb": vlb, "t": t}

    @staticmethod
    def _variance_message(den: DenoiserBase) -> str:
        return (f"HybridLoss trains a learned variance but {den!r} does not learn one: wrap a "
                "network with 2x output channels as Denoiser(net, path, learned_variance=True), "
                "or train L_simple alone with DenoisingLoss()")

    def _check(self, den: DenoiserBase) -> DiscreteVP:
        path = den.path
        if not isinstance(path, DiscreteVP):
            raise DifflabError(
                f"HybridLoss needs a discrete VP path (VP.discrete_linear / VP.discrete_cosine), "
                f"got {path!r}: its L_vlb is a sum over the chain's steps (iDDPM eq. 16); on a "
                "continuous path use DenoisingLoss"
            )
        if not getattr(den, "learned_variance", False):
            raise DifflabError(self._variance_message(den))
        return path

    def __repr__(self) -> str:
        return f"HybridLoss(lam={self.lam:g})"
