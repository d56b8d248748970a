"""Atomic saving and safe loading of amas files (training state and dense model checkpoints)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from amas.errors import CheckpointError
from amas.files.atomic import atomic_path

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file beside path, then rename over it."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_file(path: str | os.PathLike, kind: str, map_location: str | torch.device = "cpu") -> dict:
    """Load an amas file of the given kind with weights_only=True, or raise one clear CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist; check the path")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        msg = str(e).lower()
        if isinstance(e, (zipfile.BadZipFile, EOFError)) or "zip" in msg or "eof" in msg or "central directory" in msg:
            raise CheckpointError(
                f"checkpoint '{p}' is truncated or corrupt; re-create it or restore a good copy"
            ) from None
        raise CheckpointError(
            f"'{p}' is not an amas checkpoint (it holds pickled objects); pass a file amas wrote"
        ) from None
    except Exception:
        raise CheckpointError(f"'{p}' is not an amas checkpoint; pass a file amas wrote") from None
    if not isinstance(obj, dict) or "amas_format" not in obj:
        raise CheckpointError(f"'{p}' is not an amas checkpoint; pass a file amas wrote")
    if obj["amas_format"] != kind:
        raise CheckpointError(f"'{p}' is an amas '{obj['amas_format']}' file, but a '{kind}' file is needed here")
    if int(obj.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"'{p}' has format version {obj['format_version']}, newer than this amas reads ({FORMAT_VERSION}); "
            f"upgrade amas"
        )
    return obj


def model_record(model_name: str, num_classes: int, in_channels: int, info: Any, kwargs: dict | None = None) -> dict:
    """The recipe that rebuilds a dense model (its constructor kwargs when it has any), plus its data description."""
    from dataclasses import asdict

    return {
        "name": model_name,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        **({"kwargs": dict(kwargs)} if kwargs else {}),
        "data": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(info).items()},
    }


def save_model(path: str | os.PathLike, model: nn.Module, record: dict, metrics: dict | None = None) -> None:
    """Save a dense model (state_dict + rebuild recipe + metrics) as an amas 'model' file."""
    from amas import __version__

    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    atomic_save(
        {
            "amas_format": "model",
            "format_version": FORMAT_VERSION,
            "amas_version": __version__,
            "model": record,
            "metrics": dict(metrics or {}),
            "state_dict": state,
        },
        path,
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a dense model saved by save_model; returns (model in eval mode, the file's record)."""
    obj = load_file(path, "model")
    return _rebuild(obj, path).to(device).eval(), obj


def _rebuild(obj: dict, path: str | os.PathLike) -> nn.Module:
    """The zoo model a file's record names, with the file's weights loaded."""
    from amas.models import create_model

    rec = obj["model"]
    model = create_model(rec["name"], num_classes=rec["num_classes"], in_channels=rec["in_channels"],
                         **rec.get("kwargs", {}))
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError:
        raise CheckpointError(
            f"'{path}' does not match the architecture '{rec['name']}' it names; re-create it"
        ) from None
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_masked(path: str | os.PathLike, model: nn.Module, record: dict, masks: dict[str, torch.Tensor],
                metrics: dict | None = None) -> None:
    """Save a searched student: dense weights (no mask modules) plus one mask vector per channel group."""
    from amas import __version__

    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    atomic_save(
        {
            "amas_format": "masked",
            "format_version": FORMAT_VERSION,
            "amas_version": __version__,
            "model": record,
            "metrics": dict(metrics or {}),
            "state_dict": state,
            "masks": {k: v.detach().cpu().float() for k, v in masks.items()},
        },
        path,
    )


def load_masked(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """Rebuild a searched student saved by save_masked; returns (model, masks by group name, the file's record)."""
    obj = load_file(path, "masked")
    return _rebuild(obj, path).to(device).eval(), dict(obj["masks"]), obj


def is_plain_state_dict(path: str | os.PathLike) -> bool:
    """Whether path holds a plain PyTorch state_dict (tensors by key, no amas record), as torch.save(m.state_dict())."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) and "amas_format" not in obj else obj
    return isinstance(obj, dict) and bool(obj) and "amas_format" not in obj and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _first_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The first key in which state and model differ (missing, unexpected or of another shape), described."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            return f"key '{k}' is missing"
        if tuple(state[k].shape) != tuple(v.shape):
            return f"key '{k}' has shape {tuple(state[k].shape)}, the model's is {tuple(v.shape)}"
    extra = [k for k in state if k not in own]
    return f"key '{extra[0]}' is not in the model" if extra else None


def _frozen_backbone_weights(model_name: str, model: nn.Module, state: dict, kwargs: dict) -> bool:
    """Whether state is model's but for the backbone BatchNorms' step counters, which frozen BNs do not keep."""
    if not model_name.startswith("tv:") or "frozen_backbone" in kwargs or not hasattr(model, "backbone"):
        return False
    missing = [k for k in model.state_dict() if k not in state]
    return bool(missing) and all(k.startswith("backbone.") and k.endswith(".num_batches_tracked") for k in missing)


def load_plain_teacher(path: str | os.PathLike, model_name: str, info: Any, kwargs: dict | None = None,
                       device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The architecture model_name with the user's plain state_dict from path; returns (model, a 'model' file dict)."""
    from amas.models import create_model

    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj)
    if all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    kwargs = dict(kwargs or {})
    model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels, **kwargs)
    if _frozen_backbone_weights(model_name, model, state, kwargs):
        from amas.console import say

        kwargs["frozen_backbone"] = True
        model = create_model(model_name, num_classes=info.num_classes, in_channels=info.in_channels, **kwargs)
        say(f"the weights in '{path}' come from a detector with a frozen backbone (FrozenBatchNorm2d, as torchvision "
            "builds one on a pretrained backbone): built so (model.kwargs.frozen_backbone=true)")
    why = _first_mismatch(model, state)
    if why is not None:
        raise CheckpointError(f"the state_dict '{path}' does not match model.name={model_name} ({info.num_classes} "
                              f"classes, {info.in_channels} channels): {why}; set model.name to the architecture the "
                              "weights come from, or the data to its class count")
    model.load_state_dict(state)
    record = model_record(model_name, info.num_classes, info.in_channels, info, kwargs)
    return model.to(device).eval(), {"amas_format": "model", "model": record, "metrics": {}}
