"""The ``difflab eval`` and ``difflab compare`` commands (``register(subparsers)`` for the CLI).

``difflab eval RUN --samplers ddim:10,dpmpp_2m:20 --guidance cfg:1,cfg:3 --metrics fid,kid,pr,nll
--n 5000`` generates ``n`` samples per (sampler, guidance) setting once (saved as
``RUN/eval/samples/<setting>.npy`` and reused by every metric and later calls with the same
checkpoint, seed and n), extracts features of those and of the run's dataset with the dataset's
extractor, and writes ``RUN/eval/report.md``, ``report.json``, ``grids/<setting>.png`` and plots.
``difflab compare RUN_A RUN_B ...`` puts their reports in one table and one plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.argtypes import count_from_zero, output_folder, positive_int
from difflab.errors import DifflabError, bad_value
from difflab.evaluation.evaluate import FEATURE_METRICS, RealReference
from difflab.evaluation.features import dataset_tensors, extractor_for_dataset, get_extractor
from difflab.evaluation.report import PLOT_METRICS, read_report, write_comparison, write_report

METRICS = (*FEATURE_METRICS, "nll")


@dataclass(frozen=True)
class Setting:
    """One generated set: a sampler with its steps, and an optional guidance string
    (``cfg:3``, ``classifier:RUN:2``; see :mod:`difflab.guidance.spec`)."""

    sampler: str
    steps: int
    spec: str | None = None
    grid: str | None = None  # None: the path's default grid ("auto")
    options: tuple[tuple[str, object], ...] = ()  # sampler options of --option

    @property
    def label(self) -> str:
        """The sampler as reports name it: ``dpmpp_2m`` or ``dpmpp_2m[log_snr]``."""
        return self.sampler if self.grid is None else f"{self.sampler}[{self.grid}]"

    @property
    def guidance(self) -> str:
        return self.spec or "none"

    @property
    def scale(self) -> float | None:
        if self.spec is None:
            return None
        from difflab.guidance.spec import parse_guidance as parse

        return parse(self.spec).scale

    @property
    def slug(self) -> str:
        g = "" if self.spec is None else "_" + self.spec.replace(":", "-").replace("/", "_")
        grid = "" if self.grid is None else f"-{self.grid}"
        return f"{self.sampler}-{self.steps}{grid}{g}"


def parse_samplers(text: str) -> list[tuple[str, int, str | None]]:
    """``"ddim:10,dpmpp_2m:20:log_snr"`` -> ``[("ddim", 10, None), ("dpmpp_2m", 20,
    "log_snr")]``: ``NAME:STEPS[:GRID]``, names checked against the sampler and grid registries
    (no grid: the path's default)."""
    from difflab.samplers import SAMPLERS
    from difflab.samplers.timesteps import GRIDS, TUNED

    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, rest = item.partition(":")
        steps, _, grid = rest.partition(":")
        if name not in SAMPLERS:
            raise bad_value("--samplers", item, f"NAME:STEPS with NAME one of {sorted(SAMPLERS)}")
        if not steps.isdigit() or int(steps) < 1:
            raise bad_value("--samplers", item, "NAME:STEPS with STEPS a positive int, e.g. "
                            "ddim:50")
        named = [g for g in GRIDS if g != "custom"] + [TUNED]  # custom needs its times
        if grid and grid not in named:
            raise bad_value("--samplers", item, f"NAME:STEPS:GRID with GRID one of "
                            f"{', '.join(named)}")
        out.append((name, int(steps), grid or None))
    if not out:
        raise bad_value("--samplers", text, "a comma-separated list like ddim:10,ddpm:1000")
    return out


def parse_guidance(text: str | None) -> list[str | None]:
    """``"none,cfg:1,cfg:3"`` -> ``[None, "cfg:1", "cfg:3"]`` (``None``: unguided), each item
    checked by :func:`difflab.guidance.spec.parse_guidance`."""
    from difflab.guidance.spec import FORMS
    from difflab.guidance.spec import parse_guidance as parse

    if not text:
        return [None]
    out: list[str | None] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            spec = parse(item)
        except DifflabError:
            raise bad_value("--guidance", item, f"a comma-separated list of {FORMS}") from None
        out.append(None if spec.kind == "none" else item)
    return out


def parse_metrics(text: str) -> list[str]:
    """``"fid,kid,pr,nll"`` -> the list, each checked against :data:`METRICS`."""
    out = [m.strip().lower() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in METRICS:
            raise bad_value("--metrics", m, f"a comma-separated subset of {', '.join(METRICS)}")
    return out


@dataclass
class EvalRun:
    """What evaluation needs from a run folder."""

    run_dir: Path
    config: object
    denoiser: object
    shape: tuple[int, ...]
    step: int
    num_classes: int | None
    loaded: object = None  # the difflab.sampling.LoadedRun


def load_run(run_dir: str | os.PathLike, checkpoint: str | None = None) -> EvalRun:
    """Load ``RUN/config.toml`` and the EMA weights of a checkpoint (default: latest), through
    :func:`difflab.sampling.load_run`."""
    from difflab.sampling import load_run as _load

    run = _load(run_dir, checkpoint=checkpoint, ema=True)
    if not run.generative:
        raise DifflabError(f"{run_dir} is a task.kind={run.config.task.kind!r} run: it does not "
                           "generate images to evaluate")
    c = run.conditioner
    classes = c.num_classes if c.kind == "class" else None
    return EvalRun(Path(run_dir), run.config, run.denoiser, run.image_shape, run.step, classes,
                   run)


def request_for(run: EvalRun, setting: Setting, n: int, seed: int, batch_size: int,
                progress: bool = False, clip_x0: bool | None = None):
    """The :class:`~difflab.sampling.SampleRequest` of one setting: class-conditional runs
    cycle through the classes, text runs through the configured prompts; the run's own
    sampler keeps its ``sample.options`` and grid, as in ``difflab sample``."""
    from difflab.sampling import SampleRequest, one_pass

    if one_pass(run.loaded):
        return SampleRequest(run.loaded, n=n, seed=seed, batch_size=batch_size)
    return SampleRequest(run.loaded, sampler=setting.sampler, steps=setting.steps,
                         grid=setting.grid, guidance=setting.spec or "none", n=n, seed=seed,
                         options=dict(setting.options) or None,
                         batch_size=batch_size, clip_x0=clip_x0,
                         progress=f"sampling {setting.slug}" if progress else None)


def sampling_options(run: EvalRun, setting: Setting) -> tuple[dict, str, dict]:
    """``(options, grid, grid_options)`` the request of a setting resolves to."""
    from difflab.sampling import one_pass, resolve_settings

    if one_pass(run.loaded):
        return {}, "none", {}
    st = resolve_settings(run.loaded, request_for(run, setting, 1, 0, 1))
    return st["options"], st["grid"], st["grid_options"]


@torch.no_grad()
def generate(run: EvalRun, setting: Setting, n: int, seed: int, batch_size: int,
             progress: bool, clip_x0: bool | None = None,
             counts: dict | None = None) -> torch.Tensor:
    """``n`` samples of one setting through :func:`difflab.generate`, clamped to [-1, 1];
    ``counts["nfe"]``, when given, receives the counted network evaluations per sample."""
    from difflab.sampling import generate as _generate

    out = _generate(request_for(run, setting, n, seed, batch_size, progress, clip_x0))
    if counts is not None and out.nfe is not None:
        counts["nfe"] = out.nfe
    return out.images.float().clamp(-1, 1)


def cached_samples(run: EvalRun, setting: Setting, n: int, seed: int, batch_size: int,
                   out_dir: Path, progress: bool, clip_x0: bool | None = None
                   ) -> tuple[torch.Tensor, Path, float, float | None]:
    """Samples of a setting from ``out_dir/samples`` when generated before with the same
    checkpoint, n, seed, clipping, sampler options and grid; else generated and saved. Returns
    ``(samples, file, seconds, nfe)`` (``nfe``: counted network evaluations per sample)."""
    file = out_dir / "samples" / f"{setting.slug}.npy"
    meta_file = file.with_suffix(".json")
    clip = run.config.sample.clip_x0 if clip_x0 is None else clip_x0
    options, grid, grid_options = sampling_options(run, setting)
    meta = {"step": run.step, "n": n, "seed": seed, "setting": setting.slug, "clip_x0": clip,
            "options": options, "grid": grid, "grid_options": grid_options}
    if file.is_file() and meta_file.is_file():
        saved = json.loads(meta_file.read_text())
        if {k: saved.get(k) for k in meta} == meta:
            return torch.from_numpy(np.load(file)), file, 0.0, saved.get("nfe")
    start = time.perf_counter()
    counts: dict = {}
    x = generate(run, setting, n, seed, batch_size, progress, clip, counts)
    seconds = time.perf_counter() - start
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, x.numpy())
    os.replace(tmp, file)
    meta_file.write_text(json.dumps({**meta, "nfe": counts.get("nfe")}))
    return x, file, seconds, counts.get("nfe")


def likelihood(run: EvalRun, real: torch.Tensor, n: int, steps: int | None = None,
               variance: str | None = None, clip_x0: bool | None = None,
               residual: str | None = None) -> dict:
    """Bits/dim of ``n`` real images from :mod:`difflab.likelihood`, or ``{"value": None,
    "note": why}``.

    On a discrete path: the discrete VLB (Ho et al. 2020, eq. 5) over every step or a
    ``steps``-step respacing, with the reverse variance ``variance`` (default: ``learned`` for
    a model that learns it, as improved DDPM reports its NLL, else ``small``); ``analytic`` is
    Analytic-DPM's optimal variance (Bao et al. 2022a, Thm. 1-2) with ``Gamma_t`` estimated
    from the run's training data and cached (:func:`difflab.moments.run_moments`). The VLB is
    an upper bound on the NLL whose gap grows as the steps fall and depends on the variance;
    the result says so (``bound``, ``steps``, ``variance``, ``note``). Otherwise the
    probability-flow ODE (``variance`` must be None). ``clip_x0`` (default: the run's
    ``sample.clip_x0``, as sampling) clips ``x0_hat`` to [-1, 1] in the bound's means."""
    try:
        from difflab import likelihood as lk
        from difflab.paths import DiscreteVP
    except ImportError as e:
        return {"value": None, "note": f"difflab.likelihood unavailable ({e})"}
    if run.loaded.codec is not None:
        return {"value": None, "note": "the run models a codec's latents, so its bound would be "
                "in bits per latent dimension, not per pixel (LDM reports no likelihood either)"}
    x = real[:n]
    cond_er = run.loaded.conditioner  # the unconditional likelihood: the null condition
    den = run.denoiser
    if cond_er.kind != "none":
        _, null = cond_er.make(x.shape[0], prompts=[""] if cond_er.kind == "text" else None)
        den = den.bind(null)
    g = torch.Generator().manual_seed(0)
    if not isinstance(den.path, DiscreteVP):
        if variance is not None:
            raise DifflabError(f"--nll-variance {variance}: the reverse variance is a choice of "
                               f"the discrete VLB, but {den.path!r} is continuous, so the NLL "
                               "comes from the probability-flow ODE; drop --nll-variance")
        res = lk.ode_likelihood(den, x, dequantize_bits=8, generator=g)
        s = res.summary()
        return {"name": "NLL (PF-ODE)", "value": s["bpd"], "stderr": s["stderr"], "n_fake": 0,
                "n_real": int(s["n"]), "std": None, "bound": "upper",
                "note": "the probability-flow ODE's likelihood of uniformly dequantized data "
                "(Song et al. 2021, App. D): an upper bound on the NLL of the 8-bit data in "
                "expectation over the dequantization noise, up to the ODE solver's tolerance"}
    from difflab.samplers.timesteps import discrete

    head = None
    if variance in ("npr", "sn"):
        from difflab.tasks.residual import residual_head

        if residual is None:
            raise DifflabError(f"--nll-variance {variance} takes the variance from a residual "
                               "head: give --nll-residual RUN (configs/npr_mnist.toml)")
        head = residual_head(residual, den.path, variance,
                             device=next(run.loaded.net.parameters()).device)
    elif residual is not None:
        raise DifflabError("--nll-residual applies to --nll-variance npr or sn")
    if variance is None:
        variance = "learned" if getattr(den, "learned_variance", False) else "small"
    grid = (lk.default_vlb_grid(den.path) if steps is None
            else discrete(den.path, steps, spacing="linspace"))
    moments, moments_file = None, None
    if variance == "analytic":
        from difflab.moments import run_moments

        moments, moments_file = run_moments(run.loaded, grid, condition="null",
                                            what="--nll-variance analytic")
    clip = run.config.sample.clip_x0 if clip_x0 is None else clip_x0
    res = lk.vlb(den, x, grid=grid, variance=variance, moments=moments, residual=head,
                 generator=g, clip_x0=clip)
    s = res.summary()
    k, total = grid.numel() - 1, den.path.N
    how = VLB_VARIANCE_NAMES.get(variance, variance)
    means = ("x0_hat clipped to [-1, 1] as in sampling" if clip else "x0_hat not clipped")
    note = (f"an upper bound on the NLL of the 8-bit data (the variational bound, Ho et al. "
            f"2020 eq. 5), not the NLL itself: how loose it is depends on the number of steps "
            f"(here {k} of the path's {total}), on the reverse variance (here {variance}: "
            f"{how}) and on the means ({means}); fewer steps make it looser")
    if variance != "analytic":
        note += (", and Analytic-DPM's optimal variance (--nll-variance analytic; Bao et al. "
                 "2022, Thm. 1) makes few-step bounds much tighter")
    out = {"name": f"NLL (discrete VLB, {k} steps, {variance} variance)", "value": s["bpd"],
           "stderr": s["stderr"], "n_fake": 0, "n_real": int(s["n"]), "std": None,
           "bound": "upper", "steps": k, "path_steps": total, "variance": variance,
           "clip_x0": bool(clip), "note": note}
    if moments_file is not None:
        out["moments"] = str(moments_file)
    if residual is not None:
        out["residual"] = str(residual)
    return out


VLB_VARIANCE_NAMES = {
    "small": "DDPM's beta_tilde, the posterior variance",
    "large": "DDPM's beta",
    "learned": "improved DDPM's learned interpolation, eq. 15",
    "analytic": "Analytic-DPM's optimal variance from the estimated Gamma_t",
    "npr": "NPR-DPM's per-element optimal variance from the noise-residual head",
    "sn": "SN-DPM's per-element optimal variance from the squared-noise head",
}


def check_request(metrics: list[str], n: int, ext) -> None:
    """Fail before any sampling when the metrics cannot be computed at this ``n``."""
    if "fid" in metrics and n <= ext.dim:
        raise DifflabError(f"--n {n} is too small for FID with {ext.name!r} features "
                           f"({ext.dim} dimensions): use --n > {ext.dim} (ideally >= "
                           f"{10 * ext.dim}), or --metrics kid,pr, which work at any n")
    if "is" in metrics and not ext.has_logits:
        raise DifflabError(f"--metrics is: extractor {ext.name!r} has no class logits, so no "
                           "Inception Score; drop 'is' or use a classifier extractor")


def evaluate_run(args: argparse.Namespace) -> dict:
    """Everything ``difflab eval`` does; returns the report dict (also written to disk).

    Samples, features and the real-versus-real floor are computed only for feature metrics:
    ``--metrics nll`` alone draws no samples and its report has only the likelihood."""
    from difflab.builders import build_dataset
    from difflab.likelihood import VLB_VARIANCES
    from difflab.sampling import ONE_PASS, one_pass

    samplers, guidances = parse_samplers(args.samplers), parse_guidance(args.guidance)
    metrics = parse_metrics(args.metrics)
    nll_variance = getattr(args, "nll_variance", None)
    if nll_variance is not None:
        if nll_variance not in VLB_VARIANCES:
            raise bad_value("--nll-variance", nll_variance, "one of " + ", ".join(VLB_VARIANCES))
        if "nll" not in metrics:
            raise DifflabError(f"--nll-variance {nll_variance} sets the variance of the NLL's "
                               "bound: add nll to --metrics")
    if getattr(args, "nll_residual", None) is not None and nll_variance not in ("npr", "sn"):
        raise DifflabError("--nll-residual RUN is the head of --nll-variance npr or sn: add "
                           "one of them")
    options = sampler_options(samplers, getattr(args, "option", None) or [])
    feature_metrics = [m for m in metrics if m != "nll"]
    output_folder("--out", args.out)
    run = load_run(args.run, args.checkpoint)
    if one_pass(run.loaded):  # a VAE / GAN: one setting, no sampler or guidance
        samplers, guidances = [(ONE_PASS, 1, None)], [None]
    out_dir = Path(args.out) if args.out else run.run_dir / "eval"
    data = build_dataset(run.config)
    report: dict = {"run": str(run.run_dir), "step": run.step, "notes": []}
    if feature_metrics:
        real, _ = dataset_tensors(data)
        name = args.extractor or extractor_for_dataset(run.config.data.name)
        native = _native_data(name, run.config, data)
        ext = get_extractor(name, native if name != "inception" else None,
                            train=args.train_extractor, progress=args.progress,
                            inception_weights=args.inception_weights)
        resized = native is not data
        ext.resize_inputs = resized
        g = torch.Generator().manual_seed(args.seed)
        check_request(feature_metrics, args.n, ext)
        ref = RealReference(ext, real, g, progress=args.progress)
        report.update({"n": args.n, "n_reference": int(ref.reference.shape[0]),
                       "extractor": ext.meta, "floor": {}, "settings": []})
        if resized:
            report["notes"].append(
                f"the run's {run.shape[-1]}x{run.shape[-1]} images (real and generated alike) "
                f"are resized to {ext.image_size}x{ext.image_size} for the {ext.name!r} "
                "extractor, which is trained on the dataset at that size")
        if args.n > ref.holdout.shape[0]:
            report["notes"].append(f"the floor uses {ref.holdout.shape[0]} held-out real "
                                   f"images (fewer than n={args.n}): the dataset is too small")
        floor = ref.floor(args.n, feature_metrics, kid_subsets=args.kid_subsets)
        report["floor"] = {k: v.to_dict() for k, v in floor.items()}
    if "nll" in metrics:
        from difflab.builders import build_held_out

        held = build_held_out(run.config)
        nll_data = dataset_tensors(data if held is None else held)[0]
        report["likelihood"] = likelihood(run, nll_data, args.nll_n, args.nll_steps,
                                          nll_variance, getattr(args, "clip_x0", None),
                                          getattr(args, "nll_residual", None))
        report["likelihood"]["data"] = ("training images (the run holds none out)"
                                        if held is None else "held-out images")
    if feature_metrics:
        (out_dir / "grids").mkdir(parents=True, exist_ok=True)
        for (sampler, steps, grid) in samplers:
            for guidance in guidances:
                report["settings"].append(_evaluate_setting(
                    run, Setting(sampler, steps, guidance, grid, options.get(sampler, ())),
                    ref, feature_metrics, args, out_dir))
    write_report(report, out_dir)
    return report


def sampler_options(samplers: list[tuple[str, int, str | None]], items: list[str]
                    ) -> dict[str, tuple[tuple[str, object], ...]]:
    """``--option KEY=VALUE`` items, given to each sampler of ``--samplers`` that takes ``KEY``
    (e.g. ``residual=RUN`` for npr_ddpm, ``eta=0.5`` for ddim); a key no listed sampler takes
    is an error."""
    from difflab.argtypes import key_value
    from difflab.samplers import get_sampler

    pairs = [key_value(item) for item in items]
    out: dict[str, tuple[tuple[str, object], ...]] = {}
    for key, _ in pairs:
        if not any(key in get_sampler(name).options() for name, _, _ in samplers):
            names = sorted({name for name, _, _ in samplers})
            raise DifflabError(f"--option {key}=...: none of the samplers {', '.join(names)} "
                               "takes it (difflab samplers lists each one's options)")
    for name, _, _ in samplers:
        accepted = get_sampler(name).options() if name != "one_pass" else []
        out[name] = tuple((k, v) for k, v in pairs if k in accepted)
    return out


def _native_data(name: str, cfg, data):
    """The data an extractor is trained on: the run's dataset, or (when the run resized it
    away from the extractor's resolution) the same dataset at the extractor's resolution."""
    from difflab.evaluation.features import EXTRACTORS

    spec = EXTRACTORS.get(name)
    if spec is None or spec.image_size == data.image_size:
        return data
    from difflab.builders import build_dataset

    d = cfg.data.model_copy(update={"image_size": spec.image_size})
    return build_dataset(cfg.model_copy(update={"data": d}))


def _evaluate_setting(run: EvalRun, setting: Setting, ref: RealReference, metrics: list[str],
                      args: argparse.Namespace, out_dir: Path) -> dict:
    from difflab.data import save_image_grid
    from difflab.samplers import get_sampler

    x, file, seconds, nfe = cached_samples(run, setting, args.n, args.seed, args.batch_size,
                                           out_dir, args.progress, args.clip_x0)
    grid = out_dir / "grids" / f"{setting.slug}.png"
    save_image_grid(x[:64], grid, nrow=8)
    scores = {k: v.to_dict() for k, v in ref.evaluate(
        x, metrics, args.progress, kid_subsets=args.kid_subsets).items()}
    if nfe is None:  # samples cached before NFE were counted
        nfe = setting.steps * get_sampler(setting.sampler).evals_per_step
    return {"sampler": setting.label, "time_grid": sampling_options(run, setting)[1],
            "steps": setting.steps, "nfe": nfe,
            "guidance": setting.guidance, "scale": setting.scale, "n": int(x.shape[0]),
            "scores": scores, "samples": str(file.relative_to(out_dir)),
            "grid": str(grid.relative_to(out_dir)), "seconds": seconds}


def is_codec_run(source) -> bool:
    """Whether ``source`` (a run, checkpoint or component folder) holds a codec."""
    from difflab.components import CONFIG_JSON, get_family, read_component_config
    from difflab.runs import CONFIG_FILE, _is_checkpoint_dir, run_config

    p = Path(source)
    try:
        if (p / CONFIG_JSON).is_file():
            return get_family(read_component_config(p)["family"]).kind == "codec"
        if _is_checkpoint_dir(p):
            p = p.parent.parent
        if (p / CONFIG_FILE).is_file():
            cfg = run_config(p / CONFIG_FILE)
            return get_family(cfg.model.arch).kind == "codec"
    except Exception:  # noqa: BLE001 - not readable as a codec: the caller's loader says why
        return False
    return False


def evaluate_codec_run(args) -> dict:
    """``difflab eval`` of an autoencoder run: :func:`reconstruction_report` on its held-out
    images (``--n`` at most), rFID when ``fid`` is among ``--metrics``; writes
    ``report.json`` and ``report.md`` into ``--out`` (default ``RUN/eval``)."""
    from difflab.builders import build_dataset, build_held_out
    from difflab.fileio import write_text_atomic
    from difflab.latent.evaluate import reconstruction_report, render
    from difflab.runs import load_run

    metrics = parse_metrics(args.metrics)
    output_folder("--out", args.out)
    run = load_run(args.run, args.checkpoint)
    notes = []
    if run.checkpoint is None or (Path(run.checkpoint) / "config.json").is_file():
        raise DifflabError(f"{args.run}: evaluate the autoencoder's run folder (its [data] "
                           "section says which images are held out), not an exported codec")
    held = build_held_out(run.config)
    if held is None:
        held = build_dataset(run.config)
        notes.append("the run holds no images out: these are training images")
        what = "training images"
    else:
        what = "held-out images"
    x, _ = dataset_tensors(held)
    g = torch.Generator().manual_seed(args.seed)
    if x.shape[0] > args.n:
        x = x[torch.randperm(x.shape[0], generator=g)[:args.n]]
    ext = None
    if "fid" in metrics:
        name = args.extractor or extractor_for_dataset(run.config.data.name)
        data = build_dataset(run.config)
        native = _native_data(name, run.config, data)
        ext = get_extractor(name, native if name != "inception" else None,
                            train=args.train_extractor, progress=args.progress,
                            inception_weights=args.inception_weights)
        if native is not data:
            ext.resize_inputs = True
            notes.append(f"images are resized to {ext.image_size}x{ext.image_size} for the "
                         f"{ext.name!r} extractor")
    other = [m for m in metrics if m != "fid"]
    if other:
        notes.append(f"--metrics {','.join(other)}: not defined for reconstructions (only fid "
                     "gives rFID; PSNR and SSIM are always reported)")
    report = {"run": str(args.run), "step": run.step, "kind": "reconstruction", "data": what,
              "notes": notes,
              "reconstruction": reconstruction_report(run.net, x, ext, g)}
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(out / "report.md", render(report))
    r = report["reconstruction"]
    line = f"PSNR {r['psnr_db']['value']:.2f} dB"
    if "ssim" in r:
        line += f", SSIM {r['ssim']['value']:.4f}"
    if "rfid" in r:
        line += f", rFID {r['rfid']['value']:.4g} (floor {r['rfid_floor']['value']:.4g})"
    if "codebook" in r:
        line += f", {r['codebook']['used']}/{r['codebook']['codes']} codes used"
    print(f"{line} on {r['n']} {what}")
    print(f"wrote {out / 'report.md'}")
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    if is_codec_run(args.run):  # an autoencoder: reconstruction PSNR / SSIM / rFID
        evaluate_codec_run(args)
        return 0
    report = evaluate_run(args)
    out_dir = Path(args.out) if args.out else Path(args.run) / "eval"
    fl = report.get("floor", {}).get("fid")
    for s in report.get("settings", []):
        fid = s["scores"].get("fid")
        extra = f" (floor {fl['value']:.4g})" if fid and fl else ""
        print(f"{s['sampler']}:{s['steps']} {s['guidance']}: " + ", ".join(
            f"{k}={v['value']:.4g}" for k, v in s["scores"].items()) + extra + f" [n={s['n']}]")
    lik = report.get("likelihood")
    if lik is not None:
        value = lik.get("value")
        print(f"{lik.get('name', 'NLL')}: " + (f"{value:.4g} bits/dim (an upper bound) on "
                                               f"{lik.get('n_real')} {lik.get('data')}"
                                               if value is not None else
                                               f"n/a ({lik.get('note')})"))
    print(f"wrote {out_dir / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from difflab.evaluation.report import check_plot_metric

    metric = check_plot_metric(args.metric, "--metric")
    output_folder("--out", args.out)
    reports = [read_report(r) for r in args.runs]
    paths = write_comparison(reports, args.out, metric)
    if paths["plot"] is None:
        print(f"difflab: warning: no plot: none of the reports has {metric}", file=sys.stderr)
    print(f"wrote {paths['markdown']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``compare`` to the ``difflab`` command's sub-parsers."""
    from difflab.likelihood import VLB_VARIANCES

    p = subparsers.add_parser(
        "eval", help="sample quality (FID/KID/precision-recall/IS) and likelihood of a run",
        description="Generate n samples per sampler / guidance setting (saved and reused), "
        "compare them with the run's dataset through a feature extractor and write "
        "RUN/eval/report.md, report.json, sample grids and plots. Every FID is printed with the "
        "real-versus-real floor and the sample counts.",
        epilog="example:\n  difflab eval runs/mnist --samplers ddim:10,ddim:50 --metrics "
        "fid,kid,pr --n 5000 --train-extractor")
    p.add_argument("run", help="run folder (config.toml + checkpoints/step_N)")
    p.add_argument("--samplers", default="ddim:50",
                   help="NAME:STEPS[:GRID] list (default ddim:50; GRID e.g. log_snr, karras; "
                        "default the path's own grid)")
    p.add_argument("--guidance", default=None, help="comma list of none, cfg:SCALE[:...] "
                   "and classifier:RUN:SCALE (as difflab sample --guidance)")
    p.add_argument("--metrics", default="fid,kid,pr", help=f"subset of {','.join(METRICS)}")
    p.add_argument("--n", type=positive_int, default=5000,
                   help="samples per setting (default 5000)")
    p.add_argument("--nll-n", type=positive_int, default=256,
                   help="real images for nll (default 256)")
    p.add_argument("--nll-steps", type=positive_int, default=None,
                   help="respaced VLB steps for nll "
                   "on discrete paths (default: every step); the VLB is an upper bound that "
                   "loosens as the steps fall")
    p.add_argument("--nll-variance", default=None, metavar="|".join(VLB_VARIANCES),
                   help="reverse variance of the VLB: small (beta_tilde), large (beta), "
                   "learned (improved DDPM), analytic (Analytic-DPM, Gamma_t estimated from "
                   "the training data and cached in RUN/moments; tight at few steps) or npr / "
                   "sn (SN-/NPR-DPM, with --nll-residual); default learned for a model that "
                   "learns it, else small")
    p.add_argument("--nll-residual", default=None, metavar="RUN",
                   help="the residual run (task.kind='residual') of --nll-variance npr / sn")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="sampler option for every sampler of --samplers that takes it, e.g. "
                   "residual=RUN for npr_ddpm or eta=0.5 for ddim (repeatable)")
    p.add_argument("--kid-subsets", type=positive_int, default=100,
                   help="KID subsets (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip clean-data estimates to [-1, 1] while sampling and in the NLL "
                   "bound's means (default: the run's sample.clip_x0, as difflab sample)")
    p.add_argument("--seed", type=count_from_zero, default=0)
    p.add_argument("--checkpoint", default=None, help="step_N (default: the latest)")
    p.add_argument("--extractor", default=None, help="feature extractor (default: the "
                   "dataset's, e.g. mnist-lenet; 'inception' needs local weights)")
    p.add_argument("--train-extractor", action="store_true", help="train (and cache) the "
                   "dataset's extractor if it is not cached yet")
    p.add_argument("--inception-weights", default=None, help="Inception-v3 weights file")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=cmd_eval)
    c = subparsers.add_parser("compare", help="one table and plot across evaluated runs",
                              description="Compare the eval reports of several runs.")
    c.add_argument("runs", nargs="+", help="run folders (with eval/report.json) or reports")
    c.add_argument("--out", default="compare", help="output folder (default ./compare)")
    c.add_argument("--metric", default="fid", help="metric of the plot: "
                   f"{', '.join(PLOT_METRICS)} (default fid)")
    c.set_defaults(func=cmd_compare)
