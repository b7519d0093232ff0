"""Robustness of a purified classifier (DiffPure, Nie et al. 2022, Sec. 4): clean and robust
accuracy of ``classifier(purifier(x))`` under the attacks of :mod:`difflab.recipes.attacks`,
and the run's classifier and held-out images that ``difflab edit diffpure`` scores.

=============  ===============================================================================
``none``       no attack (clean accuracy only)
``pgd_linf``   PGD L-inf (Madry et al. 2018) on the undefended classifier, then purified
               (a transfer attack: it never sees the purifier)
``pgd_l2``     the same in the L2 ball
``full``       PGD through the purifier with the full gradient through the sampler, one fresh
               purifier draw per step (checkpointed)
``eot``        the same, averaging the gradient over K purifier draws per step (EOT; Athalye et
               al. 2018 Sec. 4.3)
``bpda``       PGD with the purifier's backward pass replaced by the identity (BPDA; Athalye et
               al. 2018 Sec. 4.1), averaged over K draws (default 1)
=============  ===============================================================================

Budgets are in ``[0, 1]`` pixel units, as the literature states them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from difflab.errors import DifflabError, bad_value
from difflab.recipes import attacks

CLEAN_DRAW, ROBUST_DRAW, FIRST_ATTACK_DRAW = 0, 1, 2
"""Purifier draws (:meth:`difflab.recipes.diffpure.Purifier.draw`): the clean accuracy's, the
robust accuracy's, and the attack's from ``FIRST_ATTACK_DRAW`` on, so the draw an example is
scored with is never one the attack optimised against."""

ATTACKS: tuple[str, ...] = ("none", "pgd_linf", "pgd_l2", "eot", "full", "bpda")
ADAPTIVE: tuple[str, ...] = ("eot", "full", "bpda")
DEFAULT_EPS = {"linf": 0.3, "l2": 1.5}
"""The usual MNIST budgets in ``[0, 1]`` pixel units (Madry et al. 2018: L-inf 0.3; L2 1.5 as
in the MNIST L2 results of e.g. Croce & Hein 2020)."""
DEFAULT_EOT = {"eot": 4, "full": 1, "bpda": 1}

# ----- robustness evaluation ---------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    """One attack setting (budgets in ``[0, 1]`` pixel units; see the module docstring).

    Attributes:
        name: one of :data:`ATTACKS`.
        norm: ``linf`` or ``l2`` (``pgd_linf`` / ``pgd_l2`` fix it; adaptive attacks: default
            ``linf``).
        eps: the budget (None: :data:`DEFAULT_EPS` of the norm).
        steps: PGD iterations.
        step_size: per-step move (None: ``2.5 eps / steps``).
        eot: purifier draws per step (None: :data:`DEFAULT_EOT`; ``full`` takes exactly 1).
        random_init: start PGD at a uniform random point of the ball.
    """

    name: str = "none"
    norm: str | None = None
    eps: float | None = None
    steps: int = 10
    step_size: float | None = None
    eot: int | None = None
    random_init: bool = True

    def resolved(self) -> Attack:
        """The setting with every default filled in; bad values raise naming them."""
        if self.name not in ATTACKS:
            raise bad_value("attack", self.name, "one of " + ", ".join(ATTACKS))
        fixed = {"pgd_linf": "linf", "pgd_l2": "l2"}.get(self.name)
        if fixed is not None and self.norm not in (None, fixed):
            raise DifflabError(f"attack {self.name!r} is in the {fixed} ball: norm={self.norm!r} "
                               "contradicts it (the adaptive attacks eot, full, bpda take a norm)")
        norm = attacks.check_norm(fixed or self.norm or "linf")
        eps = DEFAULT_EPS[norm] if self.eps is None else attacks.check_budget(self.eps, "eps")
        steps = attacks.check_count(self.steps, "attack_steps")
        step_size = None if self.step_size is None else attacks.check_budget(self.step_size,
                                                                               "step_size")
        if self.name in ADAPTIVE:
            eot = DEFAULT_EOT[self.name] if self.eot is None else attacks.check_count(self.eot,
                                                                                     "eot")
            if self.name == "full" and eot != 1:
                raise bad_value("eot", eot, "1 for attack 'full' (one purifier draw per step); "
                                "use attack 'eot' to average over several draws")
        else:
            if self.eot not in (None, 1):
                raise bad_value("eot", self.eot, f"nothing for attack {self.name!r}, which does "
                                "not go through the purifier (eot, full and bpda do)")
            eot = None
        return replace(self, norm=norm, eps=eps, steps=steps, step_size=step_size, eot=eot)

    @property
    def gradient(self) -> str:
        """Which gradient PGD follows: ``none``, ``classifier``, ``full`` or ``bpda``."""
        return {"none": "none", "pgd_linf": "classifier", "pgd_l2": "classifier",
                "eot": "full", "full": "full", "bpda": "bpda"}[self.name]


def _start(x: torch.Tensor, eps: float, norm: str, seed: int, indices) -> torch.Tensor:
    """PGD's random start, one generator per image (independent of the batching)."""
    from difflab.training.data import mix_seed

    rows = [attacks.random_start(x[j:j + 1], eps, norm,
                                 torch.Generator().manual_seed(mix_seed(seed, 0x57A7, int(i))))
            for j, i in enumerate(indices)]
    return torch.cat(rows)


