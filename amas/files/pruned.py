"""The amas `pruned.pt` file: save a pruned model, and load it back without tracing or Torch-Pruning.

``pruned.pt`` holds only tensors and plain containers (it loads with ``torch.load(weights_only=True)``): the
state_dict, the recipe (base model name and arguments, the kept channel count of every pruned group, see
amas.prune, and the width attributes of every layer), and metadata (dataset, input shape, normalisation, class
count, accuracy, MACs, params, amas and format versions). Loading builds the base model, sets the stored widths
and resizes its tensors to the file's; files from before the stored widths are rebuilt by pruning the base model
again (amas.channels.cut.model_from_recipe).
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from amas.errors import CheckpointError, ExportError
from amas.files.checkpoint import FORMAT_VERSION, atomic_save, load_file, load_model

__all__ = ["save_pruned", "load_pruned", "load_any_model", "layer_shapes", "rebuild_from_shapes",
           "removed_blocks"]

# the layer attributes channel pruning changes (torch's conv/linear/BN, amas' option-A shortcut)
_WIDTHS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "in_planes",
           "out_planes")


def _plain(value: Any, where: str) -> Any:
    """value as weights_only-loadable plain data (tuples become lists), or ExportError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item(), where)
    raise ExportError(f"metadata {where} is a {type(value).__name__}; use numbers, strings, lists or dicts")


def save_pruned(path: str | os.PathLike, model: nn.Module, recipe: dict, metadata: dict) -> None:
    """Write a pruned checkpoint (state_dict + recipe + metadata) atomically as an amas 'pruned' file."""
    from amas import __version__

    meta = _plain(dict(metadata), "metadata")
    meta.setdefault("amas_version", __version__)
    meta.setdefault("format_version", FORMAT_VERSION)
    recipe = dict(recipe)
    recipe.setdefault("layers", layer_shapes(model))
    from amas.channels.bake import baked_layers

    baked = baked_layers(model)
    if baked:  # weight-computing convs the cut made plain (amas.channels.bake); absent otherwise
        recipe.setdefault("baked", baked)
    removed = removed_blocks(model)
    if removed:  # residual blocks reduced to their shortcut (amas.channels.blocks); absent otherwise, as before
        recipe.setdefault("removed_blocks", removed)
    record = dict(_plain(recipe["model"], "recipe.model"))
    if "data" in meta:
        record["data"] = meta["data"]
    full = model.state_dict()
    state = OrderedDict((k, v.detach().cpu()) for k, v in full.items())
    # the modules' state-dict versions go along: some layers refuse a state_dict without them (torchvision's MNASNet)
    state._metadata = getattr(full, "_metadata", None)  # type: ignore[attr-defined]
    atomic_save(
        {
            "amas_format": "pruned",
            "format_version": FORMAT_VERSION,
            "amas_version": __version__,
            "model": record,
            "recipe": _plain(recipe, "recipe"),
            "metadata": meta,
            "state_dict": state,
        },
        path,
    )


