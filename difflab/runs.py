"""A trained model loaded for sampling or guiding: a run folder (its resolved ``config.toml``
and a checkpoint), a checkpoint folder inside one, or a component folder written by
``difflab export`` (:class:`LoadedRun`, :func:`load_run`). Version-1 run configs are converted
in memory; weights of older family layouts are converted by their ``family_version``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError
from difflab.paths import GaussianPath

logger = logging.getLogger("difflab.sampling")
CONFIG_FILE = "config.toml"


# ----- a loaded model ----------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained model ready to sample (or to guide with).

    Attributes:
        config: the run's resolved config.
        net: the network (EMA weights unless ``ema`` is false).
        denoiser: ``net`` as the core reads it (its task's ``wrap``).
        path: the noise path.
        checkpoint: the checkpoint (or component) folder the weights came from.
        step: its training step.
        ema: whether the weights are the EMA ones.
        task: the run's training task (``for_training=False``).
        conditioner: builds its conditions (classes, prompts).
        codec: the decoder of latent runs (None: pixel space).
    """

    config: Any
    net: nn.Module
    denoiser: DenoiserBase
    path: GaussianPath
    checkpoint: Path | None
    step: int
    ema: bool
    task: Any = None
    conditioner: Any = None
    codec: Any = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.task.sample_shape

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one decoded image: ``sample_shape``, or for a latent run the codec's
        images of those latents (``(C, f h, f w)``)."""
        shape = tuple(self.sample_shape)
        if self.codec is None:
            return shape
        f = self.codec.factor
        return (self.codec.image_channels, *(side * f for side in shape[1:]))

    @property
    def generative(self) -> bool:
        return bool(getattr(self.task, "generative", False))

    @classmethod
    def from_task(cls, task, net: nn.Module, checkpoint: Path | None = None, step: int = 0,
                  ema: bool = True) -> LoadedRun:
        return cls(task.cfg, net, task.wrap(net), task.path, checkpoint, step, ema, task,
                   task.conditioner, getattr(task, "codec", None))


def load_run(run_dir: str | os.PathLike, checkpoint: str | None = None, ema: bool = True,
             device: torch.device | str = "cpu", single_file: dict | None = None) -> LoadedRun:
    """Load a run folder's ``config.toml`` and a checkpoint (default: the latest that
    verifies), a checkpoint folder inside a run, a component folder of ``difflab export``, a
    diffusers Stable Diffusion pipeline folder (:mod:`difflab.interop.pipeline`), or a DiT
    checkpoint: a facebookresearch/DiT ``.pt`` file, a diffusers ``DiTTransformer2DModel`` or
    ``DiTPipeline`` folder, which carry no path and are sampled on the DiT paper's (discrete
    linear betas 1e-4 .. 0.02, N = 1000, eps prediction with learned sigma, class-conditional
    with 1000 classes; :mod:`difflab.interop.dit_run`).

    Args:
        run_dir: the folder.
        checkpoint: ``step_N`` (None: latest; a corrupt latest falls back with a warning).
        ema: load the EMA weights (else the raw trained weights).
        device: where to put the network.
        single_file: for an SD single-file checkpoint (``.safetensors`` / ``.ckpt``): its
            ``tokenizer`` folder (default: a ``tokenizer/`` beside the file), ``config`` (a
            pipeline folder or the LDM YAML; default: ``NAME.yaml`` beside it) and
            ``prediction`` (:mod:`difflab.interop.single_file`); for a DiT checkpoint: its
            ``vae`` folder (default: ``vae/`` beside it) and ``num_heads`` (a ``.pt`` file).
    """
    from difflab.components import CONFIG_JSON
    from difflab.interop.diffusers import diffusers_class
    from difflab.interop.dit_run import dit_parts, is_dit_source
    from difflab.interop.pipeline import is_pipeline, pipeline_parts
    from difflab.interop.single_file import cached_pipeline, is_single_file

    run = Path(run_dir)
    if is_dit_source(run):  # a facebookresearch DiT .pt, a diffusers DiT folder or pipeline
        task, net = dit_parts(run, device, **(single_file or {}))
        return LoadedRun.from_task(task, net, run, 0, True)
    if is_single_file(run):  # SD's original layout: converted once, then read as a pipeline
        opts = {k: v for k, v in (single_file or {}).items() if v is not None}
        if "tokenizer" not in opts and (run.parent / "tokenizer").is_dir():
            opts["tokenizer"] = run.parent / "tokenizer"
        task, net = pipeline_parts(cached_pipeline(run, **opts), device)
        return LoadedRun.from_task(task, net, run, 0, True)
    if single_file:
        raise DifflabError(f"{run}: single-file options ({', '.join(single_file)}) apply to a "
                           ".safetensors / .ckpt Stable Diffusion file")
    if is_pipeline(run):  # a diffusers Stable Diffusion folder
        task, net = pipeline_parts(run, device)
        return LoadedRun.from_task(task, net, run, 0, True)
    if run.is_file():
        raise DifflabError(f"{run} is a file: give a run folder, a component or pipeline folder, "
                           "or an SD single-file checkpoint (.safetensors, .ckpt)")
    if (run / CONFIG_JSON).is_file():
        name = diffusers_class(run)
        if name is not None:
            raise DifflabError(f"{run} is one diffusers component ({name}), not a model to "
                               "sample: give the pipeline folder holding it (with "
                               "model_index.json), or convert it with difflab convert")
        return _load_component(run, device)
    if _is_checkpoint_dir(run):
        run, checkpoint = run.parent.parent, run.name
    cfg_file = run / CONFIG_FILE
    if not cfg_file.is_file():
        raise DifflabError(f"{run} is not a run folder: {CONFIG_FILE} is missing (train one with "
                           "difflab train CONFIG --out RUN)")
    cfg = run_config(cfg_file)
    ckpt = _pick_checkpoint(run, checkpoint)
    task, net = _build_for_sampling(cfg)
    from difflab.training.checkpoint import EMA_FILE, MODEL_FILE

    load_part(task, "model", net, ckpt / (EMA_FILE if ema else MODEL_FILE))
    net.to(device).eval().requires_grad_(False)
    task.conditioner.device = torch.device(device)
    step = int(ckpt.name.removeprefix("step_"))
    return LoadedRun.from_task(task, net, ckpt, step, ema)


def run_config(file: Path):
    """A run folder's config; a version-1 file is converted in memory (with a hint)."""
    from difflab.config import config_from_dict, read_toml
    from difflab.upgrade import is_legacy

    raw = read_toml(file)
    if is_legacy(raw):
        logger.info("%s uses the version-1 config layout; it is converted on every load "
                    "(convert it once with: difflab upgrade %s)", file, file.parent)
    cfg = config_from_dict(raw, f"config {file}", upgrade=True)
    return cfg


