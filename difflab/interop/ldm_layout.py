"""Stable Diffusion's original single-file layout, part by part, against diffusers' /
transformers' names: the openaimodel.py U-Net (``model.diffusion_model.``), the LDM KL
autoencoder (``first_stage_model.``) and the CLIP / OpenCLIP text tower
(``cond_stage_model.``), with the configs their weights imply. The file-level reading and
writing is :mod:`difflab.interop.single_file`."""

from __future__ import annotations

import re
from typing import Any

import torch

from difflab.errors import DifflabError

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


def _unet_names(read, keys, ldm_side: bool) -> list[tuple[str, str]]:
    """``(diffusers key, openaimodel key)`` of every U-Net weight; spatial transformers carry
    the same names in both layouts, so theirs come from ``keys`` (of the ``ldm_side`` layout
    when true, else of diffusers')."""
    names = []
    for dp, lp, kind in _unet_pairs(read):
        if kind == "plain":
            names += [(f"{dp}.{p}", f"{lp}.{p}") for p in ("weight", "bias")]
        elif kind == "res":
            names += [(f"{dp}.{d}.{p}", f"{lp}.{s}.{p}") for d, s in _LDM_RES.items()
                      for p in ("weight", "bias")]
        else:
            own = lp if ldm_side else dp
            names += [(f"{dp}.{k[len(own) + 1:]}", f"{lp}.{k[len(own) + 1:]}") for k in keys
                      if k.startswith(own + ".")]
    return names


def unet_ldm_to_diffusers(state: dict[str, torch.Tensor], read) -> tuple[dict, set[str]]:
    """``model.diffusion_model.*`` (prefix removed) -> diffusers names; returns the tensors and
    the keys it read."""
    pairs = [(d, ldm) for d, ldm in _unet_names(read, state, True) if ldm in state]
    return {d: state[ldm] for d, ldm in pairs}, {ldm for _, ldm in pairs}


def unet_diffusers_to_ldm(state: dict[str, torch.Tensor], read) -> dict[str, torch.Tensor]:
    return {ldm: state[d] for d, ldm in _unet_names(read, state, False) if d in state}


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


def _encoder_levels(state: dict[str, torch.Tensor], block: str) -> int:
    """How many resolution levels the VAE encoder has (``encoder.<block>.N.`` keys)."""
    return 1 + max((int(m.group(1)) for k in state
                    if (m := re.match(rf"encoder\.{block}\.(\d+)\.", k))), default=0)


def vae_ldm_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = _encoder_levels(state, "down")
    rules = _vae_rules(levels)
    out = {}
    for k, v in state.items():
        new = _vae_key(k, rules)
        if ".mid_block.attentions.0." in new and v.ndim > 2:  # 1x1 convolutions -> linear
            v = v.reshape(v.shape[0], v.shape[1])
        out[new] = v
    return out


def vae_diffusers_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = _encoder_levels(state, "down_blocks")
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
