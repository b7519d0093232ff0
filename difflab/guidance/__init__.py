"""Guidance: a denoiser in, a denoiser out (ARCHITECTURE.md, "Guidance").

Every transform returns a :class:`Guided` denoiser whose ``base`` is the unguided conditional
denoiser, so transforms nest and :func:`interval` can switch guidance off outside a range.
"""

from difflab.guidance.noisy_classifier import check_classifier_matches, classifier_log_prob
from difflab.guidance.sdg import alignment_score, content_energy, sdg, style_energy, text_energy
from difflab.guidance.spec import GuidanceSpec, parse_guidance
from difflab.guidance.transforms import Guided, cfg, classifier, energy, interval

__all__ = ["GuidanceSpec", "Guided", "alignment_score", "cfg", "check_classifier_matches",
           "classifier", "classifier_log_prob", "content_energy", "energy", "interval",
           "parse_guidance", "sdg", "style_energy", "text_energy"]
