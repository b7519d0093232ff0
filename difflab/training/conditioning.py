"""From what a dataset or a user gives (class ids, captions, prompts) to the ``Cond`` a network
reads, for training and for sampling; one place for the null condition of every kind.

- Class-conditional U-Net: ``Cond(labels)``; the null class is ``num_classes``.
- Text-conditional U-Net (``model.text_encoder``): ``Cond(context, context_mask)`` from the frozen
  text encoder; the null condition is the empty prompt ``""`` (GLIDE, Nichol et al. 2022, Sec.
  2.3 / App. E; Stable Diffusion does the same).
- Condition dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1): during training
  each condition is replaced by the null one with probability ``train.p_uncond``.
- Noise-aware classifier (``model.arch = "classifier"``): ``Cond(labels)``, never dropped.
- Image-text alignment model (``model.arch = "alignment"``): the captions' pooled sentence
  embeddings in ``Cond.extra["text_emb"]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from difflab.cond import Cond
from difflab.config import Config
from difflab.errors import DifflabError, bad_value

logger = logging.getLogger("difflab.training")


def text_cache_dir() -> Path:
    from difflab.evaluation.features import cache_dir

    return cache_dir() / "text"


class Conditioner:
    """Builds ``Cond`` objects for the model of ``cfg``.

    Args:
        cfg: a config whose data fields are resolved.
        captions: the dataset's captions (text models, training): they are encoded once and
            cached on disk (:class:`~difflab.networks.text.CaptionEmbeddings`).
        device: where the tensors go.
    """

    def __init__(self, cfg: Config, captions: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        m = cfg.model
        self.device = torch.device(device)
        self.num_classes = m.num_classes
        self.kind = ("text" if m.text_encoder else "class" if m.class_cond or m.arch ==
                     "classifier" else "none")
        self.embeddings = None
        self._encoder = None
        if self.kind == "text" and captions is not None:
            from difflab.networks.text import CaptionEmbeddings

            self.embeddings = CaptionEmbeddings.build(self.encoder, captions, text_cache_dir())

    @property
    def encoder(self):
        if self._encoder is None:
            from difflab.networks.text import load_text_encoder

            m = self.cfg.model
            self._encoder = load_text_encoder(m.text_encoder, m.text_max_length)
        return self._encoder

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    # ----- training ---------------------------------------------------------------------------
    def training(self, batch: Cond, generator: torch.Generator | None, p_uncond: float = 0.0
                 ) -> Cond | None:
        """The network's ``Cond`` for a collated batch, with condition dropout ``p_uncond``."""
        arch = self.cfg.model.arch
        if self.kind == "none":
            return None
        if self.kind == "class":
            if batch.labels is None:
                raise DifflabError("the model is class-conditional but the batch has no labels")
            labels = batch.labels.to(self.device)
            if p_uncond > 0 and arch == "unet":
                drop = self._drop(labels.shape[0], generator, p_uncond)
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            return Cond(labels=labels)
        captions = batch.extra.get("captions")
        if captions is None:
            raise DifflabError(f"model.text_encoder={self.cfg.model.text_encoder!r} needs "
                               f"captions but dataset {self.cfg.data.name!r} gives none: point "
                               "data.captions at a TSV 'file<TAB>caption'")
        captions = list(captions)
        if p_uncond > 0 and arch == "unet":
            drop = self._drop(len(captions), generator, p_uncond).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        emb = self.embeddings
        if emb is None:
            raise DifflabError("Conditioner built without the dataset's captions")
        if arch == "alignment":
            return Cond(extra={"text_emb": emb.sentence(captions).to(self.device)})
        context, mask = emb.lookup(captions)
        return Cond(context=context.to(self.device), context_mask=mask.to(self.device))

    def _drop(self, n: int, generator: torch.Generator | None, p: float) -> torch.Tensor:
        dev = generator.device if generator is not None else torch.device("cpu")
        return (torch.rand(n, generator=generator, device=dev) < p).to(self.device)

    # ----- sampling ---------------------------------------------------------------------------
    def labels(self, labels: torch.Tensor | Sequence[int] | int | None, n: int) -> torch.Tensor:
        """Class ids ``(n,)``: one id for all, a list cycled, or (None) ``i mod num_classes``."""
        k = self.num_classes
        if self.kind != "class" or not k:
            if labels is not None:
                raise bad_value("class", labels, "nothing: this model is not class-conditional")
            raise DifflabError("this model is not class-conditional")
        if labels is None:
            return torch.arange(n) % k
        t = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        bad = t[(t < 0) | (t >= k)]
        if bad.numel():
            raise bad_value("class", int(bad[0]), f"a class id in [0, {k})")
        return t.repeat((n + t.numel() - 1) // t.numel())[:n]

    def make(self, n: int, labels=None, prompts: Sequence[str] | str | None = None,
             negative_prompt: str | None = None) -> tuple[Cond | None, Cond | None]:
        """``(cond, null_cond)`` for ``n`` samples: the requested condition and what guidance
        contrasts it with (null class; the empty or the negative prompt). ``(None, None)`` for
        an unconditional model."""
        if self.kind == "none":
            if labels is not None or prompts is not None:
                raise DifflabError("this model is unconditional: --class / --prompt do not apply")
            return None, None
        if self.kind == "class":
            if prompts is not None or negative_prompt is not None:
                raise DifflabError("this model is class-conditional: use --class, not --prompt")
            y = self.labels(labels, n)
            return Cond(labels=y), Cond(labels=torch.full_like(y, self.num_classes))
        if labels is not None:
            raise DifflabError("this model is text-conditional: use --prompt, not --class")
        if prompts is None:
            prompts = self.default_prompts(n)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise DifflabError("no prompts given")
        prompts = (prompts * ((n + len(prompts) - 1) // len(prompts)))[:n]
        neg = negative_prompt or ""
        context, mask = self.encode(prompts + [neg])
        cond = Cond(context=context[:n], context_mask=mask[:n])
        null = Cond(context=context[n:].expand(n, -1, -1), context_mask=mask[n:].expand(n, -1))
        return cond, null

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings of ``prompts`` padded to one length (cached captions when all are
        known, else the encoder)."""
        emb = self.embeddings
        if emb is not None and all(p in emb.row for p in prompts):
            return emb.lookup(prompts)
        return self.encoder.encode(prompts)

    def default_prompts(self, n: int) -> list[str]:
        """``sample.prompts`` of the config, or (none given) distinct dataset captions."""
        given = list(self.cfg.sample.prompts)
        if given:
            return given
        if self.embeddings is not None:
            caps = [c for c in self.embeddings.captions if c]
            step = max(1, len(caps) // max(n, 1))
            return caps[::step][:n]
        raise DifflabError("a text-conditional model needs prompts: give --prompt or set "
                           "sample.prompts in the config")


def warn_if_no_unconditional(cfg: Config, what: str = "classifier-free guidance") -> None:
    """Guidance needs a null-condition branch: warn for a model trained without dropout."""
    if cfg.train.p_uncond == 0:
        warnings.warn(f"{what} was asked of a model trained with train.p_uncond=0: it never saw "
                      "the null condition, so it has no unconditional branch and guidance will "
                      "extrapolate from an untrained output", stacklevel=3)


def preview_inputs(cfg: Config, conditioner: Conditioner, n: int):
    """``(cond, null_cond, guide)`` for the training previews: the default classes / prompts,
    with ``sample.guidance`` when it is classifier-free guidance."""
    from difflab.guidance.spec import cfg_guide, parse_guidance

    if not conditioner.conditional or cfg.model.arch != "unet":
        return None, None, None
    cond, null = conditioner.make(n)
    spec = parse_guidance(cfg.sample.guidance) if cfg.sample.guidance else None
    if spec is None or spec.kind != "cfg" or (spec.scale == 1 and spec.interval is None):
        return cond, None, None
    return cond, null, cfg_guide(spec)
