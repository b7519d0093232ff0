"""Analytic-DPM's moments of a trained run, estimated from its own training data and cached.

Analytic-DPM (Bao et al. 2022a, ICLR) needs one number per time of the grid,

    Gamma_t = E_{x0 ~ data, eps} ||eps_hat(alpha_t x0 + sigma_t eps, t)||^2 / d      (eq. 8),

estimated by Monte Carlo over training images (:func:`~difflab.samplers.analytic.estimate_gamma`).
:func:`run_moments` does that for a :class:`~difflab.runs.LoadedRun`: ``n_samples`` images of
the run's ``[data]`` (drawn without replacement, fixed seed), fresh noise per time, and writes
the result to ``RUN/moments/<checkpoint>-<ema|raw>-<key>.safetensors``. The key hashes
everything the estimate depends on (the weights' SHA-256 from the checkpoint manifest, the
grid's times, the sample count, the seed, the conditioning, the path and the ``[data]``
section), so a cache of another checkpoint or grid is never read; the next call with the same
inputs reads the file instead of evaluating the network. ``difflab sample`` / ``difflab eval``
(the ``analytic_ddpm`` / ``analytic_ddim`` samplers) and ``difflab eval --nll-variance
analytic`` (the VLB with Analytic-DPM's variance) go through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from difflab.errors import DifflabError, bad_value
from difflab.runs import LoadedRun
from difflab.samplers import analytic

logger = logging.getLogger("difflab.moments")

DEFAULT_SAMPLES = 256
"""Training images per time. ``Gamma_t`` is a mean over images of ``||eps_hat||^2 / d``, itself
an average over the ``d`` pixels, so its Monte Carlo spread is small; the standard error of
every estimate is stored beside it (``AnalyticMoments.stderr``)."""
SEED = 0
"""The seed of the image subset and the noise: the estimate depends only on the run."""
CONDITIONS = ("data", "null")
"""How a conditional run is conditioned while estimating: each image's own label / caption
(``data``: what a sampler conditioned on a class sees) or the null condition (``null``: the
unconditional branch, whose likelihood ``difflab eval`` reports)."""
FOLDER = "moments"
VERSION = 1  # bump when the estimate's definition changes: old cache files are then not read


def run_moments(run: LoadedRun, grid, *, condition: str = "data",
                n_samples: int = DEFAULT_SAMPLES, seed: int = SEED, batch_size: int = 256,
                what: str = "Analytic-DPM") -> tuple[analytic.AnalyticMoments, Path | None]:
    """``Gamma_t`` of ``run`` at the positive times of ``grid``, read from the run's cache or
    estimated from its training data and cached. Returns ``(moments, cache file)``.

    Args:
        run: the loaded run (its weights, path, conditioner and ``[data]`` section).
        grid: the sampler's or the bound's time grid (zeros are skipped).
        condition: ``data`` or ``null`` (see :data:`CONDITIONS`; no effect when unconditional).
        n_samples: training images per time (fewer when the dataset is smaller).
        seed: seed of the image subset and of the noise.
        batch_size: images per network call.
        what: who asks (named in messages).
    """
    if condition not in CONDITIONS:
        raise bad_value("condition", condition, "one of " + ", ".join(CONDITIONS))
    if not isinstance(n_samples, int) or n_samples < 2:
        raise bad_value("n_samples", n_samples, "an int >= 2")
    times = torch.as_tensor(grid, dtype=torch.float64).flatten()
    times = times[times > 0]
    if times.numel() == 0:
        raise DifflabError(f"{what}: the grid has no positive time to estimate Gamma_t at")
    kind = run.conditioner.kind if run.conditioner is not None else "none"
    key = {"version": VERSION, "weights": _weights_id(run), "ema": run.ema,
           "times": [float(t).hex() for t in times], "n_samples": n_samples, "seed": seed,
           "condition": "none" if kind == "none" else condition, "path": repr(run.path),
           "data": run.config.data.model_dump(mode="json")}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = _cache_folder(run)
    name = run.checkpoint.name if run.checkpoint is not None else "model"
    file = folder / f"{name}-{'ema' if run.ema else 'raw'}-{digest}.safetensors"
    if file.is_file():
        mom = analytic.AnalyticMoments.load(file)
        if mom.times.numel() == times.numel() and torch.equal(mom.times, times.sort().values):
            logger.info("Analytic-DPM moments (Gamma_t at %d times, %d training images) read "
                        "from %s", mom.times.numel(), mom.n_samples, file)
            return mom, file
    x0, cond = _training_images(run, n_samples, seed, condition, what)
    logger.info("estimating Analytic-DPM moments (Gamma_t, Bao et al. 2022 eq. 8) from %d "
                "training images at %d times (%d network evaluations); cached in %s",
                x0.shape[0], times.numel(), x0.shape[0] * times.numel(), file)
    g = torch.Generator().manual_seed(seed + 1)
    mom = analytic.estimate_gamma(run.denoiser, x0, times, generator=g, batch_size=batch_size,
                                  cond=cond, progress=f"{what}: estimating Gamma_t")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mom.save(file)
    except OSError as e:  # a read-only run folder: the moments still serve this call
        logger.warning("could not cache the Analytic-DPM moments in %s (%s)", file, e)
        return mom, None
    return mom, file


def _cache_folder(run: LoadedRun) -> Path:
    """``RUN/moments`` for a checkpoint of a run folder; for an exported component (whose
    folder's content is its identity) the user cache ``$DIFFLAB_CACHE/moments``."""
    ckpt = run.checkpoint
    if ckpt is not None and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / FOLDER
    from difflab.evaluation.extractor import cache_dir

    return cache_dir() / FOLDER


def _weights_id(run: LoadedRun) -> str:
    """The SHA-256 of the loaded weights from the checkpoint manifest, else the names, sizes
    and modification times of the folder's files (an exported component)."""
    from difflab.training.checkpoint import EMA_FILE, MANIFEST_FILE, MODEL_FILE

    ckpt = run.checkpoint
    if ckpt is None:
        raise DifflabError("the Analytic-DPM moments of a model without a checkpoint folder "
                           "cannot be cached: pass moments=AnalyticMoments yourself")
    manifest = ckpt / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            return files[EMA_FILE if run.ema else MODEL_FILE]["sha256"]
        except (ValueError, KeyError, TypeError):
            pass
    stats = sorted((str(f.relative_to(ckpt)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in ckpt.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _training_images(run: LoadedRun, n: int, seed: int, condition: str, what: str):
    """``n`` images of the run's ``[data]`` (a fixed-seed subset) on the model's device, and
    their conditions (None for an unconditional run)."""
    from difflab.builders import build_dataset

    d = run.config.data
    try:
        data = build_dataset(run.config)
    except (DifflabError, OSError, ValueError) as e:
        text = " ".join(str(e).split())
        raise DifflabError(
            f"{what} estimates Analytic-DPM's Gamma_t from the run's training data, but data "
            f"{d.name!r} (split {d.split!r}, root {d.root!r}) cannot be loaded: {text}"
        ) from None
    if len(data) < 2:
        raise DifflabError(f"{what}: the run's data {d.name!r} has {len(data)} images; "
                           "estimating Gamma_t needs at least 2")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n].tolist()
    items = [data[i] for i in idx]
    x0 = torch.stack([torch.as_tensor(im, dtype=torch.float32) for im, _ in items])
    if run.codec is not None:  # a latent run: Gamma_t of the scaled latents it trained on
        codec = run.codec.to("cpu")
        with torch.no_grad():
            x0 = torch.cat([codec.to_latent(b, generator=g) for b in x0.split(64)])
    if tuple(x0.shape[1:]) != tuple(run.sample_shape):
        raise DifflabError(f"{what}: the run's data {d.name!r} gives images of shape "
                           f"{tuple(x0.shape[1:])} but the model samples "
                           f"{tuple(run.sample_shape)}: Gamma_t needs the training data")
    net = run.net
    params = list(net.parameters()) if isinstance(net, torch.nn.Module) else []
    device = params[0].device if params else torch.device("cpu")
    cond = _conditions(run, [info for _, info in items], condition, what)
    return x0.to(device), None if cond is None else cond.to(device)


def _conditions(run: LoadedRun, infos: list[dict], condition: str, what: str):
    c = run.conditioner
    if c is None or c.kind == "none":
        return None
    n = len(infos)
    if condition == "null":
        return c.make(n, prompts=[""] if c.kind == "text" else None)[1]
    if c.kind == "class":
        labels = [info.get("label") for info in infos]
        if any(y is None for y in labels):
            raise DifflabError(f"{what}: the class-conditional run's data has no labels to "
                               "condition Gamma_t's estimate on")
        return c.make(n, labels=labels)[0]
    captions = [info.get("caption") for info in infos]
    if any(cap is None for cap in captions):
        raise DifflabError(f"{what}: the text-conditional run's data has no captions to "
                           "condition Gamma_t's estimate on (data.captions)")
    return c.make(n, prompts=captions)[0]


def checked_file(value) -> analytic.AnalyticMoments:
    """``--option moments=FILE``: moments saved by :meth:`AnalyticMoments.save`."""
    p = Path(os.fspath(value))
    if not p.is_file():
        raise bad_value("moments", str(value), "a .safetensors or .json file written by "
                        "AnalyticMoments.save (or leave it out: the run's moments are estimated "
                        "and cached)")
    return analytic.AnalyticMoments.load(p)
