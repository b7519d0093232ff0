"""Training: the ``accelerate`` trainer of a task's parts, EMA, atomic checkpoints, logs.

Quick start::

    import difflab
    from difflab.config import load_config
    from difflab.training import train

    cfg = load_config("configs/ddpm_digits.toml", ["train.steps=200"])
    train(cfg, "runs/try")
    out = difflab.generate(difflab.SampleRequest("runs/try", sampler="ddim", steps=50, n=16))
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
    "MetricsLogger",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "check_compatible",
    "list_checkpoints",
    "load_training_state",
    "load_weights",
    "make_accelerator",
    "mix_seed",
    "read_metrics",
    "read_safetensors",
    "resolve_checkpoint",
    "resumable_checkpoint",
    "save_checkpoint",
    "train",
    "verify_checkpoint",
]
