"""DiT checkpoints of other code in and out of difflab's ``dit`` family (Peebles & Xie 2023).

Two layouts hold the same network (the adaLN-Zero, class-conditional DiT):

- **facebookresearch/DiT** ``.pt`` files (``DiT-XL-2-256x256.pt``: a plain state dict of the EMA
  weights; ``train.py``'s checkpoints nest it under ``"ema"`` / ``"model"``): ``x_embedder.proj``,
  ``pos_embed`` (the fixed sin-cos table, stored), ``t_embedder.mlp.0`` / ``.2``,
  ``y_embedder.embedding_table``, ``blocks.N.attn.qkv`` / ``.proj``, ``blocks.N.mlp.fc1`` /
  ``.fc2``, ``blocks.N.adaLN_modulation.1`` and ``final_layer.adaLN_modulation.1`` / ``.linear``.
  Read with ``torch.load(weights_only=True)`` only: a file that needs code to unpickle (a
  training checkpoint's argparse ``args``) is refused, never run.
- **diffusers' ``DiTTransformer2DModel``** folders: ``pos_embed.proj``, per block
  ``norm1.linear`` (the modulation), ``attn1.to_q/k/v`` (fused into difflab's ``to_qkv``),
  ``attn1.to_out.0``, ``ff.net.0.proj`` / ``ff.net.2``; ``proj_out_1`` / ``proj_out_2``.
  diffusers repeats the time and class embedders in every block (``norm1.emb``; its converted
  DiT checkpoints hold copies of one), where DiT has one: they must be equal, and are written
  to every block. Two numerical settings differ from the DiT code and are kept on load so that
  outputs match diffusers: time frequencies ``10000 ** (-i / (half - 1))``
  (``time_freq_shift=1``) and ``norm_eps`` (1e-5) before the MLP (``mlp_norm_eps``).

The DiT code does not record the number of heads; a facebookresearch file is read with DiT's
(Table 1: 64-wide heads, 72-wide for XL's 1152 width) unless ``num_heads`` is given. A checkpoint
that does not fit a given config (another patch size, depth, width) is refused with every
mismatched, missing and unexpected tensor listed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.networks.dit import DiT, DiTConfig, sincos_2d

logger = logging.getLogger("difflab.interop")

FB_MARKERS = ("x_embedder.proj.weight", "final_layer.linear.weight")
SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
DIFFUSERS_CLASS = "DiTTransformer2DModel"
CONFIG, SAFETENSORS = "config.json", "diffusion_pytorch_model.safetensors"  # diffusers' names
BIN = "diffusion_pytorch_model.bin"
_HEADS = {1152: 16}  # DiT-XL; S, B and L have 64-wide heads (Table 1)
_BLOCK_PAIRS = (("attn.to_qkv", "attn.qkv"), ("attn.to_out", "attn.proj"), ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"), ("modulation", "adaLN_modulation.1"))
_EMB = "norm1.emb."
_SHARED = (("time_embed.linear_1", "timestep_embedder.linear_1"),
           ("time_embed.linear_2", "timestep_embedder.linear_2"))


# ----- the facebookresearch layout -------------------------------------------------------------
def facebook_names(depth: int) -> list[tuple[str, str]]:
    """``(difflab key, facebookresearch key)`` of every weight of a ``depth``-block DiT."""
    pairs = [("patch_embed", "x_embedder.proj"), ("time_embed.linear_1", "t_embedder.mlp.0"),
             ("time_embed.linear_2", "t_embedder.mlp.2")]
    pairs += [(f"blocks.{i}.{a}", f"blocks.{i}.{b}") for i in range(depth) for a, b in _BLOCK_PAIRS]
    pairs += [("final.modulation", "final_layer.adaLN_modulation.1"),
              ("final.linear", "final_layer.linear")]
    out = [(f"{a}.{s}", f"{b}.{s}") for a, b in pairs for s in ("weight", "bias")]
    return [*out, ("label_emb.weight", "y_embedder.embedding_table.weight")]


def heads_of(hidden: int) -> int:
    """DiT's head count for a width (Table 1): 16 for XL's 1152, else 64-wide heads."""
    if hidden in _HEADS:
        return _HEADS[hidden]
    if hidden % 64:
        raise DifflabError(f"a DiT of width {hidden} is not one of Table 1's (heads of 64, XL: "
                           "16 heads of 72): give num_heads, which the checkpoint does not record")
    return hidden // 64


def config_from_facebook(state: dict[str, torch.Tensor], num_heads: int | None = None
                         ) -> DiTConfig:
    """The config of a facebookresearch DiT state dict, read off its tensors: the patch size,
    width and input channels from ``x_embedder.proj.weight``, the depth from the block count,
    the classes from ``y_embedder`` (its last row the null class), the size from ``pos_embed``,
    ``learn_sigma`` from the output width (``2 C`` with it, as the DiT code)."""
    missing = [k for k in (*FB_MARKERS, "pos_embed", "y_embedder.embedding_table.weight",
                           "t_embedder.mlp.0.weight", "blocks.0.mlp.fc1.weight") if k not in state]
    if missing:
        raise DifflabError(f"not a facebookresearch DiT state dict: no {', '.join(missing)}")
    D, C, p, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise DifflabError(f"pos_embed has {tokens} tokens, not a square grid")
    out = state["final_layer.linear.weight"].shape[0] // (p * p)
    if out not in (C, 2 * C):
        raise DifflabError(f"final_layer.linear gives {out} channels per pixel; a DiT over {C} "
                           f"channels gives {C} (or {2 * C} with learned sigma)")
    try:
        return DiTConfig(image_size=grid * p, patch_size=p, in_channels=C, out_channels=C,
                         hidden_size=D, depth=depth, num_heads=num_heads or heads_of(D),
                         mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / D,
                         num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
                         learn_sigma=out == 2 * C,
                         time_freq_dim=state["t_embedder.mlp.0.weight"].shape[1])
    except DifflabError as e:
        raise DifflabError(f"the DiT checkpoint's tensors give no valid config: {e}") from None


def _check_layout(c: DiTConfig, layout: str) -> None:
    bad = [name for name, on in (("block=" + repr(c.block), c.block != "adaln_zero"),
                                 ("num_classes=None", c.num_classes is None),
                                 (f"context_dim={c.context_dim}", c.context_dim is not None))
           if on]
    if bad:
        raise DifflabError(f"this DiT has {', '.join(bad)}, which {layout}'s layout cannot hold "
                           "(it holds class-conditional adaLN-Zero DiTs without text)")


def _shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}


def _report(what: str, config: DiTConfig, problems: list[str], missing: list[str],
            unexpected: list[str]) -> None:
    parts = []
    if problems:
        parts.append(f"{len(problems)} tensors differ: " + "; ".join(problems[:12])
                     + (" ..." if len(problems) > 12 else ""))
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{name} {len(keys)}: {', '.join(keys[:12])}"
                         + (" ..." if len(keys) > 12 else ""))
    if parts:
        c = config
        raise DifflabError(f"{what} does not fit the DiT config (patch_size={c.patch_size}, "
                           f"depth={c.depth}, hidden_size={c.hidden_size}, image_size="
                           f"{c.image_size}, num_classes={c.num_classes}, learn_sigma="
                           f"{c.learn_sigma}): " + "; ".join(parts))


def dit_from_facebook_state(state: dict[str, torch.Tensor], config: DiTConfig | None = None,
                            num_heads: int | None = None, what: str = "the checkpoint"
                            ) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """facebookresearch layout -> ``(config, difflab weights)``; the config is read off the
    tensors unless given (then every tensor that does not fit it is named)."""
    c = config if config is not None else config_from_facebook(state, num_heads)
    _check_layout(c, "facebookresearch/DiT")
    pairs, shapes = facebook_names(c.depth), _shapes(c)
    want = {theirs for _, theirs in pairs} | {"pos_embed"}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    problems = [f"{theirs} {tuple(state[theirs].shape)} (config gives {shapes[ours]})"
                for ours, theirs in pairs if theirs in state
                and tuple(state[theirs].shape) != shapes[ours]]
    if "pos_embed" in state:
        pos, n = state["pos_embed"], c.grid
        if tuple(pos.shape) != (1, n * n, c.hidden_size):
            problems.append(f"pos_embed {tuple(pos.shape)} (config gives (1, {n * n}, "
                            f"{c.hidden_size}))")
        elif float((pos[0].float() - sincos_2d(c.hidden_size, n, n)).abs().max()) > 1e-4:
            problems.append(f"pos_embed is not the fixed 2-D sin-cos table of a {n}x{n} grid")
    _report(what, c, problems, missing, unexpected)
    return c, {ours: state[theirs] for ours, theirs in pairs}


def dit_to_facebook_state(module: DiT) -> dict[str, torch.Tensor]:
    """difflab DiT -> the facebookresearch layout (with its stored ``pos_embed``)."""
    c = module.config
    _check_layout(c, "facebookresearch/DiT")
    if c.time_freq_shift != 0 or c.mlp_norm_eps != 1e-6:
        logger.warning("this DiT computes time_freq_shift=%s / mlp_norm_eps=%g (diffusers' "
                       "layout); the facebookresearch code uses 0 / 1e-6, so its outputs there "
                       "differ slightly", c.time_freq_shift, c.mlp_norm_eps)
    own = module.state_dict()
    out = {theirs: own[ours].detach().cpu().clone() for ours, theirs in facebook_names(c.depth)}
    out["pos_embed"] = sincos_2d(c.hidden_size, c.grid, c.grid)[None]
    return out


# ----- the diffusers layout ----------------------------------------------------------------------
_FIXED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
          "attention_bias": True, "norm_elementwise_affine": False}


def config_from_diffusers(cfg: dict[str, Any]) -> DiTConfig:
    """difflab's config of a ``DiTTransformer2DModel`` ``config.json``."""
    problems = [f"{k}={cfg[k]!r} (DiT has {v!r})" for k, v in _FIXED.items()
                if k in cfg and cfg[k] != v]
    heads, head_dim = int(cfg.get("num_attention_heads", 16)), int(cfg.get("attention_head_dim",
                                                                           72))
    c_in = int(cfg.get("in_channels", 4))
    c_out = int(cfg.get("out_channels") or c_in)
    if c_out not in (c_in, 2 * c_in):
        problems.append(f"out_channels={c_out} (DiT outputs in_channels={c_in}, or twice that "
                        "with learned sigma)")
    if cfg.get("num_embeds_ada_norm") is None:
        problems.append("num_embeds_ada_norm=None (DiT is class-conditional)")
    if problems:
        raise DifflabError(f"this {DIFFUSERS_CLASS} cannot be read as a DiT: "
                           + "; ".join(problems))
    try:
        return DiTConfig(image_size=int(cfg.get("sample_size", 32)),
                         patch_size=int(cfg.get("patch_size", 2)), in_channels=c_in,
                         out_channels=c_in, hidden_size=heads * head_dim,
                         depth=int(cfg.get("num_layers", 28)), num_heads=heads,
                         num_classes=int(cfg["num_embeds_ada_norm"]), learn_sigma=c_out != c_in,
                         time_freq_shift=1, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))
    except DifflabError as e:
        raise DifflabError(f"{DIFFUSERS_CLASS} config: {e}") from None


