"""CLIP's symmetric InfoNCE on noisy images: the training loss of a noise-aware alignment model.

Semantic Diffusion Guidance (Liu et al. 2023, Sec. 3-4) needs an image-text model that reads the
noisy ``x_t``; it is CLIP (Radford et al. 2021) fine-tuned on noised images. For a batch of
clean images ``x0_i`` with sentence embeddings ``l_i``, draw ``t_i`` and ``eps_i``, set
``x_t,i = alpha(t_i) x0_i + sigma(t_i) eps_i`` and

    logits_ij = s * <E_I'(x_t,i, t_i), E_L(l_j)>        (unit embeddings, s = exp(logit_scale))

CLIP's loss (Radford et al. 2021, Fig. 3) is the mean of the cross-entropies of the rows
(image -> text) and of the columns (text -> image). Per sample ``i`` it is

    L_i = 1/2 [ CE(q_i., softmax_j logits_ij) + CE(q_.i, softmax_k logits_ki) ]

whose batch mean is exactly CLIP's loss.

Duplicate captions. The emoji captions repeat (``number sign`` names two images); equal
captions have bit-equal embeddings. Here they are positives of each other, not negatives: the
targets are soft, ``q_ij = 1[l_i == l_j] / #{k : l_k == l_i}``, uniform over the samples whose
text embedding is exactly equal (every coordinate). ``q`` is symmetric, so rows and columns use
the same weights, and with distinct texts ``q = I`` (CLIP). The cross-entropy is bounded below by
the entropy of ``q``, ``log k`` for a caption shared by ``k`` samples, reached when an image
spreads its probability evenly over the ``k`` equal texts and a text evenly over its ``k``
images (the true conditional within the batch); the gradient is ``softmax - q``.

Note: because equal texts give equal *columns* of ``logits``, the batch sum of this loss equals
that of CLIP's hard targets (``-log P(j | l_j)`` summed over the copies' columns is the same
sum), so the gradient of the batch mean is the same; what changes is the per-sample split (each
copy gets the average over its positives rather than its own column) and the explicit floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.objectives.base import check_x0, draw_noise
from difflab.objectives.time import (
    TimeSampler,
    as_time_sampler,
    build_time_sampler,
    optional_time_sampler,
)
from difflab.paths.base import as_time

__all__ = ["ContrastiveLoss", "info_nce", "soft_targets", "text_embeddings"]


def soft_targets(text: torch.Tensor) -> torch.Tensor:
    """``q (B, B)``: row ``i`` uniform over the samples whose text embedding equals ``l_i``.

    Equality is exact (every coordinate), which is what repeated captions give with a
    deterministic text encoder.
    """
    same = (text[:, None, :] == text[None, :, :]).all(dim=-1)  # (B, B), True on the diagonal
    same = same.to(torch.float32 if not text.is_floating_point() else text.dtype)
    return same / same.sum(dim=1, keepdim=True)


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
             targets: torch.Tensor) -> torch.Tensor:
    """Per-sample symmetric InfoNCE ``(B,)`` from unit embeddings (CLIP, Fig. 3).

    Args:
        image: unit image embeddings ``(B, E)``.
        text: unit text embeddings ``(B, E)``.
        scale: the logit multiplier ``exp(logit_scale)``.
        targets: ``q (B, B)``, rows summing to one and symmetric (:func:`soft_targets`).
    """
    logits = scale * image @ text.T  # (B, B): image i against text j
    q = targets.to(logits.dtype)
    image_to_text = -(q * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B,), row i
    text_to_image = -(q.T * F.log_softmax(logits, dim=0)).sum(dim=0)  # (B,), column i
    return 0.5 * (image_to_text + text_to_image)


def text_embeddings(cond: Cond | None, batch: int) -> torch.Tensor:
    """``cond.extra["text_emb"]`` checked to be a ``(batch, D)`` floating-point tensor."""
    extra = {} if cond is None else cond.extra
    if "text_emb" not in extra:
        raise DifflabError(
            "the contrastive loss needs cond.extra['text_emb']: precomputed sentence embeddings "
            f"of shape ({batch}, text_dim), e.g. Cond(extra={{'text_emb': emb}}); got "
            f"extra keys {sorted(extra)}"
        )
    text = extra["text_emb"]
    if (not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[0] != batch
            or not text.is_floating_point()):
        got = (f"{text.dtype} {tuple(text.shape)}" if isinstance(text, torch.Tensor)
               else type(text).__name__)
        raise DifflabError(
            f"cond.extra['text_emb'] must be a floating-point tensor of shape ({batch}, "
            f"text_dim), one row per image; got {got}"
        )
    return text


class ContrastiveLoss:
    """CLIP's symmetric InfoNCE between noisy images and their captions (see module docstring).

    ``loss(model, x0, cond, generator) -> (B,)`` where ``model`` is a
    :class:`~difflab.networks.noisy.NoisyModel` wrapping an
    :class:`~difflab.networks.alignment.AlignmentModel` (anything with ``net.text_embed``,
    ``path`` and ``model(x_t, t) -> unit image embeddings``) and ``cond.extra["text_emb"]``
    holds the frozen sentence embeddings ``(B, text_dim)``.

    Args:
        time_sampler: a :class:`TimeSampler`, a name (``discrete``, ``uniform``,
            ``lognormal``) or None for the path's own default (DDPM's uniform steps on discrete
            paths, uniform in ``[t_min, t_max]`` otherwise).
    """

    def __init__(self, time_sampler: TimeSampler | str | None = None) -> None:
        self.time_sampler = (build_time_sampler(time_sampler) if isinstance(time_sampler, str)
                             else time_sampler)

    def __call__(self, model, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample losses ``(B,)``: draws ``t`` (float64) then ``eps`` from ``generator``."""
        x0 = check_x0(x0)
        text = text_embeddings(cond, x0.shape[0])
        path = _check_model(model).path
        t = as_time_sampler(self.time_sampler, path).sample(path, x0.shape[0], generator)
        eps = draw_noise(x0, generator)
        return self.loss_at(model, x0, t.to(x0.device), eps, text)

    def loss_at(self, model, x0: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor,
                text_emb: torch.Tensor) -> torch.Tensor:
        """The per-sample loss at given times ``t`` ``(B,)`` and noise ``eps`` (no randomness)."""
        x0 = check_x0(x0)
        path = _check_model(model).path
        t = as_time(t).to(x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        x_t = path.add_noise(x0, eps, t)  # (B, C, H, W)
        image = model(x_t, t)  # (B, E), unit
        text = model.net.text_embed(text_emb)  # (B, E), unit
        return info_nce(image, text, model.net.scale, soft_targets(text_emb))

    def __repr__(self) -> str:
        return f"ContrastiveLoss(time_sampler={self.time_sampler!r})"


def _check_model(model):
    net = getattr(model, "net", None)
    if getattr(model, "path", None) is None or not hasattr(net, "text_embed"):
        raise DifflabError(
            "the contrastive loss needs NoisyModel(AlignmentModel(config), path): a model with "
            f".path and .net.text_embed; got {type(model).__name__}"
        )
    return model


def _contrastive(*, time_sampler: str | None = None, t_min: float | None = None,
                 t_max: float | None = None) -> ContrastiveLoss:
    """Registry factory (``build_objective("contrastive", ...)``): a named time sampler with
    ``t_min`` / ``t_max`` (``uniform``), or None for the path's default."""
    return ContrastiveLoss(time_sampler=optional_time_sampler(time_sampler, t_min=t_min,
                                                              t_max=t_max))
