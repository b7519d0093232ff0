"""The procedural scenes of depth-to-image: the ray-cast depth is the exact depth (against the
closed-form ray-sphere and ray-plane intersections), scenes are a function of (seed, i), and
captions say what the geometry says."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.data import build_dataset
from difflab.data.shapes import (
    FLOOR_Y,
    WALL_Z,
    Scene,
    Shape,
    Shapes,
    caption,
    random_scene,
    rays,
    render,
)
from difflab.errors import DifflabError
from difflab.tasks.conditioning import depth_condition


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))


def _env_t(d: torch.Tensor) -> torch.Tensor:
    """Distance to the floor or the back wall along unit rays ``d`` (closed form)."""
    t_wall = WALL_Z / d[..., 2]
    t_floor = torch.where(d[..., 1] < 0, FLOOR_Y / d[..., 1].clamp_max(-1e-12),
                          torch.full_like(t_wall, math.inf))
    return torch.minimum(t_wall, t_floor)


def test_an_empty_scene_has_the_floor_and_walls_depth():
    size = 32
    d, cam_z = rays(size)
    _, depth = render(Scene(()), size)
    torch.testing.assert_close(depth[0].double(), _env_t(d) * cam_z, rtol=1e-6, atol=1e-5)


def test_sphere_depth_is_the_ray_sphere_intersection():
    size = 48
    c, r = torch.tensor([0.3, FLOOR_Y + 0.7, 3.5], dtype=torch.float64), 0.7
    _, depth = render(Scene((Shape("sphere", "red", tuple(c.tolist()), r),)), size)
    d, cam_z = rays(size)
    b = (d * c).sum(-1)  # |t d - c|^2 = r^2 with |d| = 1
    disc = b * b - (c @ c - r * r)
    t = b - torch.sqrt(disc.clamp_min(0))
    closest = torch.sqrt((c @ c - b * b).clamp_min(0))
    inside = (closest < 0.97 * r) & (t < _env_t(d))  # away from grazing rims
    assert int(inside.sum()) > 100
    err = (depth[0].double() - t * cam_z)[inside].abs().max()
    assert float(err) < 1e-3
    # and outside the sphere the depth is the environment's
    outside = closest > 1.03 * r
    torch.testing.assert_close(depth[0].double()[outside], (_env_t(d) * cam_z)[outside],
                               rtol=1e-6, atol=1e-5)


def test_every_kind_renders_in_front_of_the_wall_and_shades():
    for kind in ("sphere", "box", "cylinder", "torus"):
        s = Shape(kind, "blue", (0.0, FLOOR_Y + (0.2 if kind == "torus" else 0.6), 3.0), 0.6,
                  0.4)
        img, depth = render(Scene((s,)), 32)
        assert img.shape == (3, 32, 32) and float(img.min()) >= -1 and float(img.max()) <= 1
        near = depth[0] < 3.0
        assert int(near.sum()) > 20, kind
        # the object's pixels are blue-dominant
        rgb = img[:, near]
        assert float(rgb[2].mean()) > float(rgb[0].mean()), kind


def test_scenes_are_a_function_of_seed_and_index():
    a = Shapes(n=6, n_test=3, seed=3, image_size=16)
    b = Shapes(n=6, n_test=3, seed=3, image_size=16)
    assert torch.equal(a.images, b.images) and torch.equal(a.depths, b.depths)
    assert a.captions == b.captions
    c = Shapes(n=6, n_test=3, seed=4, image_size=16)
    assert not torch.equal(a.images, c.images)
    test = Shapes(split="test", n=6, n_test=3, seed=3, image_size=16)
    assert len(test) == 3 and set(test.ids).isdisjoint(a.ids)
    image, info = a[0]
    assert image.shape == (3, 16, 16) and info["depth"].shape == (1, 16, 16)
    assert isinstance(info["caption"], str) and info["caption"].startswith("a")
    ds = build_dataset("shapes", image_size=16, n=4, n_test=2)
    assert len(ds) == 4 and ds.channels == 3
    for bad in ({"n": 0}, {"max_shapes": 4}, {"seed": -1}, {"image_size": 4}):
        with pytest.raises(DifflabError):
            Shapes(**{"n": 4, "image_size": 16, **bad})


def test_captions_say_what_the_geometry_says():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        scene = random_scene(g, 2)
        text = caption(scene)
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            if "in front of" in text:
                assert a.center[2] < b.center[2]
            elif "behind" in text:
                assert a.center[2] > b.center[2]
            elif "left of" in text:
                assert a.center[0] < b.center[0]
            else:
                assert "right of" in text and a.center[0] > b.center[0]
        for s in scene.shapes:
            assert f"{s.color} {s.kind}" in text
    one = Scene((Shape("box", "orange", (0.0, -0.5, 3.0), 0.5),))
    assert caption(one) == "an orange box"


def test_depth_condition_is_sd2s_normalised_inverse_depth():
    depth = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]]]])
    c = depth_condition(depth, (2, 2))
    # inverse depth 1, 1/2, 1/4, 1/8 stretched to [-1, 1]: nearest +1, farthest -1
    expect = 2 * (1 / depth - 1 / 8) / (1 - 1 / 8) - 1
    torch.testing.assert_close(c, expect)
    assert depth_condition(torch.rand(3, 1, 32, 32) + 1, (8, 8)).shape == (3, 1, 8, 8)
    with pytest.raises(DifflabError, match="positive"):
        depth_condition(torch.zeros(1, 1, 4, 4), (2, 2))
    with pytest.raises(DifflabError, match="depth"):
        depth_condition(torch.ones(1, 4, 4), (2, 2))
