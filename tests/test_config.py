"""Tests of difflab.config: validation messages, ``--set`` overrides, round trips, builders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from difflab.builders import build_dataset, build_held_out, build_objective, build_path
from difflab.config import (
    Config,
    apply_overrides,
    config_to_toml,
    load_config,
    parse_override,
    save_config,
)
from difflab.denoiser import EDMPrecond
from difflab.errors import DifflabError
from difflab.paths import EDM, GVP, VE, CosineVP, DiscreteVP, Linear, LinearVP, SubVP
from difflab.tasks import make_task

REPO = Path(__file__).resolve().parents[1]


def error_of(overrides: list[str]) -> str:
    with pytest.raises(DifflabError) as info:
        load_config(None, overrides)
    return str(info.value)


# ----- unknown keys and bad values --------------------------------------------------------------
@pytest.mark.parametrize("item, key, allowed", [
    ("train.lrr=1e-3", "train.lrr", ["lr", "batch_size", "ema_decay"]),
    ("model.chanels=3", "model.chanels", ["model_channels", "preset", "family 'unet'"]),
    ("task.predction='v'", "task.predction", ["prediction", "p_uncond"]),
    ("sample.samplr='ddim'", "sample.samplr", ["sampler", "steps"]),
    ("trian.lr=1", "trian", ["train", "model", "path"]),
    ("objective.targt='v'", "objective.targt", ["target", "weighting", "time_sampler"]),
    ("data.holdot_fraction=0.1", "data.holdot_fraction", ["holdout_fraction", "root"]),
    ("sample.options.etaa=0.1", "sample.options.etaa", ["eta"]),
])
def test_unknown_key_names_the_dotted_key_and_the_allowed_keys(item, key, allowed):
    msg = error_of([item])
    assert f"{key}: unknown key" in msg
    for a in allowed:
        assert a in msg


def test_unknown_key_suggests_the_closest_name():
    assert "did you mean 'lr'" in error_of(["train.lrr=1e-3"])


def test_path_parameter_of_another_kind_is_rejected_with_the_kinds_parameters():
    msg = error_of(["path.kind='discrete_linear'", "path.sigma_max=80.0"])
    assert "path.sigma_max" in msg and "N, beta_start, beta_end" in msg


@pytest.mark.parametrize("item, key, hint", [
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.lr=-1e-4", "train.lr", "greater than 0"),
    ("train.batch_size=0", "train.batch_size", "greater than or equal to 1"),
    ("train.ema_decay=1.0", "train.ema_decay", "less than 1"),
    ("train.mixed_precision='fp8'", "train.mixed_precision", "'no', 'bf16' or 'fp16'"),
    ("train.adam_betas=[0.9, 1.5]", "train.adam_betas", "[0, 1)"),
    ("task.prediction='noise'", "task.prediction", "'eps'"),
    ("task.cond='label'", "task.cond", "'class'"),
    ("task.kind='banana'", "task.kind", "diffusion"),
    ("model.dropout=1.0", "model.dropout", "family 'unet'"),
    ("model.num_res_blocks='two'", "model.num_res_blocks", "valid integer"),
    ("model.preset='huge'", "model.preset", "tiny"),
    ("model.arch='resnet'", "model.arch", "unet"),
    ("path.N=0", "path.N", "greater than or equal to 1"),
    ("path.kind='vp'", "path.kind", "discrete_linear"),
    ("sample.sampler='nope'", "sample.sampler", "ddim"),
    ("sample.grid='random'", "sample.grid", "karras"),
    ("data.name='imagenet'", "data.name", "digits"),
    ("objective.name='gan'", "objective.name", "denoising"),
    ("data.split='val'", "data.split", "'train'"),
])
def test_out_of_range_value_names_key_and_accepted_values(item, key, hint):
    msg = error_of([item])
    assert key in msg and hint in msg


def test_every_error_is_reported_at_once_on_one_line():
    msg = error_of(["train.lr=-1", "train.steps=0"])
    assert "train.lr" in msg and "train.steps" in msg and "\n" not in msg


# ----- --set parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize("item, keys, value", [
    ("train.lr=1e-4", ["train", "lr"], 1e-4),
    ("train.steps=20", ["train", "steps"], 20),
    ("train.ema_warmup=false", ["train", "ema_warmup"], False),
    ("model.channel_mult=[1, 2, 2]", ["model", "channel_mult"], [1, 2, 2]),
    ("data.root=../shared/data/mnist", ["data", "root"], "../shared/data/mnist"),
    ("data.root='a b'", ["data", "root"], "a b"),
    ("sample.options.eta = 0.5", ["sample", "options", "eta"], 0.5),
])
def test_parse_override_reads_toml_literals_else_strings(item, keys, value):
    assert parse_override(item) == (keys, value)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1"])
def test_malformed_override_is_rejected(item):
    with pytest.raises(DifflabError, match="--set"):
        parse_override(item)


def test_overrides_apply_in_order_and_create_sections():
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=2.0", "sample.options.eta=0.3",
                                                   "train.lr=3.0"])
    assert raw == {"train": {"lr": 3.0}, "sample": {"options": {"eta": 0.3}}}


def test_override_into_a_value_is_an_error():
    with pytest.raises(DifflabError, match="train.lr is a value"):
        apply_overrides({}, ["train.lr=1.0", "train.lr.x=2"])


def test_override_type_error_names_the_key():
    msg = error_of(["train.steps=many"])
    assert "train.steps='many'" in msg and "integer" in msg
    assert "train.steps" in error_of(["train.steps=1.5"])


def test_overrides_change_the_loaded_values(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("# comment\n[train]\nlr = 1e-3\nsteps = 5\n")
    cfg = load_config(f, ["train.steps=7", "model.preset=tiny"])
    assert (cfg.train.lr, cfg.train.steps, cfg.model.preset) == (1e-3, 7, "tiny")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(DifflabError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(DifflabError, match="bad.toml is not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[train]\nlrr = 1.0\n")
    with pytest.raises(DifflabError, match="wrong.toml.*train.lrr"):
        load_config(wrong)


# ----- round trip ---------------------------------------------------------------------------------
def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["model.channel_mult=[1, 2]", "sample.options.eta=0.5",
                             "data.holdout_fraction=0.3", "objective.target='v'",
                             "path.kind='vp_cosine'", "path.s=0.01"])
    out = save_config(cfg, tmp_path / "run" / "config.toml")
    assert load_config(out) == cfg
    assert "null" not in config_to_toml(cfg) and not list(tmp_path.glob("run/.*tmp*"))


@pytest.mark.parametrize("name", ["ddpm_digits", "ddpm_mnist", "iddpm_mnist", "cfg_mnist",
                                  "classifier_mnist", "clip_emoji", "t2i_emoji",
                                  "ae_kl_mnist", "ae_kl_emoji", "vq_emoji", "ldm_emoji"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert cfg.train.steps >= 1
    text = (REPO / "configs" / f"{name}.toml").read_text()
    assert text.startswith("#")  # the header says what it reproduces and how long it takes


# ----- builders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, cls, check", [
    (["path.kind='discrete_linear'", "path.N=10", "path.beta_end=0.05"], DiscreteVP,
     lambda p: p.N == 10 and math.isclose(float(p.betas[-1]), 0.05)),
    (["path.kind='discrete_cosine'", "path.N=20"], DiscreteVP, lambda p: p.N == 20),
    (["path.kind='discrete'", "path.betas=[0.1, 0.2]"], DiscreteVP,
     lambda p: p.betas.tolist() == [0.1, 0.2]),
    (["path.kind='vp_linear'", "path.beta_max=10.0"], LinearVP, lambda p: p.beta_max == 10.0),
    (["path.kind='vp_cosine'"], CosineVP, lambda p: True),
    (["path.kind='subvp'"], SubVP, lambda p: True),
    (["path.kind='ve'", "path.sigma_max=20.0"], VE, lambda p: p.sigma_max == 20.0),
    (["path.kind='edm'", "path.sigma_min=0.01"], EDM, lambda p: p.t_min == 0.01),
    (["path.kind='linear'"], Linear, lambda p: True),
    (["path.kind='gvp'", "path.t_min=0.01"], GVP, lambda p: p.t_min == 0.01),
])
def test_build_path_passes_the_parameters(sets, cls, check):
    path = build_path(load_config(None, sets))
    assert type(path) is cls and check(path)


class FakeData:
    channels, image_size, num_classes = 1, 8, 10

    def __len__(self) -> int:
        return 4


def test_model_fields_come_from_the_data_and_attention_scales():
    task = make_task(load_config(None, ["model.preset='tiny'"]), dataset=FakeData())
    uc = task.model_config
    # tiny: image_size 16 with attention at 8, so 8x8 data gets attention at 4
    assert (uc.image_size, uc.in_channels, uc.out_channels) == (8, 1, 1)
    assert uc.attention_resolutions == (4,) and uc.num_classes is None
    assert task.sample_shape == (1, 8, 8)
    cond = make_task(load_config(None, ["model.preset='tiny'", "task.cond='class'",
                                        "model.learn_sigma=true"]), dataset=FakeData())
    net = cond.build_model()
    x = torch.zeros(2, 1, 8, 8)
    assert net(x, torch.zeros(2)).shape == (2, 2, 8, 8)  # mean and variance channels
    assert net.config.num_classes == 10 and cond.wrap(net).learned_variance
    # the run's config.toml holds every resolved field
    assert cond.cfg.model.values()["num_classes"] == 10
    assert cond.cfg.model.values()["attention_resolutions"] == [4]


def test_model_field_that_disagrees_with_the_data_is_an_error():
    cfg = load_config(None, ["model.image_size=16"])
    with pytest.raises(DifflabError, match="model.image_size=16 does not match"):
        make_task(cfg, dataset=FakeData())

    class NoLabels(FakeData):
        num_classes = None
    with pytest.raises(DifflabError, match="task.cond='class'"):
        make_task(load_config(None, ["task.cond='class'"]), dataset=NoLabels())


def test_model_keys_are_checked_against_the_named_family():
    msg = error_of(["task.kind='classifier'", "model.arch='classifier'", "model.learn_sigma=true"])
    assert "model.learn_sigma: unknown key" in msg and "family 'classifier'" in msg
    msg = error_of(["model.arch='classifier'", "task.kind='diffusion'"])  # it does not denoise
    assert "model.arch='classifier'" in msg and "denoiser" in msg
    msg = error_of(["task.kind='classifier'", "model.arch='classifier'", "task.prediction='v'"])
    assert "task.prediction does not apply to task kind 'classifier'" in msg
    assert "task.p_uncond" in error_of(["task.p_uncond=0.1"])  # nothing to drop
    assert "text_encoder" in error_of(["text_encoder.name='minilm'"])  # no text task


def test_version_1_configs_point_to_the_upgrade_command(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("[model]\nclass_cond = true\n")
    with pytest.raises(DifflabError, match="difflab upgrade FILE"):
        load_config(old)
    assert load_config(old, upgrade=True).task.cond == "class"


def test_build_denoiser_objective_and_dataset():
    cfg = load_config(None, ["model.preset='tiny'", "task.precond='edm'",
                             "task.sigma_data=0.3", "path.kind='edm'",
                             "objective.name='edm'", "data.holdout_fraction=0.5"])
    ds = build_dataset(cfg)
    held = build_dataset(cfg, split="test")
    assert len(ds) + len(held) == 1797 and abs(len(ds) - len(held)) < 20  # data.* reached it
    assert (ds.image_size, ds.channels) == (8, 1)
    task = make_task(cfg, dataset=ds)
    den = task.wrap(task.build_model())
    assert isinstance(den.precond, EDMPrecond) and den.precond.sigma_data == 0.3
    x0 = torch.zeros(3, 1, 8, 8)
    loss = build_objective(cfg)(den, x0, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (3,)


def test_held_out_data_is_what_the_run_never_trained_on():
    mnist = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")
    cfg = load_config("configs/ddpm_mnist.toml", [f"data.root={mnist!r}", "data.image_size=8"])
    train, held = build_dataset(cfg), build_held_out(cfg)
    assert len(train) == 9000 and len(held) == 1000  # the 10% per-class hold-out
    rows = {x.numpy().tobytes() for x in train.images}
    assert not any(x.numpy().tobytes() in rows for x in held.images)
    # the digits' own test split for a split="train" run; nothing when nothing is held out
    digits = load_config(None, ["data.holdout_fraction=0.25"])
    assert len(build_held_out(digits)) == len(build_dataset(digits, split="test")) > 400
    assert build_held_out(load_config(None, ["data.holdout_fraction=0.0"])) is None
    assert build_held_out(load_config(None, ["data.split='all'"])) is None
    # an MNIST run without a hold-out looks for the official test files (present here)
    plain = load_config("configs/ddpm_mnist.toml", [
        f"data.root={mnist!r}", "data.split='train'", "data.holdout_fraction=0.0"])
    assert len(build_held_out(plain)) == 10000


def test_defaults_are_valid():
    assert Config() == load_config(None)


@pytest.mark.parametrize("sets", [
    ["task.kind='classifier'", "model.arch='classifier'", "model.preset='tiny'"],
    ["task.cond='class'", "task.p_uncond=0.1", "model.preset='tiny'", "model.learn_sigma=true",
     "objective.name='hybrid'"],
])
def test_a_resolved_run_config_loads_back_equal(sets, tmp_path):
    task = make_task(load_config(None, sets), dataset=FakeData())
    out = save_config(task.cfg, tmp_path / "config.toml")
    assert load_config(out) == task.cfg
    assert make_task(load_config(out), for_training=False).model_config == task.model_config
