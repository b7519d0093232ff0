"""The diffusion task: a denoising network trained by a denoising objective (DDPM's L_simple,
iDDPM's hybrid loss, DSM, EDM, flow matching), optionally on class labels or captions with
condition dropout for classifier-free guidance (Ho & Salimans 2022, Alg. 1)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from difflab.components import DataSpec
from difflab.cond import Cond
from difflab.errors import DifflabError
from difflab.tasks import register_task
from difflab.tasks.base import FrozenPart, TrainingTask, content_hash


@register_task
class DiffusionTask(TrainingTask):
    """``[task] kind = "diffusion"``: ``prediction``, ``precond`` / ``sigma_data``, ``cond``
    (``none`` / ``class`` / ``text``) and ``p_uncond``."""

    kind = "diffusion"
    options = ("prediction", "precond", "sigma_data", "cond", "p_uncond", "concat")
    family_kinds = ("denoiser",)
    objectives = ("denoising", "dsm", "flow_matching", "edm", "hybrid")
    default_objective = "denoising"
    generative = True
    latent = True

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        t = cfg.task
        if cfg.codec is not None and cfg.sample.clip_x0:
            raise ValueError("sample.clip_x0=true clips to the [-1, 1] range of pixels, but "
                             "with [codec] the model samples latents: set sample.clip_x0=false")
        if cfg.path.zero_snr and (t.prediction in ("eps", "score") or t.precond != "none"):
            what = (f"task.precond={t.precond!r}" if t.precond != "none"
                    else f"task.prediction={t.prediction!r}")
            raise ValueError(f"path.zero_snr=true makes alpha = 0 at the last step, where "
                             f"{what} cannot give x0 (x_T holds no signal): set "
                             "task.prediction='v' (SD 2, Lin et al. 2024) or 'x0'"
                             + (" and task.precond='none'" if t.precond != "none" else ""))
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
        self.codec = self.codec_source = None
        self.latents_cached = False
        if cfg.codec is not None:
            self.codec, self.codec_source = _load_codec(cfg.codec, kwargs.get("device", "cpu"))
        super().__init__(cfg, *args, **kwargs)
        if self.codec is not None and self.family.input_shape is not None:
            channels = self.sample_shape[0]
            if channels != self.codec.latent_channels:
                raise DifflabError(
                    f"the codec {str(self.codec_source)!r} has {self.codec.latent_channels} "
                    f"latent channels but the {self.family.name} samples {channels}-channel "
                    "latents: pair the network with the codec it was trained on")
        if self.codec is not None:
            self.cfg = self.cfg.model_copy(update={"codec": self.cfg.codec.model_copy(
                update={"run": str(self.codec_source)})})
            if self.for_training and cfg.codec.cache:
                from difflab.latent.data import cached_moments

                acc = kwargs.get("accelerator")
                lock = acc.main_process_first() if acc is not None else \
                    contextlib.nullcontext()
                with lock:
                    self.dataset, self.latent_file = cached_moments(
                        self.codec, self.codec_hash(), self.dataset, device=self.device)
                self.latents_cached = True

    @property
    def concat_kind(self) -> str | None:
        """What is joined to the network input (``"depth"``), or None."""
        return None if self.cfg_task.concat == "none" else self.cfg_task.concat

    def data_spec(self) -> DataSpec:
        spec = super().data_spec()
        spec = dataclasses.replace(spec, context_dim=self.text_dim())
        if self.concat_kind == "depth":
            if getattr(self.dataset, "depths", None) is None:
                raise DifflabError(f"task.concat='depth' needs depth maps, but dataset "
                                   f"{self.cfg_data_name!r} has none: use data.name='shapes' "
                                   "(procedural scenes with their exact depth)")
            spec = dataclasses.replace(spec, concat_channels=1)
        if self.codec is None:
            return spec
        if spec.channels != self.codec.image_channels:
            raise DifflabError(f"[codec] run={self.cfg_codec_run!r} encodes "
                               f"{self.codec.image_channels}-channel images, data "
                               f"{self.cfg_data_name!r} has {spec.channels}")
        c, h, w = self.codec.latent_shape((spec.channels, spec.image_size, spec.image_size))
        return dataclasses.replace(spec, channels=c, image_size=h)

    @property
    def cfg_codec_run(self) -> str:
        return str(self.codec_source)

    def codec_hash(self) -> str:
        return content_hash(self.codec_source)

    def frozen_parts(self) -> dict[str, FrozenPart]:
        parts = super().frozen_parts()
        if self.codec is not None:
            parts["codec"] = FrozenPart(self.codec, str(self.codec_source), self.codec_hash())
        return parts

    def loss(self, modules, x, cond, generator):
        if self.codec is not None:
            from difflab.latent.data import latent_batch

            self.codec.to(x.device)
            x = latent_batch(self.codec, x, generator, self.cfg.codec.sample_posterior,
                             cached=self.latents_cached)
        if self.concat_kind is None:
            return super().loss(modules, x, cond, generator)
        c = self.conditioner.training(cond, generator, self.p_uncond())
        c = dataclasses.replace(c or Cond(), concat=self.concat_input(cond, x))
        den = self.wrap(modules["model"], check_finite=False)
        return self.objective(den, x, c, generator=generator)

    def concat_input(self, batch, x):
        """The channels joined to the network input for a collated batch (the depth maps,
        preprocessed as SD 2 does, at the size of ``x``)."""
        from difflab.tasks.conditioning import depth_condition

        depth = batch.extra.get("depth")
        if depth is None:
            raise DifflabError("task.concat='depth' but the batch has no depth maps")
        return depth_condition(depth, tuple(x.shape[-2:])).to(x.device)

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


def _load_codec(section, device):
    """The frozen codec of ``[codec]`` and the folder its weights come from: a run folder
    resolves to its newest checkpoint that verifies, so the run records exactly which weights
    it was trained on (and a codec run that trains on is noticed on resume)."""
    from difflab.latent.loading import load_codec
    from difflab.runs import CONFIG_FILE, _is_checkpoint_dir, _pick_checkpoint

    p = Path(section.run).expanduser()
    if p.is_dir() and (p / CONFIG_FILE).is_file() and not _is_checkpoint_dir(p):
        p = _pick_checkpoint(p, None)
    p = p.resolve() if p.exists() else p
    codec = load_codec(p, device)
    if section.scale is not None:
        codec.set_scale(section.scale, float(codec.shift))
    return codec, p
