"""End-to-end tests of the trainer on the tiny U-Net and 8x8 digits (a handful of steps each)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.sampling import load_run
from difflab.training import (
    Trainer,
    TrainingDiverged,
    list_checkpoints,
    read_metrics,
    read_safetensors,
    train,
)

TINY = [
    "model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
    "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=2",
    "train.keep_checkpoints=2", "train.ema_decay=0.9", "train.tensorboard=false",
    "train.lr=1e-3", "data.holdout_fraction=0.96",  # ~72 training digits: epochs of 9 steps
    "sample.steps=3", "sample.n=4",
]



def tiny(*sets: str):
    return load_config(None, [*TINY, *sets])


def weights(run, step, name="model.safetensors"):
    return read_safetensors(run / "checkpoints" / f"step_{step}" / name)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Twelve uninterrupted steps with dropout and warm-up (crosses an epoch boundary)."""
    run = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    train(tiny("train.steps=12", "model.dropout=0.1", "train.warmup_steps=5",
               "train.sample_every=6", "train.tensorboard=true"), run)
    return run


def test_run_folder_holds_config_checkpoints_metrics_and_samples(straight):
    cfg = load_config(straight / "config.toml")
    assert (cfg.model.image_size, cfg.model.in_channels, cfg.train.steps) == (8, 1, 12)
    assert [s for s, _ in list_checkpoints(straight / "checkpoints")] == [10, 12]  # keep 2
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_12"
    for step in (10, 12):
        files = {p.name for p in (straight / "checkpoints" / f"step_{step}").iterdir()}
        assert files == {"model.safetensors", "ema.safetensors", "training_state.pt",
                         "manifest.json"}
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for r in records:
        assert {"step", "loss", "lr", "images_per_s", "grad_norm"} <= set(r)
        assert math.isfinite(r["loss"]) and r["images_per_s"] > 0
    # the warm-up is linear over 5 steps: the lr of step k is lr * min(1, k / 5)
    assert records[0]["lr"] == pytest.approx(1e-3 * 2 / 5)
    assert records[-1]["lr"] == pytest.approx(1e-3)
    assert list((straight / "tb").glob("events.out.tfevents.*"))
    for step in (6, 12):  # 4 samples of 8x8, 2 per row, 2 px padding
        assert Image.open(straight / "samples" / f"step_{step}.png").size == (22, 22)
    assert not list(straight.rglob("*.tmp-*"))


def test_weights_are_a_function_of_the_seed(straight, tmp_path):
    torch.manual_seed(123)  # the caller's global RNG must not matter
    train(tiny("train.steps=2", "model.dropout=0.1", "train.warmup_steps=5",
               "train.checkpoint_every=1"), tmp_path / "a")
    other = tiny("train.steps=2", "model.dropout=0.1", "train.warmup_steps=5", "train.seed=1")
    train(other, tmp_path / "b")
    a, b = weights(tmp_path / "a", 2), weights(tmp_path / "b", 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(999)
    train(tiny("train.steps=2", "model.dropout=0.1", "train.warmup_steps=5"), tmp_path / "c")
    assert_bitwise_equal(a, weights(tmp_path / "c", 2))


def test_resume_is_bitwise_exact(straight, tmp_path):
    run = tmp_path / "resumed"
    sets = ("model.dropout=0.1", "train.warmup_steps=5", "train.sample_every=6")
    train(tiny("train.steps=4", *sets), run)
    torch.manual_seed(7)  # disturb the global RNG between the two halves
    result = train(tiny("train.steps=12", *sets), run, resume=True)
    assert result.step == 12
    assert_bitwise_equal(weights(straight, 12), weights(run, 12))
    assert_bitwise_equal(weights(straight, 12, "ema.safetensors"),
                         weights(run, 12, "ema.safetensors"))
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(straight)]


def test_resume_after_a_lost_tail_repeats_the_steps_exactly(straight, tmp_path):
    """Steps logged after the last checkpoint (lost in a crash) are redone, logged once."""
    run = tmp_path / "crashed"
    sets = ("model.dropout=0.1", "train.warmup_steps=5")
    train(tiny("train.steps=12", *sets), run)
    for step in (12,):
        shutil.rmtree(run / "checkpoints" / f"step_{step}")
    (run / "checkpoints" / "latest").write_text("step_12\n")  # a marker left pointing nowhere
    train(tiny("train.steps=12", *sets), run, resume=True)
    assert_bitwise_equal(weights(straight, 12), weights(run, 12))
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6, 8, 10, 12]


def test_new_run_refuses_a_folder_with_checkpoints(straight):
    with pytest.raises(DifflabError, match="--resume"):
        train(tiny("train.steps=1"), straight)


