"""``Cond``: everything a network may be conditioned on, bound once to a denoiser."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch


@dataclass
class Control:
    """A control branch, run at every network call (ControlNet, Zhang et al. 2023, sec. 3.2).

    Its residuals depend on the noisy input, so they cannot be computed once and bound: the
    base network calls ``branch(x, t, hint, cond) -> residuals`` each time it runs, with its own
    input ``x``, its time signal ``t``, this ``hint`` (the condition image, per sample) and the
    rest of the condition (without ``control``), and adds ``scale * residuals`` to its skips and
    middle block. Several controls are summed, each with its own scale.

    Attributes:
        branch: the control network (e.g. a ControlNet module).
        hint: the condition ``(B, ...)``, batched like every other per-sample field.
        scale: the conditioning scale.
    """

    branch: Callable[..., list[torch.Tensor]]
    hint: torch.Tensor
    scale: float = 1.0


@dataclass
class Cond:
    """Conditioning inputs, each optional and batched along dim 0.

    Attributes:
        labels: class ids ``(B,)`` (``int64``); the null class is the network's ``num_classes``.
        context: text token embeddings ``(B, L, D)`` for cross-attention.
        context_mask: ``(B, L)`` boolean, True where a token is real.
        concat: image channels joined to the network input ``(B, C', H, W)``
            (Palette, inpainting, depth).
        control: control branches (:class:`Control`), evaluated at every network call.
        extra: anything else a custom network wants.
    """

    labels: torch.Tensor | None = None
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    control: list[Control] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def batch_size(self) -> int | None:
        """The batch size of the first tensor field present, or None when empty."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                return v.shape[0]
            if isinstance(v, list) and v:
                return v[0].hint.shape[0]
        return None

    def map(self, fn) -> Cond:
        """Apply ``fn`` to every tensor (also the hints of ``control`` and the tensor values of
        ``extra``, which are per-sample like the other fields); used for index / to()."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif isinstance(v, list):
                v = [replace(c, hint=fn(c.hint)) for c in v]
            elif f.name == "extra":
                v = {k: fn(x) if isinstance(x, torch.Tensor) else x for k, x in v.items()}
            out[f.name] = v
        return replace(self, **out)

    def to(self, *args, **kwargs) -> Cond:
        return self.map(lambda v: v.to(*args, **kwargs))

    def __getitem__(self, idx) -> Cond:
        out = self.map(lambda v: v[idx])
        if any(isinstance(x, list) for x in out.extra.values()):  # per-sample lists (captions)
            rows = (idx if isinstance(idx, slice) else
                    torch.as_tensor(idx).reshape(-1).tolist())
            out.extra = {k: (x[rows] if isinstance(rows, slice) else [x[i] for i in rows])
                         if isinstance(x, list) else x for k, x in out.extra.items()}
        return out

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        """Concatenate along the batch (fields must be present in all or none)."""
        first = conds[0]
        out = {}
        for f in fields(first):
            vals = [getattr(c, f.name) for c in conds]
            if f.name == "extra":
                out[f.name] = _cat_extra([c.extra for c in conds])
            elif all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"Cond.cat: field {f.name!r} is set in some conds but not all")
            elif isinstance(vals[0], list):
                out[f.name] = _cat_controls(vals)
            else:
                out[f.name] = torch.cat(vals)
        return Cond(**out)


def _cat_extra(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Join ``extra`` dicts: per-sample lists (e.g. captions) are concatenated, others kept."""
    out: dict[str, Any] = {}
    for key in extras[0]:
        vals = [e.get(key) for e in extras]
        if all(isinstance(v, list) for v in vals):
            out[key] = [item for v in vals for item in v]
        elif all(isinstance(v, torch.Tensor) for v in vals):
            out[key] = torch.cat(vals)
        else:
            out[key] = vals[0]
    return out


def _cat_controls(lists: list[list[Control]]) -> list[Control]:
    """Join the controls of several conds: the same branches with the same scales, in the same
    order, their hints concatenated."""
    first = lists[0]
    for other in lists[1:]:
        if len(other) != len(first) or any(a.branch is not b.branch or a.scale != b.scale
                                            for a, b in zip(first, other)):
            raise ValueError("Cond.cat: the conds carry different control branches or scales; "
                             "give every part the same controls")
    return [replace(c, hint=torch.cat([lst[i].hint for lst in lists]))
            for i, c in enumerate(first)]
