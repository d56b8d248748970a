"""Depth as well as width: a residual block whose inner channels are all dropped is removed, leaving its shortcut.

When every channel of one of a block's inner groups is masked to zero, the residual branch no longer depends on
its input: with bias-free convs it is the per-channel constant c its last BatchNorm makes of a zero input (a
Bottleneck whose first group is dropped carries the constant through its 1x1 conv, still spatially constant).
The block is then exactly ``act(shortcut(x) + c)``, which ``RemovedBlock`` computes without the convs: removal
equals masking, as for channels (tested). Known blocks: the zoo's CIFAR BasicBlock (option-A shortcut) and
torchvision's BasicBlock and Bottleneck.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from amas.channels.cut import prune_model
from amas.channels.group import ChannelGroup
from amas.errors import PruneError
from amas.models.removed_block import RemovedBlock

__all__ = ["RemovedBlock", "removable_groups", "prune_with_blocks", "effective_counts"]


def _parts(block: nn.Module) -> tuple[str, str, str] | None:
    """(last BN, shortcut attribute, activation attribute) of a known residual block, else None."""
    cls = type(block).__name__
    mod = type(block).__module__
    if cls == "BasicBlock" and mod.startswith("amas."):
        return "bn2", "shortcut", "relu2"
    if cls == "BasicBlock" and mod.startswith("torchvision."):
        return "bn2", "downsample", "relu"
    if cls == "Bottleneck" and mod.startswith("torchvision."):
        return "bn3", "downsample", "relu"
    return None


def removable_groups(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, str]:
    """Group name -> residual block path, for the groups that lie wholly inside a known block (its inner channels)."""
    blocks = {n: m for n, m in model.named_modules() if n and _parts(m) is not None}
    out = {}
    for g in groups:
        layers = [g.name, *g.out_layers, *g.in_layers, *g.producers]
        for path in blocks:
            if all(name.startswith(path + ".") for name in layers):
                out[g.name] = path
                break
    return out


def effective_counts(kept: dict[str, int], blocks: dict[str, str]) -> dict[str, int]:
    """Kept counts with every inner group of a removed block at 0 (a Bottleneck loses all its convs at once)."""
    gone = {blocks[n] for n, k in kept.items() if k == 0 and n in blocks}
    return {n: (0 if blocks.get(n) in gone else k) for n, k in kept.items()}


def prune_with_blocks(model: nn.Module, groups: list[ChannelGroup], keep: dict[str, Any],
                      masks: dict[str, torch.Tensor] | None = None,
                      input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """prune_model, where a removable group keeping no channel removes its whole block (RemovedBlock)."""
    blocks = removable_groups(model, groups)
    by_name = {g.name: g for g in groups}
    masks = dict(masks or {})
    keep = dict(keep)
    dropped: list[str] = []
    for name, idx in list(keep.items()):
        if torch.as_tensor(idx).numel() > 0:
            continue
        if name not in blocks:
            raise PruneError(f"group {name!r} would keep no channel and is not the inner group of a residual block; "
                             f"keep at least one channel (min_channels >= 1)")
        # keep one channel, zeroed: the pruned net equals the masked one and the branch becomes a constant
        keep[name] = torch.tensor([0])
        base = masks.get(name, torch.ones(by_name[name].size))
        masks[name] = torch.zeros_like(torch.as_tensor(base, dtype=torch.float32))
        if blocks[name] not in dropped:
            dropped.append(blocks[name])
    net = prune_model(model, groups, keep, masks=masks, input_shape=input_shape)
    if not dropped:
        return net
    shape = tuple(input_shape or groups[0].input_shape)
    consts: dict[str, torch.Tensor] = {}
    handles = []
    for path in dropped:
        bn_name = _parts(net.get_submodule(path))[0]

        def grab(_m: nn.Module, _i: Any, out: torch.Tensor, path: str = path) -> None:
            consts[path] = out[0, :, 0, 0].detach().clone()

        handles.append(net.get_submodule(f"{path}.{bn_name}").register_forward_hook(grab))
    was_training = net.training
    try:
        net.eval()
        p = next(net.parameters())
        with torch.no_grad():
            net(torch.zeros((1, *shape), device=p.device, dtype=p.dtype))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    for path in dropped:
        block = net.get_submodule(path)
        _, sc, act = _parts(block)
        parent_name, _, child = path.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, RemovedBlock(getattr(block, sc), consts[path], getattr(block, act)))
    return net
