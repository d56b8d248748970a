"""Model cost: MACs and parameters (literature convention), and the exact MACs of a model with fewer channels in its
groups, without pruning it (what the planner measures)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from amas.errors import AmasError, MaskError

if TYPE_CHECKING:
    from amas.channels.group import ChannelGroup

__all__ = ["CostModel", "batched_shape", "count", "device_dtype", "param_count"]


# Convention (matches the CIFAR pruning literature, e.g. HRank/GAL tables): MACs of conv and
# linear layers, plus one per output element for their bias adds; BN, activations, pooling
# and element-wise adds are free. torch's FlopCounterMode counts conv/matmul flops (2 per MAC)
# but ignores biases, so its conv and addmm formulas are wrapped to add 2 flops per biased
# output element. Plain FlopCounterMode/2 gives the same numbers for bias-free nets (ResNets)
# but 313.46M instead of the published 313.7M for VGG-16-BN, whose convs have biases.


def _plus_bias(base: Callable[..., int], bias_index: int) -> Callable[..., int]:
    """Wrap torch's flop formula `base` to add 2 flops per output element when the op has a bias."""

    def formula(*args, out_val=None, **kwargs) -> int:
        flops = base(*args, out_val=out_val, **kwargs)
        if args[bias_index] is not None and isinstance(out_val, torch.Tensor):
            flops += 2 * out_val.numel()
        return flops

    formula._get_raw = True  # receive tensors (FlopCounterMode protocol), as `base` expects
    return formula


_aten = torch.ops.aten
# aten.convolution(input, weight, bias, ...); aten.addmm(bias, input, weight_t) is what nn.Linear runs.
_BIAS_AWARE = {
    op: _plus_bias(flop_registry[op], bias_index)
    for op, bias_index in ((_aten.convolution, 2), (_aten._convolution, 2), (_aten.addmm, 0))
    if op in flop_registry
}


def batched_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return (N, C, H, W) from (C, H, W) (N = 1) or (N, C, H, W)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (1, *shape)
    if len(shape) == 4:
        return shape
    raise AmasError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")


def param_count(model: nn.Module) -> int:
    """Return the number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, int]:
    """Return (MACs per image, params) for an eval-mode forward pass on an input of `input_shape` (a torchvision
    detector: of its tensor part, amas.channels.dense.DetectorTensors, on images after its transform)."""
    from amas.channels.dense import tensor_part

    model = tensor_part(model)
    shape = batched_shape(input_shape)
    device, dtype = device_dtype(model)
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False, custom_mapping=_BIAS_AWARE)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    macs = counter.get_total_flops() // 2 // shape[0]
    return int(macs), param_count(model)



def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a model's first parameter (CPU float32 without parameters)."""
    for p in model.parameters():
        return p.device, (p.dtype if p.is_floating_point() else torch.float32)
    return torch.device("cpu"), torch.float32


@dataclass
class _Layer:
    out_full: int
    in_full: int
    groups: int
    depthwise: bool
    weight_factor: int  # per-image MACs per (out channel x in channel per conv group)
    bias_factor: int  # per-image bias adds per out channel
    out_groups: list[tuple[str, int]] = field(default_factory=list)
    in_groups: list[tuple[str, int]] = field(default_factory=list)


class CostModel:
    """Exact MACs (count's convention) of a model pruned to given kept channel counts per group."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], input_shape: tuple[int, int, int]) -> None:
        self.groups = {g.name: g for g in groups}
        self.input_shape = tuple(int(s) for s in input_shape)
        self.total_macs: int = int(count(model, self.input_shape)[0])
        self.layers: dict[str, _Layer] = self._trace(model)
        for g in groups:
            for name, k in g.out_layers.items():
                self.layers[name].out_groups.append((g.name, k))
            for name, k in g.in_layers.items():
                if not self.layers[name].depthwise:
                    self.layers[name].in_groups.append((g.name, k))
        full = {g.name: g.size for g in groups}
        self._rest = self.total_macs - self._layer_macs(full)

    def _trace(self, model: nn.Module) -> dict[str, _Layer]:
        """Run one image through model and record each conv/linear layer's MAC factors."""
        layers: dict[str, _Layer] = {}
        handles = []

        def hook(name: str):
            def fn(m: nn.Module, inputs: Any, out: torch.Tensor) -> None:
                # one image runs: every row a layer sees is that image's (a detector's RoI head sees one per box)
                x = inputs[0]
                if isinstance(m, nn.Linear):
                    rows = out.numel() // out.shape[-1]
                    wf, bf, cin, cout, grp = rows, rows if m.bias is not None else 0, m.in_features, m.out_features, 1
                else:
                    spatial = (x if m.transposed else out).shape[2:].numel() * out.shape[0]
                    k = int(torch.tensor(m.kernel_size).prod())
                    wf = spatial * k
                    bf = out.shape[2:].numel() * out.shape[0] if m.bias is not None else 0
                    cin, cout, grp = m.in_channels, m.out_channels, m.groups
                if name in layers:
                    layers[name].weight_factor += wf
                    layers[name].bias_factor += bf
                else:
                    dw = grp > 1 and grp == cin == cout
                    layers[name] = _Layer(cout, cin, grp, dw, wf, bf)
            return fn

        for name, m in model.named_modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                handles.append(m.register_forward_hook(hook(name)))
        device, dtype = device_dtype(model)
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros((1, *self.input_shape), device=device, dtype=dtype))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return layers

    def _layer_macs(self, kept: dict[str, int]) -> int:
        total = 0
        for layer in self.layers.values():
            out = layer.out_full - sum(k * (self.groups[g].size - kept[g]) for g, k in layer.out_groups)
            if layer.depthwise:
                per_group_in = 1
            else:
                cin = layer.in_full - sum(k * (self.groups[g].size - kept[g]) for g, k in layer.in_groups)
                per_group_in = cin // layer.groups
            total += layer.weight_factor * out * per_group_in + layer.bias_factor * out
        return total

    def macs(self, kept: dict[str, int]) -> int:
        """MACs per image after pruning group g to kept[g] channels (groups absent stay at full width)."""
        full = {}
        for name, g in self.groups.items():
            k = int(kept.get(name, g.size))
            if not 0 <= k <= g.size:
                raise MaskError(f"kept channels for group {name!r} must be in 0..{g.size}, got {k}")
            full[name] = k
        unknown = [n for n in kept if n not in self.groups]
        if unknown:
            raise MaskError(f"unknown channel group {unknown[0]!r}; use the names from find_groups")
        return self._rest + self._layer_macs(full)

    def uniform_share(self, target_reduction: float) -> float:
        """The largest share r of every group's channels (ceil(r·size) kept) whose cut reaches the target reduction."""
        budget = (1.0 - float(target_reduction)) * self.total_macs
        lo, hi = 0.0, 1.0
        for _ in range(30):
            r = (lo + hi) / 2
            kept = {n: max(1, math.ceil(r * g.size)) for n, g in self.groups.items()}
            lo, hi = (r, hi) if self.macs(kept) <= budget else (lo, r)
        return lo

    def channel_costs(self) -> dict[str, float]:
        """MACs saved by removing one channel of each group from the full model."""
        return {name: float(self.total_macs - self.macs({name: g.size - 1})) for name, g in self.groups.items()}
