"""Stable Diffusion's original single-file checkpoints (``.safetensors``, or ``.ckpt`` read with
``torch.load(weights_only=True)``) in and out of difflab.

A single file holds the whole latent diffusion model of the CompVis / Stability code
(Rombach et al. 2022, ``ldm/models/diffusion/ddpm.py``) under three prefixes:
``model.diffusion_model.`` (the ``openaimodel.py`` U-Net: ``input_blocks``, ``middle_block``,
``output_blocks``), ``first_stage_model.`` (the KL autoencoder: ``encoder.down.N.block.M``,
``decoder.up.N`` in reverse order, ``mid.attn_1.q/k/v`` as 1x1 convolutions) and
``cond_stage_model.`` (SD v1: OpenAI's CLIP ViT-L/14 text tower in ``transformers``' names
under ``transformer.``; SD v2: OpenCLIP ViT-H/14 under ``model.``, fused ``in_proj`` attention,
conditioned on the penultimate layer). The schedule buffers (``betas``, ``alphas_cumprod``,
...) ride along.

:mod:`difflab.interop.ldm_layout` holds the key tables of the three parts.
:func:`single_file_to_pipeline` converts such a file into a diffusers pipeline folder (the layout
:mod:`difflab.interop.pipeline` reads; diffusers' ``from_pretrained`` reads it too) and
:func:`pipeline_to_single_file` writes the other way. The settings the weights do not show come
from, in order: a diffusers pipeline folder or an LDM YAML passed as ``config`` (a ``NAME.yaml``
beside the file is used, as A1111 does), else SD's own: 8 heads (v1) or 64-wide heads (v2),
eps-prediction for v1 and v-prediction for v2 (SD 2 at 768 px; pass ``prediction="eps"`` for
SD 2 base). The tokenizer is not in the file: give a folder (a pipeline's ``tokenizer/``, or
``openai/clip-vit-large-patch14``'s files).

Every weight is accounted for: a key no table reads is named, except the known passengers
(schedule buffers, ``model_ema.*`` copies, CLIP's ``position_ids``, OpenCLIP's unused last
block, ``text_projection`` and ``logit_scale``), which are counted in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.interop.ldm_layout import (
    canonical_text,
    check_text_weights,
    hf_to_open_clip,
    open_clip_to_hf,
    text_config_from_weights,
    unet_config_from_ldm,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_config_from_ldm,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)

logger = logging.getLogger("difflab.interop")

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPEN_CLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor",
                    "model_ema.decay", "model_ema.num_updates")


def is_single_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() in SUFFIXES


def read_checkpoint(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a single file (a ``.ckpt``'s ``state_dict`` when it nests one)."""
    f = Path(file)
    if f.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(f))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            raise DifflabError(f"{f} cannot be read as safetensors ({e})") from None
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code are refused by weights_only
        raise DifflabError(f"{f} cannot be read as plain tensors (torch.load(weights_only=True)"
                           f": {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DifflabError(f"{f} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ----- a whole file -> a diffusers pipeline folder -----------------------------------------------
def _read_yaml(file: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DifflabError(f"{file} cannot be read as an LDM YAML config ({e})") from None
    params = ((data or {}).get("model") or {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict):
        raise DifflabError(f"{file} has no model.params: not an LDM / SD inference config")
    return params


def _json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DifflabError(f"{file} cannot be read as JSON ({e})") from None


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _sd_scheduler(prediction: str, params: dict, betas: torch.Tensor | None) -> dict[str, Any]:
    """SD's scheduler config (DDIM; leading spacing, steps_offset 1, alpha_bar_0 last), with the
    file's own betas when they are not SD's scaled-linear ones."""
    from difflab.paths import VP

    cfg: dict[str, Any] = {
        "_class_name": "DDIMScheduler", "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_schedule": "scaled_linear", "beta_start": float(params.get("linear_start", 0.00085)),
        "beta_end": float(params.get("linear_end", 0.012)), "prediction_type": prediction,
        "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
        "timestep_spacing": "leading"}
    if betas is not None and betas.numel() == cfg["num_train_timesteps"]:
        sd = VP.discrete_scaled_linear(cfg["num_train_timesteps"], cfg["beta_start"],
                                       cfg["beta_end"]).betas.double()
        if not torch.allclose(betas.double(), sd, rtol=1e-4, atol=1e-7):
            cfg["trained_betas"] = [float(b) for b in betas.double()]
    return cfg


def single_file_to_pipeline(file: str | os.PathLike, out: str | os.PathLike, *,
                            tokenizer: str | os.PathLike | None = None,
                            config: str | os.PathLike | None = None,
                            prediction: str | None = None) -> Path:
    """Convert an SD v1 / v2 single file into a diffusers pipeline folder ``out`` (written
    atomically). See the module docstring for where the settings come from."""
    f, dest = Path(file), Path(out)
    if not is_single_file(f):
        raise DifflabError(f"{f} is not a single-file checkpoint ({', '.join(SUFFIXES)})")
    if prediction not in (None, "eps", "v"):
        raise DifflabError(f"prediction={prediction!r}: expected 'eps' or 'v'")
    cfg_path = Path(config) if config is not None else None
    if cfg_path is None and f.with_suffix(".yaml").is_file():
        cfg_path = f.with_suffix(".yaml")
    if cfg_path is not None and not cfg_path.exists():
        raise DifflabError(f"config {cfg_path} does not exist (give a diffusers pipeline folder "
                           "or the LDM YAML of the checkpoint)")
    folder_cfg = cfg_path if cfg_path is not None and cfg_path.is_dir() else None
    yaml_params = _read_yaml(cfg_path) if cfg_path is not None and folder_cfg is None else None
    tok = Path(tokenizer) if tokenizer is not None else (
        folder_cfg / "tokenizer" if folder_cfg is not None else None)
    if tok is None or not tok.is_dir():
        raise DifflabError(
            f"{f}: a single-file checkpoint holds no tokenizer: give tokenizer=FOLDER (CLI "
            "--tokenizer) with CLIP's tokenizer files, e.g. the tokenizer/ folder of any SD "
            "pipeline or openai/clip-vit-large-patch14" + (f" ({tok} is not a folder)" if tok
                                                           else ""))
    state = read_checkpoint(f)
    unet_ldm, vae_ldm = _strip(state, UNET), _strip(state, VAE)
    open_clip = any(k.startswith(OPEN_CLIP) for k in state)
    text_src = _strip(state, OPEN_CLIP if open_clip else CLIP)
    passengers = {k for k in state if k in SCHEDULE_BUFFERS or k.startswith("model_ema.")
                  or k.endswith("embeddings.position_ids")
                  or k in (OPEN_CLIP + "text_projection", OPEN_CLIP + "logit_scale",
                           OPEN_CLIP + "attn_mask")}
    p = yaml_params or {}
    unet_p = ((p.get("unet_config") or {}).get("params")) or {}
    # the U-Net: its config from the folder, or from the weights (+ the YAML's heads)
    from difflab.interop.diffusers_unet import unet_config_from_diffusers

    if folder_cfg is not None:
        unet_cfg = _json(folder_cfg / "unet" / "config.json")
    else:
        unet_cfg = unet_config_from_ldm(unet_ldm, unet_p or None)
    from difflab.interop.diffusers import check_unet_layout

    read = unet_config_from_diffusers(unet_cfg)
    unet_state, unet_used = unet_ldm_to_diffusers(unet_ldm, read)
    try:
        check_unet_layout(unet_cfg, unet_state)
    except DifflabError as e:
        raise DifflabError(f"{f}: {e}") from None
    # the VAE
    scale = float(p.get("scale_factor", 0.18215))
    if folder_cfg is not None:
        vae_cfg = _json(folder_cfg / "vae" / "config.json")
    else:
        dd = (((p.get("first_stage_config") or {}).get("params") or {}).get("ddconfig")) or {}
        vae_cfg = vae_config_from_ldm(vae_ldm, dd, scale)
    vae_state = vae_ldm_to_diffusers(vae_ldm)
    # the text encoder
    if not text_src:
        raise DifflabError(f"{f}: no text encoder (cond_stage_model.transformer. for SD v1, "
                           "cond_stage_model.model. for SD v2) in the file")
    if folder_cfg is not None:
        text_cfg = _json(folder_cfg / "text_encoder" / "config.json")
        layers = int(text_cfg["num_hidden_layers"])
    else:
        blocks = 1 + max((int(m.group(1)) for k in text_src
                          if (m := re.match(r"(?:transformer\.resblocks|text_model\.encoder\."
                                            r"layers)\.(\d+)\.", k))), default=-1)
        layers = blocks - 1 if open_clip else blocks  # SD 2: the penultimate layer
        text_cfg = None
    if open_clip:
        text_state, text_used = open_clip_to_hf(text_src, layers)
        text_used |= {k for k in text_src if (m := re.match(r"^transformer\.resblocks\.(\d+)\.", k))
                      and int(m.group(1)) >= layers}
        passengers |= {OPEN_CLIP + k for k in text_src
                       if (m := re.match(r"^transformer\.resblocks\.(\d+)\.", k))
                       and int(m.group(1)) >= layers}
    else:
        text_state = canonical_text(text_src)
        text_used = set(text_src)
    if text_cfg is None:
        text_cfg = text_config_from_weights(text_state, open_clip, layers)

    # every key is read, or a known passenger, or named
    text_prefix = OPEN_CLIP if open_clip else CLIP
    read_keys = ({UNET + k for k in unet_used} | {VAE + k for k in vae_ldm}
                 | {text_prefix + k for k in text_used} | passengers)
    unknown = sorted(set(state) - read_keys)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} weights belong to no part difflab reads: "
                        f"{', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
    from difflab.interop.diffusers import check_vae_state, vae_from_config
    from difflab.interop.diffusers_unet import unet_from_diffusers_state

    checks = ((unet_from_diffusers_state, (unet_state, read)),
              (lambda st: check_vae_state(vae_from_config(vae_cfg), st), (vae_state,)),
              (check_text_weights, (text_cfg, text_state, "the text encoder")))
    for check, inputs in checks:
        try:
            check(*inputs)
        except DifflabError as e:
            problems.append(str(e))
    if problems:
        raise DifflabError(f"{f}: " + "; ".join(problems))
    if passengers:
        logger.info("%s: %d non-model tensors left aside (schedule buffers, EMA copies, unused "
                    "text-encoder parts)", f, len(passengers))
    # the scheduler
    if folder_cfg is not None:
        sched = _json(folder_cfg / "scheduler" / "scheduler_config.json")
        if prediction is not None:
            sched["prediction_type"] = {"eps": "epsilon", "v": "v_prediction"}[prediction]
    else:
        param = p.get("parameterization")
        if prediction is None:
            linear = bool(unet_cfg.get("use_linear_projection"))
            prediction = "v" if param == "v" else "eps" if param is not None or not linear else "v"
            if param is None and linear:
                logger.warning("%s: an SD 2 U-Net without a config: assuming SD 2's 768-px "
                               "v-prediction (pass prediction='eps' for SD 2 base)", f)
        sched = _sd_scheduler({"eps": "epsilon", "v": "v_prediction"}[prediction], p,
                              state.get("betas"))
    return _write_pipeline(dest, unet_cfg, unet_state, vae_cfg, vae_state, text_cfg, text_state,
                           tok, sched)


def _write_pipeline(dest: Path, unet_cfg, unet_state, vae_cfg, vae_state, text_cfg, text_state,
                    tokenizer: Path, sched: dict) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    if dest.exists() and any(dest.iterdir()):
        raise DifflabError(f"{dest} is not empty: choose a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name, cfg, st, weights in (
                ("unet", unet_cfg, unet_state, "diffusion_pytorch_model.safetensors"),
                ("vae", vae_cfg, vae_state, "diffusion_pytorch_model.safetensors"),
                ("text_encoder", text_cfg, text_state, "model.safetensors")):
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            save_file({k: v.contiguous() for k, v in st.items()}, str(tmp / name / weights),
                      metadata={"format": "pt"})
        try:
            AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True).save_pretrained(
                str(tmp / "tokenizer"))
        except (OSError, ValueError) as e:
            raise DifflabError(f"tokenizer {tokenizer} cannot be read ({e})") from None
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", sched.get("_class_name", "DDIMScheduler")],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}, indent=2))
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def cached_pipeline(file: str | os.PathLike, **options) -> Path:
    """The pipeline folder of a single file, converted once into ``$DIFFLAB_CACHE/single_file``
    (keyed by the file's path, size and modification time, and the options)."""
    from difflab.evaluation.extractor import cache_dir

    f = Path(file).resolve()
    st = f.stat()
    ident = json.dumps([str(f), st.st_size, st.st_mtime_ns,
                        {k: str(v) for k, v in sorted(options.items()) if v is not None}])
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    dest = cache_dir() / "single_file" / f"{f.stem}-{key}"
    if not (dest / "model_index.json").is_file():
        logger.info("converting %s into %s (once)", f, dest)
        single_file_to_pipeline(f, dest, **options)
    return dest


# ----- a pipeline folder -> a single file --------------------------------------------------------
def pipeline_to_single_file(folder: str | os.PathLike, file: str | os.PathLike) -> Path:
    """Write a diffusers SD pipeline folder as one LDM-layout ``.safetensors`` file (the text
    encoder in OpenCLIP's layout when the U-Net is SD 2's, with linear projections)."""
    from safetensors.torch import load_file, save_file

    from difflab.interop.diffusers import read_weights
    from difflab.interop.diffusers_unet import unet_config_from_diffusers
    from difflab.paths import VP

    d, out = Path(folder), Path(file)
    if out.suffix.lower() != ".safetensors":
        raise DifflabError(f"{out}: difflab writes single files as .safetensors")
    unet_cfg = _json(d / "unet" / "config.json")
    read = unet_config_from_diffusers(unet_cfg)
    state: dict[str, torch.Tensor] = {}
    for k, v in unet_diffusers_to_ldm(read_weights(d / "unet"), read).items():
        state[UNET + k] = v
    for k, v in vae_diffusers_to_ldm(read_weights(d / "vae")).items():
        state[VAE + k] = v
    text_file = d / "text_encoder" / "model.safetensors"
    if not text_file.is_file():
        raise DifflabError(f"{d}: text_encoder/model.safetensors is missing")
    text = canonical_text(load_file(str(text_file)))
    if unet_cfg.get("use_linear_projection"):
        hidden = int(text["text_model.embeddings.token_embedding.weight"].shape[1])
        for k, v in hf_to_open_clip(text, hidden).items():
            state[OPEN_CLIP + k] = v
    else:
        for k, v in text.items():
            state[CLIP + k] = v
    sched = _json(d / "scheduler" / "scheduler_config.json")
    if sched.get("beta_schedule") == "scaled_linear" and not sched.get("trained_betas"):
        path = VP.discrete_scaled_linear(int(sched.get("num_train_timesteps", 1000)),
                                         float(sched.get("beta_start", 0.00085)),
                                         float(sched.get("beta_end", 0.012)))
        state["betas"] = path.betas.float()
        state["alphas_cumprod"] = path.alphas_cumprod.float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    return out
