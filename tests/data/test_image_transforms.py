"""Transforms: uint8 <-> [-1, 1] round trip, seeded flips, crop / pad sizes, PNG grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import (
    RandomHorizontalFlip,
    center_crop,
    center_pad,
    from_uint8,
    make_grid,
    pad,
    resize,
    save_image_grid,
    to_uint8,
)
from difflab.data.transforms import fit_square


def test_uint8_round_trip_is_exact_for_every_value():
    u = torch.arange(256, dtype=torch.uint8)
    x = from_uint8(u)
    assert x.dtype == torch.float32 and x[0] == -1.0 and x[255] == 1.0
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 0.0, 7.0])), torch.tensor([0, 128, 255],
                                                                               dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(torch.zeros(2))


def test_flip_is_deterministic_given_the_generator():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2 * 3, 1, 4, 5)
    a = RandomHorizontalFlip(0.5, torch.Generator().manual_seed(0))(x)
    b = RandomHorizontalFlip(0.5, torch.Generator().manual_seed(0))(x)
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(a[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept))  # each row flipped or kept whole
    single = [bool(torch.equal(RandomHorizontalFlip(0.5, torch.Generator().manual_seed(s))(x[0]),
                               x[0])) for s in range(40)]
    assert 5 < sum(single) < 35  # both outcomes happen
    assert torch.equal(RandomHorizontalFlip(1.0)(x[0]), x[0].flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x[0]), x[0])


def test_flip_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    RandomHorizontalFlip(0.5, torch.Generator().manual_seed(1))(torch.zeros(8, 1, 2, 2))
    assert torch.equal(torch.get_rng_state(), before)


def test_center_crop_and_pad_sizes_and_values():
    x = torch.arange(6 * 8, dtype=torch.float32).reshape(1, 6, 8)
    c = center_crop(x, 4)
    assert c.shape == (1, 4, 4) and torch.equal(c, x[:, 1:5, 2:6])
    assert center_crop(x, (2, 8)).shape == (1, 2, 8)
    with pytest.raises(ValueError, match="at most the image size"):
        center_crop(x, 7)
    p = pad(x, 2)
    assert p.shape == (1, 10, 12) and torch.equal(p[:, 2:8, 2:10], x)
    assert (p[:, :2] == -1).all() and (p[..., -2:] == -1).all()
    assert pad(x, (1, 3)).shape == (1, 8, 14)
    assert pad(x, (1, 2, 3, 4), value=0.5).shape == (1, 12, 12)
    q = center_pad(x, 10)
    assert q.shape == (1, 10, 10) and torch.equal(center_crop(q, (6, 8)), x)
    with pytest.raises(ValueError):
        pad(x, -1)


def test_resize_and_fit_square_sizes():
    img = Image.new("RGB", (30, 12), (255, 0, 0))
    assert resize(img, 8).size == (8, 8) and resize(img, (6, 10), "area").size == (10, 6)
    for fit in ("crop", "pad", "stretch"):
        assert fit_square(img, 16, fit).size == (16, 16)
    padded = np.asarray(fit_square(img, 30, "pad", "nearest"))
    assert (padded[0] == 255).all() and (padded[15] == (255, 0, 0)).all()
    with pytest.raises(ValueError, match="resize_method"):
        resize(img, 4, "cubic")


def test_save_image_grid_size_pixels_and_atomicity(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = from_uint8(torch.randint(0, 256, (10, 3, 8, 6), dtype=torch.uint8, generator=g))
    path = save_image_grid(images, tmp_path / "out" / "grid.png", nrow=4, padding=2)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)  # 4 columns, 3 rows, padding 2
        arr = np.asarray(im)
    # image 5 is row 1, column 1; pixels equal to_uint8 exactly; padding is white
    np.testing.assert_array_equal(arr[12:20, 10:16], to_uint8(images[5]).permute(1, 2, 0).numpy())
    assert (arr[:2] == 255).all() and (arr[-10:, 18:] == 255).all()  # empty cells are padding
    assert not (arr[-10:-2, 10:16] == 255).all()  # image 9 sits in row 2, column 1


def test_save_image_grid_grayscale_and_bad_input(tmp_path):
    path = save_image_grid(torch.zeros(3, 1, 5, 5), tmp_path / "g.png", nrow=8, padding=0)
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (15, 5)
    assert make_grid(torch.zeros(1, 1, 5, 5), padding=1).shape == (7, 7, 1)
    with pytest.raises(ValueError, match="B>0"):
        save_image_grid(torch.zeros(2, 2, 5, 5), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
