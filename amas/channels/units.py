"""Modules Torch-Pruning prunes as one unit (a custom pruner; it does not trace inside them): the zoo's option-A
shortcut, and timm's SelectiveKernel, whose paths are stacked along a new dimension and re-weighted by an attention
whose output is viewed as (paths, channels) — a layout Torch-Pruning's tracer cannot map, so every group through a
selective-kernel block was left out (skresnet18: 0.7% of its MACs prunable).

A SelectiveKernel's output channel c is the attention-weighted sum of channel c of every path, so removing c from
every path's conv and norm, from the attention's reduce input and from each path's block of its select output equals
masking c after every path's norm (the mask sites: the attention then reads zeros there too). Its input channels are
pruned only when the paths read the whole input (split_input=False); a split input keeps the group whole.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch_pruning as tp
from torch import nn

from amas.channels.frozen_norms import FrozenNormPruner, frozen_norm_types
from amas.channels.shortcut import CUSTOM_PRUNERS as _ZOO_PRUNERS

__all__ = ["SelectiveKernelPruner", "custom_pruners", "unit_layers", "unit_producers", "unit_prunes", "unit_reads",
           "unit_types"]


def _selective_kernel_type() -> type | None:
    """timm's SelectiveKernel when timm's module is loaded (a model that has one imported it; never import timm)."""
    mod = sys.modules.get("timm.layers.selective_kernel")
    return getattr(mod, "SelectiveKernel", None)


class SelectiveKernelPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for timm's SelectiveKernel as one unit (module docstring)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop output channels idxs from every path, the attention's reduce input and each path's select block."""
        idxs = sorted({int(i) for i in idxs})
        width = int(layer.out_channels)
        for path in layer.paths:
            tp.prune_conv_out_channels(path.conv, idxs)
            tp.prune_batchnorm_out_channels(path.bn, idxs)
        tp.prune_conv_in_channels(layer.attn.fc_reduce, idxs)
        tp.prune_conv_out_channels(layer.attn.fc_select, [p * width + i for p in range(layer.num_paths)
                                                          for i in idxs])
        layer.out_channels = width - len(idxs)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop input channels idxs from every path (paths that read the whole input only)."""
        idxs = sorted({int(i) for i in idxs})
        for path in layer.paths:
            tp.prune_conv_in_channels(path.conv, idxs)
        layer.in_channels = int(layer.in_channels) - len(idxs)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        """Output channels."""
        return int(layer.out_channels)

    def get_in_channels(self, layer: nn.Module) -> int:
        """Input channels."""
        return int(layer.in_channels)


def custom_pruners() -> dict[type, tp.pruner.function.BasePruningFunc]:
    """The unit pruners Torch-Pruning gets: the zoo's shortcut, frozen BatchNorms (amas.channels.frozen_norms), and
    timm's SelectiveKernel when timm is loaded."""
    out = dict(_ZOO_PRUNERS)
    out.update({cls: FrozenNormPruner() for cls in frozen_norm_types()})
    sk = _selective_kernel_type()
    if sk is not None:
        out[sk] = SelectiveKernelPruner()
    return out


def unit_types() -> tuple[type, ...]:
    """Unit types whose output channels root a group of their own (their inner convs are hidden from the tracer)."""
    sk = _selective_kernel_type()
    return () if sk is None else (sk,)


def _is_selective_kernel(module: nn.Module) -> bool:
    sk = _selective_kernel_type()
    return sk is not None and isinstance(module, sk)


def unit_prunes(module: nn.Module, outputs: bool) -> bool:
    """Whether amas vouches for removing the unit's output (outputs) or input channels: a SelectiveKernel whose paths
    are a plain conv then a BatchNorm (no conv groups), reading the whole input for input channels."""
    if not _is_selective_kernel(module):
        return False
    from amas.channels.masks import BatchNormBase

    plain = all(isinstance(getattr(p, "conv", None), nn.Conv2d) and p.conv.groups == 1
                and isinstance(getattr(p, "bn", None), BatchNormBase) and p.bn.affine for p in module.paths)
    return plain and (outputs or not module.split_input)


def unit_producers(name: str, module: nn.Module) -> list[str]:
    """Where a unit's output mask goes: after each path's norm (the attention then reads the masked paths)."""
    return [f"{name}.paths.{i}.bn" for i in range(len(module.paths))]


def unit_layers(name: str, module: nn.Module, outputs: bool) -> dict[str, int]:
    """The unit's conv layers whose output (outputs) or input widths follow the unit's channels, and how many of
    their channels each unit channel is (a path's block of the select conv: one per path)."""
    paths = {f"{name}.paths.{i}.conv": 1 for i in range(len(module.paths))}
    if not outputs:
        return paths
    return {**paths, f"{name}.attn.fc_select": int(module.num_paths)}


def unit_reads(name: str, module: nn.Module) -> dict[str, int]:
    """Conv layers inside the unit whose input widths follow its output channels (the attention's reduce conv)."""
    return {f"{name}.attn.fc_reduce": 1}
