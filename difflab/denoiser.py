"""Denoisers: ``den(x_t, t) -> Prediction``. Samplers, losses and guidance only ever see this.

``Denoiser`` wraps a network ``net(x_in, t_in, cond) -> Tensor``; ``FnDenoiser`` wraps any
function that already returns a ``Prediction`` (oracles, guidance). Both validate their inputs
once per call so that a wrong shape or time fails here with a clear message, never later as a
broadcasting error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.paths.base import GaussianPath, as_time, expand_like
from difflab.prediction import Prediction, check_kind, var_frac_from_output


def check_zero_snr(path: GaussianPath, prediction: str, precond: bool = False) -> None:
    """Refuse a parameterization that is undefined where ``alpha = 0`` (zero terminal SNR).

    At ``alpha_T = 0``, ``x_T`` holds no signal, so ``eps`` (and the score) equal ``x_T`` whatever
    the data and ``x0 = (x_t - sigma eps) / alpha`` is ``0 / 0``; EDM's preconditioning divides
    by ``alpha`` too. Lin et al. 2024 (Sec. 3.2) train with ``v`` prediction for this reason.
    """
    if not getattr(path, "zero_terminal_snr", False):
        return
    if precond:
        raise DifflabError(
            f"EDM preconditioning divides x_t by alpha, which is 0 at the last step of {path!r} "
            "(zero terminal SNR): use prediction v or x0 without precond"
        )
    if prediction in ("eps", "score"):
        raise DifflabError(
            f"prediction {prediction!r} cannot give x0 where alpha = 0 (the last step of "
            f"{path!r}, zero terminal SNR): use prediction 'v' (as SD 2 and Lin et al. 2024 do), "
            "'x0' or 'velocity'"
        )


class DenoiserBase:
    """Anything with a ``path`` that maps ``(x_t, t)`` to a :class:`Prediction`."""

    path: GaussianPath
    cond: Cond | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | float) -> Prediction:
        x_t, t = self.check_inputs(x_t, t)
        return self.predict(x_t, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:  # pragma: no cover
        raise NotImplementedError

    def bind(self, cond: Cond | None) -> DenoiserBase:
        """A copy that always passes ``cond`` to the model (conditioning is bound, not threaded)."""
        if cond is not None and not isinstance(cond, Cond):
            raise DifflabError(f"cond must be a difflab.Cond or None, got {type(cond).__name__}")
        out = copy.copy(self)
        out.cond = cond
        return out

    def check_inputs(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` as a ``(B,)`` float tensor within ``[t_min, t_max]``, matching ``x_t``."""
        if not isinstance(x_t, torch.Tensor) or x_t.ndim < 1:
            raise DifflabError("x_t must be a tensor of shape (B, ...)")
        t = as_time(t).to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise DifflabError(
                f"t has shape {tuple(t.shape)} but x_t has shape {tuple(x_t.shape)}: "
                f"expected t of shape ({x_t.shape[0]},) or a scalar"
            )
        self.path.check_time(t, "t")
        return x_t, t


@dataclass
class EDMPrecond:
    """EDM preconditioning (Karras et al. 2022, Table 1 and eq. 7) on any path.

    On a path with ``alpha != 1`` the network sees ``x_t / alpha``, whose noise level is
    ``sigma~ = sigma / alpha`` (EDM Sec. 4, "change of variables"); then
    ``D(x) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = log(sigma~) / 4``.
    """

    sigma_data: float = 0.5

    def coefficients(self, sv: torch.Tensor):
        sd2 = self.sigma_data**2
        norm = torch.sqrt(sv * sv + sd2)
        c_skip = sd2 / (sv * sv + sd2)
        c_out = sv * self.sigma_data / norm
        c_in = 1.0 / norm
        c_noise = torch.log(sv) / 4.0
        return c_skip, c_out, c_in, c_noise


def _time_dtype(x_t: torch.Tensor) -> torch.dtype:
    """The network's time input dtype: at least float32. In bfloat16 a DDPM step index above
    256 would round to a multiple of 2 to 8 (999 -> 1000), so half-precision runs keep the time
    signal in float32 and the network's time embedding casts its features to its weights."""
    return torch.promote_types(x_t.dtype, torch.float32)


class Denoiser(DenoiserBase):
    """A network seen as a denoiser.

    Args:
        net: ``net(x_in, t_in, cond) -> Tensor``.
        path: the forward process the network was trained on.
        prediction: what the network outputs: ``eps``, ``x0``, ``v``, ``score`` or ``velocity``.
        time_input: maps ``t`` to the network's time signal (default ``path.time_input``).
        precond: optional :class:`EDMPrecond`; the network output is then EDM's ``F``.
        learned_variance: the network outputs twice the channels; the second half is improved
            DDPM's variance interpolation ``v`` (eq. 15).
        check_finite: raise on non-finite outputs (one reduction per call).
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        path: GaussianPath,
        prediction: str = "eps",
        time_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        precond: EDMPrecond | None = None,
        learned_variance: bool = False,
        cond: Cond | None = None,
        check_finite: bool = True,
    ) -> None:
        self.net = net
        self.path = path
        self.prediction = check_kind(prediction)
        check_zero_snr(path, self.prediction, precond is not None)
        self.time_input = time_input or path.time_input
        self.precond = precond
        self.learned_variance = learned_variance
        self.cond = cond
        self.check_finite = check_finite

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        if self.precond is not None:
            alpha = expand_like(self.path.alpha(t), x_t)
            sv = self.path.sigma_ve(t)
            c_skip, c_out, c_in, c_noise = self.precond.coefficients(sv)
            x_scaled = x_t / alpha
            out = self.net(expand_like(c_in, x_t) * x_scaled, c_noise.to(_time_dtype(x_t)),
                           self.cond)
            out, var_frac = self._split(out, x_t, t)
            x0 = expand_like(c_skip, x_t) * x_scaled + expand_like(c_out, x_t) * out
            return Prediction.from_x0(x0, x_t, t, self.path, var_frac)
        out = self.net(x_t, self.time_input(t).to(_time_dtype(x_t)), self.cond)
        out, var_frac = self._split(out, x_t, t)
        return Prediction.from_output(self.prediction, out, x_t, t, self.path, var_frac)

    def _split(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        if not isinstance(out, torch.Tensor):
            raise DifflabError(f"the network returned {type(out).__name__}, expected a Tensor")
        if self.check_finite and not bool(torch.isfinite(out).all()):
            raise DifflabError(
                f"the network returned non-finite values at t in [{float(t.min()):.4g}, "
                f"{float(t.max()):.4g}]: check the inputs, the learning rate, or use "
                "mixed precision with loss scaling"
            )
        if not self.learned_variance:
            return out, None
        c = x_t.shape[1]
        if out.shape[1] != 2 * c:
            raise DifflabError(
                f"learned_variance=True expects {2 * c} output channels (mean and variance), "
                f"got {out.shape[1]}"
            )
        mean, raw = out[:, :c], out[:, c:]
        return mean, var_frac_from_output(raw)

    def __repr__(self) -> str:
        return f"Denoiser({type(self.net).__name__}, {self.path!r}, prediction={self.prediction!r})"


class FnDenoiser(DenoiserBase):
    """A denoiser given by ``fn(x_t, t, cond) -> Prediction`` (oracles, guidance transforms)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, Cond | None], Prediction],
                 path: GaussianPath, cond: Cond | None = None) -> None:
        self.fn = fn
        self.path = path
        self.cond = cond

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        return self.fn(x_t, t, self.cond)
