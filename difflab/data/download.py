"""Checksummed, atomic downloads with a list of mirrors.

A file is streamed into a temporary file beside its destination while its md5 is computed;
only when the checksum matches is it moved into place with ``os.replace``. A failed or
mismatching download leaves nothing behind. ``http(s)://`` and ``file://`` URLs both work
(tests serve local copies), through :mod:`urllib.request`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from difflab.data.base import DataError, logger
from difflab.fileio import publish

_CHUNK = 1 << 20
_USER_AGENT = "difflab-data/0.1 (+https://pypi.org/project/difflab)"


class DownloadError(DataError):
    """No mirror gave a file with the expected checksum; the message lists every attempt."""


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: str | os.PathLike, md5: str | None) -> bool:
    """True when ``path`` exists and (if ``md5`` is given) has that md5."""
    path = Path(path)
    return path.is_file() and (md5 is None or md5sum(path) == md5.lower())


def join_url(mirror: str, filename: str) -> str:
    """``mirror`` + ``filename`` with exactly one slash between them."""
    return mirror.rstrip("/") + "/" + filename


def _fetch_once(url: str, dest: Path, md5: str | None, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``dest``; rename it only if the md5 matches."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as r:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
        if md5 is not None and h.hexdigest() != md5.lower():
            raise DownloadError(f"checksum mismatch: md5 {h.hexdigest()}, expected {md5.lower()}")
        publish(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    md5: str | None = None,
    timeout: float = 60.0,
    overwrite: bool = False,
) -> Path:
    """Download ``dest`` from the first of ``urls`` that gives it with the right checksum.

    Args:
        urls: one URL or a list of mirrors for the same file, tried in order.
        dest: destination path; its folder is created.
        md5: expected hex md5 (strongly recommended; None skips the check).
        timeout: socket timeout in seconds per attempt.
        overwrite: download even if ``dest`` already exists with the right checksum.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: every URL failed (network error or checksum mismatch); the message
            lists each URL and its error. No partial file is left.
    """
    dest = Path(dest)
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise DownloadError(f"no URL given for {dest}")
    if not overwrite and check_md5(dest, md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        logger.info("downloading %s from %s", dest.name, url)
        try:
            _fetch_once(url, dest, md5, timeout)
            return dest
        # URLError / HTTPError are OSErrors; ValueError covers a malformed URL and DownloadError
        except (OSError, ValueError, http.client.HTTPException) as e:
            logger.warning("download of %s from %s failed: %s", dest.name, url, e)
            errors.append(f"  {url}: {e}")
    raise DownloadError(f"could not download {dest.name} to {dest.parent} "
                        f"(expected md5 {md5}); attempts:\n" + "\n".join(errors))


def download_files(root: str | os.PathLike, files: dict[str, str | None],
                   mirrors: Sequence[str], timeout: float = 60.0) -> list[Path]:
    """Download each ``name -> md5`` of ``files`` into ``root`` from ``mirror + name``.

    Files already present with the right checksum are kept; others are (re)downloaded.
    """
    return [download_file([join_url(m, name) for m in mirrors], Path(root) / name, md5, timeout)
            for name, md5 in files.items()]


def extract_tar(archive: str | os.PathLike, root: str | os.PathLike) -> None:
    """Extract a (gzipped) tar archive into ``root``, refusing links and paths leaving ``root``."""
    root = Path(root).resolve()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                raise DataError(f"{archive}: refusing to extract {member.name!r} "
                                "(only plain files and folders inside the target are allowed)")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.12 and recent 3.10 / 3.11 patches
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - members were checked above
            tar.extractall(root)
