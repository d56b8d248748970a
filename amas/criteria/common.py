"""Shared plumbing of the criteria: a group's member layers, producer index maps, aggregation, limited batches.

**Members of a group.** Weight criteria (l1, l2, fpgm, srr, Taylor on weights) read every conv/linear layer
whose output channels are the group's channels one to one (``ChannelGroup.out_layers``; a residual group of a
torchvision ResNet has the stem conv and each block's last conv). BN criteria (bn_scale, Taylor on BN) and
activation criteria (hrank, apoz) read the group's *producers* (``ChannelGroup.producers``: the BNs, or the
conv/linear layers without a BN), through the producer's exact position → group-channel map
(``ChannelGroup.index``), which also covers BNs that read a concatenation (DenseNet).

**Aggregation over members.** Each member gives one score per group channel. With ``normalise=True`` every
member's vector is divided by its own mean first (a member whose scores are all zero stays zero), so each
layer of a coupled group counts equally whatever its fan-in or scale; the group's score is the mean over
members. The per-layer normalisation also puts every group on the same scale (mean 1), so the global ranking
in ``prune.plan_keep`` (score per MAC saved) compares channels by how weak they are *within their layer*,
weighted by cost. Criteria that are on a common scale across layers by construction (BN |γ|, which network
slimming thresholds globally; APoZ, a fraction; random) aggregate without normalisation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from amas.channels.group import ChannelGroup

__all__ = ["aggregate", "by_position", "conv_members", "producer_positions", "to_group", "take", "model_device",
           "is_bn"]


def is_bn(module: nn.Module) -> bool:
    """True for BatchNorm layers of any dimension, frozen ones (torchvision's, timm's) included."""
    from amas.channels.frozen_norms import is_frozen_norm

    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen_norm(module)


def model_device(model: nn.Module) -> torch.device:
    """The device of model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def conv_members(model: nn.Module, group: ChannelGroup) -> list[str]:
    """Conv/linear layers whose output channels are the group's channels one to one, in named_modules order."""
    out = []
    for name in group.out_layers:
        w = model.get_submodule(name).weight
        if w.shape[0] == group.size * group.conv_groups:
            out.append(name)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(out, key=lambda n: order.get(n, 0))


def by_position(values: torch.Tensor, group: ChannelGroup) -> torch.Tensor:
    """Per-output-channel rows of a member layer → one row per group channel (its conv_groups rows side by side).

    A group through grouped convs has channel j = every output channel c with c % group.size == j; without grouped
    convs this is values itself (as 2-D rows).
    """
    v = values.reshape(values.shape[0], -1)
    if group.conv_groups == 1:
        return v
    return v.reshape(group.conv_groups, group.size, -1).transpose(0, 1).reshape(group.size, -1)


def producer_positions(group: ChannelGroup, producer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the producer's output, group channel of each position) as long tensors."""
    pos, roots = group.index.get(producer, (list(range(group.size)), list(range(group.size))))
    return torch.tensor(pos, dtype=torch.long), torch.tensor(roots, dtype=torch.long)


def to_group(values: torch.Tensor, group: ChannelGroup, producer: str) -> torch.Tensor:
    """Per-output-channel values of a producer → one value per group channel (mean over positions mapping to it)."""
    pos, roots = producer_positions(group, producer)
    v = values.detach().double().cpu().flatten()[pos]
    total = torch.zeros(group.size, dtype=torch.float64).index_add_(0, roots, v)
    count = torch.zeros(group.size, dtype=torch.float64).index_add_(0, roots, torch.ones_like(v))
    return total / count.clamp(min=1)


def aggregate(per_layer: list[torch.Tensor], normalise: bool) -> torch.Tensor:
    """Mean over members of per-channel scores, each member divided by its own mean first when normalise."""
    if not per_layer:
        raise ValueError("a channel group with no member layer to score")
    rows = []
    for s in per_layer:
        s = s.detach().double().cpu().flatten()
        if normalise:
            m = float(s.mean())
            s = s / m if m > 0 else torch.zeros_like(s)
        rows.append(s)
    return torch.stack(rows).mean(0).float()


def take(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches (fewer when the data has fewer)."""
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(0)  # type: ignore[attr-defined]
    return itertools.islice(iter(batches), max(0, int(n)))
