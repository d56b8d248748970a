"""The one search set-up, shared by the pipeline's search stage and ``amas.MaskSearch``: the student's channel groups,
their cost model, masks at 1 and the search objective."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from amas.channels.cost import CostModel
from amas.channels.group import ChannelGroup
from amas.channels.masks import ChannelMasks
from amas.config import SearchConfig
from amas.errors import SearchError
from amas.search.objective import SearchObjective

__all__ = ["SearchParts", "build_search"]


@dataclass
class SearchParts:
    """What a search runs on: groups, their cost model, the masks (hooks not yet attached) and the objective."""

    groups: list[ChannelGroup]
    cost: CostModel
    masks: ChannelMasks
    objective: SearchObjective


def build_search(net: nn.Module, teacher: Any, cfg: SearchConfig, input_shape: tuple[int, int, int], num_classes: int,
                 *, total_steps: int, round_to: int, min_channels: int, residual: bool = False,
                 ignore: Any = (), task: Any = None, what: str = "the model",
                 penalty_costs: Callable[[list[ChannelGroup]], dict[str, float] | None] | None = None) -> SearchParts:
    """Channel groups of net (the student, or a detector's tensor part), their cost model, masks at 1 and the search
    objective against teacher; a one-line SearchError when net has no group to prune."""
    from amas.channels.groups import find_groups

    groups = find_groups(net, input_shape, residual=residual, ignore=ignore)
    if not groups:
        raise SearchError(f"{what} has no prunable channel groups (no conv or linear output that can lose channels); "
                          "keep fewer layers whole with prune.ignore, or choose another model")
    cost = CostModel(net, groups, input_shape)
    masks = ChannelMasks(groups, init=1.0)
    objective = SearchObjective(teacher, groups, masks, cost, cfg, input_shape, num_classes, total_steps=total_steps,
                                round_to=round_to, min_channels=min_channels,
                                penalty_costs=penalty_costs(groups) if penalty_costs else None, task=task)
    return SearchParts(groups, cost, masks, objective)
