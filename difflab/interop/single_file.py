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


# ----- the U-Net: openaimodel.py <-> UNet2DConditionModel names ---------------------------------
_LDM_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _ldm_prefix(difflab_prefix: str) -> str:
    """The openaimodel.py prefix of a difflab U-Net block: difflab keeps openaimodel's block
    order (``down.k`` is ``input_blocks.k+1``, block 0 there being ``conv_in``; ``mid.k`` is
    ``middle_block.k``; ``up.k`` is ``output_blocks.k``)."""
    fixed = {"conv_in": "input_blocks.0.0", "time_embed.linear_1": "time_embed.0",
             "time_embed.linear_2": "time_embed.2", "out_norm": "out.0", "out_conv": "out.2"}
    if difflab_prefix in fixed:
        return fixed[difflab_prefix]
    head, k, *rest = difflab_prefix.split(".")
    base = {"down": f"input_blocks.{int(k) + 1}", "up": f"output_blocks.{k}",
            "mid": f"middle_block.{k}"}[head]
    return ".".join([base, *rest])


def _unet_pairs(read) -> list[tuple[str, str, str]]:
    """``(diffusers prefix, openaimodel prefix, kind)`` for every block."""
    from difflab.interop.diffusers_unet import module_pairs

    return [(dp, _ldm_prefix(fp), kind) for dp, fp, kind in module_pairs(read.config)]


def unet_ldm_to_diffusers(state: dict[str, torch.Tensor], read) -> tuple[dict, set[str]]:
    """``model.diffusion_model.*`` (prefix removed) -> diffusers names; returns the tensors and
    the keys it read."""
    out, used = {}, set()
    for dp, lp, kind in _unet_pairs(read):
        if kind == "plain":
            names = [("weight", "weight"), ("bias", "bias")]
        elif kind == "res":
            names = [(f"{d}.{p}", f"{s}.{p}") for d, s in _LDM_RES.items()
                     for p in ("weight", "bias")]
        else:  # spatial transformers carry the same names in both layouts
            names = [(k[len(lp) + 1:], k[len(lp) + 1:]) for k in state if k.startswith(lp + ".")]
        for d_name, l_name in names:
            key = f"{lp}.{l_name}"
            if key in state:
                out[f"{dp}.{d_name}"] = state[key]
                used.add(key)
    return out, used


def unet_diffusers_to_ldm(state: dict[str, torch.Tensor], read) -> dict[str, torch.Tensor]:
    out = {}
    for dp, lp, kind in _unet_pairs(read):
        if kind == "plain":
            names = [("weight", "weight"), ("bias", "bias")]
        elif kind == "res":
            names = [(f"{d}.{p}", f"{s}.{p}") for d, s in _LDM_RES.items()
                     for p in ("weight", "bias")]
        else:
            names = [(k[len(dp) + 1:], k[len(dp) + 1:]) for k in state if k.startswith(dp + ".")]
        for d_name, l_name in names:
            if f"{dp}.{d_name}" in state:
                out[f"{lp}.{l_name}"] = state[f"{dp}.{d_name}"]
    return out


def unet_config_from_ldm(state: dict[str, torch.Tensor], yaml_params: dict | None = None,
                         sample_size: int | None = None) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config for openaimodel.py weights (prefix removed): widths,
    levels, blocks, attention and context from the shapes; heads from the LDM YAML or SD's
    (v1: 8 heads; v2, linear projections: 64 channels per head)."""
    from difflab.interop.diffusers_unet import DOWN_ATTN, DOWN_PLAIN, UP_ATTN, UP_PLAIN

    if "input_blocks.0.0.weight" not in state or "out.2.weight" not in state:
        raise DifflabError("no U-Net (model.diffusion_model.input_blocks / out) in the file")
    conv_in = state["input_blocks.0.0.weight"]
    base, c_in = int(conv_in.shape[0]), int(conv_in.shape[1])
    widths, attn, layers = [], [], []
    i, level_blocks, level_attn, width = 1, 0, False, base
    while (f"input_blocks.{i}.0.op.weight" in state
           or f"input_blocks.{i}.0.in_layers.0.weight" in state):
        if f"input_blocks.{i}.0.op.weight" in state:  # a downsampler closes the level
            widths.append(width)
            attn.append(level_attn)
            layers.append(level_blocks)
            level_blocks, level_attn = 0, False
        else:
            width = int(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            level_blocks += 1
            level_attn |= f"input_blocks.{i}.1.proj_in.weight" in state
        i += 1
    widths.append(width)
    attn.append(level_attn)
    layers.append(level_blocks)
    if len(set(layers)) != 1:
        raise DifflabError(f"the U-Net has {layers} residual blocks per level; difflab needs one "
                           "count for every level")
    proj = next((v for k, v in state.items() if k.endswith("proj_in.weight")), None)
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise DifflabError("the U-Net has no cross-attention (attn2): not a text-to-image SD "
                           "U-Net")
    linear = proj.ndim == 2
    depth = 1 + max(int(m.group(1)) for k in state
                    if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k)))
    p = yaml_params or {}
    if p:
        if bool(p.get("use_linear_in_transformer", False)) != linear or \
                int(p.get("context_dim", to_k.shape[1])) != int(to_k.shape[1]):
            ver = "v2" if linear else "v1"
            which = ("a v2 checkpoint with a v1 config" if linear
                     else "a v1 checkpoint with a v2 config")
            raise DifflabError(
                f"the weights are an SD {ver} U-Net (context_dim={int(to_k.shape[1])}, "
                f"use_linear_in_transformer={linear}) but the config says context_dim="
                f"{p.get('context_dim')}, use_linear_in_transformer="
                f"{p.get('use_linear_in_transformer', False)}: "
                f"{which}? Use the YAML that came with the file")
        heads_n, head_ch = int(p.get("num_heads", -1)), int(p.get("num_head_channels", -1))
    else:
        heads_n, head_ch = (-1, 64) if linear else (8, -1)
    if head_ch > 0:
        bad = [w for w in widths if w % head_ch]
        if bad:
            raise DifflabError(f"U-Net widths {widths} are not multiples of the head width "
                               f"{head_ch}: give the model's config (config=...)")
        head_dim: Any = [w // head_ch for w in widths]
    else:
        head_dim = heads_n
    size = sample_size or (96 if linear else 64)
    levels = len(widths)
    return {"_class_name": "UNet2DConditionModel", "sample_size": size, "in_channels": c_in,
            "out_channels": int(state["out.2.weight"].shape[0]), "block_out_channels": widths,
            "layers_per_block": layers[0], "cross_attention_dim": int(to_k.shape[1]),
            "attention_head_dim": head_dim, "use_linear_projection": linear,
            "transformer_layers_per_block": depth, "norm_num_groups": 32,
            "down_block_types": [DOWN_ATTN if a else DOWN_PLAIN for a in attn],
            "up_block_types": [UP_ATTN if a else UP_PLAIN for a in reversed(attn)][:levels]}


# ----- the KL autoencoder: ldm/modules/diffusionmodules/model.py <-> AutoencoderKL names -------
def _vae_rules(levels: int) -> list[tuple[str, str]]:
    """``(LDM regex, diffusers replacement)`` in order, for keys without the prefix."""
    rules = [(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
             (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
             (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
             (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
             (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.",
              r"\1.mid_block.attentions.0.to_out.0."),
             (r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\.", r"\1.mid_block.attentions.0.to_\2."),
             (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
             (r"^encoder\.down\.(\d+)\.downsample\.conv\.",
              r"encoder.down_blocks.\1.downsamplers.0.conv.")]
    for i in range(levels):  # the decoder's up.N counts from the bottom
        j = levels - 1 - i
        rules += [(rf"^decoder\.up\.{j}\.block\.(\d+)\.", rf"decoder.up_blocks.{i}.resnets.\1."),
                  (rf"^decoder\.up\.{j}\.upsample\.conv\.",
                   f"decoder.up_blocks.{i}.upsamplers.0.conv.")]
    return rules


def _vae_key(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            key = new
            break
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def vae_ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = 1 + max((int(m.group(1)) for k in state
                      if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=0)
    rules = _vae_rules(levels)
    out = {}
    for k, v in state.items():
        new = _vae_key(k, rules)
        if ".mid_block.attentions.0." in new and v.ndim > 2:  # 1x1 convolutions -> linear
            v = v.reshape(v.shape[0], v.shape[1])
        out[new] = v
    return out


def vae_diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = 1 + max((int(m.group(1)) for k in state
                      if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))), default=0)
    rules = _vae_rules(levels)
    out = {}
    for k, v in state.items():
        ldm = _ldm_vae_name(k, levels)
        if _vae_key(ldm, rules) != k:  # the two tables must be inverses
            raise DifflabError(f"VAE weight {k} has no place in the LDM layout")
        if ".mid.attn_1." in ldm and v.ndim == 2:  # linear -> 1x1 convolution
            v = v[:, :, None, None]
        out[ldm] = v
    return out


def _ldm_vae_name(k: str, levels: int) -> str:
    """The LDM name of a diffusers ``AutoencoderKL`` key."""
    def res(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    m = re.match(r"^(encoder|decoder)\.conv_norm_out\.(.+)$", k)
    if m:
        return f"{m.group(1)}.norm_out.{m.group(2)}"
    m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", k)
    if m:
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{res(m.group(3))}"
    m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_out\.0|to_q|"
                 r"to_k|to_v)\.(weight|bias)$", k)
    if m:
        name = {"group_norm": "norm", "to_out.0": "proj_out", "to_q": "q", "to_k": "k",
                "to_v": "v"}[m.group(2)]
        return f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k)
    if m:
        return f"encoder.down.{m.group(1)}.block.{m.group(2)}.{res(m.group(3))}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", k)
    if m:
        return f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k)
    if m:
        return f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{res(m.group(3))}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", k)
    if m:
        return f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    return k  # conv_in, conv_out, quant_conv, post_quant_conv: the same names


def vae_config_from_ldm(state: dict[str, torch.Tensor], ddconfig: dict | None = None,
                        scaling_factor: float = 0.18215) -> dict[str, Any]:
    """An ``AutoencoderKL`` config for LDM VAE weights (prefix removed)."""
    if "encoder.conv_in.weight" not in state or "post_quant_conv.weight" not in state:
        raise DifflabError("no KL autoencoder (first_stage_model.encoder / post_quant_conv) in "
                           "the file")
    levels = 1 + max(int(m.group(1)) for k in state
                     if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    widths = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
              for i in range(levels)]
    per_level = 1 + max(int(m.group(1)) for k in state
                        if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    d = ddconfig or {}
    n = len(widths)
    return {"_class_name": "AutoencoderKL",
            "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
            "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
            "block_out_channels": widths, "layers_per_block": per_level,
            "latent_channels": int(state["post_quant_conv.weight"].shape[1]),
            "norm_num_groups": 32, "sample_size": int(d.get("resolution", 512)),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "scaling_factor": scaling_factor}


# ----- the text encoder --------------------------------------------------------------------------
_OPEN_CLIP = [(r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
              (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
              (r"^ln_final\.", "text_model.final_layer_norm."),
              (r"^transformer\.resblocks\.(\d+)\.ln_1\.",
               r"text_model.encoder.layers.\1.layer_norm1."),
              (r"^transformer\.resblocks\.(\d+)\.ln_2\.",
               r"text_model.encoder.layers.\1.layer_norm2."),
              (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.",
               r"text_model.encoder.layers.\1.mlp.fc1."),
              (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.",
               r"text_model.encoder.layers.\1.mlp.fc2."),
              (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.",
               r"text_model.encoder.layers.\1.self_attn.out_proj.")]


def open_clip_to_hf(state: dict[str, torch.Tensor], layers: int) -> tuple[dict, set[str]]:
    """OpenCLIP text-tower weights (prefix removed) -> ``CLIPTextModel`` names for the first
    ``layers`` blocks (SD 2 reads the penultimate layer: one block fewer than the file has)."""
    out, used = {}, set()
    for k, v in state.items():
        m = re.match(r"^transformer\.resblocks\.(\d+)\.", k)
        if m and int(m.group(1)) >= layers:
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", k)
        if m:
            i, p = m.groups()
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{p}"] = part.clone()
            used.add(k)
            continue
        for pattern, repl in _OPEN_CLIP:
            new, n = re.subn(pattern, repl, k)
            if n:
                out[new] = v
                used.add(k)
                break
    return out, used


def hf_to_open_clip(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` weights -> OpenCLIP names, plus the block SD 2 does not read (zeros:
    SD 2 conditions on the penultimate layer, so a file carries one more block than is used)
    and a ``text_projection``."""
    out: dict[str, torch.Tensor] = {}
    layers = 0
    for k, v in state.items():
        m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.", k)
        if m:
            layers = max(layers, int(m.group(1)) + 1)
            continue
        out[_hf_to_open_clip_key(k)] = v
    for i in range(layers):
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [state[f"text_model.encoder.layers.{i}.self_attn.{x}_proj.{p}"] for x in "qkv"])
    template = {k[len(f"transformer.resblocks.{layers - 1}."):]: v for k, v in out.items()
                if k.startswith(f"transformer.resblocks.{layers - 1}.")}
    for name, v in template.items():
        out[f"transformer.resblocks.{layers}.{name}"] = torch.zeros_like(v)
    out["text_projection"] = torch.eye(hidden)
    return out


def _hf_to_open_clip_key(k: str) -> str:
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding"}
    if k in fixed:
        return fixed[k]
    if k.startswith("text_model.final_layer_norm."):
        return "ln_final." + k.rsplit(".", 1)[1]
    m = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|"
                 r"self_attn\.out_proj)\.(weight|bias)$", k)
    if not m:
        raise DifflabError(f"text encoder weight {k} has no place in OpenCLIP's layout")
    i, name, p = m.groups()
    name = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}[name]
    return f"transformer.resblocks.{i}.{name}.{p}"


def canonical_text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights under ``text_model.`` (the names SD files and transformers 4 use;
    transformers 5 saves them without the prefix and reads both), without ``position_ids``."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def check_text_weights(cfg: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse text-encoder weights that do not fill a ``CLIPTextModel`` of ``cfg`` exactly
    (transformers would only warn, and initialise what is missing at random)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items()
                                                if k not in ("architectures", "model_type")}))
    want = {k: tuple(v.shape) for k, v in canonical_text(model.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unknown = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k} {got[k]} (config gives {want[k]})" for k in sorted(set(want) & set(got))
           if want[k] != got[k]]
    parts = [f"{what} {len(keys)}: {', '.join(keys[:6])}" + (" ..." if len(keys) > 6 else "")
             for what, keys in (("missing", missing), ("unexpected", unknown),
                                ("misshapen", bad)) if keys]
    if parts:
        raise DifflabError(f"{where}: the text encoder weights do not match its config: "
                           + "; ".join(parts))


def text_config_from_weights(state: dict[str, torch.Tensor], open_clip: bool,
                             layers: int) -> dict[str, Any]:
    """A ``CLIPTextConfig`` for CLIP text weights in ``transformers``' names: widths and counts
    from the shapes; 64-wide heads as CLIP's; quick-GELU for OpenAI's CLIP (SD v1), GELU for
    OpenCLIP (SD v2)."""
    tok = state["text_model.embeddings.token_embedding.weight"]
    hidden = int(tok.shape[1])
    if hidden % 64:
        raise DifflabError(f"text encoder width {hidden} is not a multiple of CLIP's 64-wide "
                           "heads: give the model's config (config=...)")
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": int(tok.shape[0]), "hidden_size": hidden,
            "intermediate_size": int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "max_position_embeddings": int(
                state["text_model.embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": "gelu" if open_clip else "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": hidden, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}


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
