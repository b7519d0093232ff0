"""One sampling request: every caller (``difflab sample``, ``difflab eval``, training previews,
the demo, the benchmarks) turns a :class:`SampleRequest` into images with :func:`generate`.

::

    import difflab

    out = difflab.generate(difflab.SampleRequest("runs/cfg", sampler="dpmpp_2m", steps=20,
                                                 guidance="cfg:3", labels=[7], n=16))
    out.images        # (16, C, H, W) float32 on the CPU
    out.nfe           # network evaluations per sample, counted
    out.metadata      # the resolved settings: sampler, grid, options, guidance, checkpoint...

A request names a model (a run folder, a checkpoint folder, a component folder written by
``difflab export``, or an already :class:`LoadedRun`); every setting it leaves unset comes from
the run's ``[sample]`` section. The run's own sampler options and grid options are kept only
when the request uses the run's sampler / grid (iDDPM's ``variance = "learned"`` means nothing
to another sampler; :mod:`difflab.runs` loads runs). Sample ``i`` draws all of its noise from
its own stream (:class:`~difflab.samplers.PerSampleNoise` seeded from ``(seed, i)``), so it is
the same whatever the batch size.

Guidance (:mod:`difflab.guidance.spec`): ``cfg:S`` evaluates both branches in one batched call
(:func:`difflab.guidance.cfg`), the null branch being the null class, the empty prompt or the
negative prompt; ``classifier:RUN:S`` adds the gradient of a classifier run's
``log p(y | x_t)`` to the unconditional score (:func:`difflab.guidance.classifier`), the
unconditional denoiser of a class-conditional run being its null-class branch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.runs import LoadedRun, load_run
from difflab.sample_inputs import (  # noqa: F401 (re-exported: difflab.sampling is the API)
    auto_grid_name,
    check_t0,
    concat_inputs,
    encode_images,
    init_latents,
    sample_seeds,
    sampling_grid,
    start_grid,
    strength_grid,
)

logger = logging.getLogger("difflab.sampling")

Guide = Callable[[DenoiserBase, "Cond | None", "Cond | None"], DenoiserBase]


# ----- the request -------------------------------------------------------------------------------
@dataclass
class SampleRequest:
    """Everything one batch of samples depends on; ``None`` means the run's ``[sample]`` value.

    Attributes:
        model: a run folder, a checkpoint folder, a component folder, or a :class:`LoadedRun`.
        sampler, steps: a registered sampler (:data:`difflab.samplers.SAMPLERS`) and its steps.
        grid, grid_options: the time grid (``auto``: the path's own) and its options.
        options: sampler options (``eta``, ``variance``, ...), on top of the run's own when the
            sampler is the run's.
        guidance: ``none``, ``cfg:S[:rescale=R][:interval=LO-HI]`` or ``classifier:RUN:S``
            (None: the run's ``sample.guidance``), or a callable ``guide(den, cond,
            null_cond) -> denoiser`` applied per batch (SDG and other custom guidance).
        labels: class ids (one for all, or a list cycled; default: cycle through the classes).
        prompts, negative_prompt: text prompts (cycled) and what guidance steers away from.
        seed, n, batch_size: base seed (sample ``i`` uses its own stream), how many, per batch.
        clip_x0: clip clean-data estimates to ``[-1, 1]`` (DDPM's ``clip_denoised``).
        hooks: :class:`~difflab.samplers.Hooks` of the sampling loop (with ``clip_x0`` the
            clipping runs first, then ``hooks.correct_x0``).
        device: where to sample (default: the loaded model's device).
        checkpoint, ema: which weights of a run folder.
        decode: decode latents through the run's codec (no effect in pixel space).
        progress: a progress-bar title (True: a default one; None / False: no bar).
        init: image-to-image (SDEdit, Meng et al. 2022): the images to start from, a tensor
            ``(N, C, H, W)`` in ``[-1, 1]`` at the run's image shape, or image file path(s) (fitted
            to that shape). They are encoded (through the run's codec, its posterior mean),
            noised to the grid time that ``strength`` picks and denoised from there. One image is
            used for every sample; N images give N samples (or must equal ``n``).
        depth: for a depth-conditioned model (``task.concat = "depth"``, SD 2's depth U-Net):
            depth maps, a tensor ``(1 or n, 1, H, W)`` of camera-space depths (larger is
            farther), or image / ``.npy`` files (images: grey levels of inverse depth, brighter
            is nearer, as MiDaS maps are shown; ``.npy``: depths). One map serves all samples.
        strength: how much of the grid to run from ``init``, in ``(0, 1]`` (default 0.8): the
            last ``int(steps * strength)`` steps, as diffusers' img2img counts them; 1 starts
            from the prior time, so little of ``init`` survives.
        t0: instead of ``strength``: start ``init`` at time ``t0 * t_max`` and run all
            ``steps`` steps from there (SDEdit's Alg. 1; :func:`start_grid`), ``t0`` in
            ``(0, 1]``.
        driver: replaces the one sampler call of each batch: ``driver(run_grid, x, grid, lo,
            hi, noise)`` where ``run_grid(x, times)`` runs the request's sampler (with its
            options, hooks and guidance) over a descending sub-grid. RePaint's resampling
            (:mod:`difflab.recipes.inpaint`) goes down and back up the grid this way.
    """

    model: Any
    sampler: str | None = None
    steps: int | None = None
    grid: str | None = None
    grid_options: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    guidance: str | Callable | None = None
    labels: Any = None
    prompts: Sequence[str] | str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    n: int | None = None
    batch_size: int | None = None
    clip_x0: bool | None = None
    hooks: Any = None
    device: str | torch.device | None = None
    checkpoint: str | None = None
    ema: bool = True
    decode: bool = True
    progress: str | bool | None = None
    init: Any = None
    strength: float | None = None
    depth: Any = None
    t0: float | None = None
    driver: Callable | None = None


@dataclass
class Samples:
    """What :func:`generate` returns.

    Attributes:
        images: ``(n, *sample_shape)`` float32 on the CPU (not clamped).
        seeds: the noise seed of each sample.
        nfe: network evaluations per sample, counted by a forward hook (guided branches
            batched into one call count once), None when the model is not a module.
        seconds: wall time of the sampling loop.
        metadata: the resolved settings (sampler, steps, grid, grid options, options,
            guidance, n, seed, clip_x0, checkpoint, step).
    """

    images: torch.Tensor
    seeds: list[int]
    nfe: float | int | None
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_model(model: Any, checkpoint: str | None = None, ema: bool = True,
                  device: Any = None) -> LoadedRun:
    """A request's ``model`` as a :class:`LoadedRun`."""
    if isinstance(model, LoadedRun):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_run(model, checkpoint=checkpoint, ema=ema, device=device or "cpu")
    raise DifflabError(f"SampleRequest.model must be a run / component folder or a LoadedRun, "
                       f"got {type(model).__name__}")


def not_generative(run: LoadedRun, name) -> str:
    """Why a run cannot be sampled, and what it is for (its task's ``usage``)."""
    usage = getattr(run.task, "usage", "it does not generate images").format(run=name)
    return (f"{name} is a task.kind={run.config.task.kind!r} run, which does not generate "
            f"images: {usage}")


def resolve_settings(run: LoadedRun, req: SampleRequest) -> dict[str, Any]:
    """The request's settings with the run's ``[sample]`` defaults filled in, checked."""
    from difflab.samplers import SAMPLERS
    from difflab.samplers.timesteps import GRIDS, TUNED

    s = run.config.sample
    sampler = req.sampler or s.sampler
    if sampler not in SAMPLERS:
        raise bad_value("sampler", sampler, f"one of {', '.join(sorted(SAMPLERS))}")
    grid = req.grid or s.grid
    if grid not in ("auto", TUNED) and grid not in GRIDS:
        raise bad_value("grid", grid, f"auto, {TUNED} or one of {', '.join(GRIDS)}")
    options = dict(s.options) if sampler == s.sampler else {}
    options.update(req.options or {})
    grid_options = dict(s.grid_options) if grid == s.grid else {}
    grid_options.update(req.grid_options or {})
    steps = req.steps if req.steps is not None else s.steps
    if grid == "custom" and req.steps is None and isinstance(grid_options.get("times"), list):
        steps = len(grid_options["times"]) - 1  # the grid says how many steps it has
    if grid == TUNED:  # RUN/tuned_grids.json, made by difflab tune-grid
        from difflab.tuned_grids import lookup_tuned

        if grid_options:
            raise DifflabError("the tuned grid takes no grid options: its times come from "
                               "difflab tune-grid")
        grid_options = {"times": lookup_tuned(run, sampler, steps, options)["times"]}
    out = {"sampler": sampler, "steps": steps,
           "grid": grid, "grid_options": grid_options, "options": options,
           "guidance": req.guidance if req.guidance is not None else s.guidance,
           "n": req.n if req.n is not None else s.n,
           "seed": req.seed if req.seed is not None else s.seed,
           "batch_size": req.batch_size if req.batch_size is not None else s.batch_size,
           "clip_x0": s.clip_x0 if req.clip_x0 is None else bool(req.clip_x0)}
    for key in ("steps", "n", "batch_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise bad_value(key, out[key], "a positive int")
    if not isinstance(out["seed"], int) or out["seed"] < 0:
        raise bad_value("seed", out["seed"], "an int >= 0")
    return out


@torch.no_grad()
def generate(request: SampleRequest) -> Samples:
    """Turn a request into images (see the module docstring)."""
    run = resolve_model(request.model, request.checkpoint, request.ema, request.device)
    if not run.generative:
        raise DifflabError(not_generative(run, request.model if isinstance(
            request.model, (str, os.PathLike)) else "RUN"))
    if one_pass(run):  # a VAE / GAN baseline: one network pass, no sampler
        return _one_pass(run, request)
    st = resolve_settings(run, request)
    if st["clip_x0"] and run.codec is not None:
        raise DifflabError("clip_x0 clips to the [-1, 1] range of pixels, but this run samples "
                           "a codec's latents: sample without clip_x0")
    init = None
    if request.init is not None:
        init, st = init_latents(run, request.init, request.strength, st,
                                n_given=request.n is not None, t0=request.t0)
    elif request.strength is not None or request.t0 is not None:
        raise DifflabError(f"{'strength' if request.t0 is None else 't0'} applies to "
                           "image-to-image: give init images too")
    n = st["n"]
    cond, null, guide = guidance_inputs(run, n, st["guidance"], request.labels, request.prompts,
                                        request.negative_prompt)
    cond, null = concat_inputs(run, request.depth, n, cond, null)
    progress = request.progress
    if progress is True:
        progress = f"sampling {st['sampler']}"
    options, moments_file = sampler_inputs(run, st)
    counter = _CountCalls(getattr(run.denoiser, "net", None))
    start = time.perf_counter()
    try:
        x, seeds = draw(run.denoiser, run.sample_shape, n, sampler=st["sampler"],
                        steps=st["steps"], grid=st["grid"], grid_options=st["grid_options"],
                        options=options, seed=st["seed"], batch_size=st["batch_size"],
                        cond=cond, null_cond=null, guide=guide, clip_x0=st["clip_x0"],
                        hooks=request.hooks, device=request.device, progress=progress or None,
                        init=init, strength=st.get("strength"), t0=st.get("t0"),
                        driver=request.driver)
    finally:
        counter.close()
    seconds = time.perf_counter() - start
    if request.decode and run.codec is not None:
        codec = run.codec.to(x.device)
        x = torch.cat([codec.from_latent(b) for b in x.split(st["batch_size"])])
    nfe = None
    if counter.handle is not None:
        per_sample = counter.calls / -(-n // st["batch_size"])
        nfe = int(per_sample) if float(per_sample).is_integer() else round(per_sample, 2)
    meta = {**st, "checkpoint": None if run.checkpoint is None else str(run.checkpoint),
            "step": run.step, "ema": run.ema}
    if moments_file is not None:
        meta["moments"] = moments_file
    return Samples(x, seeds, nfe, seconds, meta)


ONE_PASS = "one_pass"


def one_pass(run: LoadedRun) -> bool:
    """Whether a model draws an image in one network pass (the VAE and GAN baselines), with
    no sampler, grid or guidance."""
    return hasattr(run.task, "draw_images")


def _one_pass(run: LoadedRun, request: SampleRequest) -> Samples:
    """Samples of a model that draws in one network pass (the VAE and GAN baselines)."""
    s = run.config.sample
    st = {"n": request.n if request.n is not None else s.n,
          "seed": request.seed if request.seed is not None else s.seed,
          "batch_size": request.batch_size if request.batch_size is not None else s.batch_size}
    for key in ("n", "batch_size"):
        if not isinstance(st[key], int) or isinstance(st[key], bool) or st[key] < 1:
            raise bad_value(key, st[key], "a positive int")
    if not isinstance(st["seed"], int) or st["seed"] < 0:
        raise bad_value("seed", st["seed"], "an int >= 0")
    if request.sampler not in (None, ONE_PASS) or request.steps not in (None, 1):
        raise DifflabError(f"a task.kind={run.config.task.kind!r} model draws an image in one "
                           "pass: it takes no sampler or steps")
    guidance = request.guidance
    if guidance == "none" or getattr(guidance, "kind", None) == "none":
        guidance = None
    given = [name for name, v in (("guidance", guidance), ("labels", request.labels),
                                  ("prompts", request.prompts), ("init", request.init),
                                  ("depth", request.depth), ("hooks", request.hooks))
             if v is not None]
    if given:
        raise DifflabError(f"{', '.join(given)} do not apply to a task.kind="
                           f"{run.config.task.kind!r} model, which draws an image in one pass")
    seeds = sample_seeds(st["seed"], st["n"])
    start = time.perf_counter()
    x = run.task.draw_images(run.net, seeds, st["batch_size"], request.device)
    meta = {"n": st["n"], "seed": st["seed"], "batch_size": st["batch_size"],
            "checkpoint": None if run.checkpoint is None else str(run.checkpoint),
            "step": run.step, "ema": run.ema, "sampler": ONE_PASS, "steps": 1}
    return Samples(x, seeds, 1, time.perf_counter() - start, meta)


def sampler_inputs(run: LoadedRun, st: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The sampler options of resolved settings ``st`` with what the sampler needs from the
    run: Analytic-DPM's ``moments`` (``Gamma_t``, Bao et al. 2022 eq. 8) are estimated from the
    run's training data at the grid's times and cached in ``RUN/moments``
    (:func:`difflab.moments.run_moments`), or read from ``options["moments"] = FILE``. Returns
    ``(options, the moments file or None)``."""
    from difflab.samplers import get_sampler

    options = st["options"]
    needs = get_sampler(st["sampler"]).needs_extra
    if "residual" in needs:
        return {**options, "residual": _residual_option(run, st)}, None
    if "moments" not in needs:
        return options, None
    from difflab import moments

    given = options.get("moments")
    if isinstance(given, (str, os.PathLike)):
        return {**options, "moments": moments.checked_file(given)}, os.fspath(given)
    if given is not None:
        return options, None
    t_grid = sampling_grid(run.path, st["steps"], st["grid"], st["grid_options"])
    mom, file = moments.run_moments(run, t_grid, condition="data", batch_size=st["batch_size"],
                                    what=f"sampler {st['sampler']!r}")
    return {**options, "moments": mom}, None if file is None else str(file)


def _residual_option(run: LoadedRun, st: dict[str, Any]):
    """SN-/NPR-DPM's head: ``options["residual"]`` names a residual run (loaded and checked
    against the run's path and the sampler's kind) or is already a callable."""
    from difflab.tasks.residual import residual_head

    given = st["options"].get("residual")
    kind = st["sampler"].split("_")[0]
    if given is None:
        raise DifflabError(f"sampler {st['sampler']!r} takes its reverse variance from a trained "
                           f"residual head: give --option residual=RUN (a task.kind='residual' "
                           f"run with objective.kind={kind!r} on this run; "
                           "configs/npr_mnist.toml trains one)")
    if callable(given):
        return given
    return residual_head(given, run.path, kind, device=next(run.net.parameters()).device)


class _CountCalls:
    """Counts the forward calls of a module (one per network evaluation)."""

    def __init__(self, module: Any) -> None:
        self.calls = 0
        self.handle = (module.register_forward_pre_hook(self._hook)
                       if isinstance(module, nn.Module) else None)

    def _hook(self, *_) -> None:
        self.calls += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def draw(den: DenoiserBase, shape: Sequence[int], n: int, *, sampler: str, steps: int,
         grid: str, grid_options: dict, options: dict, seed: int, batch_size: int,
         cond: Cond | None, null_cond: Cond | None, guide: Guide | None, clip_x0: bool,
         hooks: Any = None, device: Any = None, progress: str | None = None,
         init: torch.Tensor | None = None, strength: float | None = None,
         t0: float | None = None, driver: Callable | None = None
         ) -> tuple[torch.Tensor, list[int]]:
    """The sampling loop of :func:`generate`: ``n`` samples in batches, sample ``i`` with its
    own noise stream; returns ``(samples on the CPU, seeds)``. With ``init`` (``n`` or 1 rows
    in the model's space) each sample starts from ``init`` noised to the time ``strength``
    picks (or at ``t0``: :func:`start_grid`; SDEdit) instead of from the prior. ``driver``
    replaces the sampler call of each batch (see :class:`SampleRequest`)."""
    from difflab.samplers import Hooks, PerSampleNoise, get_sampler, sample
    from difflab.samplers.thresholding import StaticThreshold

    for what, c in (("cond", cond), ("null_cond", null_cond)):
        if c is not None and c.batch_size() not in (None, n):
            raise DifflabError(f"{what} holds {c.batch_size()} conditions for n={n} samples")
    spec = get_sampler(sampler)
    if (clip_x0 or hooks is not None) and "hooks" not in spec.options():
        raise DifflabError(f"clip_x0 / hooks need a sampler with hooks; {sampler!r} has none")
    if hooks is not None and not isinstance(hooks, Hooks):
        raise DifflabError(f"hooks must be a difflab.samplers.Hooks, got {type(hooks).__name__}")
    clip = StaticThreshold(-1.0, 1.0) if clip_x0 else None
    if init is not None and t0 is not None:
        t_grid = start_grid(den.path, steps, grid, grid_options, t0)
    else:
        t_grid = sampling_grid(den.path, steps, grid, grid_options)
        if init is not None:
            t_grid = strength_grid(t_grid, strength)
    seeds = sample_seeds(seed, n)
    if device is None:
        net = getattr(den, "net", None)
        params = list(net.parameters()) if isinstance(net, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    takes_noise = "noise" in spec.options()
    out = []
    from tqdm.auto import tqdm

    batches = -(-n // batch_size)
    per_step = progress is not None and "hooks" in spec.options() and driver is None
    if per_step:  # one tick per solver step of each batch, through the loop's callback
        bar = tqdm(total=batches * (t_grid.numel() - 1), desc=progress, unit="step", leave=False)
    else:
        bar = tqdm(total=n, desc=progress, disable=progress is None, unit="img", leave=False)
    try:
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            noise = PerSampleNoise(seeds[lo:hi])
            if init is None:
                x = den.path.prior_sample((hi - lo, *shape), noise=noise).to(device)
            else:  # SDEdit (Meng et al. 2022, Alg. 1): x_t0 = alpha_t0 x0 + sigma_t0 eps
                z0 = (init if init.shape[0] == 1 else init[lo:hi]).expand(hi - lo, *shape)
                z0 = z0.to(device)
                t0 = torch.full((hi - lo,), float(t_grid[0]), dtype=torch.float64)
                x = den.path.add_noise(z0, noise.randn_like(z0), t0.to(device))
            c = None if cond is None else cond[lo:hi].to(device)
            nc = None if null_cond is None else null_cond[lo:hi].to(device)
            d = guide(den, c, nc) if guide is not None else den if c is None else den.bind(c)
            kw = dict(options)
            if takes_noise:
                kw["noise"] = noise
            h = _batch_hooks(hooks, lo, hi, noise, clip, bar if per_step else None)
            if h is not None:
                kw["hooks"] = h
            if driver is None:
                out.append(sample(sampler, d, x, t_grid, **kw).float().cpu())
            else:
                def run_grid(x_in, times, d=d, kw=kw):
                    return sample(sampler, d, x_in, times, **kw)

                out.append(driver(run_grid, x, t_grid, lo, hi, noise).float().cpu())
            if not per_step:
                bar.update(hi - lo)
    finally:
        bar.close()
    return torch.cat(out), seeds


def _batch_hooks(hooks: Any, lo: int, hi: int, noise: Any, clip: Any, bar: Any) -> Any:
    """The hooks of batch ``lo:hi``: the request's own (through ``for_batch`` when they
    depend on the batch), with ``clip_x0``'s clipping run first and a progress tick after
    each step."""
    from difflab.samplers import Hooks

    if hooks is not None and hooks.for_batch is not None:
        hooks = hooks.for_batch(lo, hi, noise)
        if not isinstance(hooks, Hooks):
            raise DifflabError(f"hooks.for_batch must return a difflab.samplers.Hooks, got "
                               f"{type(hooks).__name__}")
    if clip is None and bar is None:
        return hooks
    user_x0 = getattr(hooks, "correct_x0", None)
    user_cb = getattr(hooks, "callback", None)
    correct = user_x0
    if clip is not None:
        correct = clip if user_x0 is None else (lambda x0, t: user_x0(clip(x0, t), t))
    callback = user_cb
    if bar is not None:
        def callback(info) -> None:
            bar.update(1)
            if user_cb is not None:
                user_cb(info)

    return Hooks(correct_x0=correct, correct_xt=getattr(hooks, "correct_xt", None),
                 callback=callback)


# ----- conditions and guidance -------------------------------------------------------------------
def guidance_inputs(run: LoadedRun, n: int, guidance: str | None, labels=None, prompts=None,
                    negative_prompt: str | None = None
                    ) -> tuple[Cond | None, Cond | None, Guide | None]:
    """``(cond, null_cond, guide)`` for ``n`` samples of ``run``."""
    from difflab.guidance.spec import CLASSIFIER, GuidanceSpec, cfg_guide, parse_guidance
    from difflab.tasks.conditioning import warn_if_no_unconditional

    if callable(guidance):  # a custom guide(den, cond, null_cond) -> denoiser (SDG, ...)
        cond, null = run.conditioner.make(n, labels=labels, prompts=prompts,
                                          negative_prompt=negative_prompt)
        return cond, null, guidance
    spec = parse_guidance(guidance) if isinstance(guidance, str) else guidance
    if spec is not None and not isinstance(spec, GuidanceSpec):
        raise bad_value("guidance", guidance, "a guidance string such as cfg:3")
    if negative_prompt is not None and (spec is None or spec.kind != "cfg"):
        raise DifflabError("a negative prompt needs classifier-free guidance: add "
                           "--guidance cfg:SCALE")
    if spec is not None and (spec.kind == "none" or (spec.kind == "cfg" and spec.scale == 1.0
                                                     and spec.interval is None)):
        spec = None  # cfg at scale 1 is the conditional model: skip the second branch
    cond_er = run.conditioner
    if spec is not None and spec.kind == CLASSIFIER:
        return _classifier_inputs(run, spec, n, labels, prompts)
    cond, null = cond_er.make(n, labels=labels, prompts=prompts, negative_prompt=negative_prompt)
    if spec is None:
        return cond, None, None
    if cond is None:
        raise DifflabError(f"guidance {spec} needs a conditional model; this run is "
                           "unconditional (train with task.cond='class' or 'text' and "
                           "task.p_uncond > 0)")
    warn_if_no_unconditional(run.task.p_uncond())
    return cond, null, cfg_guide(spec)


def _classifier_inputs(run: LoadedRun, spec, n: int, labels, prompts
                       ) -> tuple[Cond, Cond | None, Guide]:
    from difflab.guidance import classifier as classifier_transform
    from difflab.guidance.noisy_classifier import check_classifier_matches, classifier_log_prob
    from difflab.paths import same_marginals
    from difflab.tasks.conditioning import warn_if_no_unconditional
    from difflab.tasks.noisy import ClassifierTask

    if prompts is not None:
        raise DifflabError("classifier guidance takes --class, not --prompt")
    cls_run = load_run(spec.run, device=next(run.net.parameters()).device)
    if not isinstance(cls_run.task, ClassifierTask):
        raise DifflabError(f"guidance {spec}: {spec.run} is not a classifier run (its task kind "
                           f"is {cls_run.config.task.kind!r}); train one with configs/"
                           "classifier_mnist.toml")
    diffusion = run.conditioner
    c_shape, d_shape = cls_run.sample_shape, run.sample_shape
    check_classifier_matches(
        (c_shape[-1], c_shape[0], cls_run.conditioner.num_classes),
        (d_shape[-1], d_shape[0], diffusion.num_classes if diffusion.kind == "class" else None),
        classifier_name=str(spec.run), diffusion_name="the diffusion run")
    if not same_marginals(run.denoiser.path, cls_run.denoiser.path):
        raise DifflabError(
            f"guidance {spec}: the classifier run was trained on path {cls_run.config.path.kind!r}"
            f" and the diffusion run samples path {run.config.path.kind!r}; the classifier reads "
            "x_t at the diffusion model's noise levels only when the two paths match: train it "
            "with the diffusion run's [path]")
    y = cls_run.conditioner.labels(labels, n)
    if diffusion.kind == "class":
        null = Cond(labels=torch.full_like(y, diffusion.num_classes))
        warn_if_no_unconditional(run.task.p_uncond(), "classifier guidance (which needs the "
                                 "unconditional model)")
    elif diffusion.kind == "none":
        null = None
    else:
        raise DifflabError("classifier guidance needs an unconditional or class-conditional "
                           "diffusion run, not a text-conditional one")
    model = cls_run.denoiser
    scale = spec.scale

    def guide(den: DenoiserBase, cond: Cond | None, nc: Cond | None) -> DenoiserBase:
        base = den if nc is None else den.bind(nc)
        return classifier_transform(base, classifier_log_prob(model, cond.labels), scale)

    return Cond(labels=y), null, guide
