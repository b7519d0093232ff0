"""A trained noise-aware classifier as the ``log_prob_fn`` of classifier guidance.

Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1, eq. 10 / Alg. 1-2) adds
``s grad_{x_t} log p_phi(y | x_t, t)`` to the score; :func:`difflab.guidance.classifier` does that
given ``log_prob_fn(x_t, t) -> (B,)``. :func:`classifier_log_prob` builds that function from a
classifier wrapped in :class:`~difflab.networks.noisy.NoisyModel`, which holds the path and feeds
the network its own time signal, so guidance works in path time on every path.

(This module is not named ``classifier``: a submodule of that name would replace the
:func:`difflab.guidance.classifier` transform on the package once imported.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.errors import DifflabError
from difflab.networks.noisy import NoisyModel
from difflab.objectives.classifier import check_labels

__all__ = ["check_classifier_matches", "classifier_log_prob"]


def classifier_log_prob(model: NoisyModel, labels: torch.Tensor | int
                        ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``log_prob_fn(x_t, t) = log softmax(model(x_t, t))[y]``, one value per sample ``(B,)``.

    Args:
        model: the classifier as a :class:`NoisyModel` (``t`` in path time).
        labels: the requested classes: an int (every sample) or ``(B,)`` integers in
            ``[0, num_classes)``; checked against the logits at the first call.

    Returns:
        A function for ``difflab.guidance.classifier(den, log_prob_fn, scale)``.
    """
    if not isinstance(model, NoisyModel):
        raise DifflabError(
            f"classifier_log_prob needs a difflab.networks.noisy.NoisyModel (e.g. "
            f"NoisyModel(NoisyClassifier(cfg), path)), got {type(model).__name__}"
        )
    y = torch.as_tensor(labels)
    if y.ndim == 0:
        y = y.reshape(1)
    y = check_labels(y, y.shape[0])  # integer, non-negative

    def log_prob_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        if y.shape[0] not in (1, B):
            raise DifflabError(
                f"classifier_log_prob was given {y.shape[0]} labels but x_t has batch size {B}: "
                "expected one label or one per sample"
            )
        logits = model(x_t, t)  # (B, K)
        if logits.ndim != 2 or logits.shape[0] != B:
            raise DifflabError(
                f"the classifier returned shape {tuple(logits.shape)}: expected ({B}, K)"
            )
        rows = check_labels(y.expand(B).to(logits.device), B, logits.shape[1])
        log_p = torch.log_softmax(logits, dim=-1)  # (B, K): log p(k | x_t, t)
        return log_p.gather(1, rows[:, None])[:, 0]  # (B,)

    return log_prob_fn


Shape = tuple[int, int, int | None]


def check_classifier_matches(classifier: Shape, diffusion: Shape,
                             classifier_name: str = "classifier run",
                             diffusion_name: str = "diffusion run") -> None:
    """Raise when a classifier cannot guide a diffusion model.

    Args:
        classifier: the classifier's ``(image_size, in_channels, num_classes)``.
        diffusion: the diffusion model's ``(image_size, in_channels, num_classes)``;
            ``num_classes=None`` (an unconditional model) skips the class check.
        classifier_name: how to name the classifier in the message (e.g. its run directory).
        diffusion_name: how to name the diffusion model in the message.

    Raises:
        DifflabError: naming every field that differs, with both values.
    """
    fields = ("image_size", "in_channels", "num_classes")
    for name, triple in ((classifier_name, classifier), (diffusion_name, diffusion)):
        if not isinstance(triple, tuple | list) or len(triple) != 3:
            raise DifflabError(
                f"{name}: expected a triple (image_size, in_channels, num_classes), got {triple!r}"
            )
    bad = [f"{f}: {classifier_name} has {c}, {diffusion_name} has {d}"
           for f, c, d in zip(fields, classifier, diffusion)
           if not (f == "num_classes" and d is None) and c != d]
    if bad:
        raise DifflabError(
            f"the {classifier_name} does not match the {diffusion_name} it should guide ("
            + "; ".join(bad) + "): train the classifier on the same data (same image size, "
            "channels and classes) as the diffusion model"
        )
