"""Printing short two-column summary tables (rank 0 only under torchrun)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["print_table"]


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
