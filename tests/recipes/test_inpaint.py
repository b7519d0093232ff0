"""Inpainting: exact known pixels, RePaint's walk and forward jump, masks and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab import cli
from difflab.errors import DifflabError
from difflab.paths import VP
from difflab.recipes.inpaint import (
    box_masks,
    forward_jump,
    free_form_masks,
    inpaint,
    repaint_schedule,
    seam,
)


def test_repaint_walk_runs_each_stretch_resample_times():
    walk = repaint_schedule(6, 2, 3)
    assert walk == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 3, 2, 3, 4, 5, 6]
    down = [(a, b) for a, b in zip(walk, walk[1:]) if b == a + 1]
    assert len(down) == 6 + 2 * 2 * 2  # 6 steps, stretches 0-2 and 2-4 run twice more
    assert repaint_schedule(5, 10, 10) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DifflabError, match="resample"):
        repaint_schedule(5, 2, 0)


def test_forward_jump_gives_the_forward_marginal():
    """x_t = alpha_t x0 + sigma_t eps jumped to s must be alpha_s x0 + sigma_s eps'."""
    path = VP.cosine()
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    class Noise:
        def randn_like(self, x):
            return torch.randn(x.shape, generator=g, dtype=x.dtype)

    t, s = 0.3, 0.7
    xt = path.add_noise(x0, Noise().randn_like(x0), torch.full((x0.shape[0],), t,
                                                               dtype=torch.float64))
    xs = forward_jump(path, xt, t, s, Noise())
    ss = torch.tensor([s], dtype=torch.float64)
    assert float(xs.mean()) == pytest.approx(0.7 * float(path.alpha(ss)), abs=5e-3)
    assert float(xs.std()) == pytest.approx(float(path.sigma(ss)), rel=5e-3)


def test_masks_are_binary_deterministic_and_sized():
    b = box_masks(4, 16, 0.25, seed=1)
    assert set(torch.unique(b).tolist()) == {0.0, 1.0}
    assert torch.allclose(b.mean((1, 2, 3)), torch.full((4,), 0.25))
    f = free_form_masks(3, 16, seed=2)
    assert torch.equal(f, free_form_masks(3, 16, seed=2)) and 0 < float(f.mean()) < 1


def test_seam_is_zero_for_a_constant_image_and_sees_a_step():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :, 4:] = 1
    assert float(seam(torch.zeros(1, 1, 8, 8), m)) == 0.0
    step = -torch.ones(1, 1, 8, 8)
    step[..., :, 4:] = 1
    assert float(seam(step, m)) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def digits_run(train_tiny_run):
    return train_tiny_run("inpaint")


@pytest.mark.parametrize("method", ["replace", "repaint"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_known_pixels_come_back_exactly(digits_run, method, sampler):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    m = box_masks(2, 8, 0.3, seed=0)
    out = inpaint(digits_run, x, m, method=method, jump_length=2, resample=2, sampler=sampler,
                  steps=4, seed=0)
    assert out.images.shape == (2, 1, 8, 8) and out.metadata["method"] == method
    assert torch.equal(out.images * (1 - m), x * (1 - m))
    assert not torch.equal(out.images * m, x * m)


def test_repaint_with_one_resample_is_replacement(digits_run):
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    m = box_masks(1, 8, 0.5, seed=3)
    a = inpaint(digits_run, x, m, method="replace", sampler="ddpm", steps=4, seed=2)
    b = inpaint(digits_run, x, m, method="repaint", resample=1, sampler="ddpm", steps=4, seed=2)
    assert torch.equal(a.images, b.images)
    c = inpaint(digits_run, x, m, method="repaint", jump_length=2, resample=3, sampler="ddpm",
                steps=4, seed=2)
    assert c.nfe == 4 + 2 * 2 and not torch.equal(a.images, c.images)


def test_bad_masks_are_named(digits_run):
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(DifflabError, match="not binary"):
        inpaint(digits_run, x, torch.full((1, 1, 8, 8), 0.5))
    with pytest.raises(DifflabError, match="4x4"):
        inpaint(digits_run, x, torch.ones(1, 1, 4, 4))
    with pytest.raises(DifflabError, match="method"):
        inpaint(digits_run, x, torch.ones(1, 1, 8, 8), method="blend")


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return str(path)


def test_inpaint_cli(digits_run, tmp_path, capsys):
    img = _png(tmp_path / "i.png", (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    good = _png(tmp_path / "m.png", mask)
    out = tmp_path / "out.png"
    assert cli.main(["edit", "inpaint", str(digits_run), "--image", img, "--mask", good,
                     "--method", "repaint", "--jump-length", "2", "--resample", "2",
                     "--steps", "4", "--n", "2", "--out", str(out)]) == 0
    assert out.is_file()
    grey = mask.copy()
    grey[0, 0] = 128
    bad = tmp_path / "bad.png"
    assert cli.main(["edit", "inpaint", str(digits_run), "--image", img, "--mask",
                     _png(tmp_path / "g.png", grey), "--out", str(bad)]) == 2
    assert "not binary" in capsys.readouterr().err and not bad.exists()
