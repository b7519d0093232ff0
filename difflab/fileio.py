"""Writing files the way every other tool does: through a temporary file renamed into place
(a reader never sees half a file), with the permissions the user's umask gives a new file.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask, so a file renamed from
it would stay private to its owner; :func:`publish` sets ``0666 & ~umask`` first.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock)."""
    with _lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets from ``open``: ``0666 & ~umask``."""
    return 0o666 & ~umask()


def publish(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Give ``tmp`` the umask's mode and rename it to ``dest`` (atomically)."""
    os.chmod(tmp, file_mode())
    os.replace(tmp, dest)
    return Path(dest)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file renamed into place, so a reader (or
    a crash) never sees half a file; creates the parent folder."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors: dict, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the umask's mode (safetensors itself writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())
    return Path(path)
