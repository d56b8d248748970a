"""The Torch-Pruning pruner for the zoo's option-A shortcut (amas.models.cifar_resnet.ShortcutA).

Kept apart from the model so that building or loading a model never imports Torch-Pruning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp

from amas.models.cifar_resnet import ShortcutA

__all__ = ["CUSTOM_PRUNERS", "ShortcutAPruner"]


class ShortcutAPruner(tp.pruner.function.BasePruningFunc):
    """Torch-Pruning pruner for ShortcutA: input and output channels are pruned independently, the routing follows."""

    TARGET_MODULES = (ShortcutA,)

    def prune_out_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        """Drop output channels idxs."""
        keep = torch.tensor(sorted(set(range(layer.out_planes)) - {int(i) for i in idxs}), dtype=torch.long,
                            device=layer.route.device)
        layer.route = layer.route[keep]
        layer.scale = layer.scale[keep]
        layer.out_planes = int(keep.numel())
        return layer

    def prune_in_channels(self, layer: ShortcutA, idxs: Sequence[int]) -> ShortcutA:
        """Drop input channels idxs; outputs that copied them become zero channels."""
        dropped = {int(i) for i in idxs}
        kept = [i for i in range(layer.in_planes) if i not in dropped]
        new_in = len(kept)
        remap = torch.full((layer.in_planes + 1,), new_in, dtype=torch.long)
        remap[torch.tensor(kept, dtype=torch.long)] = torch.arange(new_in)
        layer.route = remap.to(layer.route.device)[layer.route]
        layer.in_planes = new_in
        return layer

    def get_out_channels(self, layer: ShortcutA) -> int:
        """Output channels."""
        return layer.out_planes

    def get_in_channels(self, layer: ShortcutA) -> int:
        """Input channels."""
        return layer.in_planes


# Torch-Pruning pruners for the zoo's own channel-routing modules (they also define fold_out_scale for masks)
CUSTOM_PRUNERS = {ShortcutA: ShortcutAPruner()}