def _build_for_sampling(cfg):
    from difflab.tasks import make_task

    task = make_task(cfg, for_training=False)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: spare the caller's RNG
        net = task.build_model()
    return task, net


def load_part(task, name: str, module: nn.Module, file: Path) -> None:
    """Load a part's weights, converting an older layout of its family (the layout is in the
    file's metadata; files without one are layout 1)."""
    from difflab.components import upgrade_weights
    from difflab.training.checkpoint import check_compatible, read_metadata, read_safetensors

    tensors = read_safetensors(file)
    fam, config = task.part_family(name)
    if fam is not None:  # a part of a registered family: convert an older weight layout
        version = int(read_metadata(file).get("family_version", 1))
        tensors = upgrade_weights(fam, config, tensors, version)
    check_compatible(module, tensors, f"checkpoint file {file}")
    module.load_state_dict(tensors, strict=True)


def _load_component(folder: Path, device) -> LoadedRun:
    """A component written by ``difflab export``: its metadata holds the run's config."""
    from difflab.components import load, read_component_config
    from difflab.config import config_from_dict, tomllib

    meta = read_component_config(folder)
    text = (meta.get("metadata") or {}).get("run_config")
    if not text:
        raise DifflabError(f"{folder} is a {meta['family']!r} component without a run config: "
                           "sample a run folder, or export one with difflab export RUN OUT")
    cfg = config_from_dict(tomllib.loads(text), f"{folder}/config.json:metadata.run_config",
                           upgrade=True)
    from difflab.tasks import make_task

    task = make_task(cfg, for_training=False)
    net = load(folder, device).eval().requires_grad_(False)
    task.conditioner.device = torch.device(device)
    step = int((meta.get("metadata") or {}).get("step", 0))
    return LoadedRun.from_task(task, net, folder, step, True)


def _is_checkpoint_dir(p: Path) -> bool:
    return p.name.startswith("step_") and p.parent.name == "checkpoints"


def _pick_checkpoint(run: Path, name: str | None) -> Path:
    from difflab.training.checkpoint import (
        CheckpointError,
        resolve_checkpoint,
        resumable_checkpoint,
        verify_checkpoint,
    )

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
    found = resumable_checkpoint(run / "checkpoints", move_aside=False)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {run / 'checkpoints'}")
    return found
