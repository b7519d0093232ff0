"""diffusers component folders (``config.json`` + ``diffusion_pytorch_model.safetensors``) in and
out of difflab, without importing diffusers.

``load_diffusers(folder)`` reads a ``UNet2DConditionModel`` (Stable Diffusion's U-Net; see
:mod:`difflab.interop.diffusers_unet`) as a difflab ``unet`` and an ``AutoencoderKL`` (SD's VAE,
whose parameter names difflab's ``autoencoder_kl`` shares) as a difflab codec with the VAE's
``scaling_factor``, and a ``DiTTransformer2DModel`` as a difflab ``dit`` (see
:mod:`difflab.interop.dit`). ``save_diffusers(module, folder)`` writes a difflab ``unet``,
``autoencoder_kl`` or ``dit`` in diffusers' layout, so ``from_pretrained`` reads it. Weights are
read from safetensors, or from a ``.bin`` with ``torch.load(weights_only=True)``: loading never
runs code.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError

CONFIG = "config.json"
SAFETENSORS = "diffusion_pytorch_model.safetensors"
BIN = "diffusion_pytorch_model.bin"
CLASSES = ("UNet2DConditionModel", "AutoencoderKL", "DiTTransformer2DModel")


def diffusers_class(folder: str | os.PathLike) -> str | None:
    """The ``_class_name`` of a diffusers component folder, or None if it is not one."""
    f = Path(folder) / CONFIG
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except ValueError:
        return None
    name = meta.get("_class_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A diffusers folder's weights (safetensors first; a ``.bin`` only as plain tensors)."""
    d = Path(folder)
    if (d / SAFETENSORS).is_file():
        from safetensors.torch import load_file

        return load_file(str(d / SAFETENSORS))
    if (d / BIN).is_file():
        try:
            state = torch.load(d / BIN, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code are refused by weights_only
            raise DifflabError(f"{d / BIN} cannot be read as plain tensors "
                               f"(torch.load(weights_only=True): {e})") from None
        if not isinstance(state, dict):
            raise DifflabError(f"{d / BIN} holds a {type(state).__name__}, not a state dict")
        return state
    raise DifflabError(f"{d} has no {SAFETENSORS} (or {BIN})")


def load_diffusers(folder: str | os.PathLike, device: Any = "cpu") -> torch.nn.Module:
    """A diffusers ``UNet2DConditionModel``, ``AutoencoderKL`` or ``DiTTransformer2DModel``
    folder as a difflab module."""
    d = Path(folder)
    name = diffusers_class(d)
    if name not in CLASSES:
        raise DifflabError(f"{d}: a diffusers {name or 'component'} folder; difflab reads "
                           f"{', '.join(CLASSES)} folders")
    if name == "DiTTransformer2DModel":
        from difflab.interop.dit import load_diffusers_dit

        return load_diffusers_dit(d, device)
    cfg = json.loads((d / CONFIG).read_text())
    state = read_weights(d)
    if name == "UNet2DConditionModel":
        module = _load_unet(cfg, state, d)
    else:
        module = _load_vae(cfg, state, d)
    return module.to(device).eval()


def _build(family: str, config: Any) -> torch.nn.Module:
    from difflab.components import build

    with torch.random.fork_rng(devices=[]):  # the init is overwritten
        return build(family, **asdict(config))


def _load_unet(cfg: dict, state: dict, d: Path) -> torch.nn.Module:
    from difflab.interop.diffusers_unet import unet_config_from_diffusers, unet_from_diffusers_state

    try:
        check_unet_layout(cfg, state)
        read = unet_config_from_diffusers(cfg)
        tensors = unet_from_diffusers_state(state, read)
    except DifflabError as e:
        raise DifflabError(f"{d}: {e}") from None
    module = _build("unet", read.config)
    _check_shapes(module, tensors, d, "U-Net")
    module.load_state_dict(tensors, strict=True)
    return module


def unet_layout_of_weights(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a ``UNet2DConditionModel``'s weights say about their config: the context width
    (``cross_attention_dim``; SD v1: 768, v2: 1024) and whether the transformer projections are
    linear (``use_linear_projection``; v1: 1x1 convolutions, v2: linear)."""
    found: dict[str, Any] = {}
    for k, v in state.items():
        if k.endswith("attn2.to_k.weight") and "cross_attention_dim" not in found:
            found["cross_attention_dim"] = int(v.shape[1])
        if k.endswith("proj_in.weight") and "use_linear_projection" not in found:
            found["use_linear_projection"] = v.ndim == 2
    return found


def check_unet_layout(cfg: dict, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights whose layout contradicts their config, saying which SD version each
    looks like (a v2 checkpoint with a v1 config is the usual case)."""
    weights = unet_layout_of_weights(state)
    said = {"cross_attention_dim": cfg.get("cross_attention_dim", 1280),
            "use_linear_projection": bool(cfg.get("use_linear_projection", False))}
    wrong = {k: v for k, v in weights.items() if said[k] != v}
    if not wrong:
        return

    def version(layout: dict) -> str:
        return "SD v2" if layout.get("use_linear_projection") else "SD v1"

    got = ", ".join(f"{k}={v}" for k, v in weights.items())
    cfg_says = ", ".join(f"{k}={said[k]}" for k in weights)
    raise DifflabError(f"the U-Net weights do not fit config.json: they have {got} "
                       f"({version(weights)} layout) but config.json says {cfg_says} "
                       f"({version(said)} layout). A {version(weights)[3:]} checkpoint with a "
                       f"{version(said)[3:]} config? Use the config.json that came with the "
                       "weights")


def _check_shapes(module: torch.nn.Module, tensors: dict, d: Path, what: str) -> None:
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} (config gives {tuple(own[k].shape)})"
           for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise DifflabError(f"{d}: {len(bad)} {what} weights have other shapes than their "
                           f"config.json gives: {'; '.join(bad[:6])}" + (" ..." if len(bad) > 6
                                                                          else ""))


_VAE_FIXED = {"act_fn": "silu", "force_upcast": None, "use_quant_conv": True,
              "use_post_quant_conv": True, "latents_mean": None, "latents_std": None}


def vae_config_from_diffusers(cfg: dict):
    """difflab's ``AutoencoderKLConfig`` of a diffusers ``AutoencoderKL`` config, with its
    ``scaling_factor`` (SD v1 / v2: 0.18215) and ``shift_factor`` (0 when absent)."""
    from difflab.latent.autoencoder import AutoencoderKLConfig

    problems = []
    for key, want in _VAE_FIXED.items():
        got = cfg.get(key, want)
        if key == "force_upcast" or got == want:
            continue
        problems.append(f"{key}={got!r} (difflab's KL autoencoder has {want!r})")
    down = set(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
    up = set(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
    if down != {"DownEncoderBlock2D"} or up != {"UpDecoderBlock2D"}:
        problems.append(f"block types {sorted(down | up)} (difflab reads DownEncoderBlock2D / "
                        "UpDecoderBlock2D)")
    widths = tuple(int(w) for w in cfg.get("block_out_channels", (64,)))
    n_down = len(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
    n_up = len(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
    if not n_down == n_up == len(widths):
        problems.append(f"{len(widths)} block_out_channels but {n_down} down and {n_up} up "
                        "block types (difflab needs one of each per width)")
    if problems:
        raise DifflabError("this AutoencoderKL cannot be read as difflab's: " + "; ".join(problems))
    factor = 2 ** (len(widths) - 1)
    size = int(cfg.get("sample_size", 32))
    size = size if size % factor == 0 else factor * max(1, size // factor)
    try:
        config = AutoencoderKLConfig(
            in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels",
                                                                                 3)),
            image_size=size, block_channels=widths,
            layers_per_block=int(cfg.get("layers_per_block", 1)),
            latent_channels=int(cfg.get("latent_channels", 4)),
            groups=int(cfg.get("norm_num_groups", 32)),
            mid_attention=bool(cfg.get("mid_block_add_attention", True)))
    except ValueError as e:
        raise DifflabError(f"AutoencoderKL config: {e}") from None
    return config, float(cfg.get("scaling_factor", 0.18215)), float(cfg.get("shift_factor")
                                                                      or 0.0)


def check_vae_state(module: torch.nn.Module, state: dict) -> None:
    """Name the weights a difflab KL autoencoder lacks or does not know."""
    want = set(module.state_dict()) - {"scale_factor", "shift"}
    missing, unknown = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unknown:
        raise DifflabError("the VAE weights do not match their config: "
                           + "; ".join(f"{what} {len(keys)}: {', '.join(keys[:8])}"
                                       + (" ..." if len(keys) > 8 else "")
                                       for what, keys in (("missing", missing),
                                                          ("unexpected", unknown)) if keys))


def vae_from_config(cfg: dict) -> torch.nn.Module:
    """difflab's (freshly initialised) KL autoencoder of a diffusers ``AutoencoderKL`` config."""
    config, _, _ = vae_config_from_diffusers(cfg)
    return _build("autoencoder_kl", config)


def _load_vae(cfg: dict, state: dict, d: Path) -> torch.nn.Module:
    try:
        config, scale, shift = vae_config_from_diffusers(cfg)
    except DifflabError as e:
        raise DifflabError(f"{d}: {e}") from None
    module = _build("autoencoder_kl", config)
    try:
        check_vae_state(module, state)
    except DifflabError as e:
        raise DifflabError(f"{d}: {e}") from None
    _check_shapes(module, state, d, "VAE")
    module.load_state_dict({**state, "scale_factor": torch.tensor(scale),
                            "shift": torch.tensor(shift)}, strict=True)
    return module


# ----- writing ------------------------------------------------------------------------------------
def save_diffusers(module: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Write a difflab ``unet`` (cross-attention, no classes / learned variance; concatenated
    channels become extra input channels, as in SD 2's depth U-Net), ``autoencoder_kl`` or
    ``dit`` (class-conditional adaLN-Zero) as a diffusers component folder."""
    from safetensors.torch import save_file

    from difflab.latent.autoencoder import AutoencoderKL
    from difflab.networks.dit import DiT
    from difflab.networks.unet import UNet

    d = Path(folder)
    if isinstance(module, DiT):
        from difflab.interop.dit import save_diffusers_dit

        return save_diffusers_dit(module, d)
    if isinstance(module, UNet):
        cfg, state = _unet_out(module)
    elif isinstance(module, AutoencoderKL):
        cfg, state = _vae_out(module)
    else:
        raise DifflabError(f"difflab writes diffusers folders of U-Nets, KL autoencoders and "
                           f"DiTs, not of a {type(module).__name__}")
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(d / SAFETENSORS))
    (d / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return d


def _unet_out(module) -> tuple[dict, dict]:
    from difflab.interop.diffusers_unet import (
        DOWN_ATTN,
        DOWN_PLAIN,
        UP_ATTN,
        UP_PLAIN,
        DiffusersUNet,
        unet_to_diffusers_state,
    )

    c = module.config
    bad = [name for name, on in (("num_classes", c.num_classes is not None),
                                 ("learn_sigma", c.learn_sigma),
                                 ("use_scale_shift_norm", c.use_scale_shift_norm),
                                 ("resblock_updown", c.resblock_updown),
                                 ("context_dim=None", c.context_dim is None),
                                 ("dims", c.dims != 2)) if on]
    levels = len(c.channel_mult)
    widths = [c.model_channels * m for m in c.channel_mult]
    if any(w % 32 for w in widths):
        bad.append(f"widths {widths} (diffusers' GroupNorm needs multiples of 32)")
    if bad:
        raise DifflabError(f"this U-Net has {', '.join(bad)}, which UNet2DConditionModel in SD's "
                           "layout cannot hold")
    attn = [c.image_size // 2 ** i in c.attention_resolutions for i in range(levels)]
    cfg = {"_class_name": "UNet2DConditionModel", "sample_size": c.image_size,
           "in_channels": c.in_channels + c.concat_channels, "out_channels": c.out_channels,
           "block_out_channels": widths, "layers_per_block": c.num_res_blocks,
           "down_block_types": [DOWN_ATTN if a else DOWN_PLAIN for a in attn],
           "up_block_types": [UP_ATTN if a else UP_PLAIN for a in reversed(attn)],
           "cross_attention_dim": c.context_dim, "attention_head_dim":
               [c.heads(w)[0] for w in widths], "transformer_layers_per_block":
               c.transformer_depth, "use_linear_projection": True, "norm_num_groups": 32}
    return cfg, unet_to_diffusers_state(module.state_dict(), DiffusersUNet(c, True))


def _vae_out(module) -> tuple[dict, dict]:
    c = module.config
    n = len(c.block_channels)
    cfg = {"_class_name": "AutoencoderKL", "in_channels": c.in_channels,
           "out_channels": c.out_channels or c.in_channels,
           "block_out_channels": list(c.block_channels), "layers_per_block": c.layers_per_block,
           "latent_channels": c.latent_channels, "norm_num_groups": c.groups,
           "sample_size": c.image_size, "down_block_types": ["DownEncoderBlock2D"] * n,
           "up_block_types": ["UpDecoderBlock2D"] * n, "mid_block_add_attention":
               c.mid_attention, "scaling_factor": float(module.scale_factor)}
    if float(module.shift) != 0.0:
        cfg["shift_factor"] = float(module.shift)
    state = {k: v for k, v in module.state_dict().items() if k not in ("scale_factor", "shift")}
    return cfg, state
