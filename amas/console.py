"""Printing short two-column summary tables and one-line notices (rank 0 only under torchrun)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["print_table", "say"]


def print_table(rows: list[tuple[str, Any]], title: str = "") -> None:
    """Print a two-column summary table (on rank 0 only under torchrun)."""
    from amas.distributed import context

    if not context().is_main:
        return
    if title:
        print(title)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        v = f"{v:.4g}" if isinstance(v, float) else v
        print(f"  {k:<{width}}  {v}")
    sys.stdout.flush()


def say(line: str) -> None:
    """One line on stderr, prefixed 'amas: ' (on rank 0 only under torchrun)."""
    from amas.distributed import context

    if context().is_main:
        print(f"amas: {line}", file=sys.stderr, flush=True)
