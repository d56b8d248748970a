"""Convolutions that compute their weight in forward (timm's StdConv2d / ScaledStdConv2d of normalizer-free nets:
weight standardisation with a per-channel gain) baked into plain convolutions where a cut needs it.

Standardisation is per output channel over the input channels, so removing an input channel changes every filter's
statistics: removal would not equal masking. A baked conv holds the weight the layer computed before the cut, so
removing channels from it does. The cut bakes before it folds masks or removes channels; the pruned model keeps
plain convs there (``BakedConv``), which pruned files record by name and shape.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["BakedConv", "bake_convs", "bakeable", "baked_conv", "baked_copy", "baked_layers", "rebuild_baked"]

_CONV_FNS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, torch.nn.functional.conv1d: 1,
             torch.nn.functional.conv2d: 2, torch.nn.functional.conv3d: 3}
_PLAIN = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


class BakedConv(nn.Conv2d):
    """A plain 2-d convolution holding the weight a weight-computing conv had computed (amas.channels.bake)."""


class _ConvCalls(TorchFunctionMode):
    """Records every convolution call's function, input and arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _CONV_FNS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _call_args(args: tuple, kwargs: dict) -> dict:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    out = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    out.update(dict(zip(names, args, strict=False)))
    out.update(kwargs)
    return out


def _computes_weight(module: nn.Module) -> bool:
    """A 2-d conv subclass that runs its own forward or holds per-channel tensors beyond weight and bias."""
    if not isinstance(module, nn.Conv2d) or isinstance(module, BakedConv) or module.transposed:
        return False
    extra = [n for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
             if n not in ("weight", "bias") and t.numel() > 1]
    return bool(extra) or type(module).forward not in _PLAIN


def baked_conv(module: nn.Module) -> BakedConv | None:
    """The plain conv equal to module's forward (its computed weight and bias), or None where one call of a conv
    function on the module's own input does not make up its forward (padding of its own, several convs, ...)."""
    if not _computes_weight(module) or module.padding_mode != "zeros":
        return None
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module).to("cpu").eval()
    for m in probe.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    k = max(probe.kernel_size)
    xs = [torch.randn(2, probe.in_channels, k + s, k + s + 1, generator=gen) for s in (3, 4)]
    try:
        with torch.no_grad():
            with _ConvCalls() as rec:
                want = probe(xs[0])
            if len(rec.calls) != 1:
                return None
            a = _call_args(rec.calls[0][1], rec.calls[0][2])
            if a["input"] is not xs[0] or not isinstance(a["padding"], (int, tuple, list)):
                return None
            baked = BakedConv(probe.in_channels, probe.out_channels, probe.kernel_size, stride=a["stride"],
                              padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                              bias=a["bias"] is not None)
            baked.weight.copy_(a["weight"])
            if a["bias"] is not None:
                baked.bias.copy_(a["bias"])
            same = all(torch.allclose(baked(x), probe(x) if x is not xs[0] else want, rtol=1e-4, atol=1e-5)
                       for x in xs)
    except Exception:  # a layer that cannot be probed is not baked (its groups stay whole)
        return None
    if not same:
        return None
    p = next(module.parameters())
    return baked.to(device=p.device, dtype=p.dtype).train(module.training)


def bakeable(module: nn.Module) -> bool:
    """Whether module computes its weight in forward and a plain conv reproduces it (see baked_conv)."""
    return baked_conv(module) is not None


def bake_convs(model: nn.Module) -> list[str]:
    """Replace, in model itself, every conv that computes its weight and can be baked by its BakedConv; their names."""
    names = []
    for name, module in list(model.named_modules()):
        baked = baked_conv(module) if name else None
        if baked is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, baked)
        names.append(name)
    return names


def baked_copy(model: nn.Module) -> nn.Module:
    """model itself when no conv computes its weight, else a deep copy with those convs baked (what the cut will
    cut: Torch-Pruning traces a standardised weight's reshapes as graph outputs and would leave its groups out)."""
    if not any(_computes_weight(m) for m in model.modules()):
        return model
    net = copy.deepcopy(model)
    bake_convs(net)
    return net


def baked_layers(model: nn.Module) -> dict[str, dict]:
    """The BakedConv layers of model and what rebuilds them: {name: {stride, padding, dilation, groups, bias}}."""
    return {name: {"stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
                   "groups": int(m.groups), "bias": m.bias is not None, "kernel_size": list(m.kernel_size)}
            for name, m in model.named_modules() if isinstance(m, BakedConv)}


def rebuild_baked(model: nn.Module, layers: dict[str, dict]) -> None:
    """Put a BakedConv (widths still those of the base; rebuild_from_shapes sets them) at each name of layers."""
    for name, spec in layers.items():
        old = model.get_submodule(name)
        conv = BakedConv(old.in_channels, old.out_channels, spec["kernel_size"], stride=spec["stride"],
                         padding=spec["padding"], dilation=spec["dilation"], groups=spec["groups"], bias=spec["bias"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, conv)
