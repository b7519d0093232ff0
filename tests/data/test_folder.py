"""Image folders: the real emoji set, channel conversions, captions, corrupt files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import (
    CorruptDataError,
    DataError,
    DataNotFoundError,
    Emoji,
    ImageFolder,
    collate,
    list_images,
    read_captions,
)

HASH = "png72/emoji_u0023.png"  # number sign: 85% fully transparent pixels


def test_emoji_files_and_captions_without_decoding(emoji_dir):
    files = list_images(emoji_dir)
    assert len(files) == 3583 and all(p.suffix == ".png" for p in files)
    assert len(read_captions(emoji_dir / "captions.tsv")) == 3544
    ds = Emoji(emoji_dir, cache=False)
    assert len(ds) == 3583 and ds.num_captioned == 3544 and not ds.cached
    assert sum(c == "" for c in ds.captions) == 3583 - 3544
    assert ds.captions[0] == "number sign"
    assert (ds.name, ds.channels, ds.image_size, ds.num_classes) == ("emoji", 3, 32, None)


def test_emoji_full_decode(emoji_dir):
    ds = Emoji(emoji_dir)
    assert ds.cached and ds.skipped == []
    assert ds.images.shape == (3583, 3, 32, 32) and ds.images.dtype == torch.uint8
    image, info = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert info == {"caption": "number sign"}
    assert torch.equal(image[:, 0, 0], torch.ones(3))  # transparent corner -> white
    assert image.min() >= -1 and image.max() <= 1 and image.min() < 0


def test_transparent_pixels_become_white_and_opaque_keep_color(emoji_dir):
    ds = Emoji(emoji_dir, image_size=72, files=[HASH])
    rgba = np.asarray(Image.open(emoji_dir / HASH)).astype(np.float32)
    image = ds[0][0].permute(1, 2, 0).numpy()
    clear, opaque = rgba[..., 3] == 0, rgba[..., 3] == 255
    assert clear.sum() > 1000 and opaque.sum() > 100
    assert (image[clear] == 1.0).all()
    np.testing.assert_array_equal(image[opaque], rgba[opaque][:, :3] / 127.5 - 1)
    a = rgba[..., 3:] / 255  # partial alpha: over white, within one 8-bit step
    expected = (rgba[..., :3] * a + 255 * (1 - a)) / 127.5 - 1
    np.testing.assert_allclose(image, expected, atol=1.01 / 127.5)


def test_grayscale_from_rgba_uses_luma_over_white(emoji_dir):
    ds = Emoji(emoji_dir, image_size=72, channels=1, limit=3)
    assert len(ds) == 3 and ds.channels == 1
    rgba = np.asarray(Image.open(ds.files[2])).astype(np.float64)
    a = rgba[..., 3:] / 255
    rgb = rgba[..., :3] * a + 255 * (1 - a)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(ds[2][0][0].numpy(), luma / 127.5 - 1, atol=2.01 / 127.5)


def _save(path, array, mode=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, **kw)
    return path


def test_gray_to_rgb_replicates_and_rgb_to_gray_is_luma(tmp_path):
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    _save(tmp_path / "a_gray.png", gray)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (10, 200, 30)
    _save(tmp_path / "b_rgb.png", rgb)
    ds3 = ImageFolder(tmp_path, image_size=16, channels=3)
    x = ds3[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert torch.equal(x[0], torch.from_numpy(gray) / 127.5 - 1)
    ds1 = ImageFolder(tmp_path, image_size=16, channels=1)
    assert ds1[1][0].shape == (1, 16, 16)
    luma = 0.299 * 10 + 0.587 * 200 + 0.114 * 30
    assert abs(float(ds1[1][0][0, 0, 0]) - (luma / 127.5 - 1)) <= 1 / 127.5


def test_other_modes_and_formats(tmp_path):
    v16 = np.full((8, 8), 257 * 100, dtype=np.uint16)
    _save(tmp_path / "g16.png", v16)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    col = np.zeros((8, 8, 3), np.uint8)
    col[..., 2] = 255
    _save(tmp_path / "photo.jpg", col, quality=95)
    _save(tmp_path / "web.webp", col, lossless=True)
    _save(tmp_path / "la.png", np.zeros((8, 8), np.uint8), mode="LA")
    ds = ImageFolder(tmp_path, image_size=8, captions=None)
    names = [p.name for p in ds.files]
    assert names == ["g16.png", "la.png", "pal.png", "photo.jpg", "web.webp"]
    x = {n: ds[i][0] for i, n in enumerate(names)}
    assert torch.allclose(x["g16.png"], torch.tensor(100 / 127.5 - 1))
    assert torch.equal(x["pal.png"], torch.ones(3, 8, 8))  # transparent palette index -> white
    assert torch.equal(x["la.png"], -torch.ones(3, 8, 8))  # LA with opaque alpha stays black
    assert torch.equal(x["web.webp"][2], torch.ones(8, 8)) and x["web.webp"][0].max() == -1
    assert (x["photo.jpg"][2] > 0.9).all()


def test_channel_errors(tmp_path):
    _save(tmp_path / "c.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"channels=2 .*1 \(grayscale\) or 3 \(RGB\)"):
        ImageFolder(tmp_path, image_size=4, channels=2)
    with pytest.raises(DataError, match=r"c.png: image has 3 channel.*strict_channels"):
        ImageFolder(tmp_path, image_size=4, channels=1, strict_channels=True)
    assert len(ImageFolder(tmp_path, image_size=4, channels=3, strict_channels=True)) == 1


@pytest.fixture
def folder_with_garbage(tmp_path):
    for i in range(3):
        _save(tmp_path / f"ok{i}.png", np.full((6, 6, 3), 40 * i, np.uint8))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return tmp_path, bad


def test_corrupt_image_raises_naming_the_file(folder_with_garbage):
    root, bad = folder_with_garbage
    with pytest.raises(CorruptDataError, match="broken.png"):
        ImageFolder(root, image_size=6)
    lazy = ImageFolder(root, image_size=6, cache=False)
    assert len(lazy) == 4
    with pytest.raises(CorruptDataError, match="broken.png"):
        lazy[0]


@pytest.mark.parametrize("cache", [True, False])
def test_skip_corrupt_logs_and_counts(folder_with_garbage, caplog, cache):
    root, bad = folder_with_garbage
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        ds = ImageFolder(root, image_size=6, skip_corrupt=True, cache=cache)
    assert ds.skipped == [bad] and len(ds) == 3
    assert [p.name for p in ds.files] == ["ok0.png", "ok1.png", "ok2.png"]
    assert any("broken.png" in r.getMessage() for r in caplog.records)
    assert any("skipped 1 corrupt image(s) of 4" in r.getMessage() for r in caplog.records)
    assert torch.allclose(ds[2][0], torch.tensor(80 / 127.5 - 1))


def test_truncated_png_raises(emoji_dir, tmp_path):
    data = (emoji_dir / HASH).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match="cut.png"):
        ImageFolder(tmp_path, image_size=8)


def test_captions_by_relative_path_or_unique_name(tmp_path, caplog):
    for rel in ("a/x.png", "a/y.png", "b/x.png", "b/z.png"):
        _save(tmp_path / rel, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "captions.tsv").write_text(
        "file\tcaption\na/x.png\tfirst x\nb/x.png\tsecond x\nz.png\ta zed\nghost.png\tnobody\n")
    with caplog.at_level(logging.WARNING, logger="difflab.data"):
        ds = ImageFolder(tmp_path, image_size=4, labels_from_folders=True)
    assert ds.captions == ["first x", "", "second x", "a zed"] and ds.num_captioned == 3
    assert any("ghost.png" in r.getMessage() for r in caplog.records)
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [0, 0, 1, 1]
    images, cond = collate([ds[i] for i in range(4)])
    assert images.shape == (4, 3, 4, 4)
    assert cond.labels.dtype == torch.int64 and cond.labels.tolist() == [0, 0, 1, 1]
    assert cond.extra["captions"] == ["first x", "", "second x", "a zed"]


def test_caption_file_errors(tmp_path):
    _save(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert ImageFolder(tmp_path, image_size=4)[0][1] == {}  # default file absent: no captions
    with pytest.raises(DataNotFoundError, match="other.tsv"):
        ImageFolder(tmp_path, image_size=4, captions="other.tsv")
    (tmp_path / "captions.tsv").write_text("name\ttext\nx.png\thi\n")
    with pytest.raises(DataError, match="header"):
        ImageFolder(tmp_path, image_size=4)
    (tmp_path / "captions.tsv").write_text("file\tcaption\nx.png\thi\nx.png\tagain\n")
    with pytest.raises(DataError, match=r"captions.tsv:3: 'x.png' is listed twice"):
        ImageFolder(tmp_path, image_size=4)


def test_fit_modes_on_non_square_images(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = 255  # white left quarter
    _save(tmp_path / "w.png", wide)
    crop = ImageFolder(tmp_path, image_size=10, fit="crop", resize_method="nearest")[0][0]
    assert crop.shape == (3, 10, 10) and crop.max() == -1  # the white quarter is cropped off
    padded = ImageFolder(tmp_path, image_size=10, fit="pad", resize_method="nearest")[0][0]
    assert (padded[:, :2] == 1).all() and (padded[:, 3:7, 5:] == -1).all()
    stretched = ImageFolder(tmp_path, image_size=10, fit="stretch", resize_method="nearest")
    assert (stretched[0][0][:, :, :2] == 1).all()


def test_limit_files_split_and_missing(tmp_path):
    for i in range(10):
        _save(tmp_path / f"{i}.png", np.full((4, 4), i, np.uint8))
    assert [p.name for p in ImageFolder(tmp_path, 4, limit=3).files] == ["0.png", "1.png", "2.png"]
    assert [p.name for p in ImageFolder(tmp_path, 4, files=["7.png", "2.png"]).files] == [
        "7.png", "2.png"]
    with pytest.raises(DataNotFoundError, match="nope.png"):
        ImageFolder(tmp_path, 4, files=["nope.png"])
    tr = ImageFolder(tmp_path, 4, split="train", holdout_fraction=0.3, seed=1)
    te = ImageFolder(tmp_path, 4, split="test", holdout_fraction=0.3, seed=1)
    assert len(te) == 3 and not set(tr.files) & set(te.files) and len(tr) + len(te) == 10
    with pytest.raises(DataNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "absent", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", 4)
