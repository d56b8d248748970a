"""Planning by latency (prune.cost: latency): kept channels that meet a predicted-latency budget (plan_by_latency:
with the shared table of the config's target).

Ranking: channels are ranked globally by score per unit of predicted latency, score / (ms saved by removing
one channel of its group at full width, from the latency table), lowest removed first; zero scores first.

Budget: ``target_latency`` is the fraction of the dense model's predicted latency the plan may keep (0.5 →
half the teacher's latency at the table's batch size). The plan is the shortest prefix of the ranking whose
predicted latency (kept counts after rounding) is within the budget. Predicted latency need not fall
monotonically with the prefix (measured tables are noisy), so the prefixes are scanned in order rather than
bisected: the plan is the first one within budget, so the prefix one shorter, which differs from it by one
rounding step of one group, is over it.

Rounding: each group's count is rounded up as ``amas.channels.plan.rounded_count`` does, then raised further to the
width, within one rounding step, that the table predicts fastest for the whole model (ties: more channels):
widths the target runs fast are chosen, not only a fixed multiple.

Block removal: the groups of ``blocks`` (inner group -> residual block, amas.channels.blocks.removable_groups)
may lose every channel; the block then becomes its shortcut and all its inner groups count as empty.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from amas.channels.blocks import effective_counts, removable_groups
from amas.channels.plan import rounded_count
from amas.errors import PruneError
from amas.latency.model import LatencyTable
from amas.latency.table import shared_table

__all__ = ["plan_by_latency", "plan_keep_latency", "plan_counts_latency"]


def _ranking(scores: dict[str, torch.Tensor], table: LatencyTable, min_channels: int, removable: set[str]
             ) -> tuple[list[tuple[float, int, int, str]], dict[str, list[int]], set[str]]:
    costs = table.channel_costs()
    order, sorted_idx, dead = [], {}, set()
    for gpos, (name, size) in enumerate(table.sizes.items()):
        if name not in scores:
            continue
        s = torch.as_tensor(scores[name]).detach().flatten().double().cpu()
        if s.numel() != size:
            raise PruneError(f"scores for group {name!r} have {s.numel()} values, the group has {size} channels")
        if not torch.isfinite(s).all():
            raise PruneError(f"scores for group {name!r} are not finite; check the masks or criterion that made them")
        ranked = sorted(range(size), key=lambda i: (float(s[i]), i))
        sorted_idx[name] = ranked
        if not bool((s != 0).any()):
            dead.add(name)
        floor = 0 if name in removable else min(-(-min_channels // table.units[name]), size)
        for i in ranked[: size - floor]:
            order.append((0.0 if float(s[i]) == 0.0 else float(s[i]) / costs[name], gpos, i, name))
    order.sort()
    return order, sorted_idx, dead


def _fast_width(table: LatencyTable, counts: dict[str, int], name: str, k: int, step: int) -> int:
    """The width in [k, k + step - 1] (capped at the group size) the table predicts fastest; ties: the larger."""
    size = table.sizes[name]
    best_w, best_ms = k, math.inf
    for w in range(k, min(size, k + max(step, 1) - 1) + 1):
        ms = table.predict({**counts, name: w})
        if ms <= best_ms + 1e-12:
            best_w, best_ms = w, ms
    return best_w


def plan_counts_latency(scores: dict[str, torch.Tensor], table: LatencyTable, target_latency: float,
                        min_channels: int = 1, round_to: int = 1, blocks: dict[str, str] | None = None,
                        fast_rounding: bool = True) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Kept count per group within target_latency × the dense predicted latency, and each group's ranking."""
    if not 0.0 < float(target_latency) <= 1.0:
        raise PruneError(f"prune.target_latency must be in (0, 1], got {target_latency}; e.g. 0.5 halves the latency")
    if min_channels < 1 or round_to < 1:
        raise PruneError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
    unknown = [n for n in scores if n not in table.sizes]
    if unknown:
        raise PruneError(f"scores name channel group {unknown[0]!r}, which the latency table does not have")
    blocks = dict(blocks or {})
    removable = set(blocks)
    order, sorted_idx, dead = _ranking(scores, table, min_channels, removable)
    budget = float(target_latency) * table.predict({})

    def counts(prefix: int) -> dict[str, int]:
        removed: dict[str, int] = {}
        for *_, name in order[:prefix]:
            removed[name] = removed.get(name, 0) + 1
        out = {}
        for n in sorted_idx:
            size = table.sizes[n]
            k = size - removed.get(n, 0)
            out[n] = 0 if (k == 0 and n in removable) else rounded_count(k, size, round_to, min_channels, n in dead,
                                                                         table.units[n])
        return effective_counts(out, blocks)

    last, plan = None, None
    for prefix in range(len(order) + 1):
        c = counts(prefix)
        if c == last:
            continue
        last = c
        if table.predict(c) <= budget:
            plan = c
            break
    if plan is None:
        reach = table.predict(counts(len(order))) / table.predict({})
        raise PruneError(
            f"a latency of {100 * target_latency:.1f}% of the dense model's is out of reach: at best "
            f"{100 * reach:.1f}% with min_channels={min_channels}, round_to={round_to}; raise prune.target_latency "
            f"or allow block removal (prune.block_removal=true)"
        )
    if fast_rounding and round_to > 1:
        for n in plan:
            if plan[n] > 0:
                w = _fast_width(table, plan, n, plan[n], round_to)
                if table.predict({**plan, n: w}) <= budget:
                    plan[n] = w
    return plan, sorted_idx


def plan_keep_latency(scores: dict[str, torch.Tensor], table: LatencyTable, target_latency: float,
                      min_channels: int = 1, round_to: int = 1,
                      blocks: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Kept channel indices per group (highest scores, sorted) whose predicted latency meets the budget."""
    plan, ranked = plan_counts_latency(scores, table, target_latency, min_channels, round_to, blocks)
    return {n: torch.tensor(sorted(ranked[n][len(ranked[n]) - k:] if k else []), dtype=torch.long)
            for n, k in plan.items()}


def plan_by_latency(scores: dict, model: nn.Module, groups: list, input_shape: Sequence[int], prune_cfg,
                    target_latency: float) -> dict:
    """Kept channel indices at target_latency × the dense predicted latency (prune.cost: latency)."""
    table = shared_table(copy.deepcopy(model).cpu().eval(), groups, input_shape, prune_cfg)
    blocks = removable_groups(model, groups) if prune_cfg.block_removal else None
    return plan_keep_latency(scores, table, target_latency, prune_cfg.min_channels, prune_cfg.round_to, blocks)


def plan_scores(scores: dict[str, torch.Tensor], model: nn.Module, groups: list, cost: Any, target: float,
                prune_cfg: Any) -> dict[str, torch.Tensor]:
    """Kept channels per group from per-channel scores at target: the fraction of the MACs to remove, or with
    prune.cost latency the fraction of the latency."""
    if getattr(prune_cfg, "cost", "macs") == "latency":
        return plan_by_latency(scores, model, groups, cost.input_shape, prune_cfg, 1.0 - float(target))
    from amas.channels.plan import plan_keep

    return plan_keep(scores, cost, target, prune_cfg.min_channels, prune_cfg.round_to)
