"""Checkpoints: ``checkpoints/step_N/{model,ema}.safetensors``, ``training_state.pt``, a manifest.

Writes are atomic: everything goes to ``step_N.tmp-<pid>/`` (each file fsynced), the folder is
renamed to ``step_N`` with ``os.replace``, and only then is the ``latest`` marker replaced. A
process killed mid-write leaves a ``.tmp-`` folder that is never read and is removed on the
next start. ``manifest.json`` (written last inside the folder) records each file's size and
SHA-256, so a truncated or altered file is detected by name before anything is loaded.

Reading never executes code: weights come only from safetensors, and ``training_state.pt``
(optimizer / scheduler / RNG states: tensors, numbers, lists, dicts) is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from torch import nn

from difflab.errors import DifflabError
from difflab.fileio import save_safetensors

logger = logging.getLogger("difflab.training")
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
SLOW_HOOK = "DIFFLAB_TEST_SLOW_CHECKPOINT"


class CheckpointError(DifflabError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


# ----- writing -----------------------------------------------------------------------------------
def state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of ``module.state_dict()`` (what safetensors stores)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in
            module.state_dict().items()}


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors holding NaN or inf."""
    return [k for k, v in tensors.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _slow_hook(step: int) -> None:
    """Test hook: ``DIFFLAB_TEST_SLOW_CHECKPOINT="STEP:SECONDS[,STEP:SECONDS...]"`` sleeps
    inside the write of those steps."""
    for item in filter(None, os.environ.get(SLOW_HOOK, "").split(",")):
        at, _, seconds = item.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


def part_files(name: str) -> tuple[str, str]:
    """The weight files of a trainable part: ``model`` -> ``model.safetensors`` /
    ``ema.safetensors``; another part ``P`` -> ``P.safetensors`` / ``P-ema.safetensors``."""
    if name == "model":
        return MODEL_FILE, EMA_FILE
    return f"{name}.safetensors", f"{name}-ema.safetensors"


def save_checkpoint(root: str | os.PathLike, step: int, model: dict[str, torch.Tensor] | None,
                    ema: dict[str, torch.Tensor] | None, training_state: dict[str, Any],
                    keep: int | None = None, metadata: dict[str, str] | None = None,
                    parts: dict[str, tuple[dict, dict]] | None = None,
                    part_metadata: dict[str, dict[str, str]] | None = None,
                    frozen: dict[str, dict[str, str]] | None = None) -> Path:
    """Write ``root/step_N`` atomically, point ``root/latest`` at it, keep the last ``keep``.

    ``model`` / ``ema`` are the weights of the part named ``model``; ``parts`` maps other
    trainable parts to ``(weights, ema weights)`` (files :func:`part_files`), and
    ``part_metadata`` adds safetensors metadata per part (its family and layout version).
    ``frozen`` names the frozen parts the run used, ``{name: {"source": ..., "sha256": ...}}``:
    recorded in the manifest, never copied.

    Raises:
        CheckpointError: when any weight is NaN or inf (a checkpoint is never written then).
    """
    all_parts = dict(parts or {})
    if model is not None:
        all_parts = {"model": (model, ema if ema is not None else model), **all_parts}
    bad = [k if name == "model" else f"{name}:{k}" for name, (w, e) in all_parts.items()
           for k in non_finite(w) + [f"ema:{j}" for j in non_finite(e)]]
    if bad:
        raise CheckpointError(f"refusing to write checkpoint step_{step}: non-finite weights in "
                              f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"format": "pt", "step": str(step), **(metadata or {})}
    names = []
    for i, (name, (weights, ema_weights)) in enumerate(all_parts.items()):
        own = {**meta, **(part_metadata or {}).get(name, {})}
        raw_file, ema_file = part_files(name)
        save_safetensors(weights, tmp / raw_file, metadata=own)
        _fsync_file(tmp / raw_file)
        if i == 0:
            _slow_hook(step)
        save_safetensors(ema_weights, tmp / ema_file, metadata={**own, "ema": "true"})
        _fsync_file(tmp / ema_file)
        names += [raw_file, ema_file]
    torch.save(training_state, tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
             for name in (*names, STATE_FILE)}
    manifest: dict[str, Any] = {"step": step, "files": files, "parts": list(all_parts)}
    if frozen:
        manifest["frozen"] = frozen
    _fsync_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. the final step of a resumed run)
        old = root / f"step_{step}.tmp-old-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, final.name)
    prune(root, keep, protect=final)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    _fsync_write(tmp, (name + "\n").encode())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_dir(root)


