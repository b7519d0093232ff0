"""CIFAR-10 from pickle batches generated here in the official format."""

from __future__ import annotations

import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from difflab.data import CIFAR10, CorruptDataError, DataNotFoundError, md5sum, read_cifar_batch

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _batch(n: int, seed: int) -> dict:
    """One batch as the official files hold it: rows of R, G, B 32x32 planes, bytes keys."""
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


def _write(folder, protocol: int = 2) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for seed, name in enumerate(FILES):
        batches[name] = _batch(4 + seed, seed)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_train_and_test_splits_from_nested_folder(tmp_path, protocol):
    batches = _write(tmp_path / "cifar-10-batches-py", protocol)
    train = CIFAR10(tmp_path, split="train")
    assert len(train) == sum(4 + s for s in range(5)) and train.num_classes == 10
    assert (train.channels, train.image_size, train.name) == (3, 32, "cifar10")
    first = batches["data_batch_1"]
    image, info = train[1]
    planes = first[b"data"][1].reshape(3, 32, 32)  # channel-first planes: R, G, B
    assert torch.equal(image, torch.from_numpy(planes) / 127.5 - 1)
    assert info == {"label": first[b"labels"][1]}
    test = CIFAR10(tmp_path, split="test")
    assert len(test) == 9 and test.labels.tolist() == batches["test_batch"][b"labels"]
    both = CIFAR10(tmp_path, split="all")
    assert len(both) == len(train) + len(test) and both.splits == ["train", "test"]
    assert torch.equal(both.images[-9:], test.images)


def test_flat_folder_only_test_split_and_resize(tmp_path):
    _write(tmp_path)
    for name in FILES[:-1]:
        os.remove(tmp_path / name)
    ds = CIFAR10(tmp_path, split="all", image_size=16)
    assert ds.splits == ["test"] and ds[0][0].shape == (3, 16, 16)
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10(tmp_path, split="train")
    msg = str(err.value)
    assert "data_batch_1" in msg and str(tmp_path) in msg and "download=True" in msg
    assert "cifar-10-python.tar.gz" in msg


def test_str_keys_like_python2_pickles_are_accepted(tmp_path):
    batch = {k.decode(): v for k, v in _batch(3, 7).items()}
    (tmp_path / "b").write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = read_cifar_batch(tmp_path / "b")
    assert images.shape == (3, 32, 32, 3) and labels.tolist() == batch["labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_pickle_is_refused(tmp_path):
    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(CorruptDataError, match="refusing to load global"):
        read_cifar_batch(tmp_path / "evil")


@pytest.mark.parametrize("bad", [
    {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
    {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
    {b"labels": [0]},
])
def test_malformed_batches_name_the_file(tmp_path, bad):
    (tmp_path / "weird_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(CorruptDataError, match="weird_batch"):
        read_cifar_batch(tmp_path / "weird_batch")


def test_truncated_pickle_names_the_file(tmp_path):
    data = pickle.dumps(_batch(4, 0), protocol=2)
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDataError, match="cut"):
        read_cifar_batch(tmp_path / "cut")


def test_download_extracts_the_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write(src / "cifar-10-batches-py")
    archive = tmp_path / "mirror" / CIFAR10.ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    mirror = archive.parent.as_uri() + "/"
    with pytest.raises(Exception, match="checksum mismatch"):  # the official md5 is checked
        CIFAR10(tmp_path / "data", split="test", download=True, mirrors=[mirror])
    monkeypatch.setattr(CIFAR10, "ARCHIVE_MD5", md5sum(archive))
    ds = CIFAR10(tmp_path / "data", split="test", download=True, mirrors=[mirror])
    assert len(ds) == 9 and (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").exists()


def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes cPickle (Python 2, numpy 1.x) wrote for the official batches, by hand."""
    n = data.shape[0]
    return b"".join([
        b"\x80\x02}(", _py2_str(b"data"),
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", b"K\x00\x85",
        _py2_str(b"b"), b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
        b"(K\x01", b"M" + struct.pack("<H", n), b"M" + struct.pack("<H", 3072), b"\x86",
        b"cnumpy\ndtype\n", _py2_str(b"u1"), b"K\x00K\x01\x87R",  # dtype('u1', 0, 1)
        b"(K\x03", _py2_str(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        b"\x89", _py2_str(data.tobytes()), b"tb",  # state: (1, shape, dtype, False, raw)
        _py2_str(b"labels"), b"](", b"".join(b"K" + bytes([v]) for v in labels), b"e",
        b"u.",
    ])


def test_python2_pickles_like_the_official_files(tmp_path):
    batch = _batch(3, 5)
    (tmp_path / "test_batch").write_bytes(_py2_batch(batch[b"data"], batch[b"labels"]))
    images, labels = read_cifar_batch(tmp_path / "test_batch")
    assert labels.tolist() == batch[b"labels"]
    np.testing.assert_array_equal(images, batch[b"data"].reshape(3, 3, 32, 32)
                                  .transpose(0, 2, 3, 1))
    assert len(CIFAR10(tmp_path, split="test")) == 3
