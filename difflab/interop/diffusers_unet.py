"""Stable Diffusion's U-Net in diffusers' layout (``UNet2DConditionModel``) as a difflab ``unet``.

difflab's U-Net is the LDM U-Net (Rombach et al. 2022, App. E; ``openaimodel.py``) that diffusers
re-implements for SD v1 / v2: the same residual blocks (embedding added, not scale-shift), the
same spatial transformers (GroupNorm eps 1e-6, self- then cross-attention, GEGLU feed-forward)
and the same skip order. Only names and two fusions differ, so a checkpoint converts by a key
table: difflab fuses self-attention's ``to_q/k/v`` into ``to_qkv`` and cross-attention's
``to_k/v`` into ``to_kv``; SD v1's transformer projections are 1x1 convolutions where difflab
(and SD v2, ``use_linear_projection``) uses linear layers.

Settings of ``UNet2DConditionModel`` that the LDM U-Net does not have (SDXL's added embeddings,
class embeddings, other block kinds, scale-shift norm, ...) are refused, each by name, rather than
silently ignored; so are unknown and missing weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.networks.unet import UNetConfig

DOWN_ATTN, DOWN_PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"
UP_ATTN, UP_PLAIN = "CrossAttnUpBlock2D", "UpBlock2D"

# settings that must hold their LDM value (diffusers' default) for the layouts to agree
_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# settings that change nothing in float32 on the CPU (upcast_attention: SD 2.1 computes its
# attention scores in float32 under half precision; difflab's attention always does)
_IGNORED = {"upcast_attention", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
            "addition_embed_type_num_heads", "dropout", "sample_size"}


@dataclass(frozen=True)
class DiffusersUNet:
    """A diffusers ``UNet2DConditionModel`` config read as a difflab :class:`UNetConfig`."""

    config: UNetConfig
    linear_projection: bool


def _per_level(value: Any, levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels:
        return [int(v) for v in value]
    raise DifflabError(f"diffusers unet config: {name}={value!r} is neither an int nor one value "
                       f"per level ({levels} levels)")


def unet_config_from_diffusers(cfg: dict[str, Any]) -> DiffusersUNet:
    """The difflab U-Net of a ``UNet2DConditionModel`` ``config.json``; every setting difflab
    cannot reproduce is named in one error."""
    problems = []
    for key, want in _FIXED.items():
        got = cfg.get(key, want)
        if isinstance(want, float) and isinstance(got, int | float):
            same = abs(float(got) - want) < 1e-12
        else:
            same = (list(got) if isinstance(got, tuple) else got) == want
        if not same:
            problems.append(f"{key}={got!r} (difflab's LDM U-Net has {want!r})")
    widths = [int(w) for w in cfg.get("block_out_channels", (320, 640, 1280, 1280))]
    levels = len(widths)
    down = list(cfg.get("down_block_types", [DOWN_ATTN] * (levels - 1) + [DOWN_PLAIN]))
    up = list(cfg.get("up_block_types", [UP_PLAIN] + [UP_ATTN] * (levels - 1)))
    bad_blocks = [b for b in down if b not in (DOWN_ATTN, DOWN_PLAIN)]
    bad_blocks += [b for b in up if b not in (UP_ATTN, UP_PLAIN)]
    if bad_blocks:
        problems.append(f"block types {sorted(set(bad_blocks))} (difflab reads {DOWN_ATTN}, "
                        f"{DOWN_PLAIN}, {UP_ATTN}, {UP_PLAIN})")
    attn = [b == DOWN_ATTN for b in down]
    if len(down) != levels or [b == UP_ATTN for b in reversed(up)] != attn:
        problems.append(f"down_block_types {down} and up_block_types {up} are not mirror images "
                        f"over {levels} levels (the LDM U-Net attends at the same sizes on both "
                        "sides)")
    base = widths[0]
    if any(w % base for w in widths):
        problems.append(f"block_out_channels={widths} are not multiples of the first")
    layers = cfg.get("layers_per_block", 2)
    if not isinstance(layers, int):
        problems.append(f"layers_per_block={layers!r} (difflab needs one count for all levels)")
    depth = set(_per_level(cfg.get("transformer_layers_per_block", 1), levels,
                           "transformer_layers_per_block"))
    if len(depth) != 1:
        problems.append(f"transformer_layers_per_block={sorted(depth)} differs between levels")
    context_dim = cfg.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        problems.append(f"cross_attention_dim={context_dim!r} (difflab needs one width)")
    # diffusers calls the head count of SD's U-Net attention_head_dim (its num_attention_heads
    # falls back to it); difflab has a fixed head count, or a fixed head width
    heads_cfg = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = _per_level(heads_cfg, levels, "attention_head_dim")
    attended = [i for i in range(levels) if attn[i]] + [levels - 1]  # + the middle block
    used = {(heads[i], widths[i]) for i in attended}
    head_kw: dict[str, int] = {}
    if len({h for h, _ in used}) == 1:
        head_kw = {"num_heads": next(iter(used))[0], "num_head_channels": -1}
    elif len({w // h for h, w in used}) == 1 and all(w % h == 0 for h, w in used):
        head_kw = {"num_head_channels": next(w // h for h, w in used)}
    else:
        problems.append(f"attention heads {heads} over widths {widths} have neither one head "
                        "count nor one head width")
    if problems:
        raise DifflabError("this UNet2DConditionModel cannot be read as difflab's LDM U-Net: "
                           + "; ".join(problems))
    size = int(cfg.get("sample_size", 64))
    # more input than output channels: images joined to the latent (SD 2's depth U-Net, 4 + 1;
    # the inpainting U-Net, 4 + 5), which difflab's U-Net takes as cond.concat
    c_in, c_out = int(cfg.get("in_channels", 4)), int(cfg.get("out_channels", 4))
    config = UNetConfig(
        image_size=size, in_channels=min(c_in, c_out), concat_channels=max(0, c_in - c_out),
        out_channels=c_out, model_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=layers,
        attention_resolutions=tuple(size // 2 ** i for i in range(levels) if attn[i]),
        dropout=0.0, context_dim=context_dim, transformer_depth=depth.pop(),
        use_scale_shift_norm=False, **head_kw)
    return DiffusersUNet(config, bool(cfg.get("use_linear_projection", False)))


# ----- the key table ------------------------------------------------------------------------------
_RES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2",
        "conv2": "conv2", "conv_shortcut": "skip"}


def module_pairs(c: UNetConfig) -> list[tuple[str, str, str]]:
    """``(diffusers prefix, difflab prefix, kind)`` for every block; kind is ``res``,
    ``attn``, ``down``, ``up`` or ``plain``."""
    pairs = [("conv_in", "conv_in", "plain"), ("time_embedding.linear_1", "time_embed.linear_1",
                                               "plain"),
             ("time_embedding.linear_2", "time_embed.linear_2", "plain")]
    levels = len(c.channel_mult)
    sizes = [c.image_size // 2 ** i for i in range(levels)]
    k = 0
    for level in range(levels):
        for j in range(c.num_res_blocks):
            pairs.append((f"down_blocks.{level}.resnets.{j}", f"down.{k}.0", "res"))
            if sizes[level] in c.attention_resolutions:
                pairs.append((f"down_blocks.{level}.attentions.{j}", f"down.{k}.1", "attn"))
            k += 1
        if level < levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"down.{k}.0.op", "plain"))
            k += 1
    pairs += [("mid_block.resnets.0", "mid.0", "res"), ("mid_block.attentions.0", "mid.1", "attn"),
              ("mid_block.resnets.1", "mid.2", "res")]
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(c.num_res_blocks + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"up.{k}.0", "res"))
            n = 1
            if sizes[level] in c.attention_resolutions:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"up.{k}.1", "attn"))
                n = 2
            if level > 0 and j == c.num_res_blocks:
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"up.{k}.{n}.conv", "plain"))
            k += 1
    pairs += [("conv_norm_out", "out_norm", "plain"), ("conv_out", "out_conv", "plain")]
    return pairs


def unet_from_diffusers_state(state: dict[str, torch.Tensor], read: DiffusersUNet
                              ) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` weights -> difflab ``unet`` weights. Keys the table
    does not use, and keys it needs but does not find, are listed by name."""
    needed: set[str] = set()

    def need(key: str) -> torch.Tensor:  # a dry run that only lists the keys the table reads
        needed.add(key)
        return torch.zeros(1, 1)

    _convert(state, read, need)
    missing, unknown = sorted(needed - set(state)), sorted(set(state) - needed)
    if missing or unknown:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unknown)):
            if keys:
                parts.append(f"{what} {len(keys)}: {', '.join(keys[:8])}"
                             + (" ..." if len(keys) > 8 else ""))
        raise DifflabError("the U-Net weights do not match their config.json: "
                           + "; ".join(parts))
    return _convert(state, read, state.__getitem__)


