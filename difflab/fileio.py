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


def save_safetensors(tensors: dict, path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the umask's mode (safetensors itself writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())
    return Path(path)
