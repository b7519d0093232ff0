"""Guidance named by a short string, as the CLI and configs write it.

- ``none`` (or ``cfg:1``): the conditional model as trained.
- ``cfg:S[:rescale=R][:interval=LO-HI]``: classifier-free guidance at scale ``S`` (Ho &
  Salimans 2022), optional guidance rescale (Lin et al. 2024) and guidance interval in path time
  (Kynkaanniemi et al. 2024).
- ``classifier:RUN:S``: classifier guidance (Dhariwal & Nichol 2021) by the noise-aware
  classifier trained in run folder ``RUN``, at scale ``S``.

:func:`parse_guidance` only parses (no files are read), so a config can be validated anywhere;
building the guided denoiser needs the runs and lives in :mod:`difflab.training.guided`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from difflab.errors import DifflabError

# the guidance kind of ``classifier:RUN:S`` (a guidance keyword, not a network family)
CLASSIFIER = "classifier"

FORMS = "'none', 'cfg:SCALE[:rescale=R][:interval=LO-HI]' or 'classifier:RUN:SCALE'"


@dataclass(frozen=True)
class GuidanceSpec:
    """A parsed guidance string."""

    kind: str  # "none" | "cfg" | "classifier"
    scale: float = 1.0
    run: str | None = None
    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.text or self.kind


def _number(raw: str, what: str, text: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise DifflabError(f"guidance {text!r}: {what} {raw!r} is not a number; expected "
                           f"{FORMS}") from None
    if not math.isfinite(v):
        raise DifflabError(f"guidance {text!r}: {what} must be finite")
    return v


def parse_guidance(text: str) -> GuidanceSpec:
    """Parse ``none`` / ``cfg:S[:k=v...]`` / ``classifier:RUN:S`` (errors name the forms)."""
    if not isinstance(text, str) or not text.strip():
        raise DifflabError(f"guidance {text!r} is empty: expected {FORMS}")
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "none":
        if rest:
            raise DifflabError(f"guidance {text!r}: 'none' takes no arguments")
        return GuidanceSpec("none", text=text)
    if kind == "cfg":
        parts = rest.split(":") if rest else []
        if not parts or not parts[0]:
            raise DifflabError(f"guidance {text!r}: cfg needs a scale, e.g. cfg:3.0")
        scale = _number(parts[0], "the scale", text)
        opts: dict[str, Any] = {}
        for item in parts[1:]:
            key, sep, value = item.partition("=")
            if key == "rescale" and sep:
                r = _number(value, "rescale", text)
                if not 0 <= r <= 1:
                    raise DifflabError(f"guidance {text!r}: rescale must be in [0, 1]")
                opts["rescale"] = r
            elif key == "interval" and sep:
                lo, dash, hi = value.partition("-")
                if not dash:
                    raise DifflabError(f"guidance {text!r}: interval is LO-HI in path time, "
                                       "e.g. interval=0.1-0.8")
                a, b = _number(lo, "interval start", text), _number(hi, "interval end", text)
                if not a < b:
                    raise DifflabError(f"guidance {text!r}: interval start must be below its end")
                opts["interval"] = (a, b)
            else:
                raise DifflabError(f"guidance {text!r}: unknown cfg option {item!r}; cfg takes "
                                   "rescale=R and interval=LO-HI")
        return GuidanceSpec("cfg", scale, text=text, **opts)
    if kind == CLASSIFIER:
        run, sep, scale = rest.rpartition(":")
        if not sep or not run:
            raise DifflabError(f"guidance {text!r}: expected classifier:RUN:SCALE (the run "
                               "folder of a noise-aware classifier and a scale)")
        return GuidanceSpec("classifier", _number(scale, "the scale", text), run=run, text=text)
    raise DifflabError(f"guidance {text!r}: unknown kind {kind!r}; expected {FORMS}")


def cfg_guide(spec: GuidanceSpec):
    """``guide(den, cond, null_cond)`` applying the classifier-free guidance of ``spec``."""
    from difflab.guidance.transforms import cfg, interval

    if spec.kind != "cfg":
        raise DifflabError(f"cfg_guide needs a cfg spec, got {spec}")

    def guide(den, cond, null_cond):
        g = cfg(den, cond, null_cond, spec.scale, rescale=spec.rescale)
        return interval(g, *spec.interval) if spec.interval else g

    return guide
