"""Checkpoint files: atomic layout, corruption detection, fallback, mismatch messages, SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from difflab.config import load_config
from difflab.sampling import load_run
from difflab.training import (
    CheckpointError,
    list_checkpoints,
    load_training_state,
    load_weights,
    read_safetensors,
    save_checkpoint,
    train,
    verify_checkpoint,
)
from difflab.training.checkpoint import remove_partial, resumable_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
    "train.keep_checkpoints=5", "train.tensorboard=false", "data.holdout_fraction=0.96",
]



def tiny(*sets: str):
    return load_config(None, [*TINY, *sets])


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}


def write(root: Path, step: int, **kw) -> Path:
    return save_checkpoint(root, step, small_state(step), small_state(step + 100),
                           {"step": step, "note": [1, 2.5, "x"]}, **kw)


# ----- layout and atomicity ---------------------------------------------------------------------
def test_checkpoint_round_trip_and_latest_marker(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert (tmp_path / "latest").read_text() == "step_4\n"
    ckpt = tmp_path / "step_4"
    assert verify_checkpoint(ckpt)["step"] == 4
    got = read_safetensors(ckpt / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in small_state(4).items())
    assert load_training_state(ckpt / "training_state.pt") == {"step": 4, "note": [1, 2.5, "x"]}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_rewriting_a_step_replaces_it(tmp_path):
    write(tmp_path, 2)
    save_checkpoint(tmp_path, 2, small_state(9), small_state(9), {"step": 2})
    got = read_safetensors(tmp_path / "step_2" / "model.safetensors")
    assert torch.equal(got["w"], small_state(9)["w"])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_non_finite_weights_are_never_written(tmp_path):
    bad = small_state()
    bad["b"][1] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite weights in \\['b'\\]"):
        save_checkpoint(tmp_path, 1, bad, small_state(), {})
    assert not list(tmp_path.iterdir())


def test_partial_writes_are_ignored_and_removed(tmp_path):
    write(tmp_path, 2)
    partial = tmp_path / "step_4.tmp-12345"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert resumable_checkpoint(tmp_path) == tmp_path / "step_2"
    assert remove_partial(tmp_path) == [partial] and not partial.exists()


# ----- corruption ---------------------------------------------------------------------------------
def test_truncated_safetensors_is_named_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    write(tmp_path, 2)
    write(tmp_path, 4)
    f = tmp_path / "step_4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"{f}.*truncated"):
        verify_checkpoint(tmp_path / "step_4")
    with pytest.raises(CheckpointError, match=f"{f} is truncated or corrupt"):
        read_safetensors(f)  # even without the manifest, the file is refused by name
    with caplog.at_level(logging.WARNING, logger="difflab.training"):
        assert resumable_checkpoint(tmp_path) == tmp_path / "step_2"
    assert "skipping checkpoint step_4" in caplog.text and "falling back" in caplog.text


def test_pruning_never_deletes_the_good_checkpoint_in_favour_of_a_corrupt_one(tmp_path, caplog):
    # a run fell back from a corrupt step_4 to step_2 and then wrote step_3 (e.g. a time limit)
    write(tmp_path, 2)
    write(tmp_path, 4)
    f = tmp_path / "step_4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="difflab.training"):
        write(tmp_path, 3, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    verify_checkpoint(tmp_path / "step_3")
    moved = tmp_path / "step_4.corrupt"
    assert len((moved / "model.safetensors").read_bytes()) == 40  # the same files, kept
    assert moved.is_dir() and not (tmp_path / "step_4").exists()  # renamed, not deleted
    assert "moved aside to" in caplog.text and "step_4.corrupt" in caplog.text
    # a second corrupt step_4 later does not overwrite the first one moved aside
    write(tmp_path, 4)
    g = tmp_path / "step_4" / "ema.safetensors"
    g.write_bytes(g.read_bytes()[:40])
    assert resumable_checkpoint(tmp_path) == tmp_path / "step_3"
    assert moved.is_dir() and (tmp_path / "step_4.corrupt-2").is_dir()


def test_same_size_corruption_is_caught_by_the_hash(tmp_path):
    write(tmp_path, 1)
    f = tmp_path / "step_1" / "ema.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f} is corrupt: its SHA-256"):
        verify_checkpoint(tmp_path / "step_1")


def test_training_state_is_loaded_without_executing_code(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 1, "x": Evil()}, tmp_path / "training_state.pt")
    with pytest.raises(CheckpointError, match="training_state.pt cannot be read"):
        load_training_state(tmp_path / "training_state.pt")
    assert not marker.exists()


# ----- fitting a model ----------------------------------------------------------------------------
def test_architecture_mismatch_lists_the_tensors(tmp_path):
    small, big = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), nn.Sequential(
        nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2))
    save_checkpoint(tmp_path, 1, {k: v.clone() for k, v in small.state_dict().items()},
                    {k: v.clone() for k, v in small.state_dict().items()}, {})
    with pytest.raises(CheckpointError) as info:
        load_weights(big, tmp_path / "step_1" / "model.safetensors")
    msg = str(info.value)
    assert "0.weight: checkpoint (4, 3) vs model (5, 3)" in msg
    assert "1.weight: checkpoint (2, 4) vs model (2, 5)" in msg
    assert "missing from the checkpoint: 2.bias, 2.weight" in msg
    assert "model.safetensors" in msg and "[model] config" in msg


def test_a_run_loaded_with_another_architecture_fails_clearly(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=2"), run)
    cfg_file = run / "config.toml"
    cfg_file.write_text(cfg_file.read_text().replace("model_channels = 8",
                                                     "model_channels = 16"))
    with pytest.raises(CheckpointError, match="conv_in.weight: checkpoint \\(8, 1, 3, 3\\) vs "
                                              "model \\(16, 1, 3, 3\\)"):
        load_run(run)


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog):
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(tiny("train.steps=6"), straight)
    train(tiny("train.steps=4"), run)
    f = run / "checkpoints" / "step_4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="difflab.training"):
        train(tiny("train.steps=6"), run, resume=True)
    assert "step_4" in caplog.text and "moved aside" in caplog.text
    assert (run / "checkpoints" / "step_4.corrupt" / "model.safetensors").is_file()
    a = read_safetensors(straight / "checkpoints" / "step_6" / "model.safetensors")
    b = read_safetensors(run / "checkpoints" / "step_6" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2, still exact


# ----- a process killed mid-write -----------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_checkpoint_write_resumes_from_the_last_complete(tmp_path):
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in (*TINY, "train.steps=6")]
    env = dict(os.environ, DIFFLAB_TEST_SLOW_CHECKPOINT="4:120", OMP_NUM_THREADS="1")
    config = tmp_path / "empty.toml"
    config.write_text("# every key from --set\n")
    proc = subprocess.Popen([sys.executable, "-m", "difflab.cli", "train", str(config), "--out",
                             str(run), *sets], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(ckpts.glob("step_4.tmp-*/model.safetensors")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the checkpoint of step 4 never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert [s for s, _ in list_checkpoints(ckpts)] == [2]
    assert (ckpts / "latest").read_text().strip() == "step_2"
    result = train(tiny("train.steps=6"), run, resume=True)
    assert result.step == 6 and not list(ckpts.glob("*.tmp-*"))
    straight = tmp_path / "straight"
    train(tiny("train.steps=6"), straight)
    a = read_safetensors(straight / "checkpoints" / "step_6" / "model.safetensors")
    b = read_safetensors(ckpts / "step_6" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
