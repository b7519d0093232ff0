"""Depth-conditioned diffusion (SD 2's depth model, task.concat = "depth"): the scene's depth map
reaches the network as one more input channel in training and in sampling, and every way to get
it wrong is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.runs import load_run
from difflab.sampling import SampleRequest, generate
from difflab.training import train


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("depth") / "run"
    train(load_config(None, ["data.name='shapes'", "data.image_size=16", "data.n=24",
                             "data.n_test=4", "task.cond='text'", "task.p_uncond=0.1",
                             "task.concat='depth'", "model.preset='tiny'",
                             "model.model_channels=8", "model.num_heads=1", "train.steps=2",
                             "train.batch_size=4", "train.tensorboard=false",
                             "train.checkpoint_every=2"]), run, progress=False)
    return run


def test_the_depth_map_is_a_network_input(depth_run):
    run = load_run(depth_run)
    assert run.net.config.concat_channels == 1 and run.sample_shape == (3, 16, 16)
    from difflab.data.shapes import Shapes

    scenes = Shapes(n=2, n_test=1, image_size=16)
    kw = dict(prompts=["a red sphere"], steps=3, sampler="ddim", n=2, seed=0, guidance="cfg:2")
    a = generate(SampleRequest(run, depth=scenes.depths[0], **kw)).images
    again = generate(SampleRequest(run, depth=scenes.depths[0], **kw)).images
    b = generate(SampleRequest(run, depth=scenes.depths[1], **kw)).images
    assert torch.equal(a, again) and float((a - b).abs().max()) > 1e-4
    # one map per sample
    both = generate(SampleRequest(run, depth=scenes.depths[:2], **kw)).images
    assert both.shape == (2, 3, 16, 16)


def test_depth_files_from_the_command_line(depth_run, tmp_path, capsys):
    from PIL import Image

    from difflab.cli import main

    depth = np.linspace(2.0, 6.0, 20 * 20, dtype=np.float32).reshape(20, 20)
    np.save(tmp_path / "d.npy", depth)
    grey = (255 * (1 / depth - 1 / 6) / (1 / 2 - 1 / 6)).astype(np.uint8)  # brighter is nearer
    Image.fromarray(grey).save(tmp_path / "d.png")
    for f in ("d.npy", "d.png"):
        out = tmp_path / f"{f}.png"
        assert main(["sample", str(depth_run), "--prompt", "a blue box", "--depth",
                     str(tmp_path / f), "--steps", "2", "--n", "2", "--out", str(out)]) == 0
        assert out.is_file()
    capsys.readouterr()
    for argv in (["sample", str(depth_run), "--prompt", "x", "--steps", "2",
                  "--out", str(tmp_path / "none.png")],
                 ["sample", str(depth_run), "--prompt", "x", "--steps", "2", "--depth",
                  str(tmp_path / "missing.npy"), "--out", str(tmp_path / "m.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "depth" in err
    assert not (tmp_path / "none.png").exists()


def test_depth_mistakes_are_named(tmp_path):
    with pytest.raises(DifflabError, match="depth maps, but dataset 'digits'"):
        train(load_config(None, ["task.concat='depth'", "model.preset='tiny'",
                                 "model.model_channels=8", "train.steps=1",
                                 "train.tensorboard=false"]), tmp_path / "a", progress=False)
    run = tmp_path / "plain"
    train(load_config(None, ["model.preset='tiny'", "model.model_channels=8", "train.steps=1",
                             "train.batch_size=4", "train.tensorboard=false",
                             "train.checkpoint_every=1"]), run, progress=False)
    with pytest.raises(DifflabError, match="takes none"):
        generate(SampleRequest(run, depth=torch.ones(1, 1, 8, 8), steps=2))
