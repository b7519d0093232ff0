"""Residual heads for SN-DPM / NPR-DPM (Bao et al. 2022b, "Estimating the Optimal Covariance with
Imperfect Mean in Diffusion Probabilistic Models", ICML).

With a pretrained (frozen) noise predictor ``eps_hat``, the optimal diagonal reverse covariance
needs one more conditional moment of the noise. A second head is regressed onto it:

* NPR ("noise prediction residual", eq. 10): ``h(x_t, t) ~ E[(eps - eps_hat(x_t, t))^2 | x_t]``,
  loss ``mean_dims (h - (eps - eps_hat)^2)^2``;
* SN ("squared noise", eq. 9): ``g(x_t, t) ~ E[eps^2 | x_t]``, loss ``mean_dims (g - eps^2)^2``.

Both are plain regressions, so their minimisers are these conditional expectations. The samplers
``npr_ddpm`` / ``sn_ddpm`` (:mod:`difflab.samplers.analytic`) take the head as ``residual``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.objectives.base import check_x0, draw_noise, per_sample, prepare
from difflab.objectives.time import TimeSampler, as_time_sampler
from difflab.paths.base import GaussianPath, as_time

KINDS = ("npr", "sn")


class ResidualHead:
    """A network ``net(x_t, t_in, cond) -> Tensor`` seen as ``head(x_t, t) -> Tensor``.

    Args:
        net: the head (often the pretrained backbone with a new output layer).
        path: the forward process (for its default time signal).
        time_input: maps ``t`` to the network's time signal (default ``path.time_input``).
        cond: conditioning passed to ``net``.
    """

    def __init__(self, net: Callable[..., torch.Tensor], path: GaussianPath,
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 cond: Cond | None = None) -> None:
        self.net = net
        self.path = path
        self.time_input = time_input or path.time_input
        self.cond = cond

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = as_time(t).to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        out = self.net(x_t, self.time_input(t).to(x_t.dtype), self.cond)
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DifflabError(
                f"the residual head returned {shape} for x_t of shape {tuple(x_t.shape)}: "
                "expected a tensor with one value per element"
            )
        return out


class ResidualLoss:
    """Per-sample loss for a residual head (Bao et al. 2022b, eq. 9-10).

    ``loss(den, x0, cond=None, generator=None) -> (B,)``: draws ``t`` (the path's default time
    sampler unless given) then ``eps`` from ``generator``; ``den`` is the frozen mean model (no
    gradient flows into it), the gradient reaches only ``head``.

    Args:
        head: a :class:`ResidualHead` (or any ``(x_t, t) -> Tensor``).
        kind: ``'npr'`` (target ``(eps - eps_hat)^2``) or ``'sn'`` (target ``eps^2``).
        time_sampler: a TimeSampler, a name, or None for the path's default.
    """

    def __init__(self, head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                 kind: str = "npr", time_sampler: TimeSampler | str | None = None) -> None:
        if kind not in KINDS:
            raise bad_value("kind", kind, "'npr' (noise residual) or 'sn' (squared noise)")
        self.head = head
        self.kind = kind
        self.time_sampler = time_sampler

    def with_head(self, head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> ResidualLoss:
        """The same loss for another head (a training task binds the prepared network at
        every step; ``[objective] name = "residual"`` builds the loss without one)."""
        return ResidualLoss(head, self.kind, self.time_sampler)

    def __call__(self, den: DenoiserBase, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = check_x0(x0)
        den = prepare(den, cond)
        sampler = as_time_sampler(self.time_sampler, den.path)
        t = sampler.sample(den.path, x0.shape[0], generator).to(x0.device)
        eps = draw_noise(x0, generator)
        return self.loss_at(den, x0, t, eps)

    def loss_at(self, den: DenoiserBase, x0: torch.Tensor, t: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
        """The loss at given times and noise (no randomness)."""
        if self.head is None:
            raise DifflabError("ResidualLoss has no head: build it with one, or bind one with "
                               "loss.with_head(head)")
        x_t = den.path.add_noise(x0, eps, t)
        if self.kind == "npr":
            with torch.no_grad():
                eps_hat = den(x_t, t).eps
            target = (eps - eps_hat) ** 2
        else:
            target = eps**2
        return per_sample((self.head(x_t, t) - target) ** 2)

    def __repr__(self) -> str:
        return f"ResidualLoss(kind={self.kind!r})"
