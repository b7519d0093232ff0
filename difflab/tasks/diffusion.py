"""The diffusion task: a denoising network trained by a denoising objective (DDPM's L_simple,
iDDPM's hybrid loss, DSM, EDM, flow matching), optionally on class labels or captions with
condition dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1)."""

from __future__ import annotations

import dataclasses

from difflab.components import DataSpec
from difflab.tasks import register_task
from difflab.tasks.base import TrainingTask


@register_task
class DiffusionTask(TrainingTask):
    """``[task] kind = "diffusion"``: ``prediction``, ``precond`` / ``sigma_data``, ``cond``
    (``none`` / ``class`` / ``text``) and ``p_uncond``."""

    kind = "diffusion"
    options = ("prediction", "precond", "sigma_data", "cond", "p_uncond")
    family_kinds = ("denoiser",)
    objectives = ("denoising", "dsm", "flow_matching", "edm", "hybrid")
    default_objective = "denoising"
    generative = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        t = cfg.task
        if t.p_uncond > 0 and t.cond == "none":
            raise ValueError(f"task.p_uncond={t.p_uncond} drops the condition of a conditional "
                             "model, but task.cond='none': set task.cond or task.p_uncond=0")

    @classmethod
    def uses_text(cls, cfg) -> bool:
        return cfg.task.cond == "text"

    @classmethod
    def _text_hint(cls, cfg) -> str:
        return f" with task.cond={cfg.task.cond!r} (set task.cond = 'text' for captions)"

    def conditioning(self) -> str:
        return self.cfg_task.cond

    def __init__(self, cfg, *args, **kwargs) -> None:
        self.cfg_task = cfg.task
        super().__init__(cfg, *args, **kwargs)

    def data_spec(self) -> DataSpec:
        spec = super().data_spec()
        return dataclasses.replace(spec, context_dim=self.text_dim())

    def _no_labels_message(self) -> str:
        return (f"task.cond='class' but dataset {self.cfg_data_name!r} has no labels: set "
                "task.cond='none'")

    def p_uncond(self) -> float:
        return self.cfg_task.p_uncond

    def wrap(self, net, check_finite: bool = True):
        from difflab.denoiser import Denoiser, EDMPrecond

        t = self.cfg_task
        precond = EDMPrecond(t.sigma_data) if t.precond == "edm" else None
        return Denoiser(net, self.path, prediction=t.prediction, precond=precond,
                        learned_variance=self.family.learned_variance(self.model_config),
                        check_finite=check_finite)
