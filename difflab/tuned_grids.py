"""Where a run keeps the grids ``difflab tune-grid`` made (``RUN/tuned_grids.json``), and how
``--grid tuned`` finds them. The search itself is in :mod:`difflab.grid_tuning`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError
from difflab.runs import LoadedRun

logger = logging.getLogger("difflab.tuned_grids")

TUNED_FILE = "tuned_grids.json"
FORMAT = 1


def tuned_file(run: LoadedRun) -> Path:
    """Where a loaded run keeps its tuned grids (beside ``config.toml`` for a run folder)."""
    ckpt = run.checkpoint
    if ckpt is None:
        raise DifflabError("tuned grids are kept in a run folder; this model was built in "
                           "memory and has none")
    ckpt = Path(ckpt)
    if ckpt.name.startswith("step_") and ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / TUNED_FILE
    return (ckpt if ckpt.is_dir() else ckpt.parent) / TUNED_FILE


def read_tuned(file: Path) -> list[dict[str, Any]]:
    """The entries of a tuned-grids file ([] when there is none)."""
    if not file.is_file():
        return []
    try:
        data = json.loads(file.read_text())
        entries = data["grids"]
        if not isinstance(entries, list):
            raise TypeError("grids is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise DifflabError(f"{file} is not a difflab tuned-grids file ({e}): remove it and run "
                           "difflab tune-grid again") from e
    return entries


def save_tuned(file: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the file, replacing the one with the same sampler and steps; the file
    is replaced atomically, so a crash leaves the old one."""
    entries = [e for e in read_tuned(file)
               if (e.get("sampler"), e.get("steps")) != (entry["sampler"], entry["steps"])]
    entries.append(entry)
    entries.sort(key=lambda e: (e["sampler"], e["steps"]))
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "grids": entries}, indent=1) + "\n")
    os.replace(tmp, file)


def lookup_tuned(run: LoadedRun, sampler: str, steps: int,
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The saved entry for ``(sampler, steps)``, or an error saying what exists and how to
    make the missing one. A warning says when it was tuned on other weights or with other
    sampler ``options`` than these."""
    file = tuned_file(run)
    entries = read_tuned(file)
    for e in entries:
        if e.get("sampler") == sampler and e.get("steps") == steps:
            if e.get("step") != run.step:
                logger.warning("the tuned grid for %s at %d steps was tuned on step %s; "
                               "sampling step %s", sampler, steps, e.get("step"), run.step)
            if options is not None and e.get("options", {}) != options:
                logger.warning("the tuned grid for %s at %d steps was tuned with options %s; "
                               "sampling with %s", sampler, steps, e.get("options"), options)
            return e
    have = ", ".join(f"{e.get('sampler')}:{e.get('steps')}" for e in entries) or "none"
    raise DifflabError(f"no tuned grid for sampler {sampler!r} at {steps} steps in {file} "
                       f"(tuned: {have}); make it with difflab tune-grid RUN --sampler "
                       f"{sampler} --steps {steps}")