def diffusers_names(depth: int) -> list[tuple[str, str]]:
    """``(difflab key, diffusers key)`` of the weights that map one to one (``to_qkv`` and the
    per-block embedders are handled apart)."""
    pairs = [("patch_embed", "pos_embed.proj"), ("final.modulation", "proj_out_1"),
             ("final.linear", "proj_out_2")]
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        pairs += [(f"blocks.{i}.modulation", b + "norm1.linear"),
                  (f"blocks.{i}.attn.to_out", b + "attn1.to_out.0"),
                  (f"blocks.{i}.mlp.fc1", b + "ff.net.0.proj"),
                  (f"blocks.{i}.mlp.fc2", b + "ff.net.2")]
    return [(f"{a}.{s}", f"{b}.{s}") for a, b in pairs for s in ("weight", "bias")]


def _embedder_names(i: int) -> list[tuple[str, str]]:
    b = f"transformer_blocks.{i}.{_EMB}"
    out = [(f"{a}.{s}", f"{b}{t}.{s}") for a, t in _SHARED for s in ("weight", "bias")]
    return [*out, ("label_emb.weight", b + "class_embedder.embedding_table.weight")]


def dit_from_diffusers_state(state: dict[str, torch.Tensor], config: DiTConfig,
                             what: str = "the weights") -> dict[str, torch.Tensor]:
    """diffusers ``DiTTransformer2DModel`` weights -> difflab weights for ``config``."""
    c, shapes = config, _shapes(config)
    pairs = diffusers_names(c.depth)
    qkv = [[f"transformer_blocks.{i}.attn1.to_{x}.{s}" for x in "qkv"]
           for i in range(c.depth) for s in ("weight", "bias")]
    emb = [_embedder_names(i) for i in range(c.depth)]
    want = {b for _, b in pairs} | {k for group in qkv for k in group}
    want |= {b for group in emb for _, b in group}
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    _report(what, c, [], missing, unexpected)
    out = {a: state[b] for a, b in pairs}
    for i, group in enumerate(qkv):
        out[f"blocks.{i // 2}.attn.to_qkv.{('weight', 'bias')[i % 2]}"] = torch.cat(
            [state[k] for k in group])
    out.update({a: state[b] for a, b in emb[0]})
    untied = [b for group in emb[1:] for a, b in group if not torch.equal(state[b], out[a])]
    if untied:
        raise DifflabError(f"{what}: diffusers repeats DiT's one time and class embedder in "
                           "every block (norm1.emb), and these copies differ from block 0's: "
                           f"{', '.join(untied[:6])}" + (" ..." if len(untied) > 6 else "")
                           + "; difflab's DiT has one embedder (as the paper's)")
    problems = [f"{k} {tuple(v.shape)} (config gives {shapes[k]})" for k, v in out.items()
                if tuple(v.shape) != shapes[k]]
    _report(what, c, problems, [], [])
    return out