def load_pruned(path: str | os.PathLike, device: str | torch.device = "cpu",
                base: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a pruned model from a pruned.pt (weights_only load, no tracing, no Torch-Pruning).

    Args:
        path: a file written by amas.save_pruned or by the pipeline's export stage.
        device: where the model goes.
        base: an instance of the architecture the model was pruned from (e.g. YourModel(...), any weights), rebuilt
            from instead of the class the file records; needed where that class does not import or build here.

    Returns:
        (model in eval mode, the file's contents: recipe, metadata, state_dict).

    Example:
        >>> model, obj = amas.load_pruned("runs/quickstart/pruned.pt")  # doctest: +SKIP
        >>> obj["metadata"]["input_shape"]                              # doctest: +SKIP
    """
    if base is not None and not isinstance(base, nn.Module):
        raise ExportError(f"base is a {type(base).__name__}; pass an nn.Module of the architecture the model was "
                          "pruned from, e.g. base=YourModel(...)")
    obj = load_file(path, "pruned")
    recipe = obj.get("recipe")
    if not isinstance(recipe, dict):
        raise CheckpointError(f"'{path}' has no pruning recipe; re-export it with amas export")
    if base is not None and "layers" not in recipe:
        raise CheckpointError(f"'{path}' predates stored layer widths, so base= cannot rebuild it; load it without "
                              "base= or re-export it")
    try:
        if "layers" in recipe:
            model = rebuild_from_shapes(recipe, obj["state_dict"], base)
        else:  # files from before the stored layer shapes: prune the base model again (traces it)
            from amas.channels.cut import model_from_recipe

            model = model_from_recipe(recipe)
    except KeyError:
        raise CheckpointError(f"'{path}' has no pruning recipe; re-export it with amas export") from None
    try:
        model.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError):
        if base is not None:
            raise CheckpointError(f"base={type(base).__name__}(...) does not match '{path}' (other layers); pass the "
                                  "architecture the model was pruned from") from None
        raise CheckpointError(f"'{path}' does not match the architecture its recipe describes; re-export it") from None
    return model.to(device).eval(), obj


def removed_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks of model that were removed (amas.models.removed_block.RemovedBlock)."""
    from amas.models.removed_block import RemovedBlock

    return [name for name, m in model.named_modules() if isinstance(m, RemovedBlock)]


def _stored_width(module: nn.Module, attr: str) -> bool:
    """attr is a plain int the module stores itself (conv, linear, BN), not one a wrapper derives from its layers
    (timm's ConvNormAct.in_channels is a read-only property reading its conv's)."""
    return isinstance(vars(module).get(attr), int) and not isinstance(vars(module).get(attr), bool)


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The width attributes each layer stores itself (conv, linear, BN, the option-A shortcut), by module name;
    wrappers that only derive widths from their layers (properties) are left out: rebuilt layers carry them."""
    out = {}
    for name, module in model.named_modules():
        attrs = {a: int(vars(module)[a]) for a in _WIDTHS if _stored_width(module, a)}
        if attrs:
            out[name] = attrs
    return out


def rebuild_from_shapes(recipe: dict, state_dict: dict[str, torch.Tensor],
                        base: nn.Module | None = None) -> nn.Module:
    """The pruned architecture without tracing: the base model (the recipe's, or a copy of base) with the stored
    layer widths and tensors resized to the state_dict's shapes (weights still to be loaded)."""
    import copy

    from amas.models import create_model

    rec = recipe["model"]
    if base is not None:
        model, where = copy.deepcopy(base).cpu(), f"base={type(base).__name__}(...)"
    else:
        model = create_model(rec["name"], num_classes=int(rec["num_classes"]), in_channels=int(rec["in_channels"]),
                             **rec.get("kwargs", {}))
        where = rec["name"]
    _remove_blocks(model, recipe.get("removed_blocks", []))
    if recipe.get("baked"):
        from amas.channels.bake import rebuild_baked

        try:
            rebuild_baked(model, recipe["baked"])
        except (AttributeError, KeyError, TypeError):
            raise CheckpointError(f"the baked layers of the recipe do not match {where}; re-export the model") from None
    modules = dict(model.named_modules())
    for name, attrs in recipe["layers"].items():
        if name not in modules:
            fix = "pass the architecture the model was pruned from" if base is not None else "re-export the model"
            raise CheckpointError(f"the pruned layer '{name}' is not in {where}; {fix}")
        for attr, value in attrs.items():
            if _stored_width(modules[name], attr):  # never a wrapper's derived width (older files list them)
                setattr(modules[name], attr, int(value))
    for key, tensor in state_dict.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is None:
            continue  # load_state_dict names the mismatch
        if attr in module._parameters and module._parameters[attr] is not None:
            if module._parameters[attr].shape != tensor.shape:
                module._parameters[attr] = nn.Parameter(torch.empty_like(tensor, device="cpu"))
        elif attr in module._buffers and module._buffers[attr] is not None:
            if module._buffers[attr].shape != tensor.shape:
                module._buffers[attr] = torch.empty_like(tensor, device="cpu")
    return model


def _remove_blocks(model: nn.Module, paths: list[str]) -> None:
    """Replace each block named in paths by a RemovedBlock around its shortcut (sizes follow the state_dict)."""
    from amas.models.removed_block import RemovedBlock

    for path in paths:
        try:
            block = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"the removed block '{path}' is not in this model; re-export the model") from None
        shortcut = getattr(block, "shortcut", None) or getattr(block, "downsample", None)
        act = getattr(block, "relu2", None) or getattr(block, "relu", None)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, RemovedBlock(shortcut, torch.zeros(1), act))


def peek_format(path: str | os.PathLike) -> str | None:
    """The amas_format of a file (cheap memory-mapped look), or None when it cannot be read that way."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj.get("amas_format") if isinstance(obj, dict) else None


def load_any_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a dense 'model' or a 'pruned' amas file; returns (model, file contents with a 'model' record)."""
    if peek_format(path) == "pruned":
        model, obj = load_pruned(path, device)
        if "data" not in obj["model"]:
            raise CheckpointError(
                f"'{path}' does not say which dataset it was trained on; re-export it with amas export"
            )
        return model, obj
    return load_model(path, device)
