"""Stopping a training run on SIGINT / SIGTERM without losing work.

The first Ctrl-C (SIGINT) or SIGTERM (what batch schedulers send before they kill a job) only
raises a flag: the trainer finishes the optimizer step it is in, writes an atomic checkpoint
and returns, and the command prints what was saved and how to resume. A preview grid being
sampled at that moment is abandoned (it is only a picture). A second signal aborts at once by
raising ``KeyboardInterrupt``; checkpoint writes are atomic (``step_N.tmp-*`` renamed only when
complete), so an abort in the middle of one leaves the previous complete checkpoint as it was.

Handlers can only be installed from the main thread; elsewhere (a trainer run in a worker
thread) :class:`StopSignals` does nothing and signals keep their default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PreviewInterrupted(Exception):
    """Raised inside a preview grid when the first stop signal arrives."""


class StopSignals:
    """Context manager: catch SIGINT / SIGTERM as a stop request (see the module docstring).

    Attributes:
        received: the first signal's number, or None.
        in_preview: set by the trainer while a preview grid is sampled.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self.in_preview = False
        self._old: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: abort now
            self.restore()
            os.write(2, b"\ndifflab: second interrupt: aborting now (the last complete "
                        b"checkpoint is untouched)\n")
            raise KeyboardInterrupt
        self.received = signum
        name = signal.Signals(signum).name
        os.write(2, f"\ndifflab: {name} received: finishing this step and writing a checkpoint "
                    "(interrupt again to abort at once)\n".encode())
        if self.in_preview:
            raise PreviewInterrupted

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def __exit__(self, *exc) -> None:
        self.restore()
