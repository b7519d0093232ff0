"""Guidance: a denoiser in, a denoiser out (ARCHITECTURE.md, "Guidance").

Every transform returns a :class:`Guided` denoiser whose ``base`` is the unguided conditional
denoiser, so transforms nest and :func:`interval` can switch guidance off outside a range.
"""

from difflab.guidance.transforms import Guided, cfg, classifier, energy, interval

__all__ = ["Guided", "cfg", "classifier", "energy", "interval"]
