"""Classifier-free, classifier and energy guidance, and guidance intervals."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import expand_like
from difflab.prediction import Prediction


class Guided(DenoiserBase):
    """A guided denoiser: ``predict`` combines model calls; ``base`` is the unguided one."""

    def __init__(self, base: DenoiserBase, fn: Callable[[torch.Tensor, torch.Tensor], Prediction],
                 name: str) -> None:
        self.base = base
        self.path = base.path
        self.fn = fn
        self.name = name
        self.learned_variance = getattr(base, "learned_variance", False)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        return self.fn(x_t, t)

    def bind(self, cond: Cond | None) -> DenoiserBase:
        raise DifflabError(
            f"{self.name} guidance already has its conditions bound; bind the model before "
            "guiding it"
        )

    def __repr__(self) -> str:
        return f"Guided({self.name}, base={self.base!r})"


def _check_scale(scale: float) -> float:
    if not isinstance(scale, int | float) or scale != scale:
        raise bad_value("scale", scale, "a finite number")
    return float(scale)


def cfg(den: DenoiserBase, cond: Cond, null_cond: Cond, scale: float,
        rescale: float = 0.0) -> Guided:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6).

    ``x0 = x0_u + s (x0_c - x0_u)`` and the same for ``eps``: both are affine in the network
    output at fixed ``(x_t, t)`` and the weights sum to one, so ``x_t = alpha x0 + sigma eps``
    still holds and the combination is exact in every parameterization. Conditional and
    unconditional halves run in one batched call. ``null_cond`` is the empty condition (null
    class, empty prompt) or a negative prompt; control branches of ``cond`` (ControlNet) apply
    to the unconditional half too unless ``null_cond`` has its own. ``rescale`` in ``[0, 1]``
    is the guidance rescale of Lin et al. 2024 (Sec. 3.4, eq. 15-16), applied to the clean-data
    estimate: the guided ``x0`` is scaled to the conditional one's per-sample standard
    deviation and mixed in with weight ``rescale``.
    """
    scale = _check_scale(scale)
    if not 0.0 <= rescale <= 1.0:
        raise bad_value("rescale", rescale, "a number in [0, 1]")
    if cond is None or null_cond is None:
        raise DifflabError("cfg needs both cond and null_cond (use the null class / empty prompt)")
    if cond.control and not null_cond.control:  # the control applies to both halves
        null_cond = dataclasses.replace(null_cond, control=cond.control)
    both = Cond.cat([cond, null_cond])
    pair = den.bind(both)
    conditional = den.bind(cond)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        n = x_t.shape[0]
        p = pair(torch.cat([x_t, x_t]), torch.cat([t, t]))
        x0_c, x0_u = p.x0[:n], p.x0[n:]
        eps_c, eps_u = p.eps[:n], p.eps[n:]
        x0 = x0_u + scale * (x0_c - x0_u)
        eps = eps_u + scale * (eps_c - eps_u)
        var_frac = None if p.var_frac is None else p.var_frac[:n]
        out = Prediction(x_t=x_t, t=t, x0=x0, eps=eps, path=den.path, var_frac=var_frac)
        if rescale > 0:
            dims = tuple(range(1, x_t.ndim))
            ratio = x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp_min(
                1e-12)
            out = out.with_x0(rescale * x0 * ratio + (1 - rescale) * x0)
        return out

    return Guided(conditional, fn, f"cfg(scale={scale:g})")


def energy(den: DenoiserBase, energy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           scale: float, on: str = "x0") -> Guided:
    """Guidance by the gradient of a differentiable energy (lower = preferred).

    The score becomes ``score - s grad_{x_t} E``, i.e. ``eps <- eps + sigma s grad_{x_t} E``.
    ``on="xt"`` evaluates ``E(x_t, t)`` directly (classifier guidance, Dhariwal & Nichol 2021,
    Alg. 1/2); ``on="x0"`` evaluates ``E(x0_hat(x_t), t)`` and differentiates through the
    denoiser (reconstruction / universal guidance: Chung et al. 2023; Bansal et al. 2023;
    semantic guidance: Liu et al. 2023). ``energy_fn`` returns one value per sample ``(B,)``.
    """
    scale = _check_scale(scale)
    if on not in ("x0", "xt"):
        raise bad_value("on", on, "'x0' or 'xt'")

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            if on == "x0":
                pred = den(x, t)
                e = energy_fn(pred.x0, t)
            else:
                pred = None
                e = energy_fn(x, t)
            if e.shape != (x_t.shape[0],):
                raise DifflabError(
                    f"energy_fn returned shape {tuple(e.shape)}: expected one value per sample "
                    f"({x_t.shape[0]},)"
                )
            (grad,) = torch.autograd.grad(e.sum(), x)
        if pred is None:
            pred = den(x_t, t)
        sigma = expand_like(den.path.sigma(t), x_t)
        eps = pred.eps.detach() + sigma * scale * grad
        base = Prediction(x_t=x_t, t=t, x0=pred.x0.detach(), eps=pred.eps.detach(),
                          path=den.path, var_frac=pred.var_frac)
        return base.with_eps(eps)

    return Guided(den, fn, f"energy(scale={scale:g}, on={on})")


def classifier(den: DenoiserBase, log_prob_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               scale: float) -> Guided:
    """Classifier guidance (Dhariwal & Nichol 2021, Sec. 4): ``score + s grad log p(y | x_t)``.

    ``log_prob_fn(x_t, t) -> (B,)`` is the noise-aware classifier's log-probability of the
    requested classes. With ``s = 1``, an exact classifier and the exact unconditional denoiser
    this is exactly the conditional denoiser (Bayes' rule). It is :func:`energy` on ``x_t`` with
    ``E = -log p(y | x_t)``.
    """
    return energy(den, lambda x, t: -log_prob_fn(x, t), scale, on="xt")


def interval(g: Guided, t_lo: float, t_hi: float) -> Guided:
    """Apply guidance only for ``t`` in ``[t_lo, t_hi]`` (Kynkaanniemi et al. 2024).

    Outside the interval the unguided conditional denoiser ``g.base`` is used (one model call
    instead of two for CFG).
    """
    if not isinstance(g, Guided):
        raise DifflabError(f"interval needs a guided denoiser (cfg, classifier, energy), got {g!r}")
    if not t_lo < t_hi:
        raise DifflabError(f"interval needs t_lo < t_hi, got t_lo={t_lo}, t_hi={t_hi}")

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        inside = (t >= t_lo) & (t <= t_hi)
        if bool(inside.all()):
            return g.predict(x_t, t)
        if not bool(inside.any()):
            return g.base(x_t, t)
        pg, pb = g.predict(x_t, t), g.base(x_t, t)
        m = expand_like(inside.to(x_t.dtype), x_t) > 0
        return Prediction(x_t=x_t, t=t, x0=torch.where(m, pg.x0, pb.x0),
                          eps=torch.where(m, pg.eps, pb.eps), path=g.path)

    return Guided(g.base, fn, f"interval({g.name}, [{t_lo:g}, {t_hi:g}])")
