"""Conditioning and guidance end to end: class / caption conditions in training (with condition
dropout), the guidance strings of ``difflab sample``, and their bad inputs. Each guided sample
is checked against the same transform composed by hand with the same noise."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from difflab import cli
from difflab.cond import Cond
from difflab.config import config_from_dict
from difflab.errors import DifflabError
from difflab.guidance import cfg as cfg_transform
from difflab.guidance import classifier as classifier_transform
from difflab.guidance.noisy_classifier import classifier_log_prob
from difflab.sampling import draw, guidance_inputs, load_run
from difflab.tasks import make_task


def generate(den, shape, n, *, sampler, steps, seed=0, cond=None, null_cond=None, guide=None,
             labels=None, clip_x0=False, batch_size=256):
    """The sampling loop of difflab.generate (difflab.sampling.draw) with default grid and
    options."""
    if labels is not None:
        cond = Cond(labels=torch.as_tensor(labels))
    return draw(den, shape, n, sampler=sampler, steps=steps, grid="auto", grid_options={},
                options={}, seed=seed, batch_size=batch_size, cond=cond, null_cond=null_cond,
                guide=guide, clip_x0=clip_x0)[0]


def guided_inputs(run, n, guidance, labels=None, prompts=None, negative_prompt=None):
    return guidance_inputs(run, n, "none" if guidance is None else guidance, labels, prompts,
                           negative_prompt)

REPO = Path(__file__).resolve().parents[2]
EMOJI = REPO.parent / "shared" / "data" / "emoji"
TINY = ["model.preset='tiny'", "model.model_channels=8", "model.num_heads=1",
        "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2",
        "train.tensorboard=false", "sample.steps=3"]


def sets(*items: str) -> list[str]:
    return [a for item in (*TINY, *items) for a in ("--set", item)]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    """A class-conditional digits model with condition dropout, 2 steps."""
    out = tmp_path_factory.mktemp("cls") / "run"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(out),
                     *sets("train.steps=2", "task.cond='class'", "task.p_uncond=0.2")]) == 0
    return out


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    from difflab.config import load_config
    from difflab.training import train

    out = tmp_path_factory.mktemp("noisy") / "run"
    raw = load_config(REPO / "configs" / "classifier_mnist.toml").model_dump(exclude_none=True)
    raw["data"] = {"name": "digits", "split": "train"}
    raw["model"].update(attention_resolutions=[], model_channels=8, num_head_channels=8)
    raw["train"].update(steps=2, batch_size=8, tensorboard=False)
    train(config_from_dict(raw), out, progress=False)
    return out


def test_cli_cfg_equals_the_transform_composed_by_hand(class_run, tmp_path):
    run = load_run(class_run)
    k = run.config.model.num_classes
    n = 6
    x = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3,
                 cond=Cond(labels=torch.full((n,), 3)), null_cond=Cond(labels=torch.full((n,), k)),
                 guide=lambda d, c, nc: cfg_transform(d, c, nc, 2.5))
    cond, null, guide = guided_inputs(run, n, "cfg:2.5", labels=[3])
    y = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3, cond=cond,
                 null_cond=null, guide=guide)
    assert torch.equal(x, y)
    # scale 1 is the plain conditional model; scale 0 the null-class (unconditional) branch
    plain = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3,
                     labels=torch.full((n,), 3))
    c1 = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3,
                  **dict(zip(("cond", "null_cond", "guide"),
                             guided_inputs(run, n, "cfg:1", labels=3))))
    assert torch.equal(plain, c1)
    uncond = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3,
                      labels=torch.full((n,), k))
    c0 = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=4, seed=3,
                  **dict(zip(("cond", "null_cond", "guide"),
                             guided_inputs(run, n, "cfg:0", labels=3))))
    torch.testing.assert_close(c0, uncond, atol=1e-5, rtol=0)


def test_cli_sample_with_class_and_guidance(class_run, tmp_path, capsys):
    assert cli.main(["sample", str(class_run), "--class", "3", "--class", "5", "--guidance",
                     "cfg:2:rescale=0.5", "--n", "4", "--steps", "3",
                     "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    for argv, words in [
        (["--class", "10"], "class=10 is not valid: expected a class id in [0, 10)"),
        (["--prompt", "a cat"], "class-conditional: use --class"),
        (["--guidance", "cfg"], "cfg needs a scale"),
        (["--guidance", "cfg:2:foo=1"], "unknown cfg option"),
        (["--guidance", "magic:2"], "unknown kind 'magic'"),
        (["--guidance", "classifier:2"], "classifier:RUN:SCALE"),
        (["--negative-prompt", "blurry"], "needs classifier-free guidance"),
    ]:
        assert cli.main(["sample", str(class_run), "--n", "2", "--steps", "2",
                         "--out", str(tmp_path / "x.png"), *argv]) == 2
        assert words in capsys.readouterr().err


def test_guidance_needs_a_conditional_model_and_warns_without_dropout(class_run, tmp_path):
    uncond = tmp_path / "u"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(uncond),
                     *sets("train.steps=1")]) == 0
    with pytest.raises(DifflabError, match="needs a conditional model"):
        guided_inputs(load_run(uncond), 2, "cfg:3")
    with pytest.raises(DifflabError, match="unconditional: --class / --prompt do not apply"):
        guided_inputs(load_run(uncond), 2, None, labels=[1])
    nodrop = tmp_path / "nd"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(nodrop),
                     *sets("train.steps=1", "task.cond='class'")]) == 0
    with pytest.warns(UserWarning, match="no unconditional branch"):
        guided_inputs(load_run(nodrop), 2, "cfg:3", labels=[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_inputs(load_run(class_run), 2, "cfg:3", labels=[1])  # p_uncond > 0: silent


def test_classifier_guidance_equals_the_transform_composed_by_hand(class_run, classifier_run):
    run, cls = load_run(class_run), load_run(classifier_run)
    k, n = run.config.model.num_classes, 4
    y = torch.tensor([1, 2, 3, 4])
    cond, null, guide = guided_inputs(run, n, f"classifier:{classifier_run}:1.5",
                                      labels=y.tolist())
    assert torch.equal(cond.labels, y) and torch.equal(null.labels, torch.full((n,), k))
    got = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=3, seed=1,
                   cond=cond, null_cond=null, guide=guide)

    def by_hand(den, c, nc):
        return classifier_transform(den.bind(nc), classifier_log_prob(cls.denoiser, c.labels),
                                    1.5)

    want = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=3, seed=1,
                    cond=Cond(labels=y), null_cond=Cond(labels=torch.full((n,), k)),
                    guide=by_hand)
    assert torch.equal(got, want)
    plain = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=3, seed=1,
                     labels=torch.full((n,), k))
    assert not torch.allclose(got, plain)  # the classifier's gradient did something


def test_classifier_guidance_bad_inputs(class_run, classifier_run, tmp_path, capsys):
    with pytest.raises(DifflabError, match="not a classifier run"):
        guided_inputs(load_run(class_run), 2, f"classifier:{class_run}:1", labels=[1])
    big = tmp_path / "big"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(big),
                     *sets("train.steps=1", "task.cond='class'", "task.p_uncond=0.1",
                           "data.image_size=16")]) == 0
    with pytest.raises(DifflabError, match="image_size"):
        guided_inputs(load_run(big), 2, f"classifier:{classifier_run}:1", labels=[1])
    # a classifier trained on another noise path would read x_t at the wrong noise level
    linear = tmp_path / "linear"
    assert cli.main(["train", str(REPO / "configs" / "ddpm_digits.toml"), "--out", str(linear),
                     *sets("train.steps=1", "task.cond='class'", "task.p_uncond=0.1",
                           'path={kind="discrete_linear"}')]) == 0
    with pytest.raises(DifflabError, match="'discrete_cosine'.*'discrete_linear'.*match"):
        guided_inputs(load_run(linear), 2, f"classifier:{classifier_run}:1", labels=[1])
    assert cli.main(["sample", str(classifier_run), "--n", "2", "--out",
                     str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "does not generate images" in err
    # the hint names this run as the guide of a diffusion run, the way that works
    assert f"difflab sample DIFFUSION_RUN --guidance classifier:{classifier_run}:SCALE" in err
    hint = f"classifier:{classifier_run}:2"
    assert cli.main(["sample", str(class_run), "--steps", "2", "--n", "2", "--label", "1",
                     "--guidance", hint, "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


# ----- text --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def emoji_subset(tmp_path_factory) -> Path:
    """24 real emoji with their captions, including skin-tone variants."""
    from difflab.data import read_captions

    caps = read_captions(EMOJI / "captions.tsv")
    names = sorted(n for n in caps if "thumbs up" in caps[n] or "red apple" in caps[n]
                   or "grinning face" in caps[n])[:24]
    root = tmp_path_factory.mktemp("emoji")
    for n in names:
        shutil.copy(EMOJI / "png72" / n, root / n)
    (root / "captions.tsv").write_text("file\tcaption\n" + "".join(f"{n}\t{caps[n]}\n"
                                                                   for n in names))
    return root


def _text_cfg(root: Path, **extra):
    raw = {"model": {"preset": "tiny", "model_channels": 8, "num_heads": 1,
                     **extra.pop("model", {})},
           "task": {"cond": "text", "p_uncond": 0.5, **extra.pop("task", {})},
           "text_encoder": {"name": "minilm", **extra.pop("text_encoder", {})},
           "data": {"name": "folder", "root": str(root), "image_size": 16},
           "train": {"batch_size": 8, "steps": 2, "tensorboard": False,
                     "log_every": 1, "checkpoint_every": 2}, **extra}
    return config_from_dict(raw)


def test_text_conditions_in_training(emoji_subset):
    from difflab.networks.text import load_text_encoder

    task = make_task(_text_cfg(emoji_subset))
    ds = task.dataset
    assert task.model_config.context_dim == 384
    cond_er = task.conditioner
    enc = load_text_encoder("minilm")
    caps = ds.captions[:6]
    c = cond_er.training(Cond(extra={"captions": caps}), None, 0.0)
    L = c.context.shape[1]
    want, mask = enc.encode(caps, pad_to=L)
    torch.testing.assert_close(c.context, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(c.context_mask, mask)
    # condition dropout replaces captions by the empty prompt at rate p_uncond
    captions = [caps[i % 6] for i in range(2000)]
    g = torch.Generator().manual_seed(0)
    d = cond_er.training(Cond(extra={"captions": captions}), g, 0.3)
    null, null_mask = enc.encode([""], pad_to=L)
    is_null = (d.context_mask == null_mask).all(1) & (d.context - null).abs().amax((1, 2)).lt(1e-5)
    assert abs(is_null.float().mean().item() - 0.3) < 0.035
    g.manual_seed(0)
    again = cond_er.training(Cond(extra={"captions": captions}), g, 0.3)
    assert torch.equal(again.context, d.context)
    with pytest.raises(DifflabError, match="needs captions"):
        cond_er.training(Cond(labels=torch.zeros(2, dtype=torch.long)), None, 0.0)


def test_text_prompts_negative_prompt_and_cycling(emoji_subset):
    from difflab.networks.text import load_text_encoder

    cond_er = make_task(_text_cfg(emoji_subset), for_training=False).conditioner
    enc = load_text_encoder("minilm")
    cond, null = cond_er.make(5, prompts=["red apple", "thumbs up"], negative_prompt="blurry")
    assert cond.context.shape[0] == 5 and null.context.shape == cond.context.shape
    want, _ = enc.encode(["red apple", "thumbs up", "red apple", "thumbs up", "red apple",
                          "blurry"])
    torch.testing.assert_close(cond.context, want[:5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(null.context[3], want[5], atol=1e-5, rtol=1e-4)
    _, empty = cond_er.make(2, prompts="red apple")
    assert empty.context_mask.sum(1).tolist() == [2, 2]  # "" = [CLS] [SEP]
    with pytest.raises(DifflabError, match="text-conditional: use --prompt"):
        cond_er.make(2, labels=[1])


def test_text_to_image_run_through_the_cli(emoji_subset, tmp_path, capsys):
    out = tmp_path / "t2i"
    cfg = REPO / "configs" / "t2i_emoji.toml"
    assert cli.main(["train", str(cfg), "--out", str(out), *sets(
        "train.steps=2", f"data.root='{emoji_subset}'", "data.image_size=16",
        "model.num_head_channels=8", "train.sample_every=2", "sample.n=4")]) == 0
    assert (out / "samples" / "step_2.png").is_file()
    run = load_run(out)
    assert run.config.model.context_dim == 384  # the resolved config records it
    assert run.net.config.context_dim == 384
    for argv in (["--prompt", "red apple", "--guidance", "cfg:3"],
                 ["--prompt", "thumbs up", "--negative-prompt", "red apple", "--guidance",
                  "cfg:2"]):
        assert cli.main(["sample", str(out), *argv, "--n", "2", "--steps", "2",
                         "--out", str(tmp_path / "p.png")]) == 0
    n = 3
    cond, null, guide = guided_inputs(run, n, "cfg:3", prompts=["red apple"],
                                      negative_prompt="thumbs up")
    got = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=3, seed=0,
                   cond=cond, null_cond=null, guide=guide)
    from difflab.networks.text import load_text_encoder

    ctx, mask = load_text_encoder("minilm").encode(["red apple", "thumbs up"])
    c = Cond(context=ctx[:1].expand(n, -1, -1), context_mask=mask[:1].expand(n, -1))
    nc = Cond(context=ctx[1:].expand(n, -1, -1), context_mask=mask[1:].expand(n, -1))
    want = generate(run.denoiser, run.sample_shape, n, sampler="ddim", steps=3, seed=0,
                    cond=c, null_cond=nc, guide=lambda d, a, b: cfg_transform(d, a, b, 3.0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cli.main(["sample", str(out), "--class", "1", "--n", "2", "--out",
                     str(tmp_path / "q.png")]) == 2
    assert "text-conditional: use --prompt" in capsys.readouterr().err


def test_text_config_errors(emoji_subset):
    with pytest.raises(DifflabError, match="text_encoder.*reads no text"):
        _text_cfg(emoji_subset, task={"cond": "class"})
    with pytest.raises(DifflabError, match="context_dim=64 does not match"):
        make_task(_text_cfg(emoji_subset, model={"context_dim": 64}))
    with pytest.raises(DifflabError, match="could not load text encoder"):
        make_task(_text_cfg(emoji_subset, text_encoder={"name": "nobody/no-model"}))


def test_alignment_model_trains_from_a_config(emoji_subset, tmp_path, capsys):
    """``model.arch = "alignment"``: the batch's captions arrive as pooled MiniLM sentence
    embeddings, the contrastive loss trains it, and SDG reads it back from the run."""
    from difflab.guidance import alignment_score
    from difflab.networks.noisy import NoisyModel
    from difflab.networks.text import load_text_encoder
    from difflab.training import train

    raw = {"model": {"arch": "alignment", "preset": "tiny"}, "task": {"kind": "contrastive"},
           "text_encoder": {"name": "minilm"}, "objective": {"name": "contrastive"},
           "data": {"name": "folder", "root": str(emoji_subset), "image_size": 16},
           "train": {"batch_size": 8, "steps": 2, "tensorboard": False, "log_every": 1,
                     "checkpoint_every": 2}}
    cfg = config_from_dict(raw)
    task = make_task(cfg)
    ds = task.dataset
    assert task.p_uncond() == 0.0  # the contrastive task never drops captions
    with pytest.raises(DifflabError, match="p_uncond does not apply to task kind 'contrastive'"):
        config_from_dict({**raw, "task": {"kind": "contrastive", "p_uncond": 0.5}})
    # v1 required model.text_encoder; v2's contrastive task reads MiniLM without [text_encoder]
    bare = make_task(config_from_dict({k: v for k, v in raw.items() if k != "text_encoder"}))
    assert bare.text_config == task.text_config and bare.text_config.name == "minilm"
    c = task.conditioner.training(Cond(extra={"captions": ds.captions[:4]}), None,
                                  task.p_uncond())
    torch.testing.assert_close(c.extra["text_emb"],
                               load_text_encoder("minilm").sentence(ds.captions[:4]),
                               atol=1e-5, rtol=1e-4)
    result = train(cfg, tmp_path / "clip", progress=False)
    assert result.step == 2
    run = load_run(tmp_path / "clip")
    assert isinstance(run.denoiser, NoisyModel)
    x = torch.stack([ds[i][0] for i in range(3)])
    s = alignment_score(run.denoiser, x, load_text_encoder("minilm").sentence(ds.captions[:3]))
    assert s.shape == (3,) and bool(((s >= -1) & (s <= 1)).all())
    from difflab import cli as command

    assert command.main(["sample", str(tmp_path / "clip"), "--n", "2", "--out",
                         str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    # an alignment model guides text-to-image sampling from Python (SDG), not through
    # --guidance classifier:RUN:S, which would fail
    assert "does not generate images" in err and "difflab.guidance.sdg" in err
    assert "--guidance classifier:" not in err and not (tmp_path / "c.png").exists()
    with pytest.raises(DifflabError, match="does not generate images"):
        from difflab.training import Trainer

        Trainer(config_from_dict({**raw, "train": {**raw["train"], "sample_every": 1}}),
                tmp_path / "bad")
    with pytest.raises(DifflabError, match="family 'alignment'"):
        config_from_dict({**raw, "model": {**raw["model"], "context_dim": 8}})
    with pytest.raises(DifflabError, match="not a preset of family 'alignment'"):
        config_from_dict({**raw, "model": {**raw["model"], "preset": "base"}})
