"""Predicted latency of a model pruned to given kept channel counts: a per-layer lookup table, measured once.

Every conv/linear layer whose input or output channels belong to a prunable group is measured on its own
(a conv with the BN that follows it in the CIFAR/torchvision nets, on an input of the shape it sees in the
model) at a grid of (input, output) widths (1, the multiples of 8 and the full width, thinned to 9 per side),
on one device, batch size, thread count and runtime (HALP's lookup table, per layer). Layers of equal shape
share their measurements. A width between grid points is looked up at the next multiple of 8, then
interpolated linearly: CPU conv kernels compute channels in blocks, so a conv's time is a staircase in its
width (on this CPU a 36-channel output costs what a 48-channel one does, far more than linear interpolation
between 32 and 40 says). A grouped conv (ResNeXt, RegNet) is measured with its own ``groups`` at multiples of
them, the only widths amas prunes it to; a depthwise conv with its input following its output.

A plan's latency is the sum of its layers' latencies plus the part outside those layers (activations,
residual adds, shortcuts, pooling, the call overhead), modelled as ``a + b * f``: f is the plan's fraction of
the dense model's conv/linear output elements (what the element-wise ops touch), and a, b are fitted by least
squares to whole-model timings of the dense model and two uniformly thinned ones, timed in turn. A layer with
no input or no output channel (a removed block) costs nothing.

The table is cached as JSON, keyed by the model, input shape, groups, batch size, threads, runtime, device
and torch version; a table built under other settings is never reused. ``validate`` measures whole pruned
models and reports the table's prediction error.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.channels.group import ChannelGroup
from amas.errors import AmasError
from amas.latency.whole import (
    CALIBRATION_FRACTIONS,
    Measure,
    calibration_plans,
    fit_line,
    measure_on,
    pruned_to,
    round_robin,
)

TABLE_VERSION = 3

__all__ = ["cache_file", "LatencyTable", "LayerShape", "build_table", "width_grid", "table_key", "validate"]


@dataclass(frozen=True)
class LayerShape:
    """One conv/linear layer as the table measures it (full widths; spatial size of its input)."""

    kind: str  # "conv" or "linear"
    in_full: int
    out_full: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    depthwise: bool = False
    bias: bool = False
    spatial: tuple[int, ...] = ()
    out_elems: int = 0  # elements of one image's output at full width (the element-wise ops' share)
    groups: int = 1  # conv groups of a grouped conv that is not depthwise (kept when pruned: widths are multiples)

    def signature(self) -> str:
        """A string naming the measurement this layer needs (layers with equal signatures share it)."""
        grouped = f"g{self.groups}" if self.groups > 1 else ""
        return (f"{self.kind}:{self.in_full}x{self.out_full}:k{self.kernel}s{self.stride}p{self.padding}"
                f"d{self.dilation}:dw{int(self.depthwise)}b{int(self.bias)}{grouped}:{self.spatial}")

    def grid(self, full: int, step: int, points: int) -> list[int]:
        """The widths measured for a dimension of full channels (multiples of the conv groups when grouped)."""
        if self.groups == 1:
            return width_grid(full, step, points)
        return [self.groups * w for w in width_grid(full // self.groups, max(1, -(-step // self.groups)), points)]


@dataclass
class _Layer:
    shape: LayerShape
    out_groups: list[tuple[str, int]] = field(default_factory=list)
    in_groups: list[tuple[str, int]] = field(default_factory=list)


def width_grid(full: int, step: int = 8, points: int = 9) -> list[int]:
    """The measured widths of a dimension of full channels: 1, multiples of step, full, thinned to about points."""
    if full <= 1:
        return [max(full, 1)]
    cand = sorted({1, full, *range(step, full, step)})
    if len(cand) <= points:
        return cand
    picks = {cand[round(i * (len(cand) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


def _interp1(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indices (i, j) of the grid points around x and the weight of j (linear, clamped at the ends)."""
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    j = bisect.bisect_left(grid, x)
    i = j - 1
    return i, j, (x - grid[i]) / (grid[j] - grid[i])


