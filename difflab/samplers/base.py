"""What every sampler shares: grid validation, hooks, the registry.

A sampler is a function ``fn(den, x_init, grid, *, noise=None, hooks=None, **options)`` that owns
its loop; this module only provides the pieces around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.paths.base import GaussianPath
from difflab.prediction import Prediction


@dataclass
class StepInfo:
    """What ``hooks.callback`` receives after each step."""

    index: int
    total: int
    t: float
    t_next: float
    x: torch.Tensor
    x0: torch.Tensor


@dataclass
class Hooks:
    """Optional interventions in the sampling loop.

    Attributes:
        correct_x0: ``(x0, t) -> x0`` applied to every clean-data estimate (thresholding,
            known pixels); ``eps`` is recomputed from it.
        correct_xt: ``(x, t) -> x`` applied to the state after each step (RePaint replacement).
        callback: ``(StepInfo) -> None`` after each step (progress bars, previews).
        for_batch: ``(lo, hi, noise) -> Hooks`` for hooks that depend on which samples a batch
            holds (an inpainting mask per image, the known pixels' noise drawn from each
            sample's own stream). :func:`difflab.sampling.draw` calls it once per batch of
            samples ``lo:hi`` with that batch's noise; the samplers themselves never read it.
    """

    correct_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    correct_xt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    callback: Callable[[StepInfo], None] | None = None
    for_batch: Callable[..., Hooks] | None = None


NO_HOOKS = Hooks()


def as_hooks(hooks: Hooks | None) -> Hooks:
    if hooks is None:
        return NO_HOOKS
    if not isinstance(hooks, Hooks):
        raise DifflabError(f"hooks must be a difflab.samplers.Hooks, got {type(hooks).__name__}")
    return hooks


def predict(den: DenoiserBase, x: torch.Tensor, t: torch.Tensor, hooks: Hooks) -> Prediction:
    """Call the denoiser at ``(x, t)`` and apply ``correct_x0``."""
    pred = den(x, t)
    if hooks.correct_x0 is not None:
        pred = pred.with_x0(hooks.correct_x0(pred.x0, pred.t))
    return pred


def after_step(hooks: Hooks, i: int, total: int, t, t_next, x: torch.Tensor,
               pred: Prediction) -> torch.Tensor:
    """Apply ``correct_xt`` and the callback after step ``i``."""
    if hooks.correct_xt is not None and float(t_next) > 0:
        x = hooks.correct_xt(x, torch.as_tensor(t_next, dtype=torch.float64))
    if hooks.callback is not None:
        hooks.callback(StepInfo(i, total, float(t), float(t_next), x, pred.x0))
    return x


def check_grid(grid, path: GaussianPath) -> torch.Tensor:
    """Validate a time grid: 1-D, >= 2 entries, strictly descending, inside the path's range.

    The last entry may be exactly 0 (the data end). Returns a float64 CPU tensor.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise DifflabError(
            f"grid has shape {tuple(grid.shape)}: expected a 1-D tensor of at least 2 times "
            "(see difflab.samplers.timesteps)"
        )
    if not bool(torch.isfinite(grid).all()):
        raise bad_value("grid", grid.tolist(), "finite times")
    diffs = grid[1:] - grid[:-1]
    if not bool((diffs < 0).all()):
        i = int(torch.nonzero(diffs >= 0)[0])
        raise DifflabError(
            f"grid is not strictly descending: grid[{i}]={float(grid[i]):.6g} is followed by "
            f"{float(grid[i + 1]):.6g}; expected times from t_max down to the data"
        )
    path.check_time(grid[:-1], "grid")
    path.check_time(grid[-1:], "grid", allow_zero=True)
    return grid


def check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise DifflabError(
            "x_init must be a floating-point tensor of shape (B, ...) with a batch dimension"
        )
    return x


# ----- the registry ------------------------------------------------------------------------------
@dataclass
class SamplerSpec:
    """A registered sampler and what it needs."""

    name: str
    fn: Callable[..., torch.Tensor]
    stochastic: bool
    order: int
    needs_learned_variance: bool = False
    evals_per_step: int = 1
    needs_extra: tuple[str, ...] = ()
    noise_when: str = ""
    """For a sampler that draws noise only for some option values (DDIM's ``eta``, EDM Heun's
    ``S_churn``), the condition, e.g. ``"eta > 0"``; its defaults are then deterministic."""
    zero_snr_native: bool = False
    """Whether the sampler itself steps from ``alpha = 0`` (zero terminal SNR); otherwise
    :func:`sample` takes that first step for it (see ``_from_zero_snr``)."""

    def describe_noise(self) -> str:
        """``stochastic``, ``deterministic`` or ``deterministic (stochastic when eta > 0)``."""
        if not self.stochastic:
            return "deterministic"
        return f"deterministic (stochastic when {self.noise_when})" if self.noise_when \
            else "stochastic"

    def options(self) -> list[str]:
        params = inspect.signature(self.fn).parameters
        return [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]


SAMPLERS: dict[str, SamplerSpec] = {}


def register(name: str, *, stochastic: bool, order: int, needs_learned_variance: bool = False,
             evals_per_step: int = 1, needs_extra: tuple[str, ...] = (), noise_when: str = "",
             zero_snr_native: bool = False):
    """Decorator: add a sampler to the registry under ``name``.

    ``needs_extra`` names keyword options the sampler cannot run without (Analytic-DPM's
    ``moments``, NPR-DDPM's ``residual``), so generic callers know to supply them.
    ``noise_when`` says which option values make a ``stochastic`` sampler draw noise when its
    defaults do not (``"eta > 0"``).
    """

    def deco(fn):
        if name in SAMPLERS:
            raise DifflabError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = SamplerSpec(name, fn, stochastic, order, needs_learned_variance,
                                     evals_per_step, tuple(needs_extra), noise_when,
                                     zero_snr_native)
        return fn

    return deco


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by name."""
    if name not in SAMPLERS:
        raise bad_value("sampler", name, "one of " + ", ".join(sorted(SAMPLERS))
                        + " (`difflab samplers` describes each)")
    return SAMPLERS[name]


def sample(name: str, den: DenoiserBase, x_init: torch.Tensor, grid, **kwargs) -> torch.Tensor:
    """Run the sampler registered as ``name``; unknown options are rejected by name."""
    spec = get_sampler(name)
    allowed = set(spec.options())
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise DifflabError(
            f"sampler {name!r} got unknown option(s) {unknown}: accepted are {sorted(allowed)}"
        )
    for key, value in kwargs.items():
        _check_option_type(spec, key, value)
    if not spec.zero_snr_native and _starts_at_zero_snr(den, grid):
        return _from_zero_snr(spec, den, x_init, grid, kwargs)
    return spec.fn(den, x_init, grid, **kwargs)


def _starts_at_zero_snr(den: DenoiserBase, grid) -> bool:
    path = getattr(den, "path", None)
    if path is None or not isinstance(grid, torch.Tensor | list | tuple):
        return False
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    return g.ndim == 1 and g.numel() >= 2 and float(path.alpha(g[:1])) == 0.0


def _from_zero_snr(spec: SamplerSpec, den: DenoiserBase, x: torch.Tensor, grid, kwargs: dict
                   ) -> torch.Tensor:
    """The first step of a grid that starts at ``alpha = 0`` (zero terminal SNR), then the
    sampler on the rest of the grid.

    At ``alpha_T = 0`` log-SNR is ``-inf``, so noise-space solvers (``sigma / alpha``), SDE drifts
    and multistep ratios of log-SNR steps are undefined there (the NaN peers report). This step
    is every exponential integrator's first-order step in the limit ``lambda_T -> -inf``:
    ``x_s = alpha_s x0_hat(x_T) + sigma_s x_T`` (DDIM eq. 12, where ``eps_hat = x_T`` because
    ``x_T`` carries no signal). It is also exact for stochastic samplers: the posterior
    ``q(x_s | x_T, x0)`` is ``N(alpha_s x0, sigma_s^2 I)`` and ``x_T`` is itself a fresh standard
    normal independent of everything before it.
    """
    path, hooks = den.path, as_hooks(kwargs.get("hooks"))
    grid, x = check_grid(grid, path), check_x(x)
    t, s = grid[0], grid[1]
    pred = predict(den, x, t, hooks)
    if float(s) == 0.0:
        x = pred.x0
    else:
        x = float(path.alpha(s)) * pred.x0 + float(path.sigma(s)) * pred.eps
    x = after_step(hooks, 0, grid.numel() - 1, t, s, x, pred)
    if grid.numel() == 2:
        return x
    return spec.fn(den, x, grid[1:], **kwargs)


_KINDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}


def _option_kind(param: inspect.Parameter) -> tuple[str, bool] | None:
    """``(kind, None allowed)`` of a plain option from its annotation or its default."""
    ann = param.annotation
    if ann is not inspect.Parameter.empty:
        text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        parts = [t.strip() for t in text.split("|")]
        plain = [t for t in parts if t != "None"]
        if len(plain) == 1 and plain[0] in _KINDS:
            return plain[0], "None" in parts
        return None
    default = param.default
    for kind in ("bool", "int", "float", "str"):  # bool before int: True is an int
        if type(default).__name__ == kind:
            return kind, False
    return None


def _check_option_type(spec: SamplerSpec, key: str, value) -> None:
    """A plain option (number, flag, name) of the wrong type is named before the sampler runs
    (``--option eta=abc`` would otherwise fail deep inside the loop)."""
    param = inspect.signature(spec.fn).parameters.get(key)
    found = None if param is None else _option_kind(param)
    if found is None:
        return
    kind, nullable = found
    if value is None and nullable:
        return
    ok = {"float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    if not ok:
        raise bad_value(key, value, f"{_KINDS[kind]} (option of sampler {spec.name!r})")
