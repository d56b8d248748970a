"""Stopping a run on SIGTERM/SIGINT between steps, with its state saved (exit status 128 + signal); why a stage
would take no step."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["StopRequest", "no_steps_reason"]


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


# the config key that sets each stage's batch size (candidates, the final fine-tune and criteria use finetune's)
_BATCH_KEYS = {"train": "train.batch_size", "search": "search.train.batch_size"}


def no_steps_reason(stage: str, train: Any, world_size: int, batch_key: str | None) -> str:
    """Why a stage would take no optimiser step, and the fix, in one line."""
    n = int(getattr(train, "num_samples", 0))
    images = f"{n} training image{'' if n == 1 else 's'}"
    per_rank = getattr(train, "batch_size", None)
    if per_rank is None:  # the user's own batches: their loader sets the batch size
        return (f"{stage}: 0 optimiser steps per epoch from {images} over {world_size} processes; pass at least one "
                "batch per process, or run fewer processes")
    key = batch_key or _BATCH_KEYS.get(stage, "finetune.train.batch_size")
    batch = f"a global batch of {per_rank * world_size} ({key}"
    batch += f", {per_rank} on each of {world_size} processes)" if world_size > 1 else ")"
    if n == 0:
        fix = "add training images"
    elif n < world_size:
        fix = "add training images or run fewer processes: every process needs an image of each batch"
    else:
        fix = f"lower {key} to at most {n} or add training images"
    return f"{stage}: 0 optimiser steps per epoch: {images} for {batch}; {fix}"
