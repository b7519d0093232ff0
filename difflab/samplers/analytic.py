"""Analytic-DPM (Bao et al. 2022a, ICLR) and SN-/NPR-DPM (Bao et al. 2022b, ICML).

A reverse step ``t -> s`` of the DDIM family (Song et al. 2021a, eq. 16 with ``lambda^2 =
eta^2 beta_tilde``) has mean ``a_s x0_hat + sqrt(sigma_s^2 - lambda^2) eps_hat``; ``eta = 1`` is
DDPM's posterior mean. Moment matching gives the optimal isotropic variance (Analytic-DPM Thm. 1,
here for any two times on any path):

    var* = lambda^2 + c^2 (sigma_t / alpha_t)^2 (1 - Gamma_t),
    c = alpha_s - sqrt(sigma_s^2 - lambda^2) alpha_t / sigma_t,
    Gamma_t = E_q(x_t) ||eps_hat(x_t, t)||^2 / d,

because ``Cov[x0 | x_t] = (sigma_t / alpha_t)^2 Cov[eps | x_t]`` and
``E tr Cov[eps | x_t] / d = 1 - Gamma_t`` (``c`` is the coefficient of ``x0`` in the mean; on DDPM
``c^2 sigma_t^2 / alpha_t^2 = (sqrt(beta_bar_n / alpha_n) - sqrt(beta_bar_{n-1} - lambda_n^2))^2``
as in eq. 7). Thm. 2 bounds it, and the estimate is clipped to those bounds:

    lambda^2 <= var* <= lambda^2 + c^2 min((sigma_t / alpha_t)^2, ((b - a) / 2)^2)

for data in ``[a, b]`` (``data_range``). The follow-up (Bao et al. 2022b, eq. 9-10) replaces the
averaged ``1 - Gamma_t`` by a per-element residual head: NPR ``h ~ E[(eps - eps_hat)^2 | x_t]``,
SN ``g ~ E[eps^2 | x_t]`` with ``g - eps_hat^2`` in its place.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath
from difflab.samplers.base import (
    after_step,
    as_hooks,
    check_grid,
    check_x,
    predict,
    register,
)
from difflab.samplers.noise import as_noise

__all__ = [
    "AnalyticMoments",
    "analytic_ddim",
    "analytic_ddpm",
    "estimate_gamma",
    "npr_ddpm",
    "optimal_variance",
    "residual_variance",
    "sn_ddpm",
    "variance_bounds",
]

PIXEL = 2.0 / 255.0  # one 8-bit bin of data scaled to [-1, 1]


# ----- Gamma_t: estimated once, saved, reused by every grid -------------------------------------
@dataclass
class AnalyticMoments:
    """``Gamma_t = E_q(x_t) ||eps_hat(x_t, t)||^2 / d`` at a set of times (Analytic-DPM eq. 8).

    Attributes:
        times: ``(K,)`` float64 times, ascending.
        gamma: ``(K,)`` Monte Carlo estimates of ``Gamma_t``.
        stderr: ``(K,)`` their standard errors.
        n_samples: data samples per time.
        path: ``repr`` of the path they were estimated on (informational).
    """

    times: torch.Tensor
    gamma: torch.Tensor
    stderr: torch.Tensor
    n_samples: int
    path: str = ""

    def __post_init__(self) -> None:
        self.times = torch.as_tensor(self.times, dtype=torch.float64).flatten()
        self.gamma = torch.as_tensor(self.gamma, dtype=torch.float64).flatten()
        self.stderr = torch.as_tensor(self.stderr, dtype=torch.float64).flatten()
        k = self.times.numel()
        if k == 0 or self.gamma.numel() != k or self.stderr.numel() != k:
            raise DifflabError(
                f"AnalyticMoments needs equally long times, gamma and stderr, got "
                f"{k}, {self.gamma.numel()}, {self.stderr.numel()}"
            )
        order = torch.argsort(self.times)
        self.times, self.gamma, self.stderr = (v[order] for v in (self.times, self.gamma,
                                                                   self.stderr))

    def gamma_at(self, t, path: GaussianPath) -> float:
        """``Gamma_t``: the stored value at ``t``, else linear in log-SNR between neighbours."""
        t = float(t)
        i = int(torch.searchsorted(self.times, torch.tensor([t], dtype=torch.float64)))
        for j in (i - 1, i):
            if 0 <= j < self.times.numel() and abs(float(self.times[j]) - t) <= 1e-9 * max(1, t):
                return float(self.gamma[j])
        if not 0 < i < self.times.numel():
            raise DifflabError(
                f"moments has no Gamma at t={t:.6g}: it was estimated for t in "
                f"[{float(self.times[0]):.6g}, {float(self.times[-1]):.6g}]; run "
                "estimate_gamma(den, data, times=grid[grid > 0]) for this grid"
            )
        lam = path.log_snr(torch.tensor([float(self.times[i - 1]), t, float(self.times[i])],
                                        dtype=torch.float64))
        w = float((lam[1] - lam[0]) / (lam[2] - lam[0]))
        return float((1 - w) * self.gamma[i - 1] + w * self.gamma[i])

    def save(self, file: str | os.PathLike) -> None:
        """Write to ``.json`` or ``.safetensors`` (atomically: temporary name, then rename)."""
        file = Path(file)
        tmp = file.with_name(file.name + ".tmp")
        meta = {"n_samples": str(self.n_samples), "path": self.path}
        if file.suffix == ".json":
            tmp.write_text(json.dumps({**meta, "times": self.times.tolist(),
                                       "gamma": self.gamma.tolist(),
                                       "stderr": self.stderr.tolist()}))
        elif file.suffix == ".safetensors":
            save_file({"times": self.times, "gamma": self.gamma, "stderr": self.stderr},
                      str(tmp), metadata=meta)
        else:
            raise bad_value("file", str(file), "a path ending in .json or .safetensors")
        os.replace(tmp, file)

    @classmethod
    def load(cls, file: str | os.PathLike) -> AnalyticMoments:
        """Read a file written by :meth:`save`."""
        file = Path(file)
        if file.suffix == ".json":
            d = json.loads(file.read_text())
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                d = dict(f.metadata() or {})
            d.update(load_file(str(file)))
        else:
            raise bad_value("file", str(file), "a path ending in .json or .safetensors")
        return cls(d["times"], d["gamma"], d["stderr"], int(d["n_samples"]), d.get("path", ""))


def _collect(data, n: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` data samples from a tensor (drawn without replacement when possible) or batches."""
    if isinstance(data, torch.Tensor):
        if n is None or n == data.shape[0]:
            return data
        idx = (torch.randperm(data.shape[0], generator=generator)[:n] if n < data.shape[0]
               else torch.randint(data.shape[0], (n,), generator=generator))
        return data[idx]
    if not isinstance(data, Iterable):
        raise bad_value("data", type(data).__name__, "a tensor (N, ...) or an iterable of batches")
    parts, have = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        parts.append(torch.as_tensor(x))
        have += parts[-1].shape[0]
        if n is not None and have >= n:
            break
    if not parts:
        raise DifflabError("data yielded no batches: expected at least one (x, ...) batch")
    return torch.cat(parts)[:n]


