"""Stopping a run on SIGTERM/SIGINT between steps, with its state saved (exit status 128 + signal)."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag checked between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

