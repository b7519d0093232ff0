"""A published DiT checkpoint as a model to sample (``difflab sample FILE``, ``load_run``).

A facebookresearch/DiT ``.pt`` file, a diffusers ``DiTTransformer2DModel`` folder or a diffusers
``DiTPipeline`` folder holds a network but no forward process. It is sampled on the DiT paper's
(Peebles & Xie 2023, Sec. 4 "Diffusion"): DDPM's discrete linear betas from 1e-4 to 0.02 over
N = 1000 steps (a ``DiTPipeline``'s ``scheduler/`` config, when present, gives them instead),
eps prediction with ADM's learned covariance (iDDPM's ``v``, when the checkpoint has the
variance channels), class-conditional on ImageNet's 1000 classes with the null class 1000 for
classifier-free guidance. Defaults, as the DiT repository's ``sample.py``: 250 DDPM steps with
the learned variances (``linspace`` respacing, as iDDPM's) and guidance scale 4 (the paper's
FID-50K is at scale 1.5: ``--guidance cfg:1.5``); any difflab sampler and guidance runs on it.

A DiT over latents (4 channels: every released checkpoint) needs the VAE it was trained with,
Stable Diffusion's (``stabilityai/sd-vae-ft-ema`` or ``-mse``, a diffusers ``AutoencoderKL``
folder): the ``vae`` option, else a ``vae/`` folder beside the file (a ``DiTPipeline``'s own
``vae/``; beside a transformer folder, its sibling). Nothing is downloaded and no code runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.interop.dit import (
    DIFFUSERS_CLASS,
    is_dit_checkpoint,
    load_diffusers_dit,
    load_dit_checkpoint,
)
from difflab.networks.dit import DiT, DiTConfig

PIPELINE_CLASS = "DiTPipeline"
# DiT Sec. 4: "t_max = 1000 linear variance schedule ranging from 1e-4 to 2e-2"
DIT_PATH = {"kind": "discrete_linear", "N": 1000, "beta_start": 1e-4, "beta_end": 0.02}
OPTIONS = ("vae", "num_heads")


def _pipeline_class(folder: Path) -> str | None:
    f = folder / "model_index.json"
    if not f.is_file():
        return None
    try:
        name = json.loads(f.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def is_dit_source(path: str | os.PathLike) -> bool:
    """A facebookresearch DiT file, a diffusers DiT transformer folder or a ``DiTPipeline``."""
    from difflab.interop.diffusers import diffusers_class

    p = Path(path)
    if p.is_file():
        return is_dit_checkpoint(p)
    return p.is_dir() and (diffusers_class(p) == DIFFUSERS_CLASS
                           or _pipeline_class(p) == PIPELINE_CLASS)


def _vae_factor(vae: Path) -> int | None:
    f = vae / "config.json"
    try:
        widths = json.loads(f.read_text()).get("block_out_channels")
    except (OSError, ValueError, AttributeError):
        return None
    return 2 ** (len(widths) - 1) if isinstance(widths, list) and widths else None


def dit_run_config(c: DiTConfig, vae: Path | None = None,
                   scheduler: dict[str, Any] | None = None) -> dict[str, Any]:
    """The difflab run config (a dict) that samples a DiT on the paper's path (module
    docstring); ``vae`` makes it a latent run; ``scheduler`` is a diffusers scheduler config."""
    from difflab.components import get_family

    path = dict(DIT_PATH)
    if scheduler is not None:
        from difflab.interop.pipeline import scheduler_settings

        path, prediction, _ = scheduler_settings(scheduler)
        if prediction != "eps":
            raise DifflabError(f"the DiT pipeline's scheduler says prediction_type={prediction!r}"
                               "; DiT predicts eps")
    model = {k: v for k, v in get_family("dit").config_dict(c).items() if v is not None}
    sample: dict[str, Any] = {"sampler": "ddpm", "steps": 250, "grid": "discrete",
                              "grid_options": {"spacing": "linspace"}, "guidance": "cfg:4",
                              "n": 8, "seed": 0, "clip_x0": vae is None}
    if c.learn_sigma:
        sample["options"] = {"variance": "learned"}
    data: dict[str, Any] = {"name": "folder"}  # what fine-tuning would train on (set data.root)
    factor = 1 if vae is None else _vae_factor(vae)
    if factor is not None:
        data["image_size"] = c.image_size * factor
    config = {"path": path, "model": {"arch": "dit", **model},
              "task": {"kind": "diffusion", "prediction": "eps", "cond": "class",
                       "p_uncond": 0.1},
              "objective": ({"name": "hybrid"} if c.learn_sigma
                            else {"name": "denoising", "target": "eps"}),
              "data": data, "sample": sample}
    if vae is not None:
        config["codec"] = {"run": str(vae)}
    return config


def _read(p: Path, device: Any, num_heads: int | None) -> tuple[DiT, list[Path], dict | None]:
    """The network, where its VAE would be, and a pipeline's scheduler config."""
    if p.is_file():
        return load_dit_checkpoint(p, num_heads=num_heads, device=device), [p.parent / "vae"], None
    if num_heads is not None:
        raise DifflabError(f"{p}: num_heads applies to a facebookresearch .pt file (a diffusers "
                           "config.json records its heads)")
    if _pipeline_class(p) == PIPELINE_CLASS:
        sched = p / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(sched.read_text()) if sched.is_file() else None
        return load_diffusers_dit(p / "transformer", device), [p / "vae"], scheduler
    return load_diffusers_dit(p, device), [p / "vae", p.parent / "vae"], None


def dit_parts(path: str | os.PathLike, device: Any = "cpu", **options: Any):
    """``(task, net)`` of a DiT checkpoint, file or folder, for :func:`difflab.runs.load_run`.

    Options: ``vae`` (the VAE folder of a latent DiT) and ``num_heads`` (of a .pt file; default
    Table 1's). Anything else (the SD single-file options) is refused by name.
    """
    from difflab.config import config_from_dict
    from difflab.tasks import make_task

    p = Path(path)
    opts = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise DifflabError(f"{p} is a DiT checkpoint: options {unknown} apply to Stable "
                           f"Diffusion single files; a DiT takes {', '.join(OPTIONS)}")
    net, beside, scheduler = _read(p, device, opts.get("num_heads"))
    vae = opts.get("vae")
    vae = Path(vae) if vae is not None else next((v for v in beside if v.is_dir()), None)
    if vae is None and net.config.in_channels not in (1, 3):
        raise DifflabError(f"{p}: this DiT denoises {net.config.in_channels}-channel latents and "
                           "needs the VAE it was trained with (DiT: stabilityai/sd-vae-ft-ema or "
                           f"-mse, a diffusers AutoencoderKL folder): put it at {beside[0]} or "
                           "pass vae=FOLDER")
    raw = dit_run_config(net.config, vae, scheduler)
    try:
        cfg = config_from_dict(raw, f"DiT checkpoint {p}")
    except DifflabError as e:
        raise DifflabError(f"{p}: the DiT checkpoint does not map onto a difflab run: {e}"
                           ) from None
    task = make_task(cfg, for_training=False, device=device)
    task.conditioner.device = torch.device(device)
    return task, net.requires_grad_(False)


__all__ = ["DIT_PATH", "dit_parts", "dit_run_config", "is_dit_source"]
