"""The trainer: one loop for every objective, network and path, on ``accelerate``.

``accelerate`` provides the device, bf16 / fp16 autocast (with loss scaling for fp16), gradient
accumulation and DDP (``accelerate launch --num_processes K -m difflab.cli train ...``; only the
main process writes). The optimizer is AdamW (fused when available; weight decay on matrices
and convolution kernels only), the learning rate warms up linearly and then stays constant
(DDPM App. B: 2e-4 after 5,000 warm-up steps; iDDPM keeps it constant too), and an EMA of the
weights is kept for sampling.

Resuming is exact: a run interrupted and resumed ends with bitwise the same weights as an
uninterrupted one (on the same device and process count). Everything random is a function of
``(seed, step, micro-batch, process)``: the data order (:mod:`difflab.training.data`), the
objective's ``torch.Generator`` (re-seeded before every micro-batch) and the global RNG that
dropout reads, which is forked and seeded around each forward pass so the caller's global RNG
is left untouched. The rest (weights, EMA, AdamW moments, scheduler, step) is in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from difflab.config import Config, save_config
from difflab.data import save_image_grid
from difflab.errors import DifflabError
from difflab.runs import CONFIG_FILE
from difflab.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    list_checkpoints,
    load_training_state,
    part_files,
    remove_partial,
    resumable_checkpoint,
    save_checkpoint,
    state_dict_cpu,
)
from difflab.training.data import BatchOrder, micro_batches, mix_seed
from difflab.training.ema import EMA
from difflab.training.logging import MetricsLogger, Progress

logger = logging.getLogger("difflab.training")


class TrainingDiverged(DifflabError):
    """The loss (or gradient) became NaN / inf; the weights were not updated with it."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    loss: float | None
    seconds: float  # training time, without the preview grids
    stopped: str  # "done", "time_limit" or "interrupted" (SIGINT / SIGTERM; see ``signal``)
    preview_seconds: float = 0.0
    signal: str = ""  # the stop signal's name when interrupted


def make_accelerator(cfg: Config, cpu: bool = False) -> Accelerator:
    """An ``Accelerator`` for ``[train]``.

    Under a distributed launcher (``accelerate launch --multi_gpu --num_processes K`` or
    ``torchrun``) on a machine without CUDA, ``cpu=True`` is implied so the processes form a
    gloo group (accelerate's ``--cpu`` flag itself starts a single process). In a single process
    a previous, differently configured accelerate state (an earlier trainer in the same Python
    session) is reset.
    """
    t = cfg.train
    cpu = cpu or ("LOCAL_RANK" in os.environ and not torch.cuda.is_available())
    state = AcceleratorState._shared_state
    before = state.get("_mixed_precision")
    if before is not None and (before != t.mixed_precision or state.get("_cpu") != cpu):
        if state.get("num_processes", 1) > 1:
            raise DifflabError(f"accelerate is already initialised with mixed_precision="
                               f"{before!r} in this process group")
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                       cpu=cpu, step_scheduler_with_optimizer=False)


