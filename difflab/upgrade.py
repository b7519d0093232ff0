"""Converting runs and configs written before component families and training tasks.

Version 1 (difflab <= 0.1 of this redesign) had one ``[model]`` section mixing the network's
fields, how its output is read and what it was trained on. Version 2 splits it:

======================================  ===============================================
version 1                               version 2
======================================  ===============================================
``model.arch = "classifier"``           ``task.kind = "classifier"`` (``model.arch`` stays)
``model.arch = "alignment"``            ``task.kind = "contrastive"`` (``model.arch`` stays)
``model.prediction / precond /          ``task.prediction / precond / sigma_data``
sigma_data``
``model.class_cond = true``             ``task.cond = "class"``
``model.text_encoder = NAME``           ``[text_encoder] name = NAME`` (+ ``task.cond =
                                        "text"`` for a U-Net)
``model.text_max_length``               ``text_encoder.max_length``
``model.learned_variance``              ``model.learn_sigma`` (a U-Net field)
``train.p_uncond``                      ``task.p_uncond``
======================================  ===============================================

A run folder's own ``config.toml`` is converted in memory when the run is loaded or resumed
(with a log line saying how to convert it on disk); a config *file* given to ``difflab train``
must be converted once with ``difflab upgrade FILE`` so that what is trained is what is read.
Weights need no conversion here: a family whose parameter names changed converts its older
layouts when they are loaded (:func:`difflab.components.upgrade_weights`).
"""

from __future__ import annotations

import copy
from typing import Any

from difflab.errors import DifflabError

# What an old ``model.arch`` trained: the task of version 2 (the family name is unchanged).
_TASK_OF_OLD_ARCH = {"unet": "diffusion", "classifier": "classifier",
                     "alignment": "contrastive"}
_TO_TASK = ("prediction", "precond", "sigma_data")
_OLD_MODEL_KEYS = (*_TO_TASK, "class_cond", "learned_variance", "text_encoder",
                   "text_max_length")


def is_legacy(raw: dict[str, Any]) -> bool:
    """Whether a raw config dict uses the version-1 layout."""
    if not isinstance(raw, dict) or "version" in raw:
        return False
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    if any(k in model for k in _OLD_MODEL_KEYS) or "p_uncond" in train:
        return True
    arch = model.get("arch")
    return "task" not in raw and arch in _TASK_OF_OLD_ARCH and \
        _TASK_OF_OLD_ARCH[arch] != "diffusion"


def upgrade_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The version-2 dict of a version-1 one (a new dict; the argument is not changed)."""
    new = copy.deepcopy(raw)
    model = dict(new.pop("model", {}) or {})
    train = dict(new.get("train", {}) or {})
    task = dict(new.pop("task", {}) or {})
    arch = model.get("arch", "unet")
    kind = _TASK_OF_OLD_ARCH.get(arch)
    if kind is None:
        raise DifflabError(f"model.arch={arch!r} is not an architecture of version-1 configs "
                           f"({', '.join(_TASK_OF_OLD_ARCH)})")
    task.setdefault("kind", kind)
    diffusion = kind == "diffusion"
    read = {k: model.pop(k) for k in _OLD_MODEL_KEYS if k in model}
    p_uncond = train.pop("p_uncond", None)
    if diffusion:
        task.update({k: read[k] for k in _TO_TASK if k in read})
        if read.get("learned_variance"):
            model["learn_sigma"] = True
        if read.get("class_cond"):
            task["cond"] = "class"
        if read.get("text_encoder"):
            task["cond"] = "text"
        if p_uncond is not None:
            task["p_uncond"] = p_uncond
        # a resolved version-1 run held in_channels only: its U-Net predicted as many channels
        if "in_channels" in model and "out_channels" not in model:
            model["out_channels"] = model["in_channels"]
    if read.get("text_encoder"):
        enc = {"name": read["text_encoder"]}
        if read.get("text_max_length") is not None:
            enc["max_length"] = read["text_max_length"]
        new["text_encoder"] = enc
    out: dict[str, Any] = {"version": 2}
    for key in ("path",):
        if key in new:
            out[key] = new.pop(key)
    out["model"] = model
    out["task"] = task
    if "train" in raw:
        new["train"] = train
    out.update(new)
    return out
