"""From what a dataset or a user gives (class ids, captions, prompts) to the ``Cond`` a network
reads, for training and for sampling; one place for the null condition of every kind.

- Class-conditional U-Net: ``Cond(labels)``; the null class is ``num_classes``.
- Text-conditional U-Net (``task.cond = "text"``, ``[text_encoder]``): ``Cond(context,
  context_mask)`` from the frozen text encoder; the null condition is the empty prompt ``""``
  (GLIDE, Nichol et al. 2022, Sec. 2.3 / App. E; Stable Diffusion does the same).
- Condition dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1): during training
  each condition is replaced by the null one with probability ``task.p_uncond``.
- Noise-aware classifier (the ``classifier`` task): ``Cond(labels)``, never dropped.
- Image-text alignment model (the ``contrastive`` task): the captions' pooled sentence
  embeddings in ``Cond.extra["text_emb"]``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value

logger = logging.getLogger("difflab.training")


def text_cache_dir() -> Path:
    from difflab.evaluation.features import cache_dir

    return cache_dir() / "text"


class Conditioner:
    """Builds ``Cond`` objects for one network.

    Args:
        kind: ``none``; ``class`` (labels, the null class ``num_classes``); ``text`` (token
            embeddings and mask of a frozen text encoder, the null condition the empty
            prompt); ``sentence`` (pooled caption embeddings in ``Cond.extra["text_emb"]``,
            what an alignment model reads).
        num_classes: classes of a ``class`` conditioner.
        text_encoder: the ``TextEncoderConfig`` of a ``text`` / ``sentence`` conditioner.
        captions: the dataset's captions (training): encoded once and cached on disk
            (:class:`~difflab.networks.text.CaptionEmbeddings`).
        prompts: default prompts for sampling (``sample.prompts``).
        device: where the tensors go.
    """

    KINDS = ("none", "class", "text", "sentence")

    def __init__(self, kind: str = "none", num_classes: int | None = None, text_encoder=None,
                 captions: Sequence[str] | None = None, prompts: Sequence[str] = (),
                 device: torch.device | str = "cpu") -> None:
        if kind not in self.KINDS:
            raise bad_value("conditioning", kind, f"one of {', '.join(self.KINDS)}")
        if kind == "class" and not num_classes:
            raise DifflabError("class conditioning needs the number of classes")
        self.kind = kind
        self.num_classes = num_classes
        self.text_config = text_encoder
        self.prompts = list(prompts)
        self.device = torch.device(device)
        self.embeddings = None
        self._encoder = None
        if kind in ("text", "sentence") and captions is not None:
            from difflab.networks.text import CaptionEmbeddings

            self.embeddings = CaptionEmbeddings.build(self.encoder, captions, text_cache_dir())

    @property
    def encoder(self):
        if self._encoder is None:
            from difflab.networks.text import TextEncoderConfig, text_encoder_of

            self._encoder = text_encoder_of(self.text_config or TextEncoderConfig())
        return self._encoder

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    # ----- training ---------------------------------------------------------------------------
    def training(self, batch: Cond, generator: torch.Generator | None, p_uncond: float = 0.0
                 ) -> Cond | None:
        """The network's ``Cond`` for a collated batch, with condition dropout ``p_uncond``."""
        if self.kind == "none":
            return None
        if self.kind == "class":
            if batch.labels is None:
                raise DifflabError("the model is class-conditional but the batch has no labels")
            labels = batch.labels.to(self.device)
            if p_uncond > 0:
                drop = self._drop(labels.shape[0], generator, p_uncond)
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            return Cond(labels=labels)
        captions = batch.extra.get("captions")
        if captions is None:
            raise DifflabError("a text-conditional model needs captions but the dataset gives "
                               "none: point data.captions at a TSV 'file<TAB>caption'")
        captions = list(captions)
        if p_uncond > 0:
            drop = self._drop(len(captions), generator, p_uncond).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        emb = self.embeddings
        if emb is None:
            raise DifflabError("Conditioner built without the dataset's captions")
        if self.kind == "sentence":
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
        if self.kind == "sentence":
            raise DifflabError("an alignment model's sentence conditioning is for training; "
                               "it does not sample")
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
        given = list(self.prompts)
        if given:
            return given
        if self.embeddings is not None:
            caps = [c for c in self.embeddings.captions if c]
            step = max(1, len(caps) // max(n, 1))
            return caps[::step][:n]
        raise DifflabError("a text-conditional model needs prompts: give --prompt or set "
                           "sample.prompts in the config")


def warn_if_no_unconditional(p_uncond: float, what: str = "classifier-free guidance") -> None:
    """Guidance needs a null-condition branch: warn for a model trained without dropout."""
    if p_uncond == 0:
        warnings.warn(f"{what} was asked of a model trained with task.p_uncond=0: it never saw "
                      "the null condition, so it has no unconditional branch and guidance will "
                      "extrapolate from an untrained output", stacklevel=3)


def depth_condition(depth, size: tuple[int, int], inverse: bool = False) -> torch.Tensor:
    """A depth map as SD 2's depth model takes it (``StableDiffusionDepth2ImgPipeline``):
    inverse depth (near is high), resized bicubically to the network's input ``size``, and
    stretched per image to ``[-1, 1]``.

    Args:
        depth: ``(B, 1, H, W)`` or a list of ``(1, H, W)`` camera-space depths (larger is
            farther, positive), as :class:`difflab.data.shapes.Shapes` gives them.
        size: ``(h, w)`` of the network input (the latent's for a latent model).
        inverse: ``depth`` already holds inverse depth (near is high: MiDaS maps, grey-level
            depth images); any finite values.
    """
    import torch.nn.functional as F

    d = torch.stack(list(depth)) if isinstance(depth, list | tuple) else depth
    if not isinstance(d, torch.Tensor) or d.ndim != 4 or d.shape[1] != 1:
        shown = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise bad_value("depth", shown, "depth maps of shape (B, 1, H, W)")
    d = d.float()
    if not bool(torch.isfinite(d).all()) or (not inverse and bool((d <= 0).any())):
        raise DifflabError("depth maps must be finite and positive (camera-space distances)")
    inv = F.interpolate(d if inverse else 1.0 / d, size=tuple(size), mode="bicubic",
                        align_corners=False)
    lo = inv.amin(dim=(1, 2, 3), keepdim=True)
    hi = inv.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (inv - lo) / (hi - lo).clamp_min(1e-8) - 1.0
