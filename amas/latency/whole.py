"""Whole-model timings of a latency table: the calibration plans and fit, and the table's prediction error.

The latency table (amas.latency.model) times layers alone; the part of a model's latency outside its layers and
the table's error on whole pruned models both need whole models timed, in turn, round after round.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch
from torch import nn

from amas.channels.groups import ChannelGroup

if TYPE_CHECKING:
    from amas.latency.model import LatencyTable, Measure

__all__ = ["CALIBRATION_FRACTIONS", "calibration_plans", "fit_line", "pruned_to", "random_plans", "round_robin",
           "validate"]

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


def validate(table: LatencyTable, model: nn.Module, groups: list[ChannelGroup], plans: list[dict[str, int]],
             rounds: int = 3, iters: int = 10, measure: Measure | None = None) -> dict:
    """Predicted vs measured whole-model latency of each plan; median and max relative error."""
    from amas.latency.model import measure_on

    batch = table.key["batch_size"]
    measure = measure or measure_on(table.key["runtime"], iters)
    shape = tuple(table.key["input_shape"])
    x = torch.randn((batch, *shape))
    measured = round_robin([pruned_to(model, groups, kept, shape) for kept in plans], x, measure, rounds)
    rows = []
    for kept, ms in zip(plans, measured, strict=True):
        predicted = table.predict(kept)
        rows.append({"kept": kept, "predicted_ms": predicted, "measured_ms": ms, "error": abs(predicted - ms) / ms})
    errors = [r["error"] for r in rows]
    return {"plans": rows, "median_error": statistics.median(errors) if errors else 0.0,
            "max_error": max(errors, default=0.0)}
