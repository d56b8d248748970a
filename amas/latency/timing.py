"""Latency figures a user can trust: several models timed in alternating rounds, with a busy-machine verdict.

A background job slows every model timed while it runs; timing the models in turn, round after round, lets
such a load hit all of them alike, so their ratios hold even when the absolute numbers do not. The spread of
each model's round medians (interquartile range over the median) tells whether the machine was busy.

Every timing first puts the process's allocator in its steady state (``warm_allocator``): glibc serves large
blocks with fresh mmaps and trims freed heap back to the system until the first large free raises both
thresholds, so the first models timed in a process (and small modules timed alone, whose few multi-megabyte
outputs are freed at once) paid a page fault per 4 KiB of every output. On this CPU that made a 16-channel
conv + BN at 32x32, batch 64, time at 4.1 ms alone against 1.7 ms once warm, the time it takes inside a network.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

# round-median spread above which a measurement is reported as taken on a busy machine
BUSY_SPREAD = 0.15

__all__ = ["BUSY_SPREAD", "alternating_latency", "spread", "time_call", "warm_allocator"]


_WARM_BYTES = 30 << 20  # under glibc's 32 MiB cap on the dynamic mmap threshold
_warmed = False


def warm_allocator() -> None:
    """Raise the C allocator's mmap and trim thresholds once per process, as a long-running model would."""
    global _warmed
    if not _warmed:
        block = bytearray(_WARM_BYTES)  # one large block freed: glibc raises both thresholds to its size
        del block
        _warmed = True


def time_call(fn: Callable[[], object], warmup: int = 2, iters: int = 10, stat: str = "median") -> float:
    """Median (or, stat="min", fastest) wall time in ms of fn() over iters calls after warmup calls."""
    warm_allocator()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times) if stat == "min" else statistics.median(times)


def spread(values: Sequence[float]) -> float:
    """Interquartile range of values over their median (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return (q[2] - q[0]) / med if med > 0 else 0.0


def alternating_latency(runners: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 2,
                        iters: int = 10) -> dict:
    """Time each runner once per round, in turn, for rounds rounds: medians, spreads and a busy verdict."""
    per: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(max(1, rounds)):
        for name, fn in runners.items():
            per[name].append(time_call(fn, warmup=warmup, iters=iters))
    out = {name: {"median_ms": statistics.median(v), "rounds_ms": v, "spread": spread(v)} for name, v in per.items()}
    worst = max((r["spread"] for r in out.values()), default=0.0)
    busy = worst > BUSY_SPREAD
    return {
        "models": out,
        "max_spread": worst,
        "busy": busy,
        "warning": (f"machine busy: round medians spread {100 * worst:.0f}% (> {100 * BUSY_SPREAD:.0f}%); "
                    f"the ratios between models are more trustworthy than the times; re-time on an idle machine")
        if busy else "",
    }
