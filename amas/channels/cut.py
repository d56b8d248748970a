"""The physical cut: remove the channels a plan drops with Torch-Pruning, fold the surviving mask values into the
weights, and rebuild pruned models from a recipe."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from amas.channels.bake import bake_convs
from amas.channels.group import ChannelGroup
from amas.channels.groups import find_groups
from amas.channels.masks import remove_mask_hooks
from amas.channels.tracing import build_graph
from amas.errors import PruneError

__all__ = ["make_recipe", "model_from_recipe", "prune_model"]

RECIPE_VERSION = 1


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
    verify: bool = True,
) -> nn.Module:
    """A pruned deep copy of model: kept channels per group only, mask values folded in, no mask hooks left (verify:
    checked once against the masked model, amas.channels.verify)."""
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
    bake_convs(net)  # weight-standardised convs: plain convs with the weight they computed, before folds and cuts
    was_training = net.training
    net.eval()
    for name, m in masks.items():
        _fold(net, by_name[name], torch.as_tensor(m).detach().flatten())
    folded = copy.deepcopy(net) if verify and any(len(kept[n]) < by_name[n].size for n in kept) else None
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
    if folded is not None:
        from amas.channels.verify import check_cut

        check_cut(folded, net, groups, kept, tuple(input_shape))
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
