"""Conditions and guidance for sampling a trained run: what ``difflab sample --class 7
--guidance cfg:3`` and ``difflab eval --guidance ...`` turn into.

:func:`guided_inputs` returns ``(cond, null_cond, guide)`` for
:func:`difflab.training.sampling.generate`:

- no guidance: the requested condition bound to the denoiser;
- ``cfg:S``: both branches in one batched call (:func:`difflab.guidance.cfg`), the null branch
  being the null class, the empty prompt or the negative prompt;
- ``classifier:RUN:S``: the gradient of the classifier run's ``log p(y | x_t)`` added to the
  unconditional score (:func:`difflab.guidance.classifier`). On a class-conditional diffusion
  run the unconditional denoiser is its null-class branch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from difflab.cond import Cond
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError
from difflab.guidance import classifier as classifier_transform
from difflab.guidance.spec import GuidanceSpec, cfg_guide, parse_guidance
from difflab.training.conditioning import Conditioner, warn_if_no_unconditional
from difflab.training.sampling import Guide, LoadedRun, load_run

logger = logging.getLogger("difflab.sampling")


def conditioner_for(run: LoadedRun) -> Conditioner:
    """The :class:`Conditioner` of a loaded run (prompts are encoded on demand)."""
    return Conditioner(run.config)


def guided_inputs(run: LoadedRun, n: int, guidance: str | GuidanceSpec | None = None,
                  labels: torch.Tensor | Sequence[int] | int | None = None,
                  prompts: Sequence[str] | str | None = None,
                  negative_prompt: str | None = None,
                  conditioner: Conditioner | None = None,
                  ) -> tuple[Cond | None, Cond | None, Guide | None]:
    """``(cond, null_cond, guide)`` for ``n`` samples of ``run`` (see the module docstring)."""
    spec = parse_guidance(guidance) if isinstance(guidance, str) else guidance
    if spec is not None and (spec.kind == "none" or (spec.kind == "cfg" and spec.scale == 1.0
                                                     and spec.interval is None)):
        spec = None  # cfg at scale 1 is the conditional model: skip the second branch
    cond_er = conditioner or conditioner_for(run)
    if spec is not None and spec.kind == "classifier":
        return _classifier_inputs(run, spec, n, labels, prompts, cond_er)
    cond, null = cond_er.make(n, labels=labels, prompts=prompts, negative_prompt=negative_prompt)
    if spec is None:
        return cond, None, None
    if cond is None:
        raise DifflabError(f"guidance {spec} needs a conditional model; this run"
                           " is unconditional (train with model.class_cond=true or "
                           "model.text_encoder, and train.p_uncond > 0)")
    warn_if_no_unconditional(run.config)
    return cond, null, cfg_guide(spec)


def _classifier_inputs(run: LoadedRun, spec: GuidanceSpec, n: int, labels, prompts,
                       diffusion: Conditioner) -> tuple[Cond, Cond | None, Guide]:
    from difflab.guidance.noisy_classifier import check_classifier_matches, classifier_log_prob
    from difflab.paths import same_marginals

    if prompts is not None:
        raise DifflabError("classifier guidance takes --class, not --prompt")
    cls_run = load_run(spec.run, device=next(run.net.parameters()).device)
    c = cls_run.config.model
    if c.arch != "classifier":
        raise DifflabError(f"guidance {spec}: {spec.run} is not a classifier run (its "
                           f"model.arch is {c.arch!r}); train one with configs/"
                           "classifier_mnist.toml")
    m = run.config.model
    check_classifier_matches((c.image_size, c.in_channels, c.num_classes),
                             (m.image_size, m.in_channels, m.num_classes if m.class_cond else None),
                             classifier_name=str(spec.run), diffusion_name="the diffusion run")
    if not same_marginals(run.denoiser.path, cls_run.denoiser.path):
        raise DifflabError(
            f"guidance {spec}: the classifier run was trained on path {cls_run.config.path.kind!r}"
            f" and the diffusion run samples path {run.config.path.kind!r}; the classifier reads "
            "x_t at the diffusion model's noise levels only when the two paths match: train it "
            "with the diffusion run's [path]")
    y = Conditioner(cls_run.config).labels(labels, n)
    if diffusion.kind == "class":
        null = Cond(labels=torch.full_like(y, diffusion.num_classes))
        warn_if_no_unconditional(run.config, "classifier guidance (which needs the unconditional "
                                 "model)")
    elif diffusion.kind == "none":
        null = None
    else:
        raise DifflabError("classifier guidance needs an unconditional or class-conditional "
                           "diffusion run, not a text-conditional one")
    model = cls_run.denoiser
    scale = spec.scale

    def guide(den: DenoiserBase, cond: Cond | None, nc: Cond | None) -> DenoiserBase:
        base = den if nc is None else den.bind(nc)
        return classifier_transform(base, classifier_log_prob(model, cond.labels), scale)

    return Cond(labels=y), null, guide
