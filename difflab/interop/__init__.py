"""Other libraries' checkpoint layouts in and out of difflab (diffusers' component folders)."""

from __future__ import annotations

import os
from typing import Any


def load(path: str | os.PathLike, device: Any = "cpu", **single_file: Any) -> Any:
    """``difflab.load``: a difflab component folder (:func:`difflab.components.load`), a
    diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` folder converted to difflab's
    layout (:func:`difflab.interop.diffusers.load_diffusers`), or a diffusers Stable Diffusion
    pipeline folder or original single-file checkpoint (``.safetensors`` / ``.ckpt``; options
    ``tokenizer``, ``config``, ``prediction``, see :mod:`difflab.interop.single_file`) as a
    :class:`difflab.runs.LoadedRun` ready to sample (:func:`difflab.runs.load_run`)."""
    from difflab.components import load as load_component
    from difflab.interop.diffusers import diffusers_class, load_diffusers
    from difflab.interop.pipeline import is_pipeline
    from difflab.interop.single_file import is_single_file

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
