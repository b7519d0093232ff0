"""Ctrl-C and SIGTERM: real signals to a real ``difflab train`` process. The first one
finishes the step, writes a checkpoint and says how to resume (and the resumed run is bitwise
the uninterrupted one); a second one aborts at once and leaves the last complete checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difflab.config import load_config
from difflab.training import list_checkpoints, read_safetensors, train, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
    "train.keep_checkpoints=5", "train.tensorboard=false", "data.holdout_fraction=0.96",
    "train.steps=50",
]



def start(tmp_path: Path, slow: str) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / "run"
    config = tmp_path / "empty.toml"
    config.write_text("# every key from --set\n")
    env = dict(os.environ, DIFFLAB_TEST_SLOW_CHECKPOINT=slow, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "difflab.cli", "train", str(config), "--out",
                             str(run), *(f"--set={s}" for s in TINY)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, run / "checkpoints"


def wait_for(proc: subprocess.Popen, pattern: str, ckpts: Path, what: str) -> None:
    deadline = time.monotonic() + 180
    while not list(ckpts.glob(pattern)):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{what} never started"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path, sig):
    # the signal arrives while step 2's checkpoint is being written: step 3 is still finished
    proc, ckpts = start(tmp_path, "2:3")
    wait_for(proc, "step_2.tmp-*/model.safetensors", ckpts, "the checkpoint of step 2")
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"{name} received: finishing this step" in err
    assert f"stopped by {name} at step 3: saved {ckpts / 'step_3'}" in err
    assert f"continue with: difflab train --resume {tmp_path / 'run'}" in err
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 3]
    assert (ckpts / "latest").read_text().strip() == "step_3"
    verify_checkpoint(ckpts / "step_3")
    assert not (tmp_path / "run" / "samples").exists()
    # resuming gives bitwise the weights of a run that was never interrupted
    cfg = load_config(None, [*TINY, "train.steps=5"])
    train(cfg, tmp_path / "run", resume=True, progress=False)
    train(cfg, tmp_path / "straight", progress=False)
    a = read_safetensors(tmp_path / "straight" / "checkpoints" / "step_5" / "ema.safetensors")
    b = read_safetensors(ckpts / "step_5" / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_interrupt_aborts_at_once_and_keeps_the_last_checkpoint(tmp_path):
    proc, ckpts = start(tmp_path, "2:3,3:120")
    wait_for(proc, "step_2.tmp-*/model.safetensors", ckpts, "the checkpoint of step 2")
    os.kill(proc.pid, signal.SIGINT)  # step 3 is finished and its checkpoint starts (slowly)
    wait_for(proc, "step_3.tmp-*/model.safetensors", ckpts, "the checkpoint of step 3")
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30  # not the 120 s the write would have taken
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "second interrupt: aborting now" in err
    assert f"the last complete checkpoint is {ckpts / 'step_2'}" in err
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert (ckpts / "latest").read_text().strip() == "step_2"
    verify_checkpoint(ckpts / "step_2")
    result = train(load_config(None, [*TINY, "train.steps=4"]), tmp_path / "run", resume=True,
                   progress=False)
    assert result.step == 4 and not list(ckpts.glob("*.tmp-*"))
