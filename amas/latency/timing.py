"""Latency figures a user can trust: several models timed in alternating rounds, with a busy-machine verdict, and
one model's measured latency (``latency``).

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

import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from amas.channels.cost import batched_shape, device_dtype
from amas.engine.formats import runs_channels_last
from amas.errors import AmasError

# round-median spread above which a measurement is reported as taken on a busy machine
BUSY_SPREAD = 0.15

__all__ = ["BUSY_SPREAD", "alternating_latency", "latency", "spread", "time_call", "warm_allocator"]


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


def _sync(device: torch.device) -> None:
    """Wait for queued work on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    device: str | torch.device | None = None,
    warmup: int = 5,
    iters: int = 20,
    channels_last: bool = True,
) -> dict:
    """Measure inference time per batch: median_ms, mean_ms, images_per_s, batch_size, device."""
    shape = batched_shape(input_shape)
    if len(input_shape) == 3:
        shape = (batch_size, *shape[1:])
    elif batch_size not in (1, shape[0]):
        raise AmasError(f"batch_size={batch_size} conflicts with the batch of input_shape {tuple(input_shape)}")
    if iters < 1 or warmup < 0:
        raise AmasError(f"latency needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    model_device, dtype = device_dtype(model)
    dev = torch.device(device) if device is not None else model_device
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # Work on a copy when the model must change device or layout, so the caller's model is untouched.
    if dev != model_device or channels_last:
        net = copy.deepcopy(model).to(device=dev, memory_format=memory_format)
    else:
        net = model
    x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=memory_format)
    if channels_last and not runs_channels_last(net, x[:1]):  # a .view of a feature map: timed as it can run
        net, x = net.to(memory_format=torch.contiguous_format), x.contiguous()
    warm_allocator()
    was_training = net.training
    times: list[float] = []
    try:
        net.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            _sync(dev)
            for _ in range(iters):
                start = time.perf_counter()
                net(x)
                _sync(dev)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        net.train(was_training)
    median = statistics.median(times)
    return {
        "median_ms": median,
        "mean_ms": statistics.fmean(times),
        "images_per_s": shape[0] * 1000.0 / median,
        "batch_size": shape[0],
        "device": str(dev),
    }
