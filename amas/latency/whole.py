"""Whole-model timings of a latency table: the calibration plans and fit, the plans its prediction error is checked
on (the check is amas.latency.model.validate), and the default measurement (measure_on).

The latency table (amas.latency.model) times layers alone; the part of a model's latency outside its layers and
the table's error on whole pruned models both need whole models timed, in turn, round after round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from amas.channels.group import ChannelGroup
from amas.latency.runtimes import make_runner
from amas.latency.timing import time_call

__all__ = ["CALIBRATION_FRACTIONS", "Measure", "calibration_plans", "fit_line", "measure_on", "pruned_to",
           "random_plans", "round_robin"]

Measure = Callable[[nn.Module, torch.Tensor], float]

CALIBRATION_FRACTIONS = (0.5, 0.25)  # uniformly thinned models timed whole to fit the part outside the layers


def calibration_plans(groups: list[ChannelGroup]) -> list[dict[str, int]]:
    """The uniformly thinned plans whose whole-model timings fit the part of the latency outside the layers."""
    return [{g.name: max(1, round(f * g.size)) for g in groups} for f in CALIBRATION_FRACTIONS]


def pruned_to(model: nn.Module, groups: list[ChannelGroup], kept: dict[str, int], input_shape: tuple[int, ...]
              ) -> nn.Module:
    """model cut to kept channels per group (0: its block removed), in eval mode."""
    from amas.channels.blocks import prune_with_blocks

    keep = {n: torch.arange(k) for n, k in kept.items()}
    return prune_with_blocks(model, groups, keep, input_shape=input_shape).eval()


def round_robin(nets: list[nn.Module], x: torch.Tensor, measure: Measure, rounds: int) -> list[float]:
    """Each net's median over rounds of measure, the nets timed in turn each round (a drifting machine hits all)."""
    per: list[list[float]] = [[] for _ in nets]
    for _ in range(max(1, rounds)):
        for i, net in enumerate(nets):
            per[i].append(float(measure(net, x)))
    return [statistics.median(v) for v in per]


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) >= 0 minimising the squared error of y = a + b * x over points (x, y)."""
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    if b < 0:  # the part outside the layers never grows as channels go: a constant
        return max(my, 0.0), 0.0
    if a < 0:  # nor is it negative at zero width: a line through the origin
        sxy, sx2 = sum(x * y for x, y in points), sum(x * x for x in xs)
        return 0.0, max(sxy / sx2, 0.0) if sx2 > 0 else 0.0
    return a, b


def random_plans(groups: list[ChannelGroup], n: int, seed: int = 0, low: float = 0.25) -> list[dict[str, int]]:
    """n random kept-count plans (each group keeps between low and all of its channels), reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    plans = []
    for _ in range(n):
        plans.append({g.name: int(torch.randint(max(1, int(low * g.size)), g.size + 1, (1,), generator=gen))
                      for g in groups})
    return plans


def measure_on(runtime: str = "eager", iters: int = 10) -> Measure:
    """The measurement the table uses by default: the fastest of iters forward passes of module on x on runtime.

    The fastest, not the median: a table point is a few sub-millisecond calls, and one time slice lost to
    another process would otherwise become the point (tables are built once and must survive a busy machine).
    """
    def measure(module: nn.Module, x: torch.Tensor) -> float:
        return time_call(make_runner(module.eval(), x, runtime), warmup=2, iters=iters, stat="min")
    return measure
