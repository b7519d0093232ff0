"""Likelihoods in bits/dim: the discrete variational bound and the exact probability-flow ODE NLL.

* :func:`vlb` — DDPM's bound (Ho et al. 2020, eq. 5; improved DDPM eq. 4-6) on any grid that runs
  from ``t_max`` to 0: ``L = L_prior + sum_steps KL(q(x_s | x_t, x0) || p(x_s | x_t)) + L_decoder``
  with DDPM's discretized Gaussian decoder (eq. 13) at the last step. Reverse variances: ``small``
  (``beta_tilde``), ``large`` (``beta``), ``learned`` (improved DDPM eq. 15) and ``analytic``
  (Analytic-DPM, Bao et al. 2022a, Thm. 1-2). Its building blocks come from
  :mod:`difflab.objectives.vlb`.
* :func:`ode_likelihood` — the change of variables along the probability-flow ODE (Song et al.
  2021, eq. 39 / App. D): ``log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt``,
  with the divergence exact (one backward pass per dimension) or by the Hutchinson-Skilling
  estimator, solved with ``torchdiffeq``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.objectives.base import check_x0, draw_noise, per_sample
from difflab.objectives.vlb import (
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    prior_kl,
    reverse_log_variance,
)
from difflab.paths.base import GaussianPath, expand_like
from difflab.paths.vp import DiscreteVP
from difflab.prediction import Prediction
from difflab.samplers.analytic import (
    AnalyticMoments,
    optimal_variance,
    residual_variance,
    variance_bounds,
)
from difflab.samplers.base import check_grid
from difflab.samplers.sde import FlowVariable, check_method, solve_flow

LN2 = math.log(2.0)
VLB_VARIANCES = ("small", "large", "learned", "analytic", "npr", "sn")
PROBES = ("rademacher", "gaussian")
DIVERGENCES = ("exact", "hutchinson")


@dataclass
class LikelihoodResult:
    """Per-sample likelihoods.

    Attributes:
        bpd: bits per dimension ``(B,)``.
        log_prob: the matching log-likelihood in nats ``(B,)`` (``bpd = -log_prob / (d ln 2)``).
        terms: for :func:`vlb`, ``prior`` ``(B,)``, ``kl`` ``(B, steps)`` (grid order, the decoder
            step excluded) and ``decoder`` ``(B,)``, each in bits/dim, summing to ``bpd``.
        nfe: network evaluations used.
    """

    bpd: torch.Tensor
    log_prob: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    nfe: int = 0

    def mean(self) -> float:
        return float(self.bpd.mean())

    def stderr(self) -> float:
        """Standard error of the mean bits/dim over the samples."""
        n = self.bpd.numel()
        return float(self.bpd.std() / math.sqrt(n)) if n > 1 else float("nan")

    def summary(self) -> dict[str, float]:
        """``{'bpd': mean, 'stderr': standard error, 'n': samples, 'nfe': evaluations}``."""
        return {"bpd": self.mean(), "stderr": self.stderr(), "n": self.bpd.numel(),
                "nfe": self.nfe}


# ----- the discrete variational bound -----------------------------------------------------------
def default_vlb_grid(path: GaussianPath) -> torch.Tensor:
    """All steps of a discrete path, ``t_max = 1 > ... > 1/N > 0``."""
    if not isinstance(path, DiscreteVP):
        raise DifflabError(
            f"vlb on {path!r} needs grid=...: a continuous path has no steps of its own; pass a "
            "grid from t_max to 0, e.g. timesteps.uniform(path, 1000)"
        )
    return torch.cat([path.step_time(torch.arange(path.N - 1, -1, -1)), torch.zeros(1).double()])


def _analytic_log_var(pred: Prediction, t, s, moments: AnalyticMoments,
                      data_range: tuple[float, float]) -> torch.Tensor:
    """Analytic-DPM's ``log var*`` of the step ``t -> s`` (Thm. 1, clipped by Thm. 2).

    At ``s = 0`` (the decoder) Thm. 1 reads ``var* = (sigma_t / alpha_t)^2 (1 - Gamma_t)``, the
    averaged posterior variance of ``x0``, whose Thm. 2 lower bound is 0. An imperfect model can
    push the estimate there (``Gamma_t > 1``) and a near-zero decoder variance is catastrophic,
    so it is clipped from below by DDPM's decoder variance (the ``small`` convention of
    :func:`~difflab.objectives.vlb.reverse_log_variance`), which is what Bao et al.'s released
    code uses at this step.
    """
    path = pred.path
    gamma = moments.gamma_at(t, path)
    if float(s) > 0:
        return torch.full_like(pred.x_t, math.log(optimal_variance(path, t, s, gamma, 1.0,
                                                                   data_range)))
    _, hi = variance_bounds(path, t, 0.0, 1.0, data_range)
    floor = reverse_log_variance(pred, 0.0, "small")
    var = min(float(path.sigma_ve(t)) ** 2 * (1.0 - gamma), hi)
    return floor.clamp_min(math.log(var)) if var > 0 else floor


def _residual_log_var(pred: Prediction, t, s, head, second: bool,
                      data_range: tuple[float, float]) -> torch.Tensor:
    """SN-/NPR-DPM's per-element ``log var*`` of the step ``t -> s`` (Bao et al. 2022b, eq. 9-10,
    clipped by Analytic-DPM's Thm. 2); at ``s = 0`` the decoder's ``(sigma_t / alpha_t)^2`` times
    the head's ``Cov[eps | x_t]``, floored by DDPM's decoder variance as for ``analytic``."""
    path = pred.path
    if float(s) > 0:
        var = residual_variance(path, 1.0, data_range, head, second)(pred, t, s)
        return torch.log(var)
    out = head(pred.x_t, pred.t)
    cov = (out - pred.eps**2 if second else out).clamp_min(0.0)
    _, hi = variance_bounds(path, t, 0.0, 1.0, data_range)
    var = (float(path.sigma_ve(t)) ** 2 * cov).clamp(max=hi)
    floor = reverse_log_variance(pred, 0.0, "small")
    return torch.maximum(floor, torch.log(var.clamp_min(1e-300)))


def _step_term(pred: Prediction, x0: torch.Tensor, s, log_var_p: torch.Tensor, bins: int,
               data_range: tuple[float, float]) -> torch.Tensor:
    """One term of the bound in nats ``(B,)``: the Gaussian KL for ``s > 0``, else the decoder."""
    path, x_t, t = pred.path, pred.x_t, pred.t.double()
    s_vec = torch.full_like(t, float(s))
    c_xt, c_x0, var_q = path.posterior(t, s_vec)
    mean_p = expand_like(c_xt, x_t) * x_t + expand_like(c_x0, x_t) * pred.x0
    if float(s) == 0:
        low, high = data_range
        ll = discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * log_var_p, bins=bins,
                                                 low=low, high=high)
        return -per_sample(ll, "sum")
    mean_q = expand_like(c_xt, x_t) * x_t + expand_like(c_x0, x_t) * x0
    log_var_q = expand_like(torch.log(var_q), x_t)
    return per_sample(gaussian_kl(mean_q, log_var_q, mean_p, log_var_p), "sum")


def _check_vlb(den: DenoiserBase, x0: torch.Tensor, variance: str, moments, grid,
               data_range) -> torch.Tensor:
    path = den.path
    if variance not in VLB_VARIANCES:
        raise bad_value("variance", variance, "one of " + ", ".join(VLB_VARIANCES))
    if variance == "learned" and not isinstance(path, DiscreteVP):
        raise DifflabError(
            f"variance='learned' on {path!r}: improved DDPM's learned variance interpolates "
            "between the beta and beta_tilde of a discrete chain (eq. 15); use a VP.discrete* "
            "path, or variance='small' / 'large' / 'analytic' on a continuous path"
        )
    if variance == "analytic" and not isinstance(moments, AnalyticMoments):
        raise DifflabError(
            "variance='analytic' needs moments=AnalyticMoments (from "
            "difflab.samplers.analytic.estimate_gamma(den, data, grid))"
        )
    grid = check_grid(default_vlb_grid(path) if grid is None else grid, path)
    if abs(float(grid[0]) - path.t_max) > 1e-9 * max(1.0, path.t_max) or float(grid[-1]) != 0:
        raise DifflabError(
            f"the VLB grid must run from t_max={path.t_max:g} (the prior term) to 0 (the decoder);"
            f" got [{float(grid[0]):g}, ..., {float(grid[-1]):g}]"
        )
    low, high = data_range
    if bool((x0 < low - 1e-6).any() | (x0 > high + 1e-6).any()):
        raise DifflabError(
            f"x0 has values outside data_range=({low}, {high}): the discretized decoder "
            "expects 8-bit data scaled to that range (x / 127.5 - 1)"
        )
    return grid


@torch.no_grad()
def vlb(den: DenoiserBase, x0: torch.Tensor, *, grid=None, variance: str = "small",
        moments: AnalyticMoments | None = None, residual=None, bins: int = 256,
        data_range: tuple[float, float] = (-1.0, 1.0),
        generator: torch.Generator | None = None, clip_x0: bool = False) -> LikelihoodResult:
    """The discrete variational bound in bits/dim (Ho et al. 2020, eq. 5; iDDPM eq. 4-6).

    ``bpd = [KL(q(x_T|x0) || p(x_T)) + sum_{t->s>0} KL(q(x_s|x_t,x0) || p(x_s|x_t))
    - log p(x0 | x_t1)] / (d ln 2)``, each term estimated with one ``x_t ~ q(x_t | x0)``
    (``eps`` from ``generator``). ``p(x_s | x_t)`` has DDPM's posterior mean with ``x0_hat`` and
    variance ``variance``; the decoder is DDPM's discretized Gaussian (eq. 13) over ``bins``
    values in ``data_range``, so the bound is on the probability of the *discrete* data and
    needs no dequantization.

    Args:
        den: the denoiser.
        x0: data ``(B, ...)`` on the ``bins``-value grid of ``data_range``.
        grid: from ``t_max`` down to 0 (default: every step of a discrete path).
        variance: ``small``, ``large``, ``learned`` (discrete paths only; see
            :func:`difflab.objectives.vlb.reverse_log_variance` for the last-step convention) or
            ``analytic`` (with ``moments``), or ``npr`` / ``sn`` (SN-/NPR-DPM's per-element
            variance, with ``residual``).
        residual: the head of ``npr`` / ``sn``, ``(x_t, t) -> Tensor``.
        clip_x0: clip ``x0_hat`` to ``data_range`` in every mean (as the samplers'
            ``clip_x0`` and improved DDPM's ``clip_denoised``). The bound stays a bound, on the
            reverse chain with clipped means. Without clipping, an ``eps`` model's ``x0_hat =
            (x_t - sigma eps_hat) / alpha`` at the first step of a cosine path (``alpha_T``
            about 5e-5) amplifies the error in ``eps_hat`` by ``1 / alpha_T``, and a strided
            bound's first step (to ``alpha_s`` = 0.17 at 10 steps) then costs thousands of
            bits/dim.
    """
    x0 = check_x0(x0)
    grid = _check_vlb(den, x0, variance, moments, grid, data_range)
    if variance in ("npr", "sn") and not callable(residual):
        raise DifflabError(f"variance={variance!r} needs residual=HEAD, a (x_t, t) -> Tensor "
                           f"trained with ResidualLoss(head, kind={variance!r}) (a residual "
                           "run: difflab.tasks.residual.residual_head(RUN, path, kind))")
    path = den.path
    prior = prior_kl(path, x0).double()
    kls, decoder = [], None
    for i in range(grid.numel() - 1):
        t, s = grid[i], grid[i + 1]
        tt = t.expand(x0.shape[0])
        pred = den(path.add_noise(x0, draw_noise(x0, generator), tt), tt)
        if clip_x0:
            pred = replace(pred, x0=pred.x0.clamp(*data_range))
        if variance == "analytic":
            log_var = _analytic_log_var(pred, t, s, moments, data_range)
        elif variance in ("npr", "sn"):
            log_var = _residual_log_var(pred, t, s, residual, variance == "sn", data_range)
        else:
            log_var = reverse_log_variance(pred, s, variance)
        term = _step_term(pred, x0, s, log_var, bins, data_range).double()
        term = term / (x0[0].numel() * LN2)
        if float(s) == 0:
            decoder = term
        else:
            kls.append(term)
    kl = torch.stack(kls, 1) if kls else torch.zeros(x0.shape[0], 0, dtype=torch.float64)
    bpd = prior + kl.sum(1) + decoder
    return LikelihoodResult(bpd, -bpd * x0[0].numel() * LN2,
                            {"prior": prior, "kl": kl, "decoder": decoder}, grid.numel() - 1)


# ----- the probability-flow ODE likelihood ------------------------------------------------------
def _exact_div(drift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d drift_i / d x_i`` with one backward pass per dimension."""
    flat = drift.flatten(1)
    d = flat.shape[1]
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(d):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < d - 1)
        div = div + g.flatten(1)[:, i]
    return div


