"""Training: the ``accelerate`` trainer, EMA, atomic checkpoints, logs, and sampling from runs.

Quick start::

    from difflab.config import load_config
    from difflab.training import train, load_run, generate

    cfg = load_config("configs/ddpm_digits.toml", ["train.steps=200"])
    train(cfg, "runs/try")
    run = load_run("runs/try")                       # EMA weights of the latest checkpoint
    x = generate(run.denoiser, run.sample_shape, 16, sampler="ddim", steps=50)
"""

from difflab.training.checkpoint import (
    CheckpointError,
    check_compatible,
    list_checkpoints,
    load_training_state,
    load_weights,
    read_safetensors,
    resolve_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from difflab.training.data import BatchOrder, mix_seed
from difflab.training.ema import EMA
from difflab.training.logging import MetricsLogger, read_metrics
from difflab.training.sampling import LoadedRun, generate, load_run, sampling_grid
from difflab.training.trainer import (
    Trainer,
    TrainingDiverged,
    TrainResult,
    make_accelerator,
    train,
)

__all__ = [
    "EMA",
    "BatchOrder",
    "CheckpointError",
    "LoadedRun",
    "MetricsLogger",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "check_compatible",
    "generate",
    "list_checkpoints",
    "load_run",
    "load_training_state",
    "load_weights",
    "make_accelerator",
    "mix_seed",
    "read_metrics",
    "read_safetensors",
    "resolve_checkpoint",
    "resumable_checkpoint",
    "sampling_grid",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]
