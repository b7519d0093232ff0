"""Tasks that train noise-aware guides of a diffusion model on the same path: ADM's classifier
``p(y | x_t, t)`` (Dhariwal & Nichol 2021, Sec. 4) and an image-text alignment model for
semantic guidance (SDG, Liu et al. 2023; CLIP-style contrastive training on noisy images).
Both read the path's time through a :class:`~difflab.networks.noisy.NoisyModel`."""

from __future__ import annotations

import dataclasses

from difflab.components import DataSpec
from difflab.tasks import register_task
from difflab.tasks.base import TrainingTask


class NoisyGuideTask(TrainingTask):
    """A network of ``x_t`` and ``t`` (no condition dropout, no samples of its own)."""

    def wrap(self, net, check_finite: bool = True):
        from difflab.networks.noisy import NoisyModel

        return NoisyModel(net, self.path)


@register_task
class ClassifierTask(NoisyGuideTask):
    """``[task] kind = "classifier"``: cross-entropy on noisy labelled images."""

    kind = "classifier"
    usage = ("it guides a diffusion run trained on the same path: difflab sample DIFFUSION_RUN "
             "--guidance classifier:{run}:SCALE")
    family_kinds = ("classifier",)
    objectives = ("classifier",)
    default_objective = "classifier"
    needs_labels = True

    def conditioning(self) -> str:
        return "class"


@register_task
class ContrastiveTask(NoisyGuideTask):
    """``[task] kind = "contrastive"``: noisy images against their captions' sentence
    embeddings (``[text_encoder]``, default MiniLM)."""

    kind = "contrastive"
    usage = ("it judges how well noisy images match a caption, for semantic diffusion guidance "
             "of a text-to-image run from Python (difflab.guidance.sdg with "
             "difflab.guidance.alignment_score; benchmarks/text_to_image.py shows it), not for "
             "difflab sample --guidance")
    family_kinds = ("alignment",)
    objectives = ("contrastive",)
    default_objective = "contrastive"

    @classmethod
    def uses_text(cls, cfg) -> bool:
        return True

    def conditioning(self) -> str:
        return "sentence"

    def data_spec(self) -> DataSpec:
        return dataclasses.replace(super().data_spec(), text_dim=self.text_dim())