def _hutchinson_div(drift: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson-Skilling: ``E_v[v^T (d drift / dx) v]`` averaged over the fixed probes."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for k in range(probes.shape[0]):
        v = probes[k]
        (vjp,) = torch.autograd.grad(drift, x, grad_outputs=v, retain_graph=k < probes.shape[0] - 1)
        total = total + (vjp * v).flatten(1).sum(1)
    return total / probes.shape[0]


def _draw_probes(x: torch.Tensor, n: int, probe: str, generator) -> torch.Tensor:
    z = torch.randn((n, *x.shape), generator=generator, dtype=x.dtype)
    if probe == "rademacher":
        z = torch.sign(z) + (z == 0).to(z.dtype)  # exact +-1 (a 0 is vanishingly rare)
    return z.to(x.device)


def dequantize(x: torch.Tensor, bits: int, generator) -> torch.Tensor:
    """Uniform dequantization of ``bits``-bit data given scaled to ``[-1, 1]``.

    ``k = (x + 1) (2^bits - 1) / 2`` recovers the integers; the result is
    ``2 (k + u) / 2^bits - 1`` with ``u ~ U[0, 1)^d`` (Song et al. 2021's convention).
    """
    levels = 2**bits
    k = (x.double() + 1.0) * (levels - 1) / 2.0
    if bool(((k - k.round()).abs() > 1e-3).any()) or bool(((k < -1e-3) | (k > levels)).any()):
        raise DifflabError(
            f"dequantize=True expects {bits}-bit data scaled to [-1, 1] (x = k / "
            f"{(levels - 1) / 2:g} - 1 for integers k); pass continuous data with dequantize=False"
        )
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
    return (2.0 * (k.round() + u) / levels - 1.0).to(x.dtype)


def _check_ode(path: GaussianPath, t_end, divergence, probe, n_probes, rtol, atol) -> float:
    t_end = path.t_min if t_end is None else float(t_end)
    if not path.t_min - 1e-12 <= t_end < path.t_max or t_end <= 0:
        raise bad_value("t_end", t_end, f"a time in [t_min={path.t_min:g}, t_max="
                        f"{path.t_max:g}) above 0 (the score is undefined at t = 0)")
    if divergence not in DIVERGENCES:
        raise bad_value("divergence", divergence, "one of " + ", ".join(DIVERGENCES))
    if probe not in PROBES:
        raise bad_value("probe", probe, "one of " + ", ".join(PROBES))
    if not isinstance(n_probes, int) or n_probes < 1:
        raise bad_value("n_probes", n_probes, "a positive integer")
    if not (rtol > 0 and atol > 0):
        raise bad_value("rtol/atol", (rtol, atol), "positive tolerances")
    ends = torch.tensor([t_end, path.t_max], dtype=torch.float64)
    if not bool((path.alpha(ends) > 1e-12 * path.sigma(ends)).all()):
        raise DifflabError(
            f"{path!r} has alpha = 0 (alpha / sigma < 1e-12) inside [t_end={t_end:g}, "
            f"t_max={path.t_max:g}]: x_t no longer depends on the data there, the drift "
            "f = d log alpha / dt diverges and the flow is not invertible; use a path whose "
            "t_max keeps alpha > 0 (e.g. VP.cosine() with its default t_max=0.9946)"
        )
    return t_end


def ode_likelihood(den: DenoiserBase, x: torch.Tensor, *, t_end: float | None = None,
                   divergence: str = "hutchinson", probe: str = "rademacher", n_probes: int = 1,
                   method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   variable: str = "log_snr", dequantize_bits: int | None = None,
                   generator: torch.Generator | None = None) -> LikelihoodResult:
    """Exact likelihood along the probability-flow ODE (Song et al. 2021, App. D, eq. 39-40).

    The augmented ODE ``d/du [x, delta] = [F(x, u), div_x F(x, u)]`` with ``F = dx/du`` the
    flow drift (eq. 13) in the integration variable ``u`` (``log_snr`` or ``t``, see
    :class:`~difflab.samplers.sde.FlowVariable`; ``div F du = div f~ dt`` either way) is integrated
    from ``t_end`` (data) to ``t_max``; then ``log p_{t_end}(x) = log p_T(x(T)) + delta(T)`` with
    ``p_T`` the path's prior. This is the density of the marginal at ``t_end`` (default the
    path's ``t_min``, whose noise is negligible), evaluated at ``x``; the prior's mismatch with
    the true marginal at ``t_max`` (``alpha(t_max) x0`` is not exactly 0) is not corrected.

    **Continuous data** (``dequantize_bits=None``): ``log_prob = log p(x)`` and
    ``bpd = -log_prob / (d ln 2)``.

    **Discrete data** (``dequantize_bits=b``, e.g. 8): ``x`` holds ``b``-bit integers ``k``
    scaled to ``[-1, 1]`` as ``x = 2k / (2^b - 1) - 1``. Uniform dequantization evaluates the
    density at ``x~ = 2 (k + u) / 2^b - 1``, ``u ~ U[0,1)^d``. The variable ``z = k + u`` on
    ``[0, 2^b)`` has density ``p_z(z) = p(x~) |dx~/dz| = p(x~) (2 / 2^b)^d``, and
    ``log P(k) >= E_u log p_z(k + u)`` (Theis et al. 2016). Hence the reported
    ``log_prob = log p(x~) - d log(2^(b-1))`` and

        bpd = -log2 p(x~) / d + (b - 1)        (+7 bits/dim for 8-bit data),

    an upper bound on the discrete NLL in expectation over ``u``.

    Args:
        divergence: ``exact`` (``d`` backward passes per evaluation: small ``d`` only) or
            ``hutchinson`` (unbiased; ``n_probes`` fixed ``probe`` vectors per sample, drawn once
            per solve: Rademacher or Gaussian, as in FFJORD / Song et al.).
        method, rtol, atol: a ``torchdiffeq`` solver (a deterministic one: stochastic samplers
            define no invertible map) and its tolerances.
        generator: probes and dequantization noise.
    """
    path = den.path
    t_end = _check_ode(path, t_end, divergence, probe, n_probes, rtol, atol)
    method = check_method(method)
    flow = FlowVariable(path, variable)
    x = check_x0(x)
    if dequantize_bits is not None:
        x = dequantize(x, dequantize_bits, generator)
    n, d = x.shape[0], x[0].numel()
    probes = _draw_probes(x, n_probes, probe, generator) if divergence == "hutchinson" else None
    nfe = [0]

    def func(u: torch.Tensor, state):
        nfe[0] += 1
        with torch.enable_grad():
            xt = state[0].detach().requires_grad_(True)
            drift = flow.drift(den(xt, flow.t(u).expand(n)))
            div = _exact_div(drift, xt) if probes is None else _hutchinson_div(drift, xt, probes)
        return drift.detach(), div.detach()

    state0 = (x, torch.zeros(n, dtype=x.dtype, device=x.device))
    x_T, delta = (s[-1] for s in solve_flow(func, state0, flow.u(t_end), flow.u(path.t_max),
                                            method, rtol, atol))
    log_prob = path.prior_logp(x_T).double() + delta.double()
    if dequantize_bits is not None:
        log_prob = log_prob - d * (dequantize_bits - 1) * LN2
    return LikelihoodResult(-log_prob / (d * LN2), log_prob, {}, nfe[0])
