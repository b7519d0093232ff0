"""The training-task base class (see :mod:`difflab.tasks`)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from difflab.builders import build_dataset, build_objective, build_path
from difflab.components import DataSpec, Family, build, get_family
from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.tasks.conditioning import Conditioner

logger = logging.getLogger("difflab.training")

_HASHES: dict[tuple, str] = {}


@dataclass
class FrozenPart:
    """A module a task uses but does not train: named in checkpoints by ``source`` (a path or a
    name) and ``sha256`` (its content), never copied into them."""

    module: Any
    source: str
    sha256: str

    def record(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256}


def content_hash(source: str | Path, module: nn.Module | None = None) -> str:
    """SHA-256 of a frozen part: of its file or folder when ``source`` is one (cached per
    process by size and modification time), else of its tensors."""
    from difflab.training.checkpoint import sha256_of

    p = Path(source)
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        key = (str(p.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                       for f in files))
        if key not in _HASHES:
            _HASHES[key] = sha256_of(p)
        return _HASHES[key]
    if module is None:
        raise DifflabError(f"frozen part {source!r}: neither a file nor a module to hash")
    import hashlib

    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TrainingTask:
    """What one run trains (see :mod:`difflab.tasks`); subclasses set the class attributes and
    may override :meth:`conditioning`, :meth:`wrap`, :meth:`loss` and the part builders.

    Class attributes:
        kind: the ``[task] kind`` value.
        options: the ``[task]`` keys it reads (others are rejected).
        family_kinds: the family kinds ``[model]`` may name.
        objectives: the objectives that train it; ``default_objective`` when none is named.
        generative: it samples images (training previews, ``difflab sample``).
        needs_labels: the data must be labelled.

    Args:
        cfg: the validated run config.
        dataset: the training data (default: ``[data]``'s; not needed when ``for_training`` is
            false and the config is a run's resolved one).
        device: where conditions are built.
        accelerator: the trainer's ``Accelerator`` (the main process encodes the captions
            first).
        for_training: build the dataset, objective and caption cache; else only what loading
            and sampling a trained run need (the config must be resolved).
    """

    kind: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    family_kinds: ClassVar[tuple[str, ...]] = ()
    objectives: ClassVar[tuple[str, ...]] = ()
    default_objective: ClassVar[str] = ""
    generative: ClassVar[bool] = False
    # what a run of a non-generative task is for, with ``{run}`` for its folder (shown when
    # someone tries to sample it)
    usage: ClassVar[str] = "it does not generate images"
    needs_labels: ClassVar[bool] = False
    latent: ClassVar[bool] = False  # it can train on a codec's latents ([codec])

    @classmethod
    def check_config(cls, cfg) -> None:
        """Cross-section checks at load time (raise ``ValueError`` naming the keys)."""
        if getattr(cfg, "codec", None) is not None and not cls.latent:
            raise ValueError(f"[codec] is given but task kind {cfg.task.kind!r} does not train "
                             "on latents: remove the section")
        if cfg.text_encoder is not None and not cls.uses_text(cfg):
            raise ValueError(f"[text_encoder] is given but task kind {cfg.task.kind!r}"
                             f"{cls._text_hint(cfg)} reads no text: remove the section")

    @classmethod
    def uses_text(cls, cfg) -> bool:
        return False

    @classmethod
    def _text_hint(cls, cfg) -> str:
        return ""

    def __init__(self, cfg, dataset=None, device: torch.device | str = "cpu", accelerator=None,
                 for_training: bool = True) -> None:
        self.device = torch.device(device)
        self.for_training = for_training
        if dataset is None and for_training:
            dataset = build_dataset(cfg)
        self.dataset = dataset
        self.path = build_path(cfg)
        self.family: Family = get_family(cfg.model.arch, self.family_kinds)
        self.text_config = self._text_config(cfg) if self.uses_text(cfg) else None
        self.model_config = self._model_config(cfg)
        model = {"arch": cfg.model.arch, "preset": cfg.model.preset,
                 **self.family.config_dict(self.model_config)}
        model = {k: v for k, v in model.items() if v is not None}
        update: dict[str, Any] = {"model": type(cfg.model).model_validate(model)}
        if self.text_config is not None:
            from difflab.config import TextEncoderSection

            enc = get_family("text_encoder").config_dict(self.text_config)
            update["text_encoder"] = TextEncoderSection.model_validate(
                {k: v for k, v in enc.items() if v is not None})
        self.cfg = cfg.model_copy(update=update)
        self.objective = build_objective(self.cfg) if for_training else None
        lock = accelerator.main_process_first() if accelerator is not None else \
            contextlib.nullcontext()
        with lock:
            self.conditioner = self.make_conditioner()

    # ----- resolution -------------------------------------------------------------------------
    def _text_config(self, cfg):
        fam = get_family("text_encoder")
        values = cfg.text_encoder.values() if cfg.text_encoder is not None else {}
        return fam.make_config(values, section="text_encoder")

    def text_dim(self) -> int | None:
        """Width of the text encoder's token embeddings (None: no text)."""
        return None if self.text_config is None else self.conditioner_encoder().dim

    def conditioner_encoder(self):
        from difflab.networks.text import text_encoder_of

        return text_encoder_of(self.text_config)

    def data_spec(self) -> DataSpec:
        """What the data (and the text encoder) decide about the network."""
        d = self.dataset
        classes = None
        if self.conditioning() == "class" or self.needs_labels:
            classes = getattr(d, "num_classes", None)
            if not classes:
                raise DifflabError(self._no_labels_message())
        return DataSpec(image_size=d.image_size, channels=d.channels, num_classes=classes)

    def _no_labels_message(self) -> str:
        return (f"task kind {self.kind!r} needs labels but dataset {self.cfg_data_name!r} has "
                "none")

    def _model_config(self, cfg):
        """The family config: ``[model]``'s keys, with the fields the data decides filled in
        (a value given in ``[model]`` must agree with them)."""
        values = cfg.model.values()
        self.cfg_data_name = cfg.data.name
        if self.for_training:
            decided = self.family.resolve(self.data_spec())
            for key, value in decided.items():
                if key in values and values[key] != value:
                    given = values[key]
                    raise DifflabError(
                        f"model.{key}={given} does not match what the run gives it ({value}, "
                        f"from data {cfg.data.name!r} and [task]): remove model.{key} or "
                        "change [data] / [task]")
            values = {**values, **decided}
        return self.family.make_config(values, preset=cfg.model.preset, section="model")

    # ----- parts ------------------------------------------------------------------------------
    def conditioning(self) -> str:
        """The :class:`Conditioner` kind: ``none``, ``class``, ``text`` or ``sentence``."""
        return "none"

    def make_conditioner(self) -> Conditioner:
        kind = self.conditioning()
        captions = None
        if kind in ("text", "sentence") and self.for_training:
            captions = getattr(self.dataset, "captions", None)
            if captions is None:
                raise DifflabError(f"task kind {self.kind!r} with text needs captions but "
                                   f"dataset {self.cfg.data.name!r} has none: give "
                                   "data.captions (a TSV 'file<TAB>caption')")
        return Conditioner(kind, num_classes=getattr(self.model_config, "num_classes", None),
                           text_encoder=self.text_config, captions=captions,
                           prompts=self.cfg.sample.prompts, device=self.device)

    def build_model(self) -> nn.Module:
        """The ``[model]`` network, freshly initialised (under the caller's RNG)."""
        return build(self.family.name, self.model_config)

    def build_trainable(self) -> dict[str, nn.Module]:
        """The trainable parts, freshly initialised; the trainer seeds the RNG around this."""
        return {"model": self.build_model()}

    def frozen_parts(self) -> dict[str, FrozenPart]:
        """The frozen parts, by name (recorded in every checkpoint by source and hash)."""
        if self.text_config is None:
            return {}
        enc = self.conditioner.encoder
        return {"text_encoder": FrozenPart(enc, enc.source, content_hash(enc.source, enc))}

    def part_metadata(self) -> dict[str, dict[str, str]]:
        """Safetensors metadata per trainable part: its family and weight layout version."""
        return {"model": {"family": self.family.name,
                          "family_version": str(self.family.version)}}

    def part_family(self, name: str) -> tuple[Family, Any]:
        """``(family, config)`` of a trainable part (for loading older weight layouts)."""
        return self.family, self.model_config

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch)."""
        if self.family.input_shape is None:
            raise DifflabError(f"family {self.family.name!r} declares no input shape")
        return tuple(self.family.input_shape(self.model_config))

    def before_checkpoint(self, parts: dict[str, nn.Module], emas: dict) -> None:
        """Called by the trainer just before every checkpoint (main process and the others
        alike) with the trainable parts and their EMAs: a task may update buffers that are
        saved with them (the autoencoder task's latent scale)."""

    # ----- the loss ---------------------------------------------------------------------------
    def wrap(self, net: nn.Module, check_finite: bool = True):
        """The network as the core reads it (a ``Denoiser``, a ``NoisyModel``)."""
        raise NotImplementedError

    def p_uncond(self) -> float:
        return 0.0

    def loss(self, modules: dict[str, nn.Module], x: Tensor, cond: Cond,
             generator: torch.Generator) -> Tensor:
        """Per-example losses ``(B,)`` of one micro-batch ``(x, cond)`` (the collated batch's
        condition: labels, captions), with ``modules`` the trainer's (prepared) trainable
        parts. The condition is built first (condition dropout draws from ``generator``),
        then the objective draws its times and noise from it."""
        c = self.conditioner.training(cond, generator, self.p_uncond())
        den = self.wrap(modules["model"], check_finite=False)
        return self.objective(den, x, c, generator=generator)
