"""The residual task: the second head of SN-DPM / NPR-DPM (Bao et al. 2022b, "Estimating the
Optimal Covariance with Imperfect Mean in Diffusion Probabilistic Models", ICML).

A frozen, trained diffusion run (``[task] base``) supplies the noise predictor ``eps_hat``; this
task regresses a second network onto one more conditional moment of the noise (eq. 9-10):

* ``[objective] kind = "npr"``: ``h(x_t, t) ~ E[(eps - eps_hat(x_t, t))^2 | x_t]``;
* ``[objective] kind = "sn"``: ``g(x_t, t) ~ E[eps^2 | x_t]``.

The samplers ``npr_ddpm`` / ``sn_ddpm`` then take the per-element reverse variance from it:
``difflab sample BASE --sampler npr_ddpm --option residual=THIS_RUN``.

As the paper does, the head starts from the pretrained noise predictor (``init = "base"``): the
base network's weights with the output layer zeroed (so the head starts at 0, Thm. 2's lower
bound of the variance) and without a learned-variance output. The run takes the base's
``[path]`` and (with ``init = "base"``) its ``[model]``, so both are written into its resolved
config; the base is a frozen part, named in every checkpoint by its folder and hash.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.errors import DifflabError
from difflab.tasks import register_task
from difflab.tasks.base import FrozenPart, TrainingTask, content_hash


@register_task
class ResidualTask(TrainingTask):
    """``[task] kind = "residual"``: ``base`` (a diffusion run folder or one of its checkpoint
    folders) and ``init`` (``base`` or ``scratch``)."""

    kind = "residual"
    options = ("base", "init")
    family_kinds = ("denoiser",)
    objectives = ("residual",)
    default_objective = "residual"
    usage = ("it gives SN-/NPR-DPM the reverse variance of its base run: difflab sample BASE "
             "--sampler npr_ddpm --option residual={run} (sn_ddpm for an objective.kind='sn' "
             "run)")

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if not cfg.task.base:
            raise ValueError("task.kind='residual' needs task.base: the folder of the trained "
                             "diffusion run whose noise predictor the head completes")

    def __init__(self, cfg, *args, **kwargs) -> None:
        self.base_run = None
        self.base_source: Path | None = None
        if kwargs.get("for_training", True):
            cfg = self._with_base(cfg, kwargs.get("device", "cpu"))
        super().__init__(cfg, *args, **kwargs)

    # ----- the base run -----------------------------------------------------------------------
    def _with_base(self, cfg, device):
        """Load the frozen base and give ``cfg`` its ``[path]`` (and ``[model]``)."""
        from difflab.builders import build_path
        from difflab.config import FamilySection
        from difflab.paths import same_marginals
        from difflab.runs import CONFIG_FILE, _is_checkpoint_dir, _pick_checkpoint, load_run
        from difflab.tasks.diffusion import DiffusionTask

        src = Path(cfg.task.base).expanduser()
        if not src.exists():
            raise DifflabError(f"task.base={cfg.task.base!r} does not exist: give the folder of a "
                               "trained diffusion run")
        if src.is_dir() and (src / CONFIG_FILE).is_file() and not _is_checkpoint_dir(src):
            src = _pick_checkpoint(src, None)
        base = load_run(src, device=device)
        if not isinstance(base.task, DiffusionTask):
            raise DifflabError(f"task.base={cfg.task.base!r} is a task.kind="
                               f"{base.config.task.kind!r} run: the residual head completes the "
                               "noise predictor of a diffusion run")
        if base.codec is not None or base.conditioner.kind != "none" or \
                base.config.task.concat != "none":
            raise DifflabError(f"task.base={cfg.task.base!r} is a conditional or latent run; the "
                               "residual task supports unconditional pixel-space runs (the "
                               "setting of SN-/NPR-DPM's tables)")
        if base.config.task.prediction == "score" or base.config.task.precond != "none":
            raise DifflabError(f"task.base={cfg.task.base!r} predicts {base.config.task.prediction}"
                               f" with precond={base.config.task.precond!r}: SN-/NPR-DPM's "
                               "reverse steps need a discrete-time eps/x0/v model")
        if cfg.path.model_fields_set and not same_marginals(build_path(cfg), base.path):
            raise DifflabError(f"[path] ({cfg.path.kind}) differs from the base run's "
                               f"({base.config.path.kind}): remove [path], the residual run takes "
                               "the base's")
        update = {"path": base.config.path}
        if cfg.task.init == "base":
            given = sorted(cfg.model.values())
            if given or "arch" in cfg.model.model_fields_set:
                raise DifflabError(f"task.init='base' starts the head from the base network, so "
                                   f"[model] must stay empty (it has {given or ['arch']}): remove "
                                   "it, or set task.init='scratch' to train [model]'s network")
            values = dict(base.config.model.values())
            if "learn_sigma" in values:
                values["learn_sigma"] = False
            update["model"] = FamilySection.model_validate(
                {"arch": base.config.model.arch, "preset": base.config.model.preset, **values})
        self.base_run = base
        self.base_source = src.resolve()
        return cfg.model_copy(update=update)

    def _model_config(self, cfg):
        mc = super()._model_config(cfg)
        if getattr(mc, "learn_sigma", False):
            raise DifflabError("model.learn_sigma=true: the residual head outputs one value per "
                               "element; set model.learn_sigma=false")
        return mc

    def build_trainable(self) -> dict[str, nn.Module]:
        net = self.build_model()
        if self.cfg.task.init == "base" and self.base_run is not None:
            own = net.state_dict()
            base = {k: v for k, v in self.base_run.net.state_dict().items()
                    if k in own and v.shape == own[k].shape}
            missing = [k for k in own if k not in base and not k.startswith("out_conv.")]
            if missing:
                raise DifflabError(f"the base network's weights do not fit the head "
                                   f"({len(missing)} tensors missing, e.g. {missing[0]!r}): set "
                                   "task.init='scratch'")
            net.load_state_dict(base, strict=False)
            out = getattr(net, "out_conv", None)
            for p in out.parameters() if out is not None else ():
                nn.init.zeros_(p)
        return {"model": net}

    def frozen_parts(self) -> dict[str, FrozenPart]:
        parts = super().frozen_parts()
        if self.base_run is not None:
            parts["base"] = FrozenPart(self.base_run.net, str(self.base_source),
                                       content_hash(self.base_source))
        return parts

    # ----- the loss ---------------------------------------------------------------------------
    def wrap(self, net: nn.Module, check_finite: bool = True):
        from difflab.objectives.residual import ResidualHead

        return ResidualHead(net, self.path)

    def loss(self, modules: dict[str, nn.Module], x: Tensor, cond, generator: torch.Generator
             ) -> Tensor:
        base = self.base_run
        if base is None:
            raise DifflabError("this residual task was built for sampling, not training")
        base.net.to(x.device)
        return self.objective.with_head(self.wrap(modules["model"]))(base.denoiser, x, None,
                                                                    generator=generator)


def residual_head(source, path, kind: str | None, device="cpu"):
    """The head of a residual run folder ``source`` as ``(x_t, t) -> Tensor``, checked against
    the sampling run's ``path`` and the sampler's ``kind`` (``npr`` / ``sn``)."""
    from difflab.paths import same_marginals
    from difflab.runs import load_run

    p = Path(source).expanduser()
    if not p.exists():
        raise DifflabError(f"residual={str(source)!r} does not exist: give the folder of a "
                           "residual run (configs/npr_mnist.toml trains one)")
    run = load_run(p, device=device)
    if not isinstance(run.task, ResidualTask):
        raise DifflabError(f"residual={str(source)!r} is a task.kind={run.config.task.kind!r} "
                           "run, not a residual run (configs/npr_mnist.toml trains one)")
    trained = run.config.objective.options().get("kind", "npr")
    if kind is not None and trained != kind:
        raise DifflabError(f"residual={str(source)!r} was trained with objective.kind="
                           f"{trained!r}; the sampler needs a {kind!r} head "
                           f"({trained}_ddpm samples with it)")
    if not same_marginals(run.path, path):
        raise DifflabError(f"residual={str(source)!r} was trained on path "
                           f"{run.config.path.kind!r}, not on the sampled run's path")
    return run.denoiser
