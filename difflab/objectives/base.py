"""What every objective shares: the call signature, input checks and the random draws.

An objective is any callable

    objective(den, x0, cond=None, generator=None) -> Tensor of shape (B,)

returning one loss per sample, differentiable with respect to the network behind ``den``. The
trainer reduces it (mean, or a weighted mean for importance sampling). ``generator`` is the only
source of randomness: times are drawn from it first (float64), then the noise (in ``x0``'s dtype),
so a seeded generator reproduces a loss exactly.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value

REDUCTIONS = ("mean", "sum")


@runtime_checkable
class Objective(Protocol):
    """The contract the trainer relies on."""

    def __call__(self, den: DenoiserBase, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample losses ``(B,)``."""
        ...  # pragma: no cover


def check_x0(x0: torch.Tensor) -> torch.Tensor:
    """Validate a clean-data batch: a floating-point tensor ``(B, ...)`` with ``B >= 1``."""
    if not isinstance(x0, torch.Tensor):
        raise DifflabError(f"x0 must be a torch.Tensor of shape (B, ...), got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise DifflabError(
            f"x0 has dtype {x0.dtype}: expected a floating-point tensor (convert integer images "
            "with x.float() / 127.5 - 1, or use difflab.data's transforms)"
        )
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise DifflabError(f"x0 has shape {tuple(x0.shape)}: expected (B, ...) with B >= 1")
    return x0


def prepare(den: DenoiserBase, cond: Cond | None) -> DenoiserBase:
    """Check ``den`` and bind ``cond`` to it (conditioning is bound, not threaded)."""
    if not isinstance(den, DenoiserBase):
        raise DifflabError(
            f"den must be a difflab.DenoiserBase (e.g. Denoiser(net, path)), got "
            f"{type(den).__name__}"
        )
    return den if cond is None else den.bind(cond)


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where a generator draws (the CPU for the global RNG)."""
    return torch.device("cpu") if generator is None else generator.device


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``eps ~ N(0, I)`` shaped like ``x0``, in its dtype, on its device."""
    if generator is None:
        return torch.randn(x0.shape, dtype=x0.dtype, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=generator.device)
    return eps.to(x0.device)


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise bad_value("reduce", reduce, "one of " + ", ".join(repr(r) for r in REDUCTIONS))
    return reduce


def per_sample(x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Reduce ``(B, ...)`` to ``(B,)`` over the data dimensions."""
    flat = x.reshape(x.shape[0], -1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)