def _trace_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, LayerShape]:
    """Each conv/linear layer's shape, from one forward pass of a single image."""
    found: dict[str, LayerShape] = {}
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if name in found:
                return
            x = inputs[0]
            if isinstance(m, nn.Linear):
                found[name] = LayerShape("linear", m.in_features, m.out_features, bias=m.bias is not None,
                                         out_elems=int(out[0].numel()))
            else:
                dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
                found[name] = LayerShape("conv", m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                                         tuple(m.padding) if not isinstance(m.padding, str) else (0,) * len(m.stride),
                                         tuple(m.dilation), dw, m.bias is not None, tuple(x.shape[2:]),
                                         int(out[0].numel()), 1 if dw else int(m.groups))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def _unit(shape: LayerShape, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The module measured for shape at widths (cin, cout) and its input shape without the batch."""
    if shape.kind == "linear":
        return nn.Linear(cin, cout, bias=shape.bias), (cin,)
    groups = cout if shape.depthwise else shape.groups
    if shape.depthwise:
        cin = cout
    conv = nn.Conv2d(cin, cout, shape.kernel, shape.stride, shape.padding, shape.dilation, groups=groups,
                     bias=shape.bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)), (cin, *shape.spatial)


def _widths(layer: _Layer, kept: dict[str, int], sizes: dict[str, int]) -> tuple[int, int]:
    out = layer.shape.out_full - sum(k * (sizes[g] - kept.get(g, sizes[g])) for g, k in layer.out_groups)
    if layer.shape.depthwise:
        return out, out
    cin = layer.shape.in_full - sum(k * (sizes[g] - kept.get(g, sizes[g])) for g, k in layer.in_groups)
    return cin, out


def table_key(model_name: str, input_shape: tuple[int, ...], groups: list[ChannelGroup], batch_size: int,
              runtime: str, threads: int | None = None, grid_step: int = 8, block: int = 1) -> dict:
    """The settings a table is valid for (a cached table is used only when all of them match)."""
    return {
        "version": TABLE_VERSION,
        "model": model_name,
        "input_shape": [int(s) for s in input_shape],
        "groups": hashlib.sha1(json.dumps([(g.name, g.size) for g in groups]).encode()).hexdigest()[:12],
        "batch_size": int(batch_size),
        "threads": int(threads or torch.get_num_threads()),
        "runtime": runtime,
        "device": f"cpu:{platform.machine()}:{platform.processor() or 'unknown'}:{os.cpu_count()}",
        "torch": torch.__version__,
        "grid_step": int(grid_step),
        "block": int(block),
    }


class LatencyTable:
    """Per-layer latency lookup of one model on one target; predict(kept) gives a whole plan's latency in ms."""

    def __init__(self, key: dict, layers: dict[str, LayerShape], groups: list[ChannelGroup],
                 measured: dict[str, dict], dense_ms: float, other: tuple[float, float] | None = None) -> None:
        self.key = key
        self.sizes = {g.name: g.size for g in groups}
        self.units = {g.name: g.conv_groups for g in groups}  # channels per group channel (grouped convs)
        self.layers: dict[str, _Layer] = {n: _Layer(s) for n, s in layers.items()}
        for g in groups:
            for name, k in g.out_layers.items():
                if name in self.layers:
                    self.layers[name].out_groups.append((g.name, k))
            for name, k in g.in_layers.items():
                if name in self.layers and not self.layers[name].shape.depthwise:
                    self.layers[name].in_groups.append((g.name, k))
        self.measured = measured  # signature -> {"in": grid, "out": grid, "ms": [[...] per in] }
        self.dense_ms = float(dense_ms)
        if other is None:  # no whole-model calibration: the part outside the layers is a constant
            other = (self.dense_ms - self.layers_ms({}), 0.0)
        self.other = (float(other[0]), float(other[1]))

    @property
    def overhead_ms(self) -> float:
        """Predicted latency (ms) of the dense model outside its conv/linear layers."""
        return self.other[0] + self.other[1]

    def layers_ms(self, kept: dict[str, int]) -> float:
        """Predicted latency (ms) of the conv/linear layers alone under kept."""
        return sum(self.layer_ms(name, *_widths(layer, kept, self.sizes)) for name, layer in self.layers.items())

    def output_fraction(self, kept: dict[str, int]) -> float:
        """The fraction of the dense model's conv/linear output elements left under kept."""
        full = sum(layer.shape.out_elems for layer in self.layers.values())
        if full <= 0:
            return 1.0
        left = sum(layer.shape.out_elems * _widths(layer, kept, self.sizes)[1] / max(layer.shape.out_full, 1)
                   for layer in self.layers.values())
        return left / full

    def layer_ms(self, name: str, cin: float, cout: float) -> float:
        """Interpolated latency (ms) of layer name at widths (cin, cout); 0 when either is 0."""
        if cin <= 0 or cout <= 0:
            return 0.0
        shape = self.layers[name].shape
        block = int(self.key.get("block", 1))
        if block > 1:  # a width costs what the next multiple of the kernels' channel block costs
            cin = min(math.ceil(cin / block) * block, shape.in_full) if cin > 1 else cin
            cout = min(math.ceil(cout / block) * block, shape.out_full) if cout > 1 else cout
        m = self.measured[shape.signature()]
        i0, i1, wi = _interp1(m["in"], cin)
        o0, o1, wo = _interp1(m["out"], cout)
        t = m["ms"]
        return ((1 - wi) * ((1 - wo) * t[i0][o0] + wo * t[i0][o1])
                + wi * ((1 - wo) * t[i1][o0] + wo * t[i1][o1]))

    def predict(self, kept: dict[str, int]) -> float:
        """Predicted latency (ms) of the model with group g cut to kept[g] channels (absent groups stay whole)."""
        unknown = [n for n in kept if n not in self.sizes]
        if unknown:
            raise AmasError(f"the latency table has no channel group {unknown[0]!r}; build the table for this model")
        a, b = self.other
        return self.layers_ms(kept) + a + b * self.output_fraction(kept)

    def channel_costs(self) -> dict[str, float]:
        """Latency (ms) saved by removing one channel of each group from the full model (at least a tiny positive)."""
        full = self.predict({})
        return {n: max(full - self.predict({n: s - 1}), 1e-9) for n, s in self.sizes.items()}

    def to_json(self) -> dict:
        """The table as plain JSON data."""
        return {"key": self.key, "dense_ms": self.dense_ms, "other": list(self.other),
                "layers": {n: vars(layer.shape) for n, layer in self.layers.items()}, "measured": self.measured}

    @classmethod
    def from_json(cls, data: dict, groups: list[ChannelGroup]) -> LatencyTable:
        """A table from to_json's data and the model's groups."""
        layers = {n: LayerShape(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in s.items()})
                  for n, s in data["layers"].items()}
        return cls(data["key"], layers, groups, data["measured"], data["dense_ms"], data.get("other"))


