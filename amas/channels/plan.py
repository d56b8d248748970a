"""From per-channel scores to a physically smaller network: plan kept channels at a MACs target, remove them
with Torch-Pruning, fold the surviving mask values into the weights, and rebuild pruned models from a recipe.

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
width), because on CPU ragged widths waste most of the MAC savings (see DESIGN.md); the search over
the ranking then removes more elsewhere so the budget still holds. A group through grouped convs counts
channels per conv group: its ``conv_groups × kept`` channels are what is rounded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.groups import ChannelGroup, find_groups
from amas.channels.masks import remove_mask_hooks
from amas.channels.tracing import build_graph
from amas.errors import PruneError

__all__ = ["PruneError", "plan_keep", "prune_model", "make_recipe", "model_from_recipe", "kept_counts"]

RECIPE_VERSION = 1


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


def _fold(net: nn.Module, group: ChannelGroup, mask: torch.Tensor) -> None:
    """Multiply mask into each producer of group (BN weight and bias, or conv/linear weight and bias)."""
    for prod in group.producers:
        module = net.get_submodule(prod)
        pos, roots = group.index[prod]
        ref = module.scale if hasattr(module, "fold_out_scale") else module.weight
        f = torch.ones(ref.shape[0], dtype=ref.dtype, device=ref.device)
        f[torch.tensor(pos, device=f.device)] = mask.to(f)[torch.tensor(roots, device=f.device)]
        with torch.no_grad():
            if hasattr(module, "fold_out_scale"):  # a channel-routing module (the option-A shortcut)
                module.fold_out_scale(f)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.weight is None or module.bias is None:
                    raise PruneError(f"cannot fold a mask into '{prod}': it has no affine parameters")
                module.weight.mul_(f)
                module.bias.mul_(f)
            else:
                module.weight.mul_(f.view(-1, *([1] * (module.weight.dim() - 1))))
                if module.bias is not None:
                    module.bias.mul_(f)


def _check_keep(groups: dict[str, ChannelGroup], keep: dict[str, Any]) -> dict[str, list[int]]:
    out = {}
    for name, idx in keep.items():
        if name not in groups:
            raise PruneError(
                f"kept channels name group {name!r}, which this model does not have; plan on this model's groups"
            )
        g = groups[name]
        ids = sorted({int(i) for i in torch.as_tensor(idx).flatten().tolist()})
        if not ids:
            raise PruneError(f"group {name!r} would keep no channel; keep at least one (min_channels >= 1)")
        if ids[0] < 0 or ids[-1] >= g.size:
            raise PruneError(f"kept channel index out of range for group {name!r} (size {g.size})")
        out[name] = ids
    return out


def prune_model(
    model: nn.Module,
    groups: list[ChannelGroup],
    keep: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """A pruned deep copy of model: kept channels per group only, mask values folded in, no mask hooks left."""
    by_name = {g.name: g for g in groups}
    kept = _check_keep(by_name, keep)
    if input_shape is None:
        if not groups:
            return _plain_copy(model)
        input_shape = groups[0].input_shape
    masks = dict(masks or {})
    for name, m in masks.items():
        if name not in by_name:
            raise PruneError(f"mask for unknown channel group {name!r}; the masks were saved for another model")
        if torch.as_tensor(m).numel() != by_name[name].size:
            raise PruneError(
                f"mask {name!r} has {torch.as_tensor(m).numel()} values, the group has {by_name[name].size}"
            )
    net = _plain_copy(model)
    was_training = net.training
    net.eval()
    for name, m in masks.items():
        _fold(net, by_name[name], torch.as_tensor(m).detach().flatten())
    dg = build_graph(net, tuple(input_shape), groups[0].ignore if groups else ())
    for g in groups:
        if g.name not in kept or len(kept[g.name]) == g.size:
            continue
        gone = set(range(g.size)) - set(kept[g.name])
        drop = [c for c in range(g.size * g.conv_groups) if c % g.size in gone]  # from every conv group
        root = net.get_submodule(g.name)
        pruner = dg.get_pruner_of_module(root)
        if pruner is None or pruner.get_out_channels(root) != g.size * g.conv_groups:
            raise PruneError(
                f"group {g.name!r} does not match the model (was it pruned already?); use groups found on this model"
            )
        dg.get_pruning_group(root, pruner.prune_out_channels, drop).prune()
    net.train(was_training)
    return net


def _plain_copy(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    remove_mask_hooks(net)
    return net


# ---------------------------------------------------------------- recipe


def make_recipe(model_record: dict, input_shape: tuple[int, int, int], keep: dict[str, Any],
                ignore: Sequence[str] = ()) -> dict:
    """The rebuild recipe: base model (name, num_classes, in_channels), input shape, kept channels per group and the
    layers prune.ignore kept whole (recorded only when there are any)."""
    counts = {n: (int(v) if isinstance(v, int) else int(torch.as_tensor(v).numel())) for n, v in keep.items()}
    return {
        "version": RECIPE_VERSION,
        "model": {k: model_record[k] for k in ("name", "num_classes", "in_channels", "kwargs") if k in model_record},
        "input_shape": [int(s) for s in input_shape],
        "kept": counts,
        **({"ignore": [str(n) for n in ignore]} if ignore else {}),
    }


def model_from_recipe(recipe: dict) -> nn.Module:
    """Rebuild the pruned architecture (random weights) from a recipe: create_model + groups + pruning to the counts."""
    from amas.models import create_model

    try:
        base = recipe["model"]
        shape = tuple(int(s) for s in recipe["input_shape"])
        counts = {str(k): int(v) for k, v in recipe["kept"].items()}
    except (KeyError, TypeError, ValueError):
        raise PruneError(
            "the pruning recipe is incomplete (needs model, input_shape, kept); re-export the model"
        ) from None
    model = create_model(base["name"], num_classes=int(base["num_classes"]), in_channels=int(base["in_channels"]),
                         **base.get("kwargs", {}))
    groups = {g.name: g for g in find_groups(model, shape, residual=True, ignore=recipe.get("ignore", ()))}
    missing = [n for n in counts if n not in groups]
    if missing:
        raise PruneError(f"the recipe prunes group {missing[0]!r}, which this amas version does not find in "
                         f"{base['name']}; export again with this version")
    for n, k in counts.items():
        if not 1 <= k <= groups[n].size:
            raise PruneError(
                f"the recipe keeps {k} channels of group {n!r} (size {groups[n].size}); re-export the model"
            )
    keep = {n: torch.arange(k) for n, k in counts.items()}
    return prune_model(model, list(groups.values()), keep, input_shape=shape).eval()