def prune(root: str | os.PathLike, keep: int | None, protect: Path | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints, never ``protect`` (the one just written).

    A checkpoint with a higher step than ``protect`` is left over from before a resume that
    fell back past it; it is verified, and moved aside (:func:`quarantine`) when it fails,
    so the last checkpoint that verifies can never be pruned in favour of a corrupt one.
    """
    if keep is None:
        return
    found = list_checkpoints(root)
    if protect is not None:
        at = next((s for s, p in found if p == Path(protect)), None)
        for step, path in found:
            if at is not None and step > at:
                try:
                    verify_checkpoint(path)
                except CheckpointError as e:
                    quarantine(path, str(e))
        found = list_checkpoints(root)
    for _, path in found[:-keep]:
        if protect is not None and path == Path(protect):
            continue
        shutil.rmtree(path, ignore_errors=True)


def quarantine(path: str | os.PathLike, reason: str | None = None) -> Path:
    """Move a checkpoint that fails verification aside as ``step_N.corrupt`` (``.corrupt-2``,
    ... when taken): never deleted, never read again, and reported with the reason."""
    path = Path(path)
    dest, k = path.with_name(path.name + ".corrupt"), 1
    while dest.exists():
        k += 1
        dest = path.with_name(f"{path.name}.corrupt-{k}")
    os.replace(path, dest)
    why = f" ({reason})" if reason else ""
    logger.warning("checkpoint %s failed verification%s; moved aside to %s (not deleted)",
                   path.name, why, dest)
    return dest


def remove_partial(root: str | os.PathLike) -> list[Path]:
    """Delete leftovers of interrupted writes (``step_N.tmp-*`` folders, temporary markers)."""
    root = Path(root)
    gone = list(root.glob("*.tmp-*")) if root.is_dir() else []
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


# ----- finding and checking ----------------------------------------------------------------------
def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete-looking ``step_N`` folders, oldest first (``.tmp-`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest.

    Raises:
        CheckpointError: naming the file that is missing, truncated or altered.
    """
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {mf.name} is missing (was the "
                              "write interrupted?)")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint manifest {mf} is corrupt ({e})") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} is truncated or corrupt: {size} bytes, "
                                  f"the manifest says {info['bytes']}")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} is corrupt: its SHA-256 does not match "
                                  "the manifest")
    return manifest


def resolve_checkpoint(run_or_ckpt: str | os.PathLike, name: str | None = None) -> Path:
    """A checkpoint folder from a run folder (+ optional ``step_N``) or a checkpoint folder.

    Without ``name`` the ``latest`` marker is followed, falling back to the newest folder.
    """
    p = Path(run_or_ckpt)
    if (p / MANIFEST_FILE).is_file() or _STEP_DIR.match(p.name):
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if name is not None:
        out = root / name
        if not out.is_dir():
            have = [c.name for _, c in list_checkpoints(root)]
            raise CheckpointError(f"checkpoint {out} does not exist: the run has {have or 'none'}")
        return out
    marker = root / LATEST_FILE
    if marker.is_file():
        out = root / marker.read_text().strip()
        if out.is_dir():
            return out
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"no checkpoint in {root}: train first (difflab train CONFIG)")
    return found[-1][1]


def resumable_checkpoint(root: str | os.PathLike, move_aside: bool = True) -> Path | None:
    """The newest checkpoint that verifies. Newer ones that do not are skipped with a warning
    and (``move_aside``, on the process that writes) moved aside by :func:`quarantine`, so a
    later prune cannot keep them in place of the good one."""
    for step, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping checkpoint step_%d: %s; falling back to the previous one",
                           step, e)
            if move_aside:
                quarantine(path)
    return None


# ----- reading -----------------------------------------------------------------------------------
def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated / invalid file raises naming it."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt and cannot be "
                              f"read ({type(e).__name__}: {e})") from None


def read_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only)."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt and cannot be "
                              f"read ({type(e).__name__}: {e})") from None


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, sorted): the content hash
    that names a frozen part in a manifest."""
    p = Path(path)
    if p.is_file():
        return _sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + _sha256(f).encode())
    return h.hexdigest()


def check_compatible(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise, listing every mismatched tensor (names and shapes), unless keys and shapes agree."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if not (missing or extra or shapes):
        return
    parts = []
    for title, items in (("shape mismatches", shapes), ("missing from the checkpoint", missing),
                         ("not in the model", extra)):
        if items:
            more = f", ... ({len(items) - 12} more)" if len(items) > 12 else ""
            parts.append(f"{len(items)} {title}: " + ", ".join(items[:12]) + more)
    raise CheckpointError(f"{source} does not fit this {type(model).__name__} (was it trained "
                          "with a different [model] config?):\n  " + "\n  ".join(parts))


def load_weights(model: nn.Module, file: str | os.PathLike) -> None:
    """Load a safetensors file into ``model`` exactly (keys and shapes must match)."""
    tensors = read_safetensors(file)
    check_compatible(model, tensors, f"checkpoint file {file}")
    model.load_state_dict(tensors, strict=True)


def load_training_state(file: str | os.PathLike) -> dict[str, Any]:
    """``training_state.pt`` via ``torch.load(weights_only=True)`` (no code is executed)."""
    file = Path(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {file} does not exist") from None
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise CheckpointError(f"checkpoint file {file} cannot be read ({type(e).__name__}: "
                              f"{e})") from None