def cache_file(cache_dir: str | Path, key: dict) -> Path:
    """The cache file of the table with settings key under cache_dir."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model']}_b{key['batch_size']}_{key['runtime']}_{digest}.json"


def build_table(model: nn.Module, groups: list[ChannelGroup], input_shape: tuple[int, ...], batch_size: int = 64,
                runtime: str = "eager", model_name: str | None = None, cache_dir: str | Path | None = None,
                grid_step: int = 8, grid_points: int = 9, iters: int = 10, progress: bool = True,
                measure: Measure | None = None, block: int | None = None) -> LatencyTable:
    """Measure (or load from cache_dir) the latency table of model on this machine at batch_size on runtime.

    measure(module, x) -> ms replaces the timing on runtime (e.g. a table from an analytic cost). block: widths
    are looked up at the next multiple of block (default grid_step; 1 interpolates the widths as they are): CPU
    conv kernels work on channel blocks, so a 36-wide layer runs as slowly as a 40- or 48-wide one.
    """
    if block is None:
        block = grid_step
    from amas.files.atomic import atomic_write_text

    input_shape = tuple(int(s) for s in input_shape)
    key = table_key(model_name or type(model).__name__, input_shape, groups, batch_size, runtime, grid_step=grid_step,
                    block=block)
    path = cache_file(Path(cache_dir).expanduser(), key) if cache_dir else None
    if path is not None and path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None  # a damaged cache file: measure again and replace it
        if data is not None and data.get("key") == key:
            return LatencyTable.from_json(data, groups)
    measure = measure or measure_on(runtime, iters)
    model = model.eval()
    layers = _trace_layers(model, input_shape)
    touched: dict[str, tuple[bool, bool]] = {n: (False, False) for n in layers}
    for g in groups:
        for n in g.out_layers:
            if n in touched:
                touched[n] = (touched[n][0] or layers[n].depthwise, True)  # depthwise: in follows out
        for n in g.in_layers:
            if n in touched:
                touched[n] = (True, touched[n][1])
    plan: dict[str, tuple[LayerShape, list[int], list[int]]] = {}
    for n, s in layers.items():
        sig = s.signature()
        ins = s.grid(s.in_full, grid_step, grid_points) if touched[n][0] else [s.in_full]
        outs = s.grid(s.out_full, grid_step, grid_points) if touched[n][1] else [s.out_full]
        if sig in plan:  # equal layers under different groups: measure the union of their grids
            _, a, b = plan[sig]
            ins, outs = sorted(set(a) | set(ins)), sorted(set(b) | set(outs))
        plan[sig] = (s, ins, outs)
    total = sum(len(i) * len(o) for _, i, o in plan.values()) + len(CALIBRATION_FRACTIONS)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total + 1, desc=f"latency table b{batch_size} {runtime}", unit="point")
    measured: dict[str, dict] = {}
    for sig, (s, ins, outs) in plan.items():
        rows = []
        for cin in ins:
            row = []
            for cout in outs:
                unit, shape = _unit(s, cin, cout)
                x = torch.randn((batch_size, *shape))
                row.append(float(measure(unit.eval(), x)))
                if bar is not None:
                    bar.update()
            rows.append(row)
        measured[sig] = {"in": ins, "out": outs, "ms": rows}
    x = torch.randn((batch_size, *input_shape))
    plans = [{}, *calibration_plans(groups)]
    whole = round_robin([model, *(pruned_to(model, groups, p, input_shape) for p in plans[1:])], x, measure, rounds=3)
    if bar is not None:
        bar.update(len(plans))
        bar.close()
    table = LatencyTable(key, layers, groups, measured, whole[0])
    points = [(table.output_fraction(p), ms - table.layers_ms(p)) for p, ms in zip(plans, whole, strict=True)]
    table.other = fit_line(points)
    if path is not None:
        from amas.distributed import on_main

        on_main(atomic_write_text, path, json.dumps(table.to_json()) + "\n")  # under torchrun only rank 0 writes
    return table


def validate(table: LatencyTable, model: nn.Module, groups: list[ChannelGroup], plans: list[dict[str, int]],
             rounds: int = 3, iters: int = 10, measure: Measure | None = None) -> dict:
    """Predicted vs measured whole-model latency of each plan; median and max relative error."""
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