def _convert(state: dict[str, torch.Tensor], read: DiffusersUNet, take
             ) -> dict[str, torch.Tensor]:
    c = read.config
    out: dict[str, torch.Tensor] = {}
    for src, dst, kind in module_pairs(c):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{dst}.{p}"] = take(f"{src}.{p}")
        elif kind == "res":
            for a, b in _RES.items():
                if a == "conv_shortcut" and f"{src}.{a}.weight" not in state:
                    continue  # channels unchanged: identity skip
                for p in ("weight", "bias"):
                    out[f"{dst}.{b}.{p}"] = take(f"{src}.{a}.{p}")
        else:
            _attention(src, dst, c, read.linear_projection, take, out)
    return out


def _attention(src: str, dst: str, c: UNetConfig, linear: bool, take, out: dict) -> None:
    def proj(name: str) -> None:
        w = take(f"{src}.{name}.weight")
        if not linear:  # SD v1: 1x1 convolutions (out, in, 1, 1)
            w = w.reshape(w.shape[0], w.shape[1])
        out[f"{dst}.{name}.weight"] = w
        out[f"{dst}.{name}.bias"] = take(f"{src}.{name}.bias")

    for p in ("weight", "bias"):
        out[f"{dst}.norm.{p}"] = take(f"{src}.norm.{p}")
    proj("proj_in")
    proj("proj_out")
    for d in range(c.transformer_depth):
        s, t = f"{src}.transformer_blocks.{d}", f"{dst}.blocks.{d}"
        for n in ("norm1", "norm2", "norm3"):
            for p in ("weight", "bias"):
                out[f"{t}.{n}.{p}"] = take(f"{s}.{n}.{p}")
        out[f"{t}.attn1.to_qkv.weight"] = torch.cat(
            [take(f"{s}.attn1.to_{x}.weight") for x in "qkv"])
        out[f"{t}.attn2.to_q.weight"] = take(f"{s}.attn2.to_q.weight")
        out[f"{t}.attn2.to_kv.weight"] = torch.cat(
            [take(f"{s}.attn2.to_{x}.weight") for x in "kv"])
        for a in ("attn1", "attn2"):
            out[f"{t}.{a}.to_out.weight"] = take(f"{s}.{a}.to_out.0.weight")
            out[f"{t}.{a}.to_out.bias"] = take(f"{s}.{a}.to_out.0.bias")
        for a, b in (("ff.net.0.proj", "ff.proj_in"), ("ff.net.2", "ff.proj_out")):
            for p in ("weight", "bias"):
                out[f"{t}.{b}.{p}"] = take(f"{s}.{a}.{p}")


