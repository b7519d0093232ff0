"""Other libraries' checkpoint layouts in and out of difflab (diffusers' component folders)."""

from __future__ import annotations

import os
from typing import Any


def load(path: str | os.PathLike, device: Any = "cpu", **single_file: Any) -> Any:
    """``difflab.load``: a difflab component folder (:func:`difflab.components.load`), a
    diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``DiTTransformer2DModel`` folder
    converted to difflab's layout (:func:`difflab.interop.diffusers.load_diffusers`), a
    facebookresearch/DiT ``.pt`` file as a difflab ``dit`` (options ``num_heads``, ``config``:
    :func:`difflab.interop.dit.load_dit_checkpoint`), or a diffusers Stable Diffusion or DiT
    pipeline folder or SD's original single-file checkpoint (``.safetensors`` / ``.ckpt``;
    options ``tokenizer``, ``config``, ``prediction``, see :mod:`difflab.interop.single_file`)
    as a :class:`difflab.runs.LoadedRun` ready to sample (:func:`difflab.runs.load_run`)."""
    from difflab.components import load as load_component
    from difflab.interop.diffusers import diffusers_class, load_diffusers
    from difflab.interop.dit import is_dit_checkpoint, load_dit_checkpoint
    from difflab.interop.pipeline import is_pipeline
    from difflab.interop.single_file import is_single_file

    if is_dit_checkpoint(path):
        unknown = sorted(set(single_file) - {"num_heads", "config"})
        if unknown:
            raise TypeError(f"load() got options {unknown} that a DiT checkpoint does not take "
                            "(it takes num_heads, config)")
        return load_dit_checkpoint(path, device=device, **single_file)
    if is_pipeline(path) or is_single_file(path):
        from difflab.runs import load_run

        return load_run(path, device=device, single_file=single_file or None)
    if single_file:
        raise TypeError(f"load() got options {sorted(single_file)} that only an SD single "
                        "file takes")
    if diffusers_class(path) is not None:
        return load_diffusers(path, device)
    return load_component(path, device)


__all__ = ["load"]