@torch.no_grad()
def estimate_gamma(den: DenoiserBase, data, times, n_samples: int | None = None,
                   generator: torch.Generator | None = None,
                   batch_size: int = 1000, cond: Cond | None = None,
                   progress: str | None = None) -> AnalyticMoments:
    """Monte Carlo ``Gamma_t = E ||eps_hat(x_t, t)||^2 / d`` over training data (eq. 8).

    For each ``t`` in ``times`` (zeros are skipped) every data sample gets fresh noise
    ``x_t = alpha_t x0 + sigma_t eps``. Estimate once on the full set of times a model may be
    sampled at (e.g. all steps of a discrete path) and reuse it for every sub-grid.

    Args:
        den: the denoiser (its path defines ``q(x_t | x0)``).
        data: a tensor ``(N, ...)`` or an iterable of batches (tensors or ``(x, ...)`` tuples).
        times: times in ``[t_min, t_max]`` (a grid is fine).
        n_samples: data samples per time (default: all of a tensor).
        generator: the only source of randomness (data subset and noise).
        batch_size: rows per denoiser call.
        cond: one condition per data row (a tensor ``data`` of exactly those rows): row ``i``
            is denoised with ``cond[i]`` (a conditional model's Gamma_t is
            ``E_{x0, y} ||eps_hat(x_t, t, y)||^2 / d``).
        progress: a progress-bar title (shown on a terminal only, one tick per time).
    """
    path = den.path
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    times = times[times > 0]
    path.check_time(times, "times")
    if cond is not None and not (isinstance(data, torch.Tensor)
                                 and n_samples in (None, data.shape[0])
                                 and cond.batch_size() in (None, data.shape[0])):
        raise DifflabError("estimate_gamma(cond=...) needs a tensor of data with one condition "
                           "per row (and n_samples None)")
    x0 = _collect(data, n_samples, generator)
    n = x0.shape[0]
    dens = [den if cond is None else den.bind(cond[lo:lo + batch_size])
            for lo in range(0, n, batch_size)]
    gamma, stderr = [], []
    from tqdm.auto import tqdm

    bar = tqdm(times, desc=progress, unit="time", leave=False, delay=0.5,
               disable=progress is None or not sys.stderr.isatty())
    for t in bar:
        vals = []
        for d, chunk in zip(dens, x0.split(batch_size)):
            eps = torch.randn(chunk.shape, generator=generator, dtype=chunk.dtype)
            tt = t.expand(chunk.shape[0])
            e = d(path.add_noise(chunk, eps.to(chunk.device), tt), tt).eps
            vals.append(e.flatten(1).pow(2).mean(1).double().cpu())
        v = torch.cat(vals)
        gamma.append(v.mean())
        stderr.append(v.std() / math.sqrt(n) if n > 1 else torch.tensor(float("nan")))
    return AnalyticMoments(times, torch.stack(gamma), torch.stack(stderr), n, repr(path))