def diffusers_config(c: DiTConfig) -> dict[str, Any]:
    """The ``config.json`` of a difflab DiT as a ``DiTTransformer2DModel``."""
    _check_layout(c, DIFFUSERS_CLASS)
    bad = [f"{k}={v}" for k, v, ok in (("time_freq_dim", c.time_freq_dim, 256),
                                       ("mlp_ratio", c.mlp_ratio, 4.0)) if v != ok]
    if bad:
        raise DifflabError(f"this DiT has {', '.join(bad)}; {DIFFUSERS_CLASS} fixes 256 time "
                           "frequencies and an MLP 4x as wide")
    if c.time_freq_shift != 1:
        logger.warning("diffusers' DiT computes its time frequencies as 10000 ** (-i / (half - 1)"
                       "); this DiT was trained with 10000 ** (-i / half), so its outputs there "
                       "differ slightly (as diffusers' DiT checkpoints differ from the DiT code's)")
    return {"_class_name": DIFFUSERS_CLASS, "num_attention_heads": c.num_heads,
            "attention_head_dim": c.hidden_size // c.num_heads, "in_channels": c.in_channels,
            "out_channels": c.out_channels * (2 if c.learn_sigma else 1), "num_layers": c.depth,
            "sample_size": c.image_size, "patch_size": c.patch_size,
            "num_embeds_ada_norm": c.num_classes, "norm_eps": c.mlp_norm_eps,
            "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
            "attention_bias": True, "norm_elementwise_affine": False}


