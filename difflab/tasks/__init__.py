"""Training tasks: what a run trains, from which parts, with which loss.

A task (:class:`~difflab.tasks.base.TrainingTask`) turns a validated config into

- its *trainable* parts (``{"model": network}``; an adapter run: ``{"adapter": ...}``), each
  given its own EMA by the trainer, and its *frozen* parts (a text encoder, a codec, a
  teacher, a base model), named in checkpoints by source and content hash, never copied;
- ``loss(modules, x, cond, generator) -> (B,)``: the per-example loss of one micro-batch;
- ``sample_shape``: the shape of one sample (``(C, H, W)``; a latent or a video shape later);
- ``wrap(net)``: the network as the core reads it (a ``Denoiser``, a ``NoisyModel``);
- for generative tasks, a loaded model that :func:`difflab.generate` samples.

``[task] kind`` names the task; built in: ``diffusion`` (DDPM / DDIM / score / EDM / flow
training, :mod:`difflab.tasks.diffusion`), ``classifier`` (ADM's noise-aware classifier) and
``contrastive`` (a noise-aware image-text alignment model), :mod:`difflab.tasks.noisy`, and
``residual`` (SN- / NPR-DPM's variance head of a frozen diffusion run),
:mod:`difflab.tasks.residual`.
A new task is a subclass registered with :func:`register_task`.
"""

from __future__ import annotations

import importlib

from difflab.errors import DifflabError

__all__ = ["TASKS", "get_task", "make_task", "register_task"]

TASKS: dict[str, type] = {}
_BUILTIN = ("difflab.tasks.diffusion", "difflab.tasks.noisy", "difflab.tasks.autoencoder",
            "difflab.tasks.residual", "difflab.baselines.tasks")
_LOADED = False


def register_task(cls: type) -> type:
    """Register a :class:`~difflab.tasks.base.TrainingTask` subclass under ``cls.kind``
    (usable as a decorator)."""
    TASKS[cls.kind] = cls
    return cls


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for m in _BUILTIN:
            importlib.import_module(m)


def get_task(kind: str) -> type:
    """The task class registered as ``kind``."""
    _load()
    if kind not in TASKS:
        raise DifflabError(f"task.kind={kind!r} is not a registered training task: expected one "
                           f"of {', '.join(sorted(TASKS))}")
    return TASKS[kind]


def make_task(cfg, dataset=None, device="cpu", accelerator=None, for_training: bool = True):
    """The task of ``cfg`` (its ``[task] kind``); see :class:`~difflab.tasks.base.TrainingTask`.
    """
    return get_task(cfg.task.kind)(cfg, dataset=dataset, device=device, accelerator=accelerator,
                                   for_training=for_training)
