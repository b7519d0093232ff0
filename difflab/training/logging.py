"""Training logs: ``metrics.jsonl`` (one JSON object per log step), TensorBoard, a progress bar.

Only the main process logs. On resume, lines of ``metrics.jsonl`` past the resumed step (written
after the last checkpoint of the interrupted run) are dropped, and TensorBoard purges them too,
so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (a torn last line is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class MetricsLogger:
    """Append records to ``metrics.jsonl`` and TensorBoard scalars (main process only).

    Args:
        run_dir: the run folder.
        enabled: False on non-main processes (then every call is a no-op).
        tensorboard: also write TensorBoard event files under ``run_dir/tb``.
        start_step: the step training starts from (records after it are dropped on resume).
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True,
                 tensorboard: bool = True, start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if start_step > 0 and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif start_step == 0:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / TB_DIR),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``); non-finite floats are written as strings."""
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                 for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A tqdm bar (loss, images/s) on an interactive main process; otherwise plain log lines.

    Args:
        total: the last step.
        initial: the first step.
        enabled: False on non-main processes.
        force: show the bar even when stderr is not a TTY (None: only on a TTY).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True,
                 force: bool | None = None) -> None:
        self.enabled = enabled
        tty = sys.stderr.isatty() if force is None else force
        self.bar = (tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         desc="train") if enabled and tty else None)
        self.total = total

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, record: dict[str, Any]) -> None:
        """Show a log record: bar postfix on a TTY, one line on stderr otherwise."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}",
                                 img_s=f"{record['images_per_s']:.0f}", refresh=False)
        else:
            print(f"step {record['step']}/{self.total}  loss {record['loss']:.4g}  "
                  f"lr {record['lr']:.3g}  {record['images_per_s']:.0f} img/s", file=sys.stderr,
                  flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
