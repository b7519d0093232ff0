"""A diffusers Stable Diffusion pipeline folder as a difflab model to sample.

A pipeline folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` and ``scheduler/``) becomes a :class:`difflab.runs.LoadedRun`
(:func:`difflab.runs.load_run` of the folder, through :func:`pipeline_parts`): the U-Net read by
:mod:`difflab.interop.diffusers_unet`, the VAE as difflab's ``autoencoder_kl`` codec with its
``scaling_factor``, the CLIP text encoder through ``transformers`` with SD's convention (prompts
padded to 77 tokens, no padding mask: the context SD's U-Nets were trained on), and the
scheduler config as a difflab path, prediction and default sampling grid:

=========================  =================================================================
scheduler config           difflab
=========================  =================================================================
``beta_schedule``          ``scaled_linear`` -> ``discrete_scaled_linear`` (SD v1 / v2),
                           ``linear`` -> ``discrete_linear``, ``squaredcos_cap_v2`` ->
                           ``discrete_cosine``; ``beta_start`` / ``beta_end`` /
                           ``num_train_timesteps`` as they are
``rescale_betas_zero_snr`` ``path.zero_snr`` (Lin et al. 2024)
``prediction_type``        ``epsilon`` -> ``eps``, ``v_prediction`` -> ``v`` (SD 2 at 768 px),
                           ``sample`` -> ``x0``
``timestep_spacing``,      the ``discrete`` grid's ``spacing`` and ``steps_offset`` (SD: leading,
``steps_offset``           1: 981, 961, ..., 1 for 50 steps)
``set_alpha_to_one``       False: the last step lands on ``alpha_bar_0`` (grid ``final="first"``)
``_class_name``            the default sampler (DDIM -> ``ddim``, PNDM -> ``pndm``, Euler ->
                           ``euler``, DPM-Solver++ -> ``dpmpp_2m``, ...); any difflab sampler
                           runs on the model
=========================  =================================================================

Nothing is downloaded and no code in the folder runs: weights are safetensors (or ``.bin`` read
with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError

MODEL_INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
             "StableDiffusionDepth2ImgPipeline")
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_BETAS = {"scaled_linear": "discrete_scaled_linear", "linear": "discrete_linear",
          "squaredcos_cap_v2": "discrete_cosine"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "PNDMScheduler": "pndm",
             "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler":
                 "euler_ancestral", "HeunDiscreteScheduler": "heun",
             "DPMSolverMultistepScheduler": "dpmpp_2m", "UniPCMultistepScheduler": "unipc_bh2",
             "LMSDiscreteScheduler": "dpmpp_2m"}


def is_pipeline(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MODEL_INDEX).is_file()


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DifflabError(f"{file} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise DifflabError(f"{file} holds a {type(data).__name__}, not a JSON object")
    return data


def scheduler_settings(cfg: dict[str, Any]) -> tuple[dict, str, dict]:
    """``(path section, prediction, sample section)`` of a diffusers scheduler config."""
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in _BETAS:
        raise DifflabError(f"scheduler beta_schedule={schedule!r}: difflab reads "
                           f"{', '.join(_BETAS)}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise DifflabError(f"scheduler prediction_type={pred!r}: difflab reads "
                           f"{', '.join(_PREDICTIONS)}")
    path: dict[str, Any] = {"kind": _BETAS[schedule],
                            "N": int(cfg.get("num_train_timesteps", 1000))}
    betas = cfg.get("trained_betas")
    if betas is not None:  # the betas themselves (a single file's own schedule buffer)
        if not isinstance(betas, list) or not all(isinstance(b, int | float) for b in betas):
            raise DifflabError("scheduler trained_betas must be a list of numbers")
        path = {"kind": "discrete", "betas": [float(b) for b in betas]}
    elif schedule != "squaredcos_cap_v2":
        path.update(beta_start=float(cfg.get("beta_start", 0.0001)),
                    beta_end=float(cfg.get("beta_end", 0.02)))
    if cfg.get("rescale_betas_zero_snr"):
        path["zero_snr"] = True
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise DifflabError(f"scheduler timestep_spacing={spacing!r}: difflab's discrete grid "
                           "spaces leading, trailing or linspace")
    grid_options: dict[str, Any] = {"spacing": spacing}
    if int(cfg.get("steps_offset", 0)):
        grid_options["steps_offset"] = int(cfg["steps_offset"])
    if cfg.get("set_alpha_to_one") is False:
        grid_options["final"] = "first"
    sampler = _SAMPLERS.get(cfg.get("_class_name", ""), "ddim")
    sample = {"sampler": sampler, "steps": 50, "grid": "discrete",
              "grid_options": grid_options, "guidance": "cfg:7.5", "n": 1, "batch_size": 1}
    return path, _PREDICTIONS[pred], sample


def pipeline_config(folder: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """The difflab run config (a dict) of a pipeline folder, and its U-Net read by
    :func:`difflab.interop.diffusers_unet.unet_config_from_diffusers`."""
    from difflab.interop.diffusers import CONFIG, diffusers_class
    from difflab.interop.diffusers_unet import unet_config_from_diffusers

    d = Path(folder)
    index = _read_json(d / MODEL_INDEX)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise DifflabError(f"{d} is a diffusers {name or 'pipeline'} folder; difflab reads "
                           f"{', '.join(PIPELINES)} (SD v1 / v2) folders")
    missing = [p for p in PARTS if not (d / p).is_dir()]
    if missing:
        raise DifflabError(f"{d}: the pipeline has no {', '.join(p + '/' for p in missing)} "
                           "(a Stable Diffusion folder holds unet/, vae/, text_encoder/, "
                           "tokenizer/ and scheduler/)")
    for part, want in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        got = diffusers_class(d / part)
        if got != want:
            raise DifflabError(f"{d / part}: expected a diffusers {want} folder, found "
                               f"{got or 'no ' + CONFIG}")
    sched_file = d / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise DifflabError(f"{d}: scheduler/scheduler_config.json is missing")
    path, prediction, sample = scheduler_settings(_read_json(sched_file))
    try:
        read = unet_config_from_diffusers(_read_json(d / "unet" / CONFIG))
    except DifflabError as e:
        raise DifflabError(f"{d / 'unet'}: {e}") from None
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(read.config).items()}
    vae_cfg = _read_json(d / "vae" / CONFIG)
    factor = 2 ** (len(vae_cfg.get("block_out_channels", (64,))) - 1)
    config = {
        "path": path,
        "model": {"arch": "unet", **{k: v for k, v in model.items() if v is not None}},
        "task": {"kind": "diffusion", "prediction": prediction, "cond": "text",
                 "p_uncond": 0.1, "concat": "depth" if read.config.concat_channels == 1
                 else "none"},
        "objective": {"name": "denoising", "target": prediction},
        "text_encoder": {"name": str(d / "text_encoder"), "tokenizer": str(d / "tokenizer"),
                         "padding": "max_length", "mask_padding": False},
        "codec": {"run": str(d / "vae")},
        # what fine-tuning would train on (set data.root); sampling reads no data
        "data": {"name": "folder", "image_size": read.config.image_size * factor},
        "sample": sample,
    }
    return config, read


def pipeline_parts(folder: str | os.PathLike, device: Any = "cpu"):
    """``(task, unet)`` of a Stable Diffusion pipeline folder: the diffusion task (codec, text
    encoder, path, sampling defaults) and the U-Net, for :func:`difflab.runs.load_run` (which
    ``difflab.load``, ``difflab sample FOLDER`` and ``SampleRequest(FOLDER)`` go through)."""
    from difflab.config import config_from_dict
    from difflab.interop.diffusers import load_diffusers
    from difflab.tasks import make_task

    d = Path(folder)
    raw, _ = pipeline_config(d)
    try:
        cfg = config_from_dict(raw, f"pipeline {d}")
    except DifflabError as e:
        raise DifflabError(f"{d}: the pipeline does not map onto a difflab run: {e}") from None
    task = make_task(cfg, for_training=False, device=device)
    net = load_diffusers(d / "unet", device).requires_grad_(False)
    task.conditioner.device = torch.device(device)
    return task, net


__all__ = ["is_pipeline", "pipeline_config", "pipeline_parts", "scheduler_settings"]
