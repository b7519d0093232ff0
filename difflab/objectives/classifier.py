"""The training loss of a noise-aware classifier (Dhariwal & Nichol 2021, Sec. 4.1).

Classifier guidance needs ``p_phi(y | x_t, t)`` on the *noisy* images of the forward process, so
the classifier is trained on ``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` drawn as for the
diffusion model (ADM ``classifier_train.py``: ``t`` uniform over the diffusion steps), by
cross-entropy against the clean image's label:

    L = - log softmax(f_phi(x_t, t))_y        (optionally with label smoothing, Szegedy et al.
                                                 2016, Sec. 7)

Its minimiser over all functions is the true posterior ``p(y | x_t)`` of the noisy data (the
expected cross-entropy is ``H(p) + KL(p || p_phi)``), which is what Bayes' rule in classifier
guidance (Sec. 4.1, eq. 2-10) asks for.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value
from difflab.networks.noisy import NoisyModel
from difflab.objectives.base import check_x0, draw_noise
from difflab.objectives.time import (
    TimeSampler,
    as_time_sampler,
    build_time_sampler,
    optional_time_sampler,
)
from difflab.paths.base import as_time

__all__ = ["NoisyClassifierLoss", "check_labels"]


def check_labels(labels: torch.Tensor | None, batch: int, num_classes: int | None = None
                 ) -> torch.Tensor:
    """Validate class labels ``(B,)`` for a classifier with ``num_classes`` classes.

    Returns them as int64. Raises when they are missing, not integer, of the wrong shape, negative
    or ``>= num_classes`` (the value ``num_classes`` is the diffusion models' null class, which a
    classifier cannot predict).
    """
    if labels is None:
        raise DifflabError(
            "a noise-aware classifier needs class labels: pass cond=Cond(labels=y) with integer "
            f"y of shape ({batch},)"
        )
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool or labels.shape != (batch,):
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise DifflabError(f"expected integer labels of shape ({batch},), got {got}")
    if batch and int(labels.min()) < 0:
        raise DifflabError(f"labels must be >= 0, got {int(labels.min())}")
    if num_classes is not None and batch and int(labels.max()) >= num_classes:
        top = int(labels.max())
        what = ("the null class (the unconditional label of class-conditional diffusion "
                "models), which a classifier cannot predict" if top == num_classes
                else "out of range")
        raise DifflabError(
            f"labels must lie in [0, {num_classes - 1}] for a {num_classes}-class classifier; "
            f"got {top}: {what}"
        )
    return labels.long()


def _without_labels(cond: Cond | None) -> Cond | None:
    """``cond`` minus its labels (the classifier must not see them); None when nothing is left."""
    if cond is None:
        return None
    rest = dataclasses.replace(cond, labels=None)
    empty = all(getattr(rest, f.name) is None for f in dataclasses.fields(rest)
                if f.name != "extra")
    return None if empty else rest


class NoisyClassifierLoss:
    """Per-sample cross-entropy of a noise-aware classifier on ``x_t`` (ADM Sec. 4.1).

    Args:
        time_sampler: a :class:`TimeSampler`, a name (``discrete``, ``uniform``, ``lognormal``),
            or None for the path's default (discrete paths: uniform over the steps, as ADM;
            otherwise uniform in ``[t_min, t_max]``).
        label_smoothing: weight in ``[0, 1)`` of the uniform distribution mixed into the target.
    """

    def __init__(self, time_sampler: TimeSampler | str | None = None,
                 label_smoothing: float = 0.0) -> None:
        self.time_sampler = (build_time_sampler(time_sampler) if isinstance(time_sampler, str)
                             else time_sampler)
        if not isinstance(label_smoothing, int | float) or not 0.0 <= label_smoothing < 1.0:
            raise bad_value("label_smoothing", label_smoothing, "a number in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, model: NoisyModel, x0: torch.Tensor, cond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample losses ``(B,)``: draws ``t`` (float64), then ``eps``, from ``generator``.

        Args:
            model: the classifier as a :class:`NoisyModel` (it holds the path and feeds the
                network ``path.time_input(t)``).
            x0: clean images ``(B, ...)``.
            cond: must carry ``labels (B,)`` in ``[0, num_classes)``; other fields are passed on.
            generator: the only source of randomness.
        """
        model = _check_model(model)
        x0 = check_x0(x0)
        sampler = as_time_sampler(self.time_sampler, model.path)
        t = sampler.sample(model.path, x0.shape[0], generator).to(x0.device)
        eps = draw_noise(x0, generator)
        return self.loss_at(model, x0, cond, t, eps)

    def loss_at(self, model: NoisyModel, x0: torch.Tensor, cond: Cond | None,
                t: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
        """The per-sample loss at given times ``t`` ``(B,)`` and noise ``eps`` (no randomness)."""
        model = _check_model(model)
        x0 = check_x0(x0)
        B = x0.shape[0]
        labels = check_labels(None if cond is None else cond.labels, B)
        t = as_time(t).to(x0.device)
        if t.ndim == 0:
            t = t.expand(B)
        x_t = model.path.add_noise(x0, eps, t)  # alpha x0 + sigma eps
        logits = model(x_t, t, _without_labels(cond))  # (B, K)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != B:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise DifflabError(f"the classifier returned {got}: expected logits of shape ({B}, K)")
        labels = check_labels(labels.to(logits.device), B, logits.shape[1])
        return F.cross_entropy(logits, labels, reduction="none",
                               label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return (f"NoisyClassifierLoss(time_sampler={self.time_sampler!r}, "
                f"label_smoothing={self.label_smoothing:g})")


def _check_model(model: NoisyModel) -> NoisyModel:
    if not isinstance(model, NoisyModel):
        raise DifflabError(
            f"the classifier loss needs a difflab.networks.noisy.NoisyModel (e.g. "
            f"NoisyModel(NoisyClassifier(cfg), path)), got {type(model).__name__}"
        )
    return model


def _classifier(*, time_sampler: str | None = None, t_min: float | None = None,
                t_max: float | None = None, label_smoothing: float = 0.0) -> NoisyClassifierLoss:
    """Registry factory (``build_objective("classifier", ...)``)."""
    sampler = optional_time_sampler(time_sampler, t_min=t_min, t_max=t_max)
    return NoisyClassifierLoss(time_sampler=sampler, label_smoothing=label_smoothing)