def _adamw(modules: list[torch.nn.Module], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parts' parameters, with decay on tensors of rank >= 2 only
    (norm gains and biases are not decayed)."""
    t = cfg.train
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kw = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - device without fused
        return torch.optim.AdamW(groups, foreach=True, **kw)


class Trainer:
    """Train a task's parts into ``run_dir``.

    Args:
        task: the :class:`~difflab.tasks.base.TrainingTask` (or a config, whose task is
            built here on the accelerator's device).
        run_dir: the run folder (``config.toml``, ``checkpoints/``, ``samples/``, logs).
        resume: continue from the newest complete checkpoint in ``run_dir``.
        accelerator: an ``Accelerator`` (default: :func:`make_accelerator`).
        progress: show a progress bar (None: on a TTY only).
    """

    def __init__(self, task, run_dir: str | Path, resume: bool = False,
                 accelerator: Accelerator | None = None, progress: bool | None = None) -> None:
        from difflab.tasks import make_task

        cfg = task if isinstance(task, Config) else task.cfg
        self.acc = accelerator or make_accelerator(cfg)
        if isinstance(task, Config):
            task = make_task(cfg, device=self.acc.device, accelerator=self.acc)
        self.task = task
        task.conditioner.device = self.acc.device
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.progress_flag = progress
        self.dataset = task.dataset
        self.cfg = task.cfg
        t = self.cfg.train
        if not resume and list_checkpoints(self.ckpt_root):
            raise DifflabError(f"{self.run_dir} already holds checkpoints: continue it with "
                               f"--resume {self.run_dir}, or choose another --out")
        self.order = BatchOrder(len(self.dataset), t.seed, t.batch_size, t.grad_accum,
                                self.acc.num_processes)
        self.path = task.path
        if t.sample_every and not task.generative:
            raise DifflabError(f"train.sample_every={t.sample_every}: a task.kind="
                               f"{self.cfg.task.kind!r} model does not generate images; set "
                               "train.sample_every=0")
        if t.sample_every:  # fail now, on every process, rather than at the first preview
            from difflab.sampling import sampling_grid

            s = self.cfg.sample
            own = t.preview_sampler == "sample"
            sampling_grid(self.path, s.steps if own else t.preview_steps, s.grid,
                          s.grid_options)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(mix_seed(t.seed, 0))
            parts = task.build_trainable()
        parts = {k: m.to(self.acc.device) for k, m in parts.items()}
        if t.channels_last:
            parts = {k: m.to(memory_format=torch.channels_last) for k, m in parts.items()}
        self.frozen = task.frozen_parts()
        self.emas = {k: EMA(m, t.ema_decay, t.ema_warmup) for k, m in parts.items()}
        self.optimizer = _adamw(list(parts.values()), self.cfg)
        warm = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume(parts)
        self.parts = parts
        prepared = self.acc.prepare(*parts.values(), self.optimizer)
        self.prepared = dict(zip(parts, prepared[:-1]))
        self.prepared_optimizer = prepared[-1]

    @property
    def net(self) -> torch.nn.Module:
        """The trainable part named ``model`` (unwrapped)."""
        return self.parts["model"]

    @property
    def ema(self) -> EMA:
        """The EMA of the part named ``model``."""
        return self.emas["model"]

    # ----- resume -----------------------------------------------------------------------------
    def _resume(self, parts: dict[str, torch.nn.Module]) -> None:
        from difflab.runs import load_part
        from difflab.training.checkpoint import verify_checkpoint

        main = self.acc.is_main_process
        if main:  # the writing process tidies up: partial writes go, corrupt ones move aside
            remove_partial(self.ckpt_root)
            ckpt = resumable_checkpoint(self.ckpt_root, move_aside=True)
        self.acc.wait_for_everyone()
        if not main:
            ckpt = resumable_checkpoint(self.ckpt_root, move_aside=False)
        if ckpt is None:
            raise DifflabError(f"nothing to resume in {self.run_dir}: no complete checkpoint in "
                               f"{self.ckpt_root}")
        self._check_frozen(verify_checkpoint(ckpt), ckpt)
        for name, module in parts.items():
            raw_file, ema_file = part_files(name)
            load_part(self.task, name, module, ckpt / raw_file)
            load_part(self.task, name, self.emas[name].model, ckpt / ema_file)
        state = load_training_state(ckpt / STATE_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_hyperparameters()
        ema_state = state["ema"]
        if set(ema_state) != set(parts):  # one part, as written before trainable parts
            ema_state = {"model": ema_state}
        for name, ema in self.emas.items():
            ema.load_state(ema_state[name])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        data = state["data"]
        if (data["seed"], data["batch_size"]) != (self.order.seed, self.order.batch_size):
            logger.warning("resuming with seed/batch_size %s instead of %s: the data order "
                           "differs from the interrupted run", (self.order.seed,
                           self.order.batch_size), (data["seed"], data["batch_size"]))
        self.last_checkpoint = ckpt
        logger.info("resumed from %s (step %d)", ckpt, self.step)

    def _check_frozen(self, manifest: dict, ckpt: Path) -> None:
        """The frozen parts must be the ones the checkpoint was trained with."""
        recorded = manifest.get("frozen", {})
        for name, part in self.frozen.items():
            was = recorded.get(name)
            if was is not None and was["sha256"] != part.sha256:
                raise CheckpointError(
                    f"cannot resume from {ckpt}: frozen part {name!r} has changed (trained with "
                    f"{was['source']} sha256 {was['sha256'][:12]}..., now {part.source} sha256 "
                    f"{part.sha256[:12]}...); resume with the same {name}")

    def _apply_hyperparameters(self) -> None:
        """After loading optimizer / scheduler states, use ``[train]``'s lr, betas, eps and
        weight decay (so ``--resume --set train.lr=...`` takes effect; unchanged values give
        bitwise the same numbers as before the interruption)."""
        t = self.cfg.train
        self.scheduler.base_lrs = [t.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, decay in zip(self.optimizer.param_groups, (t.weight_decay, 0.0)):
            group.update(lr=t.lr * factor, initial_lr=t.lr, betas=tuple(t.adam_betas),
                         eps=t.adam_eps, weight_decay=decay)

    def training_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": {name: ema.state() for name, ema in self.emas.items()},
            "rng": {"torch_cpu": torch.get_rng_state()},
            "data": {"seed": self.order.seed, "batch_size": self.order.batch_size,
                     "samples_seen": self.step * self.order.batch_size,
                     "epoch": self.order.epoch_of(self.step)},
        }

    # ----- the loop ---------------------------------------------------------------------------
    def fit(self, time_limit: float | None = None, catch_signals: bool = True) -> TrainResult:
        """Train until ``train.steps`` (or ``time_limit`` seconds), checkpointing on the way.

        With ``catch_signals`` (from the main thread), SIGINT / SIGTERM stop the run after the
        current step with a checkpoint (:mod:`difflab.training.interrupt`); a second one aborts.
        """
        from difflab.training.interrupt import StopSignals

        t, acc = self.cfg.train, self.acc
        if acc.is_main_process:
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
        metrics = MetricsLogger(self.run_dir, acc.is_main_process, t.tensorboard, self.step)
        bar = Progress(t.steps, self.step, acc.is_main_process, self.progress_flag)
        batches = iter(micro_batches(self.dataset, self.order, self.step, t.steps,
                                     acc.process_index, self.cfg.data.num_workers))
        gen = torch.Generator(device=acc.device)
        start = tick = time.monotonic()
        window: list[float] = []
        stopped, last, preview_s = "done", None, 0.0
        signals = StopSignals(catch_signals)
        try:
            with signals:
                while self.step < t.steps:
                    out_of_time = (time_limit is not None
                                   and time.monotonic() - start - preview_s > time_limit)
                    lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                    loss, grad_norm, stop = self._train_step(
                        batches, gen, out_of_time, signals.received is not None)
                    self.step += 1
                    for name, ema in self.emas.items():
                        ema.update(self.parts[name])
                    bar.update()
                    window.append(loss)
                    final = self.step == t.steps or stop
                    if self.step % t.log_every == 0 or final:
                        now = time.monotonic()
                        last = sum(window) / len(window)
                        record = {"step": self.step, "loss": last, "lr": lr,
                                  "images_per_s": len(window) * t.batch_size
                                  / max(now - tick, 1e-9),
                                  "grad_norm": grad_norm, "epoch": self.order.epoch_of(self.step)}
                        metrics.log(record)
                        bar.report(record)
                        window, tick = [], now
                    saved = self.step % t.checkpoint_every == 0 or final
                    if saved:
                        self.save()  # before the preview: a failing preview loses no training
                    interrupted = stop and signals.received is not None
                    if (t.sample_every and (self.step % t.sample_every == 0 or final)
                            and not interrupted):
                        t0 = time.monotonic()
                        self._preview(bar, signals)
                        preview_s += time.monotonic() - t0
                        tick += time.monotonic() - t0
                        if signals.received is not None and not stop:  # stopped in a preview
                            if not saved:
                                self.save()
                            interrupted = stop = True
                    if interrupted:
                        stopped = "interrupted"
                        bar.write(f"stopped by {signals.name} at step {self.step}: saved "
                                  f"{self.last_checkpoint} (weights, EMA, optimizer, RNG)")
                        break
                    if stop:
                        stopped = "time_limit"
                        bar.write(f"time limit of {time_limit:.0f} s reached at step {self.step}")
                        break
        except KeyboardInterrupt:
            if acc.is_main_process:
                bar.write(f"aborted at step {self.step}; the last complete checkpoint is "
                          f"{self.last_checkpoint or 'none'}")
            raise
        finally:
            metrics.close()
            bar.close()
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, last,
                           time.monotonic() - start - preview_s, stopped, preview_s,
                           signals.name)

    def _preview(self, bar: Progress, signals) -> None:
        """The preview grid, with a message (and a bar on a terminal); a stop signal during it
        abandons the grid (the training state is what matters)."""
        from difflab.training.interrupt import PreviewInterrupted

        if self.acc.is_main_process:
            req = self.preview_request()
            bar.write(f"step {self.step}: sampling the preview grid ({req.n} images, "
                      f"{req.sampler} {req.steps} steps) -> samples/step_{self.step}.png")
        signals.in_preview = True
        try:
            self.sample_grid(progress=bar.bar is not None)
        except PreviewInterrupted:
            bar.write(f"preview grid of step {self.step} abandoned")
        finally:
            signals.in_preview = False

    def _train_step(self, batches, gen: torch.Generator, out_of_time: bool,
                    interrupted: bool = False) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm, stop).

        ``stop`` is agreed by every process: any one out of time or interrupted stops all."""
        t, acc = self.cfg.train, self.acc
        rank, losses = acc.process_index, []
        fork = [acc.device] if acc.device.type != "cpu" else []
        for micro in range(t.grad_accum):
            x, cond = next(batches)
            x = x.to(acc.device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            gen.manual_seed(mix_seed(t.seed, 1, self.step, micro, rank))
            self.task.step = self.step  # (a loss that changes with the step: GAN warm-up)
            with acc.accumulate(*self.prepared.values()):
                with torch.random.fork_rng(devices=fork, device_type=acc.device.type):
                    torch.manual_seed(mix_seed(t.seed, 2, self.step, micro, rank))
                    loss = self.task.loss(self.prepared, x, cond, gen).mean()
                acc.backward(loss)
                losses.append(loss.detach())
                if acc.sync_gradients:
                    clip = t.grad_clip if t.grad_clip > 0 else math.inf
                    params = [p for m in self.prepared.values() for p in m.parameters()]
                    grad_norm = acc.clip_grad_norm_(params, clip)
                    stats = torch.stack([torch.stack(losses).mean().float(),
                                         torch.as_tensor(grad_norm, device=acc.device).float(),
                                         torch.tensor(float(out_of_time or interrupted),
                                                      device=acc.device)])
                    if acc.num_processes > 1:
                        stats = acc.reduce(stats, "mean")  # stop > 0 when any process stops
                    loss_v, norm_v, stop = (float(v) for v in stats.cpu())
                    self._guard(loss_v, norm_v)
                    self.prepared_optimizer.step()
                    self.scheduler.step()
                    self.prepared_optimizer.zero_grad(set_to_none=True)
        return loss_v, norm_v, stop > 0

    def _guard(self, loss: float, grad_norm: float) -> None:
        fp16 = self.cfg.train.mixed_precision == "fp16"  # the loss scaler skips inf gradients
        if math.isfinite(loss) and (fp16 or math.isfinite(grad_norm)):
            return
        t = self.cfg.train
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        if self.last_checkpoint is not None:
            then = f"continue with: difflab train --resume {self.run_dir} --set train.lr=..."
        else:  # nothing to resume: start the run again
            then = (f"start again (nothing to resume) with: difflab train CONFIG --out "
                    f"{self.run_dir}-2 --set train.lr=...")
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: loss={loss}, grad_norm={grad_norm}. "
            f"The weights were not updated with it and {where}. Try a lower train.lr (now "
            f"{t.lr:g}), gradient clipping (train.grad_clip, now {t.grad_clip:g}), more "
            f"train.warmup_steps (now {t.warmup_steps}) or train.mixed_precision='no' (now "
            f"{t.mixed_precision!r}); then {then}"
        )

    # ----- outputs ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write ``checkpoints/step_N`` (main process) and wait for every process: each
        trainable part's weights and EMA, the training state, and the frozen parts by name."""
        if not all(bool(torch.isfinite(p).all()) for m in self.parts.values()
                   for p in m.parameters()):
            raise TrainingDiverged(  # checked on every process (same weights), so none hangs
                f"the weights became non-finite at step {self.step}; no checkpoint was written "
                f"and the last good one is {self.last_checkpoint}. Try a lower train.lr "
                f"(now {self.cfg.train.lr:g}) or gradient clipping (train.grad_clip)")
        self.task.before_checkpoint(self.parts, self.emas)
        if self.acc.is_main_process:
            meta = {"config": (self.run_dir / CONFIG_FILE).read_text()}
            weights = {name: (state_dict_cpu(m), state_dict_cpu(self.emas[name].model))
                       for name, m in self.parts.items()}
            main = weights.pop("model", (None, None))
            self.last_checkpoint = save_checkpoint(
                self.ckpt_root, self.step, main[0], main[1], self.training_state(),
                keep=self.cfg.train.keep_checkpoints, metadata=meta, parts=weights,
                part_metadata=self.task.part_metadata(),
                frozen={k: p.record() for k, p in self.frozen.items()})
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            self.last_checkpoint = self.ckpt_root / f"step_{self.step}"
        return self.last_checkpoint

    def preview_request(self, progress: bool = False):
        """The :class:`~difflab.sampling.SampleRequest` of a training preview: the EMA model
        with the ``[sample]`` settings, except the solver: ``train.preview_sampler`` /
        ``preview_steps`` (a 20-step DPM-Solver++ by default; ``"sample"`` keeps ``[sample]``'s).
        Classifier-free guidance only: a preview loads no other run."""
        from difflab.guidance.spec import parse_guidance
        from difflab.sampling import LoadedRun, SampleRequest

        s, t = self.cfg.sample, self.cfg.train
        guidance = s.guidance
        if guidance is not None and parse_guidance(guidance).kind != "cfg":
            guidance = "none"
        model = LoadedRun.from_task(self.task, self.ema.model, self.last_checkpoint, self.step)
        own = t.preview_sampler == "sample"
        return SampleRequest(model, guidance=guidance,
                             sampler=s.sampler if own else t.preview_sampler,
                             steps=s.steps if own else t.preview_steps, n=s.n,
                             progress="preview grid" if progress else None)

    def sample_grid(self, progress: bool = False) -> Path | None:
        """``samples/step_N.png`` from the EMA model (:meth:`preview_request`)."""
        from difflab.sampling import generate

        out = None
        if self.acc.is_main_process:
            n = self.cfg.sample.n
            x = generate(self.preview_request(progress)).images
            out = save_image_grid(x.clamp(-1, 1), self.run_dir / "samples" /
                                  f"step_{self.step}.png", nrow=math.ceil(math.sqrt(n)))
        self.acc.wait_for_everyone()
        return out


def train(cfg: Config, run_dir: str | Path, resume: bool = False,
          time_limit: float | None = None, progress: bool | None = None) -> TrainResult:
    """Build the config's task and a :class:`Trainer`, and run it (``difflab train``)."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).fit(time_limit)