def dit_to_diffusers_state(module: DiT) -> dict[str, torch.Tensor]:
    """difflab DiT -> ``DiTTransformer2DModel`` weights (the embedder copied to every block)."""
    c, own = module.config, {k: v.detach().cpu() for k, v in module.state_dict().items()}
    out = {b: own[a].clone() for a, b in diffusers_names(c.depth)}
    for i in range(c.depth):
        for s in ("weight", "bias"):
            q, k, v = own[f"blocks.{i}.attn.to_qkv.{s}"].chunk(3)
            for x, part in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.to_{x}.{s}"] = part.clone()
        out.update({b: own[a].clone() for a, b in _embedder_names(i)})
    return out


# ----- files and folders -------------------------------------------------------------------------
def _torch_load(file: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickles that need code
        raise DifflabError(f"{file} cannot be read as plain tensors (torch.load(weights_only="
                           f"True), which never runs code: {e})") from None


def _unwrap(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """A state dict, or the EMA / model weights a training checkpoint nests."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict) and FB_MARKERS[0] not in obj:
                return _unwrap(obj[key], file)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DifflabError(f"{file} holds a {type(obj).__name__}, not a DiT state dict")
    return obj


def read_dit_state(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The facebookresearch-layout tensors of a ``.pt`` (or ``.safetensors``) file."""
    f = Path(file)
    if f.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return _unwrap(_torch_load(f), f)


def is_dit_checkpoint(path: str | os.PathLike) -> bool:
    """A file in facebookresearch/DiT's layout (its keys read without loading the tensors)."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in SUFFIXES:
        return False
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                keys = set(f.keys())
        else:
            keys = set(_unwrap(_torch_load(p, mmap=True), p))
    except (DifflabError, OSError, RuntimeError, ValueError):
        return False
    return all(k in keys for k in FB_MARKERS)


def _build(config: DiTConfig, tensors: dict[str, torch.Tensor], device: Any) -> DiT:
    from difflab.components import build

    with torch.random.fork_rng(devices=[]):  # the init is overwritten: spare the caller's RNG
        module = build("dit", replace(config))
    module.load_state_dict(tensors, strict=True)
    return module.to(device).eval()


def load_dit_checkpoint(path: str | os.PathLike, config: DiTConfig | None = None,
                        num_heads: int | None = None, device: Any = "cpu") -> DiT:
    """A facebookresearch/DiT ``.pt`` file as a difflab ``dit`` (``difflab.load`` of it).

    Args:
        path: the file (``torch.load(weights_only=True)``; never runs code).
        config: the expected config; every tensor that does not fit it is named. Default: read
            off the tensors (:func:`config_from_facebook`).
        num_heads: the head count, which the file does not record (default: Table 1's).
        device: where to put the module.
    """
    f = Path(path)
    config, tensors = dit_from_facebook_state(read_dit_state(f), config, num_heads, what=str(f))
    return _build(config, tensors, device)


def save_dit_checkpoint(module: DiT, file: str | os.PathLike) -> Path:
    """Write a difflab DiT as a facebookresearch ``.pt`` state dict (``torch.save``)."""
    f = Path(file)
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dit_to_facebook_state(module), f)
    return f


def _folder_weights(d: Path) -> dict[str, torch.Tensor]:
    """A diffusers folder's weights: safetensors, else a ``.bin`` read as plain tensors."""
    if (d / SAFETENSORS).is_file():
        from safetensors.torch import load_file

        return load_file(str(d / SAFETENSORS))
    if (d / BIN).is_file():
        return _unwrap(_torch_load(d / BIN), d / BIN)
    raise DifflabError(f"{d} has no {SAFETENSORS} (or {BIN})")


def load_diffusers_dit(folder: str | os.PathLike, device: Any = "cpu") -> DiT:
    """A diffusers ``DiTTransformer2DModel`` folder as a difflab ``dit``."""
    d = Path(folder)
    try:
        config = config_from_diffusers(json.loads((d / CONFIG).read_text()))
    except DifflabError as e:
        raise DifflabError(f"{d}: {e}") from None
    except (OSError, ValueError) as e:
        raise DifflabError(f"{d / CONFIG} cannot be read ({e})") from None
    weights = _folder_weights(d)
    return _build(config, dit_from_diffusers_state(weights, config, what=str(d)), device)


def save_diffusers_dit(module: DiT, folder: str | os.PathLike) -> Path:
    """Write a difflab DiT as a diffusers ``DiTTransformer2DModel`` folder."""
    from safetensors.torch import save_file

    d = Path(folder)
    cfg = diffusers_config(module.config)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit_to_diffusers_state(module).items()},
              str(d / SAFETENSORS))
    (d / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return d


__all__ = ["config_from_diffusers", "config_from_facebook", "diffusers_config",
           "dit_from_diffusers_state", "dit_from_facebook_state", "dit_to_diffusers_state",
           "dit_to_facebook_state", "is_dit_checkpoint", "load_diffusers_dit",
           "load_dit_checkpoint", "read_dit_state", "save_diffusers_dit", "save_dit_checkpoint"]
