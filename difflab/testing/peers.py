"""Run peer libraries' samplers on a difflab denoiser, in float64, for cross-checks.

Two peers implement many of the samplers difflab has: diffusers' schedulers and
k-diffusion's sampling functions. The drivers here feed either one a difflab
:class:`~difflab.denoiser.DenoiserBase` (typically the exact oracle of
:class:`difflab.testing.GaussianMixture`), so a difflab sampler and its peer can be compared on
the same problem, on the same grid (``tests/interop/test_peer_samplers.py``; the benchmarks
use them too):

* :func:`run_diffusers` runs a configured diffusers scheduler (its ``set_timesteps`` /
  ``scale_model_input`` / ``step`` loop, as a pipeline does) with the network output its
  ``prediction_type`` asks for; :func:`difflab_path_for` gives the difflab path with the
  scheduler's betas and :func:`difflab_grid_for` the difflab grid of its steps.
* :func:`run_k_diffusion` runs a k-diffusion sampling function with the denoiser as
  k-diffusion's model ``D(x~; sigma~)``; :func:`difflab_grid_for_sigmas` maps its sigmas to a
  difflab grid. :func:`load_k_diffusion_sampling` loads k-diffusion's ``sampling.py`` alone.

**Float64.** diffusers keeps its schedule in float32 and casts the sample to float32 inside
some ``step`` methods, which caps an agreement at ~1e-7. :func:`run_diffusers` therefore
builds a fresh scheduler from the given one's config and runs its construction,
``set_timesteps`` and every ``step`` with the scheduler module's ``torch.float32`` /
``np.float32`` names pointing at float64 (and float64 as torch's default dtype): the peer's
own arithmetic, in double precision. That temporarily rebinds two globals of the scheduler's
module (restored afterwards), so do not run diffusers concurrently in other threads meanwhile.

**Noise levels.** Both peers and difflab's samplers see a grid point only through its noise
level ``rho = sigma / alpha`` (EDM's ``sigma~``, diffusers' ``sigmas``, k-diffusion's
``sigma``), so the map between them is ``t = path.t_from_sigma_ve(rho)``. On a
:class:`~difflab.paths.vp.DiscreteVP` path difflab's step ``n`` sits at ``t = (n + 1) / N``
(diffusers' integer ``timestep`` n); times within 1e-9 steps of such a knot are put exactly on
it, so a scheduler's integer timesteps map to difflab's knots without rounding noise.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError
from difflab.paths.base import GaussianPath
from difflab.paths.vp import VP, DiscreteVP
from difflab.prediction import Prediction

K_DIFFUSION_PIN = "k-diffusion==0.1.1.post1"
K_DIFFUSION_INSTALL = f"pip install --no-deps {K_DIFFUSION_PIN}"

# diffusers' prediction_type -> difflab's parameterization name
PREDICTION_KINDS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

__all__ = [
    "K_DIFFUSION_INSTALL",
    "difflab_grid_for",
    "difflab_grid_for_sigmas",
    "difflab_path_for",
    "float64_scheduler",
    "k_diffusion_model",
    "load_k_diffusion_sampling",
    "run_diffusers",
    "run_k_diffusion",
    "time_of_rho",
]


# ----- noise levels and times --------------------------------------------------------------------
def time_of_rho(path: GaussianPath, rho) -> torch.Tensor:
    """The path times (float64) whose noise level ``sigma / alpha`` is ``rho``; ``rho = 0`` is
    ``t = 0`` (the data). On a discrete path, times within 1e-9 steps of a knot ``(n + 1) / N``
    are put on the knot."""
    rho = torch.as_tensor(rho, dtype=torch.float64).detach().cpu()
    zero = rho == 0
    t = path.t_from_sigma_ve(torch.where(zero, torch.ones_like(rho), rho))
    if isinstance(path, DiscreteVP):
        steps = t * path.N
        knot = torch.round(steps)
        t = torch.where((steps - knot).abs() < 1e-9, knot / path.N, t)
    return torch.where(zero, torch.zeros_like(t), t)


# ----- diffusers ---------------------------------------------------------------------------------
class _Float64Names(types.ModuleType):
    """A stand-in for a module (``torch`` or ``numpy``) whose ``float32`` is ``float64``."""

    def __init__(self, base: types.ModuleType, float64) -> None:
        super().__init__(base.__name__)
        self._base, self._float64 = base, float64

    def __getattr__(self, name: str):
        if name == "float32":
            return self._float64
        return getattr(self._base, name)


def _scheduler_modules(cls: type) -> list[types.ModuleType]:
    """The modules defining ``cls`` and its bases, inside diffusers."""
    mods = []
    for klass in cls.__mro__:
        mod = sys.modules.get(klass.__module__)
        if mod is not None and klass.__module__.startswith("diffusers") and mod not in mods:
            mods.append(mod)
    return mods


@contextlib.contextmanager
def _in_float64(cls: type) -> Iterator[None]:
    """Run diffusers scheduler code of class ``cls`` in float64 (see the module docstring)."""
    saved = []
    for mod in _scheduler_modules(cls):
        for name, stand_in in (("torch", _Float64Names(torch, torch.float64)),
                               ("np", _Float64Names(np, np.float64))):
            if name in vars(mod):
                saved.append((mod, name, vars(mod)[name]))
                setattr(mod, name, stand_in)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


_FLOAT64_COPIES: dict = {}  # (class, config) -> a float64 scheduler, copied on each use
_CACHED_COPIES = 32


def float64_scheduler(scheduler):
    """A fresh copy of a diffusers scheduler, built from its config in float64 (its betas,
    ``alphas_cumprod`` and derived tables are float64). The given scheduler is not changed.
    Construction can be slow (KDPM2's builds 1000-step tables), so the last few float64 builds
    are kept and deep-copied."""
    cls = type(scheduler)
    config = {k: v for k, v in dict(scheduler.config).items()
              if not k.startswith("_") and k != "solver_p"}
    solver_p = getattr(scheduler, "solver_p", None)  # UniPC's optional predictor scheduler
    key = None if solver_p is not None else (cls, repr(sorted(config.items())))
    if key is not None and key in _FLOAT64_COPIES:
        return copy.deepcopy(_FLOAT64_COPIES[key])
    extra = {} if solver_p is None else {"solver_p": float64_scheduler(solver_p)}
    with _in_float64(cls):
        built = cls.from_config(copy.deepcopy(config), **extra)
    if key is not None:
        if len(_FLOAT64_COPIES) >= _CACHED_COPIES:
            _FLOAT64_COPIES.pop(next(iter(_FLOAT64_COPIES)))
        _FLOAT64_COPIES[key] = copy.deepcopy(built)
    return built


def difflab_path_for(scheduler) -> DiscreteVP:
    """The difflab path of a diffusers scheduler: ``VP.discrete`` with its betas (computed in
    float64), so ``path.alphas_cumprod`` is the scheduler's ``alphas_cumprod``."""
    sched = float64_scheduler(scheduler)
    betas = getattr(sched, "betas", None)
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1:
        raise DifflabError(f"{type(sched).__name__} has no betas (a sigma- or flow-schedule "
                           "scheduler): pick the difflab path yourself (e.g. EDM())")
    return VP.discrete(betas.to(torch.float64))


def _abar_rho(abar) -> float:
    """``rho = sqrt((1 - abar) / abar)`` of an ``alpha_cumprod`` (0 at ``abar = 1``)."""
    abar = float(abar)
    return math.sqrt((1.0 - abar) / abar) if abar < 1.0 else 0.0


def _timestep_rho(sched, timestep) -> torch.Tensor:
    if not hasattr(sched, "alphas_cumprod"):
        raise DifflabError(f"{type(sched).__name__} has neither sigmas nor alphas_cumprod: "
                           "run_diffusers cannot tell its noise levels")
    abar = sched.alphas_cumprod.to(torch.float64)[int(timestep)]
    return torch.sqrt((1.0 - abar) / abar)


def _has_sigmas(sched) -> bool:
    sigmas = getattr(sched, "sigmas", None)
    return isinstance(sigmas, torch.Tensor) and sigmas.numel() >= 2


def _last_rho(sched) -> float:
    """The noise level a float64 scheduler (after ``set_timesteps``) ends at."""
    if _has_sigmas(sched):
        return float(sched.sigmas[-1])
    return _abar_rho(sched.final_alpha_cumprod)  # DDIM, PNDM: alpha_cumprod of the last step


def _grid_rhos(sched) -> torch.Tensor:
    """The noise levels of a float64 scheduler's steps (after ``set_timesteps``), last one
    included, each once (Heun-type schedulers repeat theirs)."""
    if _has_sigmas(sched):
        return torch.unique_consecutive(sched.sigmas.to(torch.float64))
    plms = getattr(sched, "_timesteps", None)  # PNDM: its PRK stages sit between these
    ts = sorted({int(t) for t in plms}, reverse=True) if plms is not None else \
        [int(t) for t in sched.timesteps]
    jump = sched.config.num_train_timesteps // sched.num_inference_steps
    for a, b in zip(ts, ts[1:]):
        if a - jump != b:
            raise DifflabError(
                f"{type(sched).__name__} steps from timestep {a} to {a - jump}, not to its next "
                f"timestep {b}: no difflab grid follows it (use timestep_spacing='leading', "
                "or 'trailing' with a step count that divides num_train_timesteps)")
    rhos = [float(_timestep_rho(sched, t)) for t in ts] + [_last_rho(sched)]
    # set_alpha_to_one=False after timestep 0: a last step of length 0 (it returns its input)
    return torch.unique_consecutive(torch.tensor(rhos, dtype=torch.float64))


def difflab_grid_for(scheduler, path: GaussianPath, steps: int) -> torch.Tensor:
    """The difflab grid through the points a diffusers scheduler visits with ``steps`` steps.

    The points are the scheduler's ``sigmas`` (sigma-based and DPM-type schedulers; repeated
    entries once) or its timesteps and final ``alpha_cumprod`` (DDIM, PNDM: without PNDM's
    Runge-Kutta midpoints), mapped to ``path`` by their noise level (:func:`time_of_rho`); a
    final ``sigma = 0`` / ``alpha_cumprod = 1`` becomes ``t = 0``. ``path`` may be any path
    covering those noise levels; on :func:`difflab_path_for`'s path they are its knots.
    Singlestep schedulers (``DPMSolverSinglestepScheduler``) list their intermediate points
    too: every ``order``-th entry is the solver's grid. Raises for DDIM / PNDM configurations
    whose step does not land on their next timestep (``linspace`` spacing, or ``trailing`` with
    a step count that does not divide ``num_train_timesteps``).
    """
    sched = float64_scheduler(scheduler)
    with _in_float64(type(sched)):
        sched.set_timesteps(steps)
    return time_of_rho(path, _grid_rhos(sched))


def _current_rho(sched, timestep) -> torch.Tensor:
    """The noise level at which ``sched`` evaluates the model for this call of ``step``."""
    if not (_has_sigmas(sched) and hasattr(sched, "step_index")):
        return _timestep_rho(sched, timestep)
    if sched.step_index is None:
        sched._init_step_index(timestep)
    i = sched.step_index
    if getattr(sched, "state_in_first_order", True) is False and hasattr(sched,
                                                                          "sigmas_interpol"):
        return sched.sigmas_interpol[i].to(torch.float64)  # KDPM2's midpoint stage
    return sched.sigmas[i].to(torch.float64)


def _vp_alpha(rho) -> float:
    """The signal coefficient ``alpha = 1 / sqrt(1 + rho^2)`` of a VP schedule at ``rho``."""
    return 1.0 / math.sqrt(1.0 + float(rho) ** 2)


def _path_alpha(path: GaussianPath, rho) -> float:
    return 1.0 if float(rho) == 0 else float(path.alpha(time_of_rho(path, rho)))


def _per_step(kwargs: dict, i: int) -> dict:
    return {k: (v[i] if isinstance(v, list | tuple) else v) for k, v in kwargs.items()}


def _network_output(sched, kind: str, pred, latents: torch.Tensor, rho,
                    sigma_space: bool) -> torch.Tensor:
    """What ``sched.step`` expects as the model output for the exact prediction ``pred``
    (``latents``: the scheduler's state, ``x / alpha`` for a sigma-space one)."""
    if hasattr(sched, "precondition_outputs"):
        # EDM schedulers: x0 = c_skip latents + c_out F, affine in the raw output F
        sigma = torch.as_tensor(rho, dtype=torch.float64)
        base = sched.precondition_outputs(latents, torch.zeros_like(latents), sigma)
        slope = sched.precondition_outputs(torch.zeros_like(latents), torch.ones_like(latents),
                                           sigma)
        return (pred.x0 - base) / slope
    if kind == "v":  # v of the scheduler's own VP schedule at this noise level, not den.path's
        vp = difflab_path_for(sched)
        t = time_of_rho(vp, rho).expand(latents.shape[0])
        x_vp = latents * _vp_alpha(rho) if sigma_space else latents
        return Prediction.from_x0(pred.x0, x_vp, t, vp).v
    return pred.as_kind(kind)


def run_diffusers(scheduler, den: DenoiserBase, x: torch.Tensor, steps: int,
                  model_dtype: torch.dtype | None = None, **step_kwargs) -> torch.Tensor:
    """Sample with a diffusers scheduler driven by a difflab denoiser, in float64.

    ``scheduler`` is configured by the caller (e.g. ``DPMSolverMultistepScheduler(
    beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)``); a float64 copy of
    it (:func:`float64_scheduler`) runs ``steps`` steps the way a diffusers pipeline runs them:
    ``set_timesteps(steps)``, then for each timestep ``scale_model_input``, the network output
    and ``step``. The network output is the exact one for ``den``'s prediction, in the
    scheduler's ``prediction_type`` (``epsilon``, ``v_prediction`` or ``sample``; for the EDM
    schedulers, the raw output their ``precondition_outputs`` maps to ``x0``).

    ``den`` is evaluated at the time of the noise level ``rho = sigma / alpha`` the scheduler
    uses for that call (its ``sigmas`` entry, KDPM2's midpoint level in its second stage, else
    ``alphas_cumprod[timestep]``; see :func:`time_of_rho`), on the scheduler's latents brought
    to ``den.path``'s scale. VP-space schedulers (DDIM, DPM-Solver, UniPC, DEIS, PNDM: those
    whose ``scale_model_input`` is the identity) hold ``x`` on the VP scale
    ``alpha = 1 / sqrt(1 + rho^2)``, sigma-space ones (Euler, Heun, KDPM2, LMS, EDM) hold
    ``x / alpha``. ``den.path`` may be :func:`difflab_path_for`'s (the same schedule: the
    conversion is the identity up to rounding) or any path covering the noise levels (an EDM or
    VE oracle). ``v = alpha eps - sigma x0`` uses the scheduler's VP ``alpha, sigma``.

    ``x`` is the state difflab's samplers start from: ``x_T`` on ``den.path``'s scale at the
    first noise level, converted exactly to the scheduler's space. (Pipelines start at
    ``init_noise_sigma x``; for sigma-space schedulers with ``linspace`` / ``trailing``
    spacing that is ``sigma_max x`` instead of ``sqrt(1 + sigma_max^2) x``, a start smaller by
    ``1 / (2 sigma_max^2)``, 2e-5 on DDPM's schedule: a difference that is not the sampler's.)

    ``model_dtype`` (default None: float64 throughout) evaluates ``den`` in another dtype, for a
    trained network (``torch.float32``): its input is cast to that dtype and its output back to
    float64, and it runs under the caller's default dtype (not float64); the scheduler's own
    arithmetic stays in float64.

    ``step_kwargs`` go to every ``step`` call (``eta=0.0``); a list or tuple gives one value per
    call (``variance_noise=[z_0, z_1, ...]``). Returns the final sample on ``den.path``'s scale
    (at ``sigma = 0``, the latents themselves), in float64.
    """
    ptype = scheduler.config.get("prediction_type", "epsilon")
    kind = PREDICTION_KINDS.get(ptype)
    if kind is None:
        raise DifflabError(f"prediction_type={ptype!r} is not one of "
                           + ", ".join(PREDICTION_KINDS))
    sched = float64_scheduler(scheduler)
    path = den.path
    x = x.to(torch.float64)
    caller_dtype = torch.get_default_dtype()

    def to_path(rho) -> float:  # latents -> den.path's scale at noise level rho
        return _path_alpha(path, rho) * (1.0 if sigma_space else 1.0 / _vp_alpha(rho))

    def model(x_t: torch.Tensor, t: torch.Tensor):
        if model_dtype is None:
            return den(x_t, t)
        torch.set_default_dtype(caller_dtype)  # the network builds tensors in its own dtype
        try:
            return den(x_t.to(model_dtype), t)
        finally:
            torch.set_default_dtype(torch.float64)

    with _in_float64(type(sched)):
        sched.set_timesteps(steps)
        first = sched.timesteps[0]
        probe = torch.ones(1, dtype=torch.float64)
        sigma_space = float(sched.scale_model_input(probe, first)[0]) != 1.0
        latents = x / to_path(_current_rho(sched, first))
        for i, timestep in enumerate(sched.timesteps):
            sched.scale_model_input(latents, timestep)  # what a pipeline calls (some record it)
            rho = _current_rho(sched, timestep)
            pred = model(latents * to_path(rho), time_of_rho(path, rho))
            out = _network_output(sched, kind, pred, latents, rho, sigma_space)
            out = out.to(torch.float64)
            latents = sched.step(out, timestep, latents, **_per_step(step_kwargs, i)).prev_sample
        return latents * to_path(_last_rho(sched))


# ----- k-diffusion -------------------------------------------------------------------------------
_KD_PACKAGE = "_difflab_peer_k_diffusion"
_kd_sampling: types.ModuleType | None = None


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k-diffusion's ``utils.append_dims``: trailing singleton dims up to ``target_dims``."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def _missing(name: str) -> types.ModuleType:
    """A stand-in for an optional dependency of k-diffusion's ``sampling.py`` that is not
    installed; using anything from it raises."""
    stub = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise DifflabError(f"{name} is not installed: this k-diffusion function needs it "
                           f"(pip install {name})")

    stub.__getattr__ = lambda attr: unavailable  # type: ignore[method-assign]
    return stub


def load_k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded without ``k_diffusion/__init__.py``.

    The package's ``__init__`` imports its models, which pull in torchvision, CLIP and more;
    ``sampling.py`` needs only torch, scipy, tqdm and, for a few functions, torchsde and
    torchdiffeq. The installed package is located with ``importlib.util.find_spec`` (which does
    not run it) and ``sampling.py`` is loaded as ``_difflab_peer_k_diffusion.sampling`` beside
    a stand-in ``utils`` (``append_dims``, all it uses); torchsde / torchdiffeq are replaced by
    stand-ins that raise when used if they are not installed. Loaded once, then cached.
    Raises :class:`~difflab.errors.DifflabError` with the install command when k-diffusion is
    missing.
    """
    global _kd_sampling
    if _kd_sampling is not None:
        return _kd_sampling
    spec = importlib.util.find_spec("k_diffusion")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    source = next((Path(p) / "sampling.py" for p in locations
                   if (Path(p) / "sampling.py").is_file()), None)
    if source is None:
        raise DifflabError(f"k-diffusion is not installed: {K_DIFFUSION_INSTALL}")
    pkg = types.ModuleType(_KD_PACKAGE)
    pkg.__path__ = []
    utils = types.ModuleType(f"{_KD_PACKAGE}.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    stubs = {}
    for name in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(name) is None:
            stubs[name] = _missing(name)
    mod_spec = importlib.util.spec_from_file_location(f"{_KD_PACKAGE}.sampling", source)
    module = importlib.util.module_from_spec(mod_spec)
    added = {_KD_PACKAGE: pkg, f"{_KD_PACKAGE}.utils": utils, f"{_KD_PACKAGE}.sampling": module}
    sys.modules.update(added)
    sys.modules.update(stubs)  # only while sampling.py imports them
    try:
        mod_spec.loader.exec_module(module)
    except BaseException:
        for name in added:
            sys.modules.pop(name, None)
        raise
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    pkg.sampling = module
    _kd_sampling = module
    return module


def k_diffusion_model(den: DenoiserBase) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``den`` as k-diffusion's model ``D(x~, sigma~) -> x0`` in EDM's scaled space
    (Karras et al. 2022, Sec. 4: ``x~ = x / alpha``, ``sigma~ = sigma / alpha``): the input is
    mapped to ``x = alpha x~`` at the time of noise level ``sigma~`` (per row)."""
    path = den.path

    def model(x_tilde: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = time_of_rho(path, sigma.reshape(-1).expand(x_tilde.shape[0]))
        alpha = path.alpha(t).to(x_tilde.dtype).reshape(-1, *([1] * (x_tilde.ndim - 1)))
        return den(alpha * x_tilde, t).x0

    return model


def run_k_diffusion(fn: Callable, den: DenoiserBase, x: torch.Tensor, sigmas,
                    **kw) -> torch.Tensor:
    """Run a k-diffusion sampling function with ``den`` as its model, in float64.

    ``fn`` is a function of :func:`load_k_diffusion_sampling`'s module, e.g.
    ``sample_dpmpp_2m``. ``sigmas`` are k-diffusion's noise levels ``sigma~ = sigma / alpha``
    (a descending tensor or list; the last may be 0), or, for the functions that take a range
    (``sample_dpm_fast``, ``sample_dpm_adaptive``), the tuple ``(sigma_min, sigma_max)`` of two
    ascending numbers.
    ``x`` is difflab's starting state on ``den.path``'s scale at noise level ``sigmas[0]``
    (``sigma_max``); it is handed over as ``x / alpha`` and the result mapped back by the last
    level's ``alpha`` (1 at ``sigma = 0``). ``kw`` go to ``fn`` (``eta=0.0``, ``n=...``) with
    ``disable=True``; while it runs, torch's default dtype is float64 (k-diffusion builds some
    tensors with ``torch.tensor``).
    """
    path = den.path
    if (isinstance(sigmas, tuple) and len(sigmas) == 2
            and all(isinstance(s, int | float) for s in sigmas) and sigmas[0] < sigmas[1]):
        sigma_min, sigma_max = float(sigmas[0]), float(sigmas[1])
        args, first, last = (sigma_min, sigma_max), sigma_max, sigma_min
    else:
        sig = torch.as_tensor(sigmas, dtype=torch.float64)
        args, first, last = (sig,), float(sig[0]), float(sig[-1])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x_tilde = x.to(torch.float64) / _path_alpha(path, first)
        out = fn(k_diffusion_model(den), x_tilde, *args, disable=True, **kw)
    finally:
        torch.set_default_dtype(before)
    if isinstance(out, tuple):  # sample_dpm_adaptive(return_info=True)
        out = out[0]
    return out * _path_alpha(path, last)


def difflab_grid_for_sigmas(path: GaussianPath, sigmas) -> torch.Tensor:
    """The difflab grid through k-diffusion's ``sigmas`` (``sigma~ = sigma / alpha``) on
    ``path`` (:func:`time_of_rho`; a final 0 stays 0)."""
    return time_of_rho(path, torch.as_tensor(sigmas, dtype=torch.float64))
