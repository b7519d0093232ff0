"""Loading a trained codec from a folder (above the codec classes: it reads runs and diffusers
folders, which themselves build codecs)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.errors import DifflabError
from difflab.latent.codec import Codec


def load_codec(source: str | os.PathLike, device: torch.device | str = "cpu") -> Codec:
    """A trained codec: a component folder (``difflab export`` of an autoencoder run, or
    ``difflab.save``), a diffusers ``AutoencoderKL`` folder (Stable Diffusion's ``vae/``), a
    run folder of the ``autoencoder`` task (its EMA weights), or a
    checkpoint folder inside one. Frozen: eval mode, no gradients."""
    from difflab.components import CONFIG_JSON, load
    from difflab.interop.diffusers import diffusers_class, load_diffusers

    p = Path(source)
    if not p.exists():
        raise DifflabError(f"codec {str(source)!r} does not exist: give an autoencoder run "
                           "folder (difflab train configs/ae_kl_emoji.toml --out RUN) or a "
                           "component folder (difflab export RUN OUT)")
    if (p / CONFIG_JSON).is_file():
        # a diffusers AutoencoderKL folder (SD's vae/) or a difflab component folder
        module = load_diffusers(p, device) if diffusers_class(p) else load(p, device)
    else:
        from difflab.runs import load_run

        module = load_run(p, device=device).net
    if not isinstance(module, Codec):
        raise DifflabError(f"{source} holds a {type(module).__name__}, not a codec: [codec] "
                           "names a run of task kind 'autoencoder' or an exported codec")
    return module.to(device).eval().requires_grad_(False)