def unet_to_diffusers_state(state: dict[str, torch.Tensor], read: DiffusersUNet
                            ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`unet_from_diffusers_state` (difflab -> diffusers names)."""
    c = read.config
    out: dict[str, torch.Tensor] = {}
    for src, dst, kind in module_pairs(c):
        if kind == "plain":
            for p in ("weight", "bias"):
                out[f"{src}.{p}"] = state[f"{dst}.{p}"]
        elif kind == "res":
            for a, b in _RES.items():
                if f"{dst}.{b}.weight" in state:
                    for p in ("weight", "bias"):
                        out[f"{src}.{a}.{p}"] = state[f"{dst}.{b}.{p}"]
        else:
            for p in ("weight", "bias"):
                out[f"{src}.norm.{p}"] = state[f"{dst}.norm.{p}"]
            for name in ("proj_in", "proj_out"):
                w = state[f"{dst}.{name}.weight"]
                out[f"{src}.{name}.weight"] = w if read.linear_projection else w[:, :, None, None]
                out[f"{src}.{name}.bias"] = state[f"{dst}.{name}.bias"]
            for d in range(c.transformer_depth):
                s, t = f"{src}.transformer_blocks.{d}", f"{dst}.blocks.{d}"
                for n in ("norm1", "norm2", "norm3"):
                    for p in ("weight", "bias"):
                        out[f"{s}.{n}.{p}"] = state[f"{t}.{n}.{p}"]
                for x, w in zip("qkv", state[f"{t}.attn1.to_qkv.weight"].chunk(3)):
                    out[f"{s}.attn1.to_{x}.weight"] = w.contiguous()
                out[f"{s}.attn2.to_q.weight"] = state[f"{t}.attn2.to_q.weight"]
                for x, w in zip("kv", state[f"{t}.attn2.to_kv.weight"].chunk(2)):
                    out[f"{s}.attn2.to_{x}.weight"] = w.contiguous()
                for a in ("attn1", "attn2"):
                    out[f"{s}.{a}.to_out.0.weight"] = state[f"{t}.{a}.to_out.weight"]
                    out[f"{s}.{a}.to_out.0.bias"] = state[f"{t}.{a}.to_out.bias"]
                for a, b in (("ff.net.0.proj", "ff.proj_in"), ("ff.net.2", "ff.proj_out")):
                    for p in ("weight", "bias"):
                        out[f"{s}.{a}.{p}"] = state[f"{t}.{b}.{p}"]
    return out
