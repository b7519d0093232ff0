"""DiffPure (Nie et al. 2022, "Diffusion Models for Adversarial Purification", ICML).

A possibly attacked input ``x_a`` is diffused to a time ``t*`` and the reverse SDE is solved back
to the data end; the classifier sees the result. DiffPure Sec. 3.1:

* eq. 4, the forward diffusion in closed form:
  ``x(t*) = sqrt(alpha_bar(t*)) x_a + sqrt(1 - alpha_bar(t*)) eps``, ``eps ~ N(0, I)``
  (``path.add_noise``: ``alpha(t) = sqrt(alpha_bar(t))``, ``sigma(t) = sqrt(1 - alpha_bar)``);
* eq. 5, the reverse-time VP-SDE from ``t*`` to 0,
  ``dx = -1/2 beta(t) [x + 2 grad log p_t(x)] dt + sqrt(beta(t)) dw_bar``, with the score
  from the diffusion model.

Any registered sampler solves the reverse process here (``sampler=``): DiffPure's own is an
SDE solver (their code: Euler-Maruyama, ``dt = 1e-3``; here ``em``); on DDPM's discrete chain the
natural discretisation of eq. 5 is ancestral sampling (``ddpm``, Ho et al. 2020 Alg. 2, over the
path's own steps below ``t*``), the default. By default every step of the path below ``t*``
is taken (``round(t* N)`` on a discrete path, ``round(1000 t*)`` on a continuous one: DiffPure's
``dt = 1e-3``); ``steps`` respaces them (:func:`difflab.sampling.start_grid`).

``t*`` is a fraction of the path's time range, in ``(0, 1]``. The purifier is differentiable
(nothing here runs under ``no_grad``), so attacks can take the full gradient through the
sampler. DiffPure computes that gradient with the adjoint SDE (their Sec. 3.4); here it is
plain backpropagation with gradient checkpointing (``checkpoint=True``: each reverse step is
recomputed in the backward pass, so memory holds one step's activations plus one state per
step; exact, because each step's noise is recorded and replayed, see :class:`_ReplayNoise`).
Checkpointing runs the sampler one grid step at a time, which is the same computation only
for samplers that keep no history between steps (:data:`ONE_STEP_SAMPLERS`); others are
refused.

Robustness evaluation lives in :mod:`difflab.recipes.robustness` (its module docstring lists
the attacks): clean and robust accuracy of ``classifier(purify(x))`` under the attacks of
:mod:`difflab.recipes.attacks`.

Budgets are given in ``[0, 1]`` pixel units, as the literature states them (MNIST: L-inf 0.3,
L2 1.5); difflab's images are in ``[-1, 1]``, so the attacks work with twice that
(``eps_model`` in reports). The command line: ``difflab edit diffpure RUN --t-star 0.1 ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from difflab.argtypes import (
    HelpFormatter,
    count_from_zero,
    device_name,
    fraction,
    key_value,
    non_negative_float,
    output_file,
    output_folder,
    positive_int,
    set_threads,
)
from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.recipes import attacks
from difflab.samplers import Hooks, PerSampleNoise, as_noise, get_sampler, sample

ONE_STEP_SAMPLERS: tuple[str, ...] = (
    "ddpm", "ddim", "euler", "euler_ancestral", "em", "reverse_diffusion", "dpm_solver_1",
    "dpm_solver_2", "dpm_solver_3", "dpmpp_2s")
"""Samplers whose steps depend only on the current state and the step's two times, so that
running them over one-step sub-grids (gradient checkpointing) is the same computation as one
run over the whole grid (tested in ``tests/recipes/test_diffpure.py``). Multistep solvers
(``dpmpp_2m``, PNDM, UniPC, ...) would restart their history every step, and EDM's Heun with
churn sets its churn from the number of steps."""


# ----- checks ------------------------------------------------------------------------------------
def check_t_star(t_star) -> float:
    """``t*`` as a float if it lies in ``(0, 1]`` (a fraction of the path's time range)."""
    from difflab.sample_inputs import check_t0

    return check_t0(t_star, "t_star", "DiffPure uses 0.1 on CIFAR-10")


def default_steps(path, t_star: float) -> int:
    """Every step of the path below ``t*``: ``round(t* N)`` on a discrete path, else
    ``round(1000 t*)`` (DiffPure's SDE solver step ``dt = 1e-3``); at least 1."""
    from difflab.paths.vp import DiscreteVP

    n = path.N if isinstance(path, DiscreteVP) else 1000
    return max(1, round(check_t_star(t_star) * n))


# ----- the purifier ------------------------------------------------------------------------------
class _ReplayNoise:
    """Noise for one checkpointed step: the first pass draws from ``noise`` and records; after
    :meth:`rewind` (the recomputation in the backward pass) the same tensors come back in the
    same order. ``torch.utils.checkpoint``'s ``preserve_rng_state`` restores only the global
    RNG, not the ``torch.Generator`` streams of :class:`~difflab.samplers.PerSampleNoise`:
    without the replay the recomputation would draw the streams' *next* values, advancing the
    caller's streams during the backward pass and, for a step whose noise enters before its
    network call (EDM's churn, a Langevin corrector), recomputing a different function. (In
    the samplers of :data:`ONE_STEP_SAMPLERS` the noise is added after the network call, and
    torch's non-reentrant checkpoint stops recomputing once it has the tensors it saved, so
    the recomputation would usually not reach the draw; the replay makes that not matter.)"""

    def __init__(self, noise) -> None:
        self.noise, self.drawn, self.i = noise, [], 0

    def rewind(self) -> None:
        self.i = 0

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.i < len(self.drawn):
            z = self.drawn[self.i]
            if z.shape != x.shape:
                raise DifflabError(f"checkpointed step replays noise of shape {tuple(z.shape)} "
                                   f"for a state of shape {tuple(x.shape)}")
        else:
            z = self.noise.randn_like(x)
            self.drawn.append(z)
        self.i += 1
        return z.to(dtype=x.dtype, device=x.device)


def draw_seeds(seed: int, draw: int, indices) -> list[int]:
    """One noise seed per image for purifier draw ``draw``: a hash of ``(seed, draw, index)``,
    so image ``i``'s purification does not depend on the batch it is in."""
    from difflab.training.data import mix_seed

    return [mix_seed(int(seed), 0xD1FF, int(draw), int(i)) for i in indices]


@dataclass
class Purifier:
    """DiffPure's purifier ``x -> reverse_SDE(x(t*))`` for images ``x`` in ``[-1, 1]``.

    Attributes:
        den: the diffusion model's denoiser (its ``path`` sets the times).
        t_star: the diffusion time as a fraction of ``path.t_max``, in ``(0, 1]``.
        sampler: a registered sampler solving the reverse process (default ``ddpm``).
        steps: reverse steps from ``t*`` (None: :func:`default_steps`).
        grid, grid_options: the time grid (:func:`difflab.sampling.start_grid`).
        options: sampler options (``variance``, ``eta``, ...).
        clip_x0: clip every clean-data estimate to ``[-1, 1]`` (DDPM's ``clip_denoised``),
            and the output.
        checkpoint: gradient checkpointing per reverse step (one-step samplers only).
        codec: a latent run's codec: the image is encoded (posterior mean), purified in the
            latent space and decoded.
        seed: base seed of :meth:`draw`.
    """

    den: DenoiserBase
    t_star: float
    sampler: str = "ddpm"
    steps: int | None = None
    grid: str = "auto"
    grid_options: dict | None = None
    options: dict = field(default_factory=dict)
    clip_x0: bool = True
    checkpoint: bool = False
    codec: Any = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.t_star = check_t_star(self.t_star)
        spec = get_sampler(self.sampler)
        self.options = dict(self.options or {})
        reserved = {"noise", "hooks"}
        accepted = set(spec.options()) - reserved
        wrong = sorted(set(self.options) - accepted)
        if wrong:
            raise DifflabError(f"sampler {self.sampler!r} got option(s) {wrong}: accepted are "
                               f"{sorted(accepted)}")
        missing = [e for e in spec.needs_extra if e not in self.options]
        if missing:
            raise DifflabError(f"sampler {self.sampler!r} needs option(s) {missing}")
        if self.checkpoint and self.sampler not in ONE_STEP_SAMPLERS:
            raise bad_value("sampler", self.sampler, "with gradient checkpointing, a sampler "
                            "that keeps no history between steps: " + ", ".join(ONE_STEP_SAMPLERS)
                            + " (or turn checkpointing off)")
        if self.steps is None:
            self.steps = default_steps(self.den.path, self.t_star)
        attacks.check_count(self.steps, "steps")
        self.times = _grid(self.den.path, self.steps, self.grid, self.grid_options,
                           self.t_star)
        self._spec = spec
        self._hooks = Hooks(correct_x0=_clip) if self.clip_x0 else None

    @property
    def t_start(self) -> float:
        """The time the input is diffused to (``t* t_max``, or the nearest step of a discrete
        path)."""
        return float(self.times[0])

    @property
    def nfe(self) -> int:
        """Network evaluations of one purification (forward only)."""
        return (self.times.numel() - 1) * self._spec.evals_per_step

    def __call__(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """Purify ``x`` (``(B, C, H, W)`` in ``[-1, 1]``); ``noise``: None (global RNG), a seed,
        a ``torch.Generator`` or a noise object (``PerSampleNoise``). The forward diffusion
        draws first, then the sampler from the same stream."""
        noise = as_noise(noise)
        z = x if self.codec is None else self.codec.to_latent(x, sample=False)
        t = torch.full((z.shape[0],), self.t_start, dtype=torch.float64, device=z.device)
        z = self.den.path.add_noise(z, noise.randn_like(z), t)  # DiffPure eq. 4
        z = self._reverse(z, noise)  # eq. 5, solved from t* to 0
        out = z if self.codec is None else self.codec.from_latent(z)
        return out.clamp(-1.0, 1.0) if self.clip_x0 else out

    def draw(self, x: torch.Tensor, draw: int, indices) -> torch.Tensor:
        """Purify with the noise of draw ``draw`` of images ``indices`` (:func:`draw_seeds`)."""
        return self(x, PerSampleNoise(draw_seeds(self.seed, draw, indices)))

    def _reverse(self, z: torch.Tensor, noise) -> torch.Tensor:
        kw = dict(self.options)
        if self._hooks is not None:
            kw["hooks"] = self._hooks
        if not self.checkpoint:
            return sample(self.sampler, self.den, z, self.times, noise=noise, **kw)
        for i in range(self.times.numel() - 1):
            times, rec = self.times[i:i + 2], _ReplayNoise(noise)

            def step(v: torch.Tensor, times=times, rec=rec) -> torch.Tensor:
                rec.rewind()
                return sample(self.sampler, self.den, v, times, noise=rec, **kw)

            if torch.is_grad_enabled():
                z = _checkpoint(step, z, use_reentrant=False)
            else:
                z = step(z)
        return z


def _grid(path, steps: int, grid: str, grid_options: dict | None, t_star: float
          ) -> torch.Tensor:
    """:func:`difflab.sampling.start_grid`, except that ``t* = 1`` on a discrete path's own
    grid also starts at the path's last step (trailing spacing; ``start_grid`` gives the run's
    full sampling grid there, whose leading spacing starts below ``t_max``)."""
    from difflab.paths.vp import DiscreteVP
    from difflab.samplers.timesteps import discrete
    from difflab.sampling import auto_grid_name, start_grid

    name = auto_grid_name(path) if grid == "auto" else grid
    if t_star == 1 and name == "discrete" and isinstance(path, DiscreteVP) and not grid_options:
        return discrete(path, steps, spacing="trailing")
    return start_grid(path, steps, grid, grid_options, t_star)


def _clip(x0: torch.Tensor, t=None) -> torch.Tensor:
    return x0.clamp(-1.0, 1.0)


def purify(den: DenoiserBase, x: torch.Tensor, t_star: float, *, sampler: str = "ddpm",
           steps: int | None = None, noise=None, grid: str = "auto",
           grid_options: dict | None = None, options: dict | None = None, clip_x0: bool = True,
           checkpoint: bool = False, codec: Any = None) -> torch.Tensor:
    """DiffPure: diffuse ``x`` to ``t*`` (eq. 4) and solve the reverse process to 0 (eq. 5)
    with ``sampler``. Differentiable; see :class:`Purifier` for the arguments."""
    return Purifier(den, t_star, sampler, steps, grid, grid_options, options or {}, clip_x0,
                    checkpoint, codec)(x, noise)


# ----- command line ------------------------------------------------------------------------------
def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``difflab edit diffpure``."""
    from difflab.recipes import robustness
    p = sub.add_parser(
        "diffpure", help="DiffPure: purify inputs through the diffusion model, score robustness",
        description="DiffPure (Nie et al. 2022): diffuse an input to t* and solve the reverse "
        "SDE back (any --sampler) in front of the run's classifier (mnist-lenet for MNIST, "
        "digits-mlp for digits). With --out it scores clean and robust accuracy on held-out "
        "images under an attack written in difflab: pgd_linf / pgd_l2 on the undefended "
        "classifier (transfer), or adaptive attacks through the purifier: full (the full "
        "gradient through the sampler, checkpointed), eot (that gradient averaged over --eot "
        "purifier draws) and bpda (identity backward pass). Budgets are in [0, 1] pixel units "
        "(MNIST: L-inf 0.3, L2 1.5); difflab's images span [-1, 1], so the attack moves twice "
        "that. With --input it just purifies image files into --out-dir.",
        epilog="examples:\n  difflab edit diffpure runs/mnist --t-star 0.1 --steps 10 --attack "
        "eot --eot 4 --attack-steps 10 --n 64 --out diffpure.json\n  difflab edit diffpure "
        "runs/mnist --t-star 0.1 --input a.png b.png --out-dir purified",
        formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN", help="the run folder (or a checkpoint folder in it)")
    p.add_argument("--t-star", type=fraction, required=True, help="diffusion time as a "
                   "fraction of the path's t_max, in (0, 1] (DiffPure: 0.1 on CIFAR-10)")
    p.add_argument("--sampler", default="ddpm", help="reverse-process solver (default ddpm: "
                   "ancestral steps of the reverse SDE; em: Euler-Maruyama as DiffPure)")
    p.add_argument("--steps", type=positive_int, help="reverse steps from t* (default: every "
                   "step of the path below t*)")
    p.add_argument("--grid", default="auto", help="time grid (default: the path's own)")
    p.add_argument("--grid-option", dest="grid_options", action="append", default=[],
                   metavar="KEY=VALUE", help="time-grid option")
    p.add_argument("--option", dest="options", action="append", default=[],
                   metavar="KEY=VALUE", help="sampler option, e.g. variance='large'")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip clean-data estimates to [-1, 1] (default: the run's "
                   "sample.clip_x0)")
    a = p.add_argument_group("attack (with --out)")
    a.add_argument("--attack", default="none", choices=robustness.ATTACKS, help="default none")
    a.add_argument("--norm", choices=attacks.NORMS, help="ball of eot / full / bpda "
                   "(default linf)")
    a.add_argument("--eps", type=non_negative_float, help="budget in [0, 1] pixel units "
                   "(default 0.3 for linf, 1.5 for l2)")
    a.add_argument("--attack-steps", type=positive_int, default=10, help="PGD steps "
                   "(default 10)")
    a.add_argument("--step-size", type=non_negative_float, help="PGD step in [0, 1] pixel "
                   "units "
                   "(default 2.5 eps / steps)")
    a.add_argument("--eot", type=positive_int, help="purifier draws per attack step (default: "
                   "4 for eot, 1 for bpda; full takes 1)")
    a.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start PGD at a random point of the ball (default: yes)")
    a.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing per reverse step for eot / full (default: "
                   "yes; memory of one step instead of all)")
    a.add_argument("--n", type=positive_int, default=100, help="held-out images to score "
                   "(default 100)")
    a.add_argument("--extractor", help="the classifier (default: the dataset's)")
    a.add_argument("--train-extractor", action="store_true", help="train the classifier if "
                   "it is not cached (as difflab eval --train-extractor)")
    p.add_argument("--seed", type=count_from_zero, default=0, help="seed of the image choice, "
                   "the purifier's noise and PGD's start (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="REPORT.json", help="score robustness; write the report")
    dest.add_argument("--out-dir", metavar="DIR", help="with --input: write the purified images")
    p.add_argument("--input", nargs="+", metavar="IMAGE", help="image files to purify")
    p.add_argument("--checkpoint", metavar="step_N", help="which checkpoint (default: latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the raw trained weights")
    p.add_argument("--device", default="cpu", type=device_name, help="torch device")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only when stderr is a terminal)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    p.set_defaults(func=cmd_diffpure)


def cmd_diffpure(args: argparse.Namespace) -> int:
    from difflab.fileio import write_text_atomic
    from difflab.sampling import load_run, not_generative

    out_file = output_file("--out", args.out, (".json",))
    out_dir = output_folder("--out-dir", args.out_dir)
    if out_dir is not None and not args.input:
        raise DifflabError("--out-dir writes purified --input images: give --input IMAGE...")
    if out_file is not None and args.input:
        raise DifflabError("--input purifies files into --out-dir; --out scores robustness on "
                           "held-out images: use one or the other")
    from difflab.recipes import robustness

    attack = robustness.Attack(args.attack, args.norm, args.eps, args.attack_steps,
                               args.step_size,
                    args.eot, args.random_start).resolved()  # refuse bad settings before loading
    get_sampler(args.sampler)
    grid_options = dict(key_value(o, "--grid-option") for o in args.grid_options)
    options = dict(key_value(o) for o in args.options)
    set_threads(args.threads)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    run = load_run(args.run, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
    if not run.generative:
        raise DifflabError(not_generative(run, args.run))
    clip = run.config.sample.clip_x0 if args.clip_x0 is None else args.clip_x0
    purifier = Purifier(run.denoiser, args.t_star, args.sampler, args.steps, args.grid,
                        grid_options or None, options, clip,
                        args.grad_checkpoint and attack.gradient == "full", run.codec,
                        args.seed)
    if out_dir is not None:
        return _purify_files(run, purifier, args.input, out_dir, args.device)
    ext = robustness.judge_for_run(run, args.extractor, args.train_extractor, progress)
    x, y, what = robustness.held_out_images(run, ext.name)
    x, y, _ = robustness.pick(x, y, args.n, args.seed)
    net = ext.net.to(args.device)
    report = robustness.evaluate(net.logits, x.to(args.device), y.to(args.device), purifier, attack,
                      seed=args.seed, batch_size=args.batch_size, progress=progress)
    report.update({"run": str(args.run), "step": run.step, "classifier": ext.name,
                   "classifier_meta": {k: ext.meta.get(k) for k in ("key", "score", "n_train")},
                   "images": what, "seed": args.seed})
    write_text_atomic(out_file, json.dumps(report, indent=2) + "\n")
    rob = (f", robust {report['robust_accuracy']:.3f} under {attack.name} "
           f"({attack.norm} eps={attack.eps:g}, {attack.steps} steps"
           + (f", EOT {attack.eot}" if attack.eot else "") + ")") if attack.name != "none" \
        else ""
    print(f"diffpure t*={purifier.t_star:g} ({purifier.sampler}, {purifier.nfe} NFE): clean "
          f"accuracy {report['clean_accuracy']:.3f}{rob} on {report['n']} images; wrote "
          f"{out_file}", file=sys.stderr)
    return 0


def _purify_files(run, purifier: Purifier, files: list[str], out_dir: Path, device) -> int:
    from difflab.data import save_image_grid
    from difflab.recipes.common import pixel_shape, read_images

    x = read_images(files, pixel_shape(run), "--input image").to(device)
    with torch.no_grad():
        from difflab.recipes.robustness import CLEAN_DRAW

        out = purifier.draw(x, CLEAN_DRAW, range(len(files)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        save_image_grid(out[i:i + 1].cpu(), out_dir / f"{Path(f).stem}_purified.png", padding=0)
    print(f"purified {len(files)} image(s) at t*={purifier.t_star:g} ({purifier.sampler}, "
          f"{purifier.nfe} NFE) into {out_dir}", file=sys.stderr)
    return 0
