"""Planning: from per-channel scores to kept channels at a MACs target (the physical cut is amas.channels.cut).

Ranking: channels are ranked globally by score per unit of cost, score / (MACs saved by removing one
channel of its group at full width), and removed lowest first. Dividing by cost means that, at equal
score, the channel that saves more MACs goes first, and a cheap channel is not removed merely because
it is cheap; a channel with score 0 (a zero mask) goes first whatever its cost. Within a group the
cost is the same for all channels, so the group keeps its highest-scoring channels.

Target: ``target_reduction`` is the fraction of the dense MACs to remove (0.5 → half the MACs). The
plan removes the shortest prefix of the ranking whose pruned model, measured exactly by ``CostModel``
(kept counts after rounding), has at most (1 - target_reduction) × dense MACs: the budget is met and
overshot by as little as the ranking allows.

Rounding: with ``round_to=N`` each group's kept count is rounded up to a multiple of N (or the full
width), because on CPU ragged widths waste most of the MAC savings; the search over
the ranking then removes more elsewhere so the budget still holds. A group through grouped convs counts
channels per conv group: its ``conv_groups × kept`` channels are what is rounded.
"""

from __future__ import annotations

import math

import torch

from amas.channels.cost import CostModel
from amas.errors import PruneError

__all__ = ["kept_counts", "plan_keep", "rounded_count"]


def rounded_count(k: int, size: int, round_to: int, min_channels: int, dead: bool = False, unit: int = 1) -> int:
    """Kept count k raised to at least min_channels and rounded up to a multiple of round_to (capped at size).

    A dead group (every score zero, e.g. a block whose masks all reached zero) cut to its minimum keeps exactly
    min_channels: rounding it up to round_to would spend MACs on zero channels that live groups then lose.
    unit: channels per group channel (ChannelGroup.conv_groups): the rounding and the minimum apply to k·unit.
    """
    least = min(-(-min_channels // unit), size)
    k = max(k, least)
    step = round_to // math.gcd(round_to, unit)
    if step > 1 and not (dead and k <= least):
        k = min(size, int(math.ceil(k / step)) * step)
    return k


def plan_keep(scores: dict[str, torch.Tensor], cost_model: CostModel, target_reduction: float,
              min_channels: int = 1, round_to: int = 1) -> dict[str, torch.Tensor]:
    """Kept channel indices per group (sorted) whose pruned MACs meet the target reduction as closely as possible."""
    if not 0.0 <= float(target_reduction) < 1.0:
        raise PruneError(
            f"target MACs reduction must be in [0, 1), got {target_reduction}; e.g. 0.5 removes half the MACs"
        )
    if min_channels < 1 or round_to < 1:
        raise PruneError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
    groups = cost_model.groups
    unknown = [n for n in scores if n not in groups]
    if unknown:
        raise PruneError(
            f"scores name channel group {unknown[0]!r}, which this model does not have; score this model's groups"
        )
    costs = cost_model.channel_costs()
    order: list[tuple[float, int, int, str]] = []  # (score per MAC, group position, channel, group)
    sorted_idx: dict[str, list[int]] = {}
    dead: set[str] = set()
    for gpos, (name, g) in enumerate(groups.items()):
        if name not in scores:
            continue
        s = torch.as_tensor(scores[name]).detach().flatten().double().cpu()
        if s.numel() != g.size:
            raise PruneError(f"scores for group {name!r} have {s.numel()} values, the group has {g.size} channels")
        if not torch.isfinite(s).all():
            raise PruneError(
                f"scores for group {name!r} are not finite; check the masks or criterion that produced them"
            )
        # channels in ascending score order (ties: lower index first); the top min_channels are never removable
        ranked = sorted(range(g.size), key=lambda i: (float(s[i]), i))
        sorted_idx[name] = ranked
        if not bool((s != 0).any()):
            dead.add(name)
        removable = ranked[: max(0, g.size - min(-(-min_channels // g.conv_groups), g.size))]
        cost = costs[name]
        for i in removable:
            ratio = float(s[i]) / cost if cost > 0 else math.inf
            if float(s[i]) == 0.0:
                ratio = 0.0
            order.append((ratio, gpos, i, name))
    order.sort()
    budget = (1.0 - float(target_reduction)) * cost_model.total_macs

    def counts(prefix: int) -> dict[str, int]:
        removed: dict[str, int] = {}
        for _, _, _, name in order[:prefix]:
            removed[name] = removed.get(name, 0) + 1
        return {n: rounded_count(groups[n].size - removed.get(n, 0), groups[n].size, round_to, min_channels, n in dead,
                                 groups[n].conv_groups) for n in sorted_idx}

    lo, hi = 0, len(order)
    if cost_model.macs(counts(hi)) > budget:
        best = cost_model.macs(counts(hi))
        reach = 100.0 * (1.0 - best / cost_model.total_macs)
        raise PruneError(
            f"a {100 * target_reduction:.1f}% MACs reduction is out of reach: at most {reach:.1f}% with "
            f"min_channels={min_channels}, round_to={round_to} on the prunable groups; lower the target or round_to"
        )
    while lo < hi:  # smallest prefix that meets the budget (MACs fall monotonically with the prefix)
        mid = (lo + hi) // 2
        if cost_model.macs(counts(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept = counts(lo)
    return {n: torch.tensor(sorted(sorted_idx[n][g.size - kept[n]:] if kept[n] else []), dtype=torch.long)
            for n, g in ((n, groups[n]) for n in sorted_idx)}


def kept_counts(keep: dict[str, torch.Tensor]) -> dict[str, int]:
    """Number of kept channels per group."""
    return {n: int(torch.as_tensor(v).numel()) for n, v in keep.items()}


# ---------------------------------------------------------------- removal