# ----- the variance, its bounds, and the family's coefficients ----------------------------------
def family_coefficients(path: GaussianPath, t, s, eta: float) -> tuple[float, float, float]:
    """``(lambda^2, sqrt(sigma_s^2 - lambda^2), c)`` of a step ``t -> s`` (DDIM eq. 16)."""
    lam2 = eta * eta * float(path.posterior(t, s)[2])
    a_t, s_t = float(path.alpha(t)), float(path.sigma(t))
    keep = math.sqrt(max(float(path.sigma(s)) ** 2 - lam2, 0.0))
    c = float(path.alpha(s)) - keep * a_t / s_t
    return lam2, keep, c


def variance_bounds(path: GaussianPath, t, s, eta: float = 1.0,
                    data_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """Analytic-DPM Thm. 2: ``[lambda^2, lambda^2 + c^2 min(sigma_t^2/alpha_t^2, ((b-a)/2)^2)]``."""
    lam2, _, c = family_coefficients(path, t, s, eta)
    cov_max = float(path.sigma_ve(t)) ** 2
    if data_range is not None:
        lo, hi = data_range
        cov_max = min(cov_max, ((hi - lo) / 2.0) ** 2)
    return lam2, lam2 + c * c * cov_max


def optimal_variance(path: GaussianPath, t, s, gamma: float, eta: float = 1.0,
                     data_range: tuple[float, float] | None = None, clip: bool = True) -> float:
    """Analytic-DPM's ``var*`` of step ``t -> s`` (Thm. 1), clipped to Thm. 2's bounds."""
    lam2, _, c = family_coefficients(path, t, s, eta)
    var = lam2 + c * c * float(path.sigma_ve(t)) ** 2 * (1.0 - gamma)
    if not clip:
        return var
    lo, hi = variance_bounds(path, t, s, eta, data_range)
    return min(max(var, lo), hi)


def _check_common(eta: float, data_range, clip_pixels) -> None:
    if not 0 <= eta <= 1:
        raise bad_value("eta", eta, "a number in [0, 1] (0: DDIM, 1: DDPM)")
    if data_range is not None and not (len(data_range) == 2 and data_range[0] < data_range[1]):
        raise bad_value("data_range", data_range, "None or (low, high) with low < high")
    if clip_pixels is not None and not clip_pixels > 0:
        raise bad_value("clip_pixels", clip_pixels, "None or a positive number of 2/255 bins")


# ----- the shared loop --------------------------------------------------------------------------
VarianceFn = Callable[..., "torch.Tensor | float"]


def _reverse_loop(den: DenoiserBase, x: torch.Tensor, grid, variance: VarianceFn, eta: float,
                  clip_pixels: float | None, noise, hooks) -> torch.Tensor:
    """``x_s = a_s x0_hat + sqrt(sigma_s^2 - lambda^2) eps_hat + sqrt(var) z``; ``s = 0``: x0_hat.

    ``clip_pixels``: the step into the smallest positive grid time gets
    ``std <= clip_pixels * (2/255) * sqrt(pi/2)``, i.e. ``E|std z| <= clip_pixels`` bins (the
    sampling setting of Bao et al.'s released code, 2 bins), so no visible noise is left for the
    final denoising step.
    """
    path, hooks, noise = den.path, as_hooks(hooks), as_noise(noise)
    grid, x = check_grid(grid, path), check_x(x)
    t_last = float(grid[grid > 0].min())
    n = grid.numel() - 1
    for i in range(n):
        t, s = grid[i], grid[i + 1]
        pred = predict(den, x, t, hooks)
        if s == 0:
            x = pred.x0
        else:
            _, keep, _ = family_coefficients(path, t, s, eta)
            var = variance(pred, t, s)
            if clip_pixels is not None and float(s) == t_last:
                cap = (clip_pixels * PIXEL * math.sqrt(math.pi / 2)) ** 2
                var = var.clamp(max=cap) if torch.is_tensor(var) else min(var, cap)
            std = var.sqrt() if torch.is_tensor(var) else math.sqrt(var)
            x = float(path.alpha(s)) * pred.x0 + keep * pred.eps + std * noise.randn_like(x)
        x = after_step(hooks, i, n, t, s, x, pred)
    return x


def _need(name: str, option: str, value, how: str):
    if value is None:
        raise DifflabError(f"sampler {name!r} needs {option}=...: {how}")
    return value



# ----- Analytic-DPM -----------------------------------------------------------------------------
def _analytic(name, den, x, grid, moments, eta, data_range, clip_pixels, noise, hooks):
    _check_common(eta, data_range, clip_pixels)
    moments = _need(name, "moments", moments,
                    "difflab sample / difflab.generate estimate it from the run's training data "
                    "and cache it in the run; called directly, estimate Gamma once with "
                    "difflab.samplers.analytic.estimate_gamma(den, data, times) (or "
                    "AnalyticMoments.load(file)) and pass it")
    if not isinstance(moments, AnalyticMoments):
        raise bad_value("moments", type(moments).__name__, "an AnalyticMoments")
    path = den.path

    def variance(pred, t, s):
        return optimal_variance(path, t, s, moments.gamma_at(t, path), eta, data_range)

    return _reverse_loop(den, x, grid, variance, eta, clip_pixels, noise, hooks)


@register("analytic_ddpm", stochastic=True, order=1, needs_extra=("moments",))
def analytic_ddpm(den: DenoiserBase, x: torch.Tensor, grid, *,
                  moments: AnalyticMoments | None = None,
                  data_range: tuple[float, float] | None = None, clip_pixels: float | None = 2.0,
                  noise=None, hooks=None) -> torch.Tensor:
    """Analytic-DDPM (Bao et al. 2022a, eq. 7 and Thm. 2): DDPM's mean, the optimal variance.

    Args:
        moments: ``Gamma_t`` from :func:`estimate_gamma` at (or around) the grid's times.
        data_range: ``(a, b)`` bounding the data, for Thm. 2's tighter upper bound
            (``(-1, 1)`` for images); None uses only ``Gamma_t >= 0``.
        clip_pixels: cap on the last noisy step, in 2/255 bins (None disables).
    """
    return _analytic("analytic_ddpm", den, x, grid, moments, 1.0, data_range, clip_pixels, noise,
                     hooks)


@register("analytic_ddim", stochastic=True, order=1, needs_extra=("moments",),
          noise_when="eta > 0")
def analytic_ddim(den: DenoiserBase, x: torch.Tensor, grid, *,
                  moments: AnalyticMoments | None = None, eta: float = 0.0,
                  data_range: tuple[float, float] | None = None, clip_pixels: float | None = 2.0,
                  noise=None, hooks=None) -> torch.Tensor:
    """Analytic-DDIM (Bao et al. 2022a, Sec. 3 with ``lambda^2 = eta^2 beta_tilde``, default 0).

    DDIM's mean ``a_s x0_hat + sqrt(sigma_s^2 - lambda^2) eps_hat`` with the optimal variance
    ``lambda^2 + (a_s - sqrt(sigma_s^2 - lambda^2) a_t / sigma_t)^2 (sigma_t/a_t)^2 (1 - Gamma_t)``.
    """
    return _analytic("analytic_ddim", den, x, grid, moments, eta, data_range, clip_pixels, noise,
                     hooks)


# ----- SN-DPM / NPR-DPM -------------------------------------------------------------------------
Residual = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def residual_variance(path: GaussianPath, eta: float, data_range, head: Residual, second: bool):
    """``variance(pred, t, s)``: SN-/NPR-DPM's per-element variance of the step ``t -> s``
    (``second``: SN's ``g - eps_hat^2``, else NPR's ``h``), clipped to Thm. 2's bounds."""
    def variance(pred, t, s):
        lam2, _, c = family_coefficients(path, t, s, eta)
        lo, hi = variance_bounds(path, t, s, eta, data_range)
        out = head(pred.x_t, pred.t)
        if out.shape != pred.x_t.shape:
            raise DifflabError(
                f"the residual head returned shape {tuple(out.shape)} for x_t of shape "
                f"{tuple(pred.x_t.shape)}: expected one value per element"
            )
        cov_eps = out - pred.eps**2 if second else out
        var = lam2 + c * c * float(path.sigma_ve(t)) ** 2 * cov_eps.clamp_min(0.0)
        return var.clamp(lo, hi)

    return variance


def _residual(name, den, x, grid, residual, eta, data_range, clip_pixels, noise, hooks, second):
    _check_common(eta, data_range, clip_pixels)
    kind = "sn" if second else "npr"
    residual = _need(name, "residual", residual,
                     f"a function (x_t, t) -> E[{'eps^2' if second else '(eps - eps_hat)^2'} | x_t]"
                     f", e.g. a ResidualHead trained with ResidualLoss(head, kind={kind!r})")
    var = residual_variance(den.path, eta, data_range, residual, second)
    return _reverse_loop(den, x, grid, var, eta, clip_pixels, noise, hooks)


@register("npr_ddpm", stochastic=True, order=1, needs_extra=("residual",))
def npr_ddpm(den: DenoiserBase, x: torch.Tensor, grid, *, residual: Residual | None = None,
             eta: float = 1.0, data_range: tuple[float, float] | None = None,
             clip_pixels: float | None = 2.0, noise=None, hooks=None) -> torch.Tensor:
    """NPR-DDPM (Bao et al. 2022b, eq. 10): per-element variance from the noise residual.

    ``var = lambda^2 + c^2 (sigma_t/alpha_t)^2 h(x_t, t)`` with ``h ~ E[(eps - eps_hat)^2 | x_t]``
    (``residual``), clipped to Thm. 2's bounds; ``eta = 0`` gives NPR-DDIM.
    """
    return _residual("npr_ddpm", den, x, grid, residual, eta, data_range, clip_pixels, noise,
                     hooks, second=False)


@register("sn_ddpm", stochastic=True, order=1, needs_extra=("residual",))
def sn_ddpm(den: DenoiserBase, x: torch.Tensor, grid, *, residual: Residual | None = None,
            eta: float = 1.0, data_range: tuple[float, float] | None = None,
            clip_pixels: float | None = 2.0, noise=None, hooks=None) -> torch.Tensor:
    """SN-DDPM (Bao et al. 2022b, eq. 9): per-element variance from the squared noise.

    ``var = lambda^2 + c^2 (sigma_t/alpha_t)^2 (g(x_t, t) - eps_hat^2)`` with
    ``g ~ E[eps^2 | x_t]`` (``residual``), clipped to Thm. 2's bounds; ``eta = 0``: SN-DDIM.
    """
    return _residual("sn_ddpm", den, x, grid, residual, eta, data_range, clip_pixels, noise,
                     hooks, second=True)
