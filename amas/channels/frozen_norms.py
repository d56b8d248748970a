"""Frozen BatchNorms as channel layers: torchvision's FrozenBatchNorm2d (every torchvision detector and segmenter
built on a pretrained backbone has them) and timm's FrozenBatchNormAct2d.

They hold their affine and statistics in buffers and compute ``x * scale + shift`` in their forward, so Torch-Pruning
traces them as plain arithmetic and would cut nothing inside them: every group through one was left out (a
fasterrcnn_resnet50_fpn built with ``weights_backbone`` kept its whole backbone). Registered as a Torch-Pruning unit
(in and out channels one to one, as a BatchNorm), the cut slices their four buffers; a mask goes after them (before
the activation of timm's norm+act) and folds into their weight and bias, as into a BatchNorm's. They stay frozen:
no statistics are re-estimated and nothing of theirs trains.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch_pruning as tp
from torch import nn

__all__ = ["FrozenNormPruner", "frozen_norm_types", "is_frozen_norm"]

_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_CLASSES = (("torchvision.ops.misc", "FrozenBatchNorm2d"), ("timm.layers.norm_act", "FrozenBatchNormAct2d"))


def frozen_norm_types() -> tuple[type, ...]:
    """The frozen BatchNorm classes of the libraries loaded (a model that has one imported its library)."""
    found = []
    for module, attr in _CLASSES:
        cls = getattr(sys.modules.get(module), attr, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def is_frozen_norm(module: object) -> bool:
    """Whether module is a frozen BatchNorm of torchvision or timm (the class itself: a subclass may compute
    otherwise) with its four per-channel buffers and no parameters of its own."""
    if type(module) not in frozen_norm_types():
        return False
    assert isinstance(module, nn.Module)
    bufs = dict(module.named_buffers(recurse=False))
    shapes = {bufs[n].shape if bufs.get(n) is not None else None for n in _BUFFERS}
    return len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 1 \
        and not any(True for _ in module.parameters(recurse=False))


class FrozenNormPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for a frozen BatchNorm: its channels in and out are the same channels."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop channels idxs from the weight, bias and statistics."""
        drop = {int(i) for i in idxs}
        keep = [i for i in range(self.get_out_channels(layer)) if i not in drop]
        for name in _BUFFERS:
            setattr(layer, name, getattr(layer, name).detach()[keep].clone())
        if isinstance(getattr(layer, "num_features", None), int):
            layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels  # Torch-Pruning couples in and out channels by this identity

    def get_out_channels(self, layer: nn.Module) -> int:
        """Channels."""
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels
