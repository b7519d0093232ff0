"""Sampling from a trained run: load its config and a checkpoint, build the denoiser, generate.

Used by the trainer's preview grids, ``difflab sample`` and the demo. Sample ``i`` draws all of
its noise from its own stream (:class:`~difflab.samplers.PerSampleNoise` seeded from
``(seed, i)``), so it is the same whatever the batch size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.builders import build_denoiser, build_model, build_path
from difflab.cond import Cond
from difflab.config import Config, load_config
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError
from difflab.paths import EDM, VE, DiscreteVP, GaussianPath
from difflab.samplers import Hooks, PerSampleNoise, get_sampler, sample
from difflab.samplers.thresholding import StaticThreshold
from difflab.samplers.timesteps import make_grid
from difflab.training.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    CheckpointError,
    load_weights,
    logger,
    resolve_checkpoint,
    resumable_checkpoint,
    verify_checkpoint,
)
from difflab.training.data import mix_seed

Guide = Callable[[DenoiserBase, "Cond | None", "Cond | None"], DenoiserBase]

CONFIG_FILE = "config.toml"


def auto_grid_name(path: GaussianPath) -> str:
    """``discrete`` on discrete paths, ``karras`` on VE / EDM, ``uniform`` otherwise."""
    if isinstance(path, DiscreteVP):
        return "discrete"
    if isinstance(path, (VE, EDM)):
        return "karras"
    return "uniform"


def sampling_grid(path: GaussianPath, steps: int, grid: str = "auto",
                  grid_options: dict[str, Any] | None = None) -> torch.Tensor:
    """The time grid named ``grid`` (``auto``: :func:`auto_grid_name`) with ``steps`` steps."""
    name = auto_grid_name(path) if grid == "auto" else grid
    return make_grid(name, path, steps, **(grid_options or {}))


def sample_seeds(seed: int, n: int) -> list[int]:
    """One seed per sample, derived from ``(seed, i)``."""
    return [mix_seed(seed, 0x5A3B1E, i) for i in range(n)]


@torch.no_grad()
def generate(den: DenoiserBase, shape: Sequence[int], n: int, *, sampler: str = "ddim",
             steps: int = 50, grid: str = "auto", grid_options: dict[str, Any] | None = None,
             options: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 256,
             labels: torch.Tensor | None = None, device: torch.device | str | None = None,
             clip_x0: bool = False, cond: Cond | None = None, null_cond: Cond | None = None,
             guide: Guide | None = None, progress: str | None = None) -> torch.Tensor:
    """Draw ``n`` samples of ``shape = (C, H, W)`` with a registered sampler.

    Args:
        den: the denoiser (conditioning is bound per batch from ``labels``).
        shape: the shape of one sample.
        n: number of samples.
        sampler: a name in :data:`difflab.samplers.SAMPLERS`.
        steps: steps of the grid.
        grid, grid_options: the time grid (see :func:`sampling_grid`).
        options: sampler options (``eta``, ``variance``, ...).
        seed: base seed; sample ``i`` uses its own stream.
        batch_size: samples per network batch.
        labels: optional class ids ``(n,)`` (shorthand for ``cond=Cond(labels=labels)``).
        cond: the condition of all ``n`` samples (sliced per batch).
        null_cond: the null / negative condition guidance contrasts ``cond`` with.
        guide: ``guide(den, cond_batch, null_batch) -> denoiser`` (e.g. classifier-free
            guidance, :func:`difflab.training.guided.guided_inputs`); default:
            ``den.bind(cond)``.
        progress: a progress-bar title (None: no bar).
        device: where to sample (default: the network's device or the CPU).
        clip_x0: clip every clean-data estimate to ``[-1, 1]`` (static thresholding, DDPM's
            ``clip_denoised``) through the sampler's ``correct_x0`` hook.

    Returns:
        ``(n, C, H, W)`` float32 samples on the CPU.
    """
    if labels is not None:
        if cond is not None:
            raise DifflabError("give labels or cond, not both")
        cond = Cond(labels=labels)
    for what, c in (("cond", cond), ("null_cond", null_cond)):
        if c is not None and c.batch_size() not in (None, n):
            raise DifflabError(f"{what} holds {c.batch_size()} conditions for n={n} samples")
    spec = get_sampler(sampler)
    if clip_x0 and "hooks" not in spec.options():
        raise DifflabError(f"clip_x0=True needs a sampler with hooks; {sampler!r} has none")
    t_grid = sampling_grid(den.path, steps, grid, grid_options)
    seeds = sample_seeds(seed, n)
    if device is None:
        net = getattr(den, "net", None)
        params = list(net.parameters()) if isinstance(net, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    out = []
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=progress, disable=progress is None, unit="img", leave=False)
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        noise = PerSampleNoise(seeds[lo:hi])
        x = den.path.prior_sample((hi - lo, *shape), noise=noise).to(device)
        c = None if cond is None else cond[lo:hi].to(device)
        nc = None if null_cond is None else null_cond[lo:hi].to(device)
        d = guide(den, c, nc) if guide is not None else den if c is None else den.bind(c)
        kw = dict(options or {})
        if "noise" in spec.options():
            kw["noise"] = noise
        if clip_x0:
            kw["hooks"] = Hooks(correct_x0=StaticThreshold(-1.0, 1.0))
        out.append(sample(sampler, d, x, t_grid, **kw).float().cpu())
        bar.update(hi - lo)
    bar.close()
    return torch.cat(out)


def default_labels(cfg: Config, n: int) -> torch.Tensor | None:
    """Class ids ``i mod num_classes`` for a class-conditional model (None otherwise)."""
    k = cfg.model.num_classes
    return None if not cfg.model.class_cond or not k else torch.arange(n) % k


@dataclass
class LoadedRun:
    """A trained model ready to sample."""

    config: Config
    net: nn.Module
    denoiser: DenoiserBase
    path: GaussianPath
    checkpoint: Path
    step: int
    ema: bool

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.in_channels, m.image_size, m.image_size)


def load_run(run_dir: str | os.PathLike, checkpoint: str | None = None, ema: bool = True,
             device: torch.device | str = "cpu") -> LoadedRun:
    """Load ``run_dir/config.toml`` and a checkpoint (default: the latest that verifies).

    Args:
        run_dir: a run folder (or a checkpoint folder inside one).
        checkpoint: ``step_N`` (None: latest; a corrupt latest falls back with a warning).
        ema: load the EMA weights (else the raw trained weights).
        device: where to put the network.
    """
    run = Path(run_dir)
    if _is_checkpoint_dir(run):
        run, checkpoint = run.parent.parent, run.name
    cfg_file = run / CONFIG_FILE
    if not cfg_file.is_file():
        raise DifflabError(f"{run} is not a run folder: {CONFIG_FILE} is missing (train one with "
                           "difflab train CONFIG --out RUN)")
    cfg = load_config(cfg_file)
    if cfg.model.image_size is None:
        raise DifflabError(f"{cfg_file} has no resolved model.image_size: it was not written by "
                           "difflab train")
    ckpt = _pick_checkpoint(run, checkpoint)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: spare the caller's RNG
        net = build_model(cfg)
    load_weights(net, ckpt / (EMA_FILE if ema else MODEL_FILE))
    net.to(device).eval().requires_grad_(False)
    path = build_path(cfg)
    den = build_denoiser(cfg, net, path)
    step = int(ckpt.name.removeprefix("step_"))
    return LoadedRun(cfg, net, den, path, ckpt, step, ema)


def _is_checkpoint_dir(p: Path) -> bool:
    return p.name.startswith("step_") and p.parent.name == "checkpoints"


def _pick_checkpoint(run: Path, name: str | None) -> Path:
    if name is not None:
        ckpt = resolve_checkpoint(run, name)
        verify_checkpoint(ckpt)
        return ckpt
    ckpt = resolve_checkpoint(run)
    try:
        verify_checkpoint(ckpt)
        return ckpt
    except CheckpointError as e:
        logger.warning("%s; using the newest checkpoint that verifies", e)
    found = resumable_checkpoint(run / "checkpoints")
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {run / 'checkpoints'}")
    return found
