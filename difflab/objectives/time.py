"""Time samplers: where along the forward process each training example is noised.

A sampler is an object with ``sample(path, n, generator) -> (n,)`` float64 times in
``[path.t_min, path.t_max]``, drawn only from ``generator`` (the global RNG when None), on the
generator's device. Samplers know nothing about the network or the loss.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from difflab.errors import DifflabError, bad_value
from difflab.objectives.base import generator_device
from difflab.paths.base import GaussianPath


def _check_n(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad_value("n", n, "a positive int (the number of times to draw)")
    return n


def discrete_steps(path: GaussianPath) -> int:
    """The number of steps ``N`` of a discrete path (one with ``N`` and ``step_time``)."""
    n_steps = getattr(path, "N", None)
    if not isinstance(n_steps, int) or not hasattr(path, "step_time"):
        raise DifflabError(
            f"{path!r} is a continuous path but a discrete time sampler was asked for: use "
            "UniformTime / LogNormalTime ('uniform' / 'lognormal'), or a discrete path such as "
            "VP.discrete_linear(N)"
        )
    return n_steps


class TimeSampler(ABC):
    """Draws training times for a path."""

    name: str = "time"

    @abstractmethod
    def sample(self, path: GaussianPath, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` float64 times in ``[path.t_min, path.t_max]``."""


@dataclass(frozen=True)
class DiscreteUniformTime(TimeSampler):
    """DDPM's ``t ~ Uniform({1, ..., T})`` (Ho et al. 2020, Algorithm 1).

    On a discrete path step ``n`` (0-based) sits at the knot ``t_n = (n + 1) / N``; ``n`` is drawn
    uniformly from ``0..N-1``. Raises on continuous paths.
    """

    name = "discrete"

    def sample_steps(self, path: GaussianPath, n: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The integer steps ``n`` (int64) behind :meth:`sample`."""
        n_steps = discrete_steps(path)
        return torch.randint(0, n_steps, (_check_n(n),), generator=generator,
                             device=generator_device(generator))

    def sample(self, path: GaussianPath, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        steps = self.sample_steps(path, n, generator)
        return path.step_time(steps).to(steps.device)


def _range(path: GaussianPath, t_min: float | None, t_max: float | None) -> tuple[float, float]:
    lo = path.t_min if t_min is None else float(t_min)
    hi = path.t_max if t_max is None else float(t_max)
    tol = 1e-12 * max(1.0, abs(path.t_max))
    if not path.t_min - tol <= lo < hi <= path.t_max + tol:
        raise DifflabError(
            f"time range [t_min={lo:g}, t_max={hi:g}] is not valid for {path!r}: expected "
            f"path.t_min={path.t_min:g} <= t_min < t_max <= path.t_max={path.t_max:g}"
        )
    return lo, hi


@dataclass(frozen=True)
class UniformTime(TimeSampler):
    """``t ~ Uniform[t_min, t_max]`` (continuous-time training: Song et al. 2021, eq. 7;
    flow matching, Lipman et al. 2023, eq. 9). ``None`` means the path's own end."""

    t_min: float | None = None
    t_max: float | None = None
    name = "uniform"

    def sample(self, path: GaussianPath, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = _range(path, self.t_min, self.t_max)
        u = torch.rand(_check_n(n), generator=generator, dtype=torch.float64,
                       device=generator_device(generator))
        return lo + (hi - lo) * u


@dataclass(frozen=True)
class LogNormalTime(TimeSampler):
    """EDM's noise distribution ``ln sigma~ ~ N(P_mean, P_std^2)`` (Karras et al. 2022, Table 1).

    ``sigma~ = sigma / alpha`` is the noise level of ``x_t / alpha`` (EDM Sec. 4), so the same
    distribution of noise levels is used on any path: ``t = path.t_from_sigma_ve(sigma~)``,
    clamped to ``[t_min, t_max]``.
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    name = "lognormal"

    def __post_init__(self) -> None:
        if not math.isfinite(self.p_mean):
            raise bad_value("p_mean", self.p_mean, "a finite number")
        if not (math.isfinite(self.p_std) and self.p_std > 0):
            raise bad_value("p_std", self.p_std, "a positive number")

    def sample(self, path: GaussianPath, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(_check_n(n), generator=generator, dtype=torch.float64,
                        device=generator_device(generator))
        sigma_ve = torch.exp(self.p_mean + self.p_std * z)
        t = path.t_from_sigma_ve(sigma_ve).double()
        return t.clamp(path.t_min, path.t_max)


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    "discrete": DiscreteUniformTime,
    "uniform": UniformTime,
    "lognormal": LogNormalTime,
}


def default_time_sampler(path: GaussianPath) -> TimeSampler:
    """DiscreteUniformTime on discrete paths, UniformTime otherwise."""
    is_discrete = isinstance(getattr(path, "N", None), int) and hasattr(path, "step_time")
    return DiscreteUniformTime() if is_discrete else UniformTime()


def build_time_sampler(name: str, **params) -> TimeSampler:
    """A time sampler by name: ``discrete``, ``uniform`` (t_min, t_max), ``lognormal`` (p_mean,
    p_std). Parameters that the chosen sampler does not take are rejected by name."""
    if name not in TIME_SAMPLERS:
        raise bad_value("time_sampler", name,
                        "one of " + ", ".join(repr(k) for k in TIME_SAMPLERS))
    cls = TIME_SAMPLERS[name]
    accepted = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DifflabError(
            f"time_sampler={name!r} does not take {unknown}: accepted are "
            f"{accepted or 'no parameters'}"
        )
    return cls(**params)


def as_time_sampler(sampler: TimeSampler | str | None, path: GaussianPath) -> TimeSampler:
    """Resolve ``None`` (the path's default), a name, or a sampler object."""
    if sampler is None:
        return default_time_sampler(path)
    if isinstance(sampler, str):
        return build_time_sampler(sampler)
    if not hasattr(sampler, "sample"):
        raise bad_value("time_sampler", sampler,
                        "None, a name (" + ", ".join(TIME_SAMPLERS) + ") or a TimeSampler")
    return sampler


def optional_time_sampler(name: str | None, **params) -> TimeSampler | None:
    """Build a named time sampler from the options that were given (None = not given)."""
    given = {k: v for k, v in params.items() if v is not None}
    if name is None:
        if given:
            raise DifflabError(
                f"time-sampler options {sorted(given)} were given without time_sampler: name "
                "one of " + ", ".join(repr(k) for k in TIME_SAMPLERS)
            )
        return None
    return build_time_sampler(name, **given)
