"""Checksummed, atomic downloads, tested offline against local copies (file:// and 127.0.0.1)."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading

import pytest

from difflab.data import MNIST, DownloadError, download_file, md5sum
from difflab.data.base import DataError
from difflab.data.download import extract_tar

TEST_MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def mnist_server(mnist_dir):
    """An HTTP server on 127.0.0.1 serving the shared MNIST folder; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(mnist_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_shared_files_match_the_official_md5(mnist_dir):
    for name, md5 in TEST_MD5.items():
        assert md5sum(mnist_dir / name) == md5
        assert MNIST.MD5[name] == md5


def test_file_url_download_with_good_md5(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    dest = download_file((mnist_dir / name).as_uri(), tmp_path / "sub" / name, TEST_MD5[name])
    assert dest.read_bytes() == (mnist_dir / name).read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [name]


def test_bad_md5_raises_and_leaves_nothing(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        download_file((mnist_dir / name).as_uri(), tmp_path / name, "0" * 32)
    assert "0" * 32 in str(err.value) and TEST_MD5[name] in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_mirrors_are_tried_in_order(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    urls = ["not a url", (tmp_path / "missing" / name).as_uri(), (mnist_dir / name).as_uri()]
    dest = download_file(urls, tmp_path / "out" / name, TEST_MD5[name])
    assert md5sum(dest) == TEST_MD5[name]


def test_existing_good_file_is_kept_and_bad_one_replaced(mnist_dir, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / name
    dest.write_bytes(b"stale")
    download_file((mnist_dir / name).as_uri(), dest, TEST_MD5[name])
    assert md5sum(dest) == TEST_MD5[name]
    download_file((tmp_path / "nothing-here").as_uri(), dest, TEST_MD5[name])  # no fetch needed


def test_http_download_of_mnist_test_split(mnist_server, tmp_path):
    ds = MNIST(tmp_path / "mnist", split="test", download=True, mirrors=[mnist_server])
    assert len(ds) == 10000
    for name, md5 in TEST_MD5.items():
        assert md5sum(tmp_path / "mnist" / name) == md5


def test_http_download_failure_lists_attempts_and_leaves_no_partial(mnist_server, tmp_path):
    root = tmp_path / "mnist"
    with pytest.raises(DownloadError) as err:
        MNIST(root, split="train", download=True, mirrors=[mnist_server, mnist_server + "x/"])
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "404" in msg and mnist_server + "x/" in msg
    assert [p.name for p in root.iterdir()] == []


def test_http_bad_md5_leaves_no_partial(mnist_server, tmp_path, monkeypatch):
    monkeypatch.setitem(MNIST.MD5, "t10k-images-idx3-ubyte.gz", "f" * 32)
    root = tmp_path / "mnist"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        MNIST(root, split="test", download=True, mirrors=[mnist_server])
    assert not (root / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in root.iterdir() if p.name.endswith(".part")]


def _tar_with(tmp_path, name: str, data: bytes = b"x"):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_tar_refuses_paths_outside_root(tmp_path):
    (tmp_path / "out").mkdir()
    extract_tar(_tar_with(tmp_path, "ok/file.txt"), tmp_path / "out")
    assert (tmp_path / "out" / "ok" / "file.txt").read_bytes() == b"x"
    with pytest.raises(DataError, match="refusing to extract"):
        extract_tar(_tar_with(tmp_path, "../evil.txt"), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_missing_data_message_gives_the_cli_form_and_an_absolute_path(tmp_path, monkeypatch,
                                                                      capsys):
    """From ``difflab train`` the fix is ``--set data.download=true`` (not ``download=True``),
    and a relative ``data.root`` is shown resolved, so the user sees where it looked."""
    from pathlib import Path

    from difflab import cli

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "ddpm_mnist.toml"
    code = cli.main(["train", str(config), "--out", "run", "--set", "data.root='nomnist'",
                     "--set", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--set data.download=true" in err
    assert str(tmp_path / "nomnist") in err and "(folder does not exist)" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
