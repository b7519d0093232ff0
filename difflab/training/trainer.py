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

from difflab.builders import (
    build_dataset,
    build_denoiser,
    build_model,
    build_objective,
    build_path,
    resolve_data_fields,
    resolve_text_fields,
)
from difflab.cond import Cond
from difflab.config import Config, save_config
from difflab.data import save_image_grid
from difflab.errors import DifflabError
from difflab.training.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    list_checkpoints,
    load_training_state,
    load_weights,
    remove_partial,
    resumable_checkpoint,
    save_checkpoint,
    state_dict_cpu,
)
from difflab.training.conditioning import Conditioner, preview_inputs
from difflab.training.data import BatchOrder, micro_batches, mix_seed
from difflab.training.ema import EMA
from difflab.training.logging import MetricsLogger, Progress
from difflab.training.sampling import CONFIG_FILE, generate, sampling_grid

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
    seconds: float
    stopped: str  # "done" or "time_limit"


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


def _adamw(net: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with decay on tensors of rank >= 2 only (norm gains and biases are not decayed)."""
    t = cfg.train
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kw = dict(lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - device without fused
        return torch.optim.AdamW(groups, foreach=True, **kw)


class Trainer:
    """Train the model of a config into ``run_dir``.

    Args:
        cfg: the run's configuration.
        run_dir: the run folder (``config.toml``, ``checkpoints/``, ``samples/``, logs).
        resume: continue from the newest complete checkpoint in ``run_dir``.
        accelerator: an ``Accelerator`` (default: :func:`make_accelerator`).
        progress: show a progress bar (None: on a TTY only).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False,
                 accelerator: Accelerator | None = None, progress: bool | None = None) -> None:
        self.acc = accelerator or make_accelerator(cfg)
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.progress_flag = progress
        self.dataset = build_dataset(cfg)
        self.cfg = resolve_text_fields(resolve_data_fields(cfg, self.dataset))
        t = self.cfg.train
        if not resume and list_checkpoints(self.ckpt_root):
            raise DifflabError(f"{self.run_dir} already holds checkpoints: continue it with "
                               f"--resume {self.run_dir}, or choose another --out")
        self.order = BatchOrder(len(self.dataset), t.seed, t.batch_size, t.grad_accum,
                                self.acc.num_processes)
        self.path = build_path(self.cfg)
        self.objective = build_objective(self.cfg)
        self.conditioner = self._conditioner()
        if t.sample_every and self.cfg.model.arch != "unet":
            raise DifflabError(f"train.sample_every={t.sample_every}: a model.arch="
                               f"{self.cfg.model.arch!r} network does not generate images; set "
                               "train.sample_every=0")
        if t.sample_every:  # fail now, on every process, rather than at the first preview
            s = self.cfg.sample
            sampling_grid(self.path, s.steps, s.grid, s.grid_options)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on train.seed only
            torch.manual_seed(mix_seed(t.seed, 0))
            net = build_model(self.cfg).to(self.acc.device)
        if t.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.ema = EMA(net, t.ema_decay, t.ema_warmup)
        self.optimizer = _adamw(net, self.cfg)
        warm = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume(net)
        self.net = net
        self.model, self.prepared_optimizer = self.acc.prepare(net, self.optimizer)
        self.den = build_denoiser(self.cfg, self.model, self.path, check_finite=False)

    def _conditioner(self) -> Conditioner:
        """Class / caption conditioning; the main process encodes the captions into the cache
        first, then the others read it."""
        if not self.cfg.model.text_encoder:
            return Conditioner(self.cfg, device=self.acc.device)
        captions = getattr(self.dataset, "captions", None)
        if captions is None:
            raise DifflabError(f"model.text_encoder={self.cfg.model.text_encoder!r} needs "
                               f"captions but dataset {self.cfg.data.name!r} has none: give "
                               "data.captions (a TSV 'file<TAB>caption')")
        with self.acc.main_process_first():
            return Conditioner(self.cfg, captions, device=self.acc.device)

    # ----- resume -----------------------------------------------------------------------------
    def _resume(self, net: torch.nn.Module) -> None:
        if self.acc.is_main_process:
            remove_partial(self.ckpt_root)
        self.acc.wait_for_everyone()
        ckpt = resumable_checkpoint(self.ckpt_root)
        if ckpt is None:
            raise DifflabError(f"nothing to resume in {self.run_dir}: no complete checkpoint in "
                               f"{self.ckpt_root}")
        load_weights(net, ckpt / MODEL_FILE)
        load_weights(self.ema.model, ckpt / EMA_FILE)
        state = load_training_state(ckpt / STATE_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_hyperparameters()
        self.ema.load_state(state["ema"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        data = state["data"]
        if (data["seed"], data["batch_size"]) != (self.order.seed, self.order.batch_size):
            logger.warning("resuming with seed/batch_size %s instead of %s: the data order "
                           "differs from the interrupted run", (self.order.seed,
                           self.order.batch_size), (data["seed"], data["batch_size"]))
        self.last_checkpoint = ckpt
        logger.info("resumed from %s (step %d)", ckpt, self.step)

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
            "ema": self.ema.state(),
            "rng": {"torch_cpu": torch.get_rng_state()},
            "data": {"seed": self.order.seed, "batch_size": self.order.batch_size,
                     "samples_seen": self.step * self.order.batch_size,
                     "epoch": self.order.epoch_of(self.step)},
        }

    # ----- the loop ---------------------------------------------------------------------------
    def fit(self, time_limit: float | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``time_limit`` seconds), checkpointing on the way."""
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
        stopped, last = "done", None
        try:
            while self.step < t.steps:
                out_of_time = time_limit is not None and time.monotonic() - start > time_limit
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss, grad_norm, stop = self._train_step(batches, gen, out_of_time)
                self.step += 1
                self.ema.update(self.net)
                bar.update()
                window.append(loss)
                final = self.step == t.steps or stop
                if self.step % t.log_every == 0 or final:
                    now = time.monotonic()
                    last = sum(window) / len(window)
                    record = {"step": self.step, "loss": last, "lr": lr,
                              "images_per_s": len(window) * t.batch_size / max(now - tick, 1e-9),
                              "grad_norm": grad_norm, "epoch": self.order.epoch_of(self.step)}
                    metrics.log(record)
                    bar.report(record)
                    window, tick = [], now
                if t.sample_every and (self.step % t.sample_every == 0 or final):
                    self.sample_grid()
                if self.step % t.checkpoint_every == 0 or final:
                    self.save()
                if stop:
                    stopped = "time_limit"
                    bar.write(f"time limit of {time_limit:.0f} s reached at step {self.step}")
                    break
        finally:
            metrics.close()
            bar.close()
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, last,
                           time.monotonic() - start, stopped)

    def _train_step(self, batches, gen: torch.Generator, out_of_time: bool
                    ) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (loss, grad norm, stop)."""
        t, acc = self.cfg.train, self.acc
        rank, losses = acc.process_index, []
        fork = [acc.device] if acc.device.type != "cpu" else []
        for micro in range(t.grad_accum):
            x, cond = next(batches)
            x = x.to(acc.device, non_blocking=True)
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            gen.manual_seed(mix_seed(t.seed, 1, self.step, micro, rank))
            cond = self._cond(cond, gen)
            with acc.accumulate(self.model):
                with torch.random.fork_rng(devices=fork, device_type=acc.device.type):
                    torch.manual_seed(mix_seed(t.seed, 2, self.step, micro, rank))
                    loss = self.objective(self.den, x, cond, generator=gen).mean()
                acc.backward(loss)
                losses.append(loss.detach())
                if acc.sync_gradients:
                    clip = t.grad_clip if t.grad_clip > 0 else math.inf
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
                    stats = torch.stack([torch.stack(losses).mean().float(),
                                         torch.as_tensor(grad_norm, device=acc.device).float(),
                                         torch.tensor(float(out_of_time), device=acc.device)])
                    if acc.num_processes > 1:
                        stats = acc.reduce(stats, "mean")
                    loss_v, norm_v, stop = (float(v) for v in stats.cpu())
                    self._guard(loss_v, norm_v)
                    self.prepared_optimizer.step()
                    self.scheduler.step()
                    self.prepared_optimizer.zero_grad(set_to_none=True)
        return loss_v, norm_v, stop > 0

    def _cond(self, cond: Cond, gen: torch.Generator) -> Cond | None:
        """The network's condition: class labels or caption embeddings, each dropped to the
        null condition with probability ``p_uncond`` (classifier-free guidance; Ho & Salimans
        2022, Alg. 1); see :class:`~difflab.training.conditioning.Conditioner`."""
        return self.conditioner.training(cond, gen, self.cfg.train.p_uncond)

    def _guard(self, loss: float, grad_norm: float) -> None:
        fp16 = self.cfg.train.mixed_precision == "fp16"  # the loss scaler skips inf gradients
        if math.isfinite(loss) and (fp16 or math.isfinite(grad_norm)):
            return
        t = self.cfg.train
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was written yet")
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: loss={loss}, grad_norm={grad_norm}. "
            f"The weights were not updated with it and {where}. Try a lower train.lr (now "
            f"{t.lr:g}), gradient clipping (train.grad_clip, now {t.grad_clip:g}), more "
            f"train.warmup_steps (now {t.warmup_steps}) or train.mixed_precision='no' (now "
            f"{t.mixed_precision!r}); then continue with: difflab train --resume {self.run_dir} "
            "--set train.lr=..."
        )

    # ----- outputs ----------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write ``checkpoints/step_N`` (main process) and wait for every process."""
        if not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
            raise TrainingDiverged(  # checked on every process (same weights), so none hangs
                f"the weights became non-finite at step {self.step}; no checkpoint was written "
                f"and the last good one is {self.last_checkpoint}. Try a lower train.lr "
                f"(now {self.cfg.train.lr:g}) or gradient clipping (train.grad_clip)")
        if self.acc.is_main_process:
            meta = {"config": (self.run_dir / CONFIG_FILE).read_text()}
            self.last_checkpoint = save_checkpoint(
                self.ckpt_root, self.step, state_dict_cpu(self.net), state_dict_cpu(self.ema.model),
                self.training_state(), keep=self.cfg.train.keep_checkpoints, metadata=meta)
        self.acc.wait_for_everyone()
        if not self.acc.is_main_process:
            self.last_checkpoint = self.ckpt_root / f"step_{self.step}"
        return self.last_checkpoint

    def sample_grid(self) -> Path | None:
        """``samples/step_N.png`` from the EMA model with the ``[sample]`` settings."""
        out = None
        if self.acc.is_main_process:
            s = self.cfg.sample
            den = build_denoiser(self.cfg, self.ema.model, self.path)
            m = self.cfg.model
            cond, null, guide = preview_inputs(self.cfg, self.conditioner, s.n)
            x = generate(den, (m.in_channels, m.image_size, m.image_size), s.n,
                         sampler=s.sampler, steps=s.steps, grid=s.grid,
                         grid_options=s.grid_options, options=s.options, seed=s.seed,
                         batch_size=s.batch_size, cond=cond, null_cond=null, guide=guide,
                         clip_x0=s.clip_x0)
            out = save_image_grid(x.clamp(-1, 1), self.run_dir / "samples" /
                                  f"step_{self.step}.png", nrow=math.ceil(math.sqrt(s.n)))
        self.acc.wait_for_everyone()
        return out


def train(cfg: Config, run_dir: str | Path, resume: bool = False,
          time_limit: float | None = None, progress: bool | None = None) -> TrainResult:
    """Build a :class:`Trainer` and run it (the ``difflab train`` command)."""
    return Trainer(cfg, run_dir, resume=resume, progress=progress).fit(time_limit)