def test_a_bad_preview_grid_fails_before_training(tmp_path):
    with pytest.raises(DifflabError, match="steps=2000"):
        train(tiny("train.steps=2", "train.sample_every=1", "train.preview_steps=2000"), tmp_path)
    with pytest.raises(DifflabError, match="steps=2000"):
        train(tiny("train.steps=2", "train.sample_every=1", "train.preview_sampler='sample'",
                   "sample.steps=2000"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_the_preview_grid_is_fast_announced_and_timed_apart(tmp_path, capsys):
    # [sample] asks for 1000-step DDPM (the paper's sampler); the preview uses 20 solver steps
    cfg = tiny("train.steps=2", "train.sample_every=2", "sample.sampler='ddpm'",
               "sample.steps=1000", "sample.n=4")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    req = trainer.preview_request()
    assert (req.sampler, req.steps, req.n) == ("dpmpp_2m", 20, 4)
    result = trainer.fit()
    err = capsys.readouterr().err
    assert "step 2: sampling the preview grid (4 images, dpmpp_2m 20 steps)" in err
    assert (tmp_path / "run" / "samples" / "step_2.png").is_file()
    assert result.preview_seconds > 0 and result.seconds > 0
    own = Trainer(tiny("train.preview_sampler='sample'", "sample.sampler='ddpm'",
                       "sample.steps=1000"), tmp_path / "own").preview_request()
    assert (own.sampler, own.steps) == ("ddpm", 1000)
    with pytest.raises(DifflabError, match="train.preview_sampler='banana'.*'sample'"):
        tiny("train.preview_sampler='banana'")


def test_resume_without_checkpoints_is_an_error(tmp_path):
    with pytest.raises(DifflabError, match="nothing to resume"):
        train(tiny("train.steps=1"), tmp_path, resume=True)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "diverge"
    train(tiny("train.steps=2"), run)
    before = weights(run, 2)
    with pytest.raises(TrainingDiverged) as info:
        train(tiny("train.steps=8", "train.lr=1e30", "train.grad_clip=0"), run, resume=True)
    msg = str(info.value)
    assert "diverged at step" in msg and "train.lr" in msg and "step_2" in msg
    step = int(msg.split("diverged at step ")[1].split(":")[0])
    assert 3 <= step <= 8
    # every checkpoint on disk is finite, and step_2 is untouched
    for _, ckpt in list_checkpoints(run / "checkpoints"):
        for name in ("model.safetensors", "ema.safetensors"):
            assert all(torch.isfinite(v).all() for v in
                       read_safetensors(ckpt / name).values())
    assert_bitwise_equal(before, weights(run, 2))
    assert f"continue with: difflab train --resume {run}" in msg


def test_divergence_before_the_first_checkpoint_says_start_again(tmp_path):
    """``--resume`` would answer "nothing to resume": the hint is to start the run again."""
    run = tmp_path / "early"
    with pytest.raises(TrainingDiverged) as info:
        train(tiny("train.steps=8", "train.lr=1e30", "train.grad_clip=0",
                   "train.checkpoint_every=100"), run)
    msg = str(info.value)
    assert "no checkpoint was written yet" in msg and "--resume" not in msg
    assert f"difflab train CONFIG --out {run}-2" in msg
    with pytest.raises(DifflabError, match="nothing to resume"):
        train(tiny("train.steps=8"), run, resume=True)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """lr = 1e39 overflows float32 in the first update while that step's loss was finite."""
    with pytest.raises(TrainingDiverged, match="weights became non-finite at step 1"):
        train(tiny("train.steps=3", "train.lr=1e39", "train.grad_clip=0",
                   "train.checkpoint_every=1"), tmp_path / "inf")
    assert not list_checkpoints(tmp_path / "inf" / "checkpoints")


def test_nan_data_is_caught_on_the_first_step(tmp_path, monkeypatch):
    from difflab.data import Digits

    real = Digits._image

    def poisoned(self, index):
        return real(self, index) * float("nan")

    monkeypatch.setattr(Digits, "_image", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 1:.*no checkpoint was written yet"):
        train(tiny("train.steps=3"), tmp_path / "nan")
    assert not list_checkpoints(tmp_path / "nan" / "checkpoints")


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    result = train(tiny("train.steps=1000", "train.checkpoint_every=500"), tmp_path / "t",
                   time_limit=0.0)
    assert (result.stopped, result.step) == ("time_limit", 1)
    assert [s for s, _ in list_checkpoints(tmp_path / "t" / "checkpoints")] == [1]


def test_class_conditional_accumulation_and_bf16(tmp_path):
    """Labels reach the network (with CFG label dropout), accumulation splits the batch."""
    run = tmp_path / "cond"
    cfg = tiny("train.steps=2", "task.cond='class'", "task.p_uncond=0.2",
               "train.grad_accum=2", "train.mixed_precision='bf16'", "objective.target='v'",
               "task.prediction='v'")
    result = train(cfg, run)
    assert result.step == 2 and math.isfinite(result.loss)
    loaded = load_run(run)
    assert loaded.net.config.num_classes == 10 and loaded.config.train.mixed_precision == "bf16"
    bad = tiny("train.steps=1", "train.grad_accum=3")  # 8 is not divisible by 3
    with pytest.raises(DifflabError, match="divisible"):
        train(bad, tmp_path / "bad")


def test_learned_variance_with_the_hybrid_loss(tmp_path):
    cfg = tiny("train.steps=2", "path.kind='discrete_cosine'", "path.N=100",
               "model.learn_sigma=true", "objective.name='hybrid'",
               "sample.sampler='ddpm'", "sample.options.variance='learned'",
               "train.sample_every=2")
    result = train(cfg, tmp_path / "iddpm")
    assert math.isfinite(result.loss)
    assert (tmp_path / "iddpm" / "samples" / "step_2.png").is_file()
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 2
