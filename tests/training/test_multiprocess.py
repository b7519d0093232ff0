"""Data-parallel training on the CPU: ``accelerate launch --multi_gpu --num_processes 2``.

(On a machine without CUDA the processes form a gloo group; accelerate's own ``--cpu`` flag
would start a single process.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.training import list_checkpoints, read_metrics, read_safetensors

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.steps=4", "train.log_every=1", "train.checkpoint_every=2",
    "train.tensorboard=false", "data.holdout_fraction=0.96", "train.sample_every=4",
    "sample.steps=3", "sample.n=4",
]


@pytest.mark.slow
def test_two_processes_train_and_only_the_main_one_writes(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("# keys come from --set\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no",
           "-m", "difflab.cli", "train", str(config), "--out", str(run),
           *[a for s in TINY for a in ("--set", s)]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 4 steps" in proc.stderr and proc.stderr.count("trained 4 steps") == 1
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]
    # one writer: every step logged once, no half-written leftovers
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert not list(run.rglob("*.tmp-*"))
    assert (run / "samples" / "step_4.png").is_file()
    manifest = json.loads((run / "checkpoints" / "step_4" / "manifest.json").read_text())
    assert manifest["step"] == 4
    weights = read_safetensors(run / "checkpoints" / "step_4" / "model.safetensors")
    assert weights and all(v.isfinite().all() for v in weights.values())
    # step 1's logged loss is the mean over both shards: rank r trained on micro-batch r of
    # the global batch, with its own noise stream (recomputed here from the same seeds)
    assert read_metrics(run)[0]["loss"] == pytest.approx(first_step_loss(run), rel=1e-5)


def first_step_loss(run: Path) -> float:
    from difflab.builders import build_dataset, build_objective
    from difflab.config import load_config
    from difflab.data import collate
    from difflab.tasks import make_task
    from difflab.training import BatchOrder, mix_seed

    cfg = load_config(run / "config.toml")
    t = cfg.train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(t.seed, 0))  # the initial weights of train.seed
        task = make_task(cfg, for_training=False)
        net = task.build_model()
    den = task.wrap(net)
    ds, objective = build_dataset(cfg), build_objective(cfg)
    order = BatchOrder(len(ds), t.seed, t.batch_size, t.grad_accum, num_processes=2)
    losses = []
    with torch.no_grad():
        for rank in (0, 1):
            x, _ = collate([ds[i] for i in order.indices(0, 0, rank)])
            gen = torch.Generator().manual_seed(mix_seed(t.seed, 1, 0, 0, rank))
            losses.append(objective(den, x, None, generator=gen).mean())
    return float(sum(losses) / 2)