def evaluate(classify, x: torch.Tensor, y: torch.Tensor, purifier: Any,
             attack: Attack | str = "none", *, seed: int = 0, batch_size: int = 64,
             progress: bool = False, desc: str | None = None) -> dict:
    """Clean and robust accuracy of ``classify(purifier(x))`` under ``attack``.

    Args:
        classify: a differentiable ``(N, C, H, W) in [-1, 1] -> logits`` (eval mode).
        x, y: the images (in ``[-1, 1]``) and labels.
        purifier: the defence; None scores the undefended classifier (then the adaptive
            attacks are plain white-box PGD on it).
        attack: an :class:`Attack` or an attack name.
        seed: seeds PGD's random start (per image); the purifier's draws come from
            ``purifier.seed``.
        batch_size: images per batch (results do not depend on it).

    Returns:
        A dict: the settings, ``clean_accuracy`` / ``robust_accuracy`` (defended: one purifier
        draw each, never one the attack used), ``undefended_clean_accuracy`` /
        ``undefended_robust_accuracy`` (the classifier alone on the same clean and adversarial
        images), ``linf`` / ``l2`` (the largest perturbation, pixel units) and ``seconds``.
    """
    from tqdm.auto import tqdm

    attack = (Attack(attack) if isinstance(attack, str) else attack).resolved()
    attacks.check_count(batch_size, "batch_size")
    if x.ndim != 4 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise DifflabError(f"expected images (N, C, H, W) and N labels, got {tuple(x.shape)} and "
                           f"{tuple(y.shape)}")
    eps = attacks.pixel_budget(attack.eps)
    step = None if attack.step_size is None else attacks.pixel_budget(attack.step_size)
    n = x.shape[0]
    per_batch = attack.steps if attack.name != "none" else 1
    bar = tqdm(total=-(-n // batch_size) * per_batch, desc=desc or f"diffpure {attack.name}",
               disable=not progress, unit="step", leave=False)
    correct = {"clean": 0, "robust": 0, "undefended_clean": 0, "undefended_robust": 0}
    linf = l2 = 0.0
    start = time.perf_counter()
    try:
        for lo in range(0, n, batch_size):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            idx = range(lo, lo + xb.shape[0])
            x_adv = _attack_batch(classify, xb, yb, purifier, attack, eps, step, seed, idx,
                                  lambda i: bar.update(1))
            if attack.name == "none":
                bar.update(1)
            with torch.no_grad():
                und_clean = classify(xb).argmax(1)
                und_adv = classify(x_adv).argmax(1)
                if purifier is None:
                    clean, adv = und_clean, und_adv
                else:
                    clean = classify(purifier.draw(xb, CLEAN_DRAW, idx)).argmax(1)
                    adv = classify(purifier.draw(x_adv, ROBUST_DRAW, idx)).argmax(1)
            for key, pred in (("clean", clean), ("robust", adv), ("undefended_clean", und_clean),
                              ("undefended_robust", und_adv)):
                correct[key] += int((pred == yb).sum())
            d = (x_adv - xb).flatten(1) / 2.0  # in [0, 1] pixel units
            linf = max(linf, float(d.abs().max()))
            l2 = max(l2, float(d.norm(dim=1).max()))
    finally:
        bar.close()
    report = {"attack": attack.name, "gradient": attack.gradient, "n": n}
    if attack.name != "none":
        report.update({"norm": attack.norm, "eps": attack.eps, "eps_model": eps,
                       "eps_unit": "[0, 1] pixels (eps_model: difflab's [-1, 1] images)",
                       "attack_steps": attack.steps,
                       "step_size": attack.step_size if step is not None
                       else 2.5 * attack.eps / attack.steps,
                       "eot_samples": attack.eot, "random_init": attack.random_init})
    report.update(purifier_settings(purifier))
    report.update({f"{k}_accuracy": v / n for k, v in correct.items()})
    report.update({"linf": linf, "l2": l2, "seconds": time.perf_counter() - start})
    return report


def purifier_settings(purifier: Any) -> dict:
    """What a report says about the defence."""
    if purifier is None:
        return {"t_star": 0.0, "purifier": None}
    return {"t_star": purifier.t_star, "t_start": purifier.t_start,
            "purifier": {"sampler": purifier.sampler, "steps": purifier.times.numel() - 1,
                         "nfe": purifier.nfe, "options": purifier.options,
                         "clip_x0": purifier.clip_x0, "checkpoint": purifier.checkpoint,
                         "seed": purifier.seed}}


def _attack_batch(classify, xb, yb, purifier, attack: Attack, eps: float, step, seed: int, idx,
                  callback) -> torch.Tensor:
    if attack.name == "none":
        return xb
    if purifier is None or attack.gradient not in ("full", "bpda"):
        gradient = attacks.classifier_gradient(classify)
    else:
        def transform(v: torch.Tensor, draw: int) -> torch.Tensor:
            return purifier.draw(v, FIRST_ATTACK_DRAW + draw, idx)

        gradient = attacks.eot_gradient(classify, transform, attack.eot,
                                        bpda=attack.gradient == "bpda")
    start = _start(xb, eps, attack.norm, seed, idx) if attack.random_init else None
    return attacks.pgd(xb, yb, gradient, eps=eps, norm=attack.norm, steps=attack.steps,
                       step_size=step, start=start, random_init=False, callback=callback)


# ----- the run's classifier and held-out images --------------------------------------------------
def judge_for_run(run, extractor: str | None = None, train: bool = False,
                  progress: bool = False):
    """The classifier DiffPure defends: the run's dataset's extractor (``mnist-lenet``,
    ``digits-mlp``, ...), trained on the run's own training data as ``difflab eval`` trains
    it (same cache entry), so it never saw the run's held-out images. Its parameters are
    frozen (attacks need only input gradients)."""
    from difflab.builders import build_dataset
    from difflab.evaluation.features import EXTRACTORS, extractor_for_dataset, get_extractor

    name = extractor or extractor_for_dataset(run.config.data.name)
    spec = EXTRACTORS.get(name)
    if spec is None or not spec.labelled:
        raise bad_value("extractor", name, "a classifier extractor: one of " + ", ".join(
            sorted(k for k, s in EXTRACTORS.items() if s.labelled)))
    shape = tuple(run.image_shape)
    if shape != (spec.channels, spec.image_size, spec.image_size):
        raise DifflabError(f"the {name!r} classifier reads ({spec.channels}, {spec.image_size}, "
                           f"{spec.image_size}) images; this run makes {shape}: pick a "
                           "classifier of the run's resolution")
    ext = get_extractor(name, build_dataset(run.config), train=train, progress=progress)
    ext.net.eval().requires_grad_(False)
    return ext


def held_out_images(run, extractor=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(images, labels, what)``: the run's held-out images (neither the diffusion model nor
    :func:`judge_for_run`'s classifier trained on them), else the classifier's own hold-out
    (the run trained on all of its data; the diffusion model has seen these)."""
    from difflab.builders import build_dataset, build_held_out
    from difflab.data.base import holdout_indices
    from difflab.evaluation.features import EXTRACTORS, dataset_tensors, extractor_for_dataset

    held = build_held_out(run.config)
    if held is not None:
        x, y = dataset_tensors(held)
        what = "the run's held-out images (neither the diffusion model nor the classifier " \
               "trained on them)"
    else:
        x, y = dataset_tensors(build_dataset(run.config))
        spec = EXTRACTORS[extractor or extractor_for_dataset(run.config.data.name)]
        keep = holdout_indices(len(x), "test", spec.holdout_fraction, spec.train.seed,
                               None if y is None else y.numpy())
        x, y = x[keep], None if y is None else y[keep]
        what = "the classifier's held-out images (the diffusion model trained on them)"
    if y is None:
        raise DifflabError(f"the run's dataset {run.config.data.name!r} has no labels: DiffPure "
                           "needs a labelled dataset to score a classifier")
    return x, y.long(), what


def pick(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` images drawn without replacement (a seeded permutation)."""
    if n > x.shape[0]:
        raise bad_value("n", n, f"at most the {x.shape[0]} held-out images")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[perm], y[perm], perm


