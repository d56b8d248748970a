"""amas as a library: the whole pruning pipeline in one call on the user's model and batches (amas.prune)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from amas.config import Config, from_dict, read_yaml, to_dict

__all__ = ["PruneResult", "prune", "resolve_config"]


@dataclass
class PruneResult:
    """What amas.prune returns: the pruned model (eval mode), its report and the selection of candidates."""

    model: nn.Module
    report: dict
    selection: dict


def resolve_config(config: str | os.PathLike | Config | None, overrides: Mapping[str, Any] | None = None,
                   **defaults: Any) -> Config:
    """A Config from a YAML path, a Config or None, then the dotted defaults (unless overridden), then overrides."""
    if isinstance(config, Config):
        data = to_dict(config)
    else:
        data = read_yaml(config) if config else {}
    items = {**defaults, **dict(overrides or {})}
    for key, value in items.items():
        *parents, last = str(key).split(".")
        node = data
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return from_dict(data)


def prune(teacher: nn.Module, train: Iterable, val: Iterable, input_shape: tuple[int, int, int],
          target_reduction: float = 0.5, config: str | os.PathLike | Config | None = None,
          overrides: Mapping[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
          test: Iterable | None = None, method: str = "amas", latency_iters: int = 20) -> PruneResult:
    """Prune a trained classifier to target_reduction of its MACs with the amas pipeline on the user's batches.

    teacher: any trained classifier (its output on (batch, C, H, W) is (batch, classes) logits; the class count is
    read from it). train, val, test: iterables of (images, labels) batches as the model takes them (e.g. torch
    DataLoaders; images already normalised). config: a YAML path or a Config; overrides: dotted keys, e.g.
    {"finetune.train.epochs": 5}; target_reduction sets search.target_reduction and select.min_reduction unless the
    overrides set them. out_dir: the resumable run directory `amas prune --out` writes (the same files); without it
    the run happens in a temporary directory that is deleted before returning.
    Under torchrun every rank calls prune with the same arguments; each rank trains on its share of the batches.
    """
    from amas.errors import DataError
    from amas.files.pruned import load_pruned
    from amas.inputs import UserDataInfo, classes_of, user_bundle
    from amas.pipeline.context import RunContext
    from amas.pipeline.runner import _check_method, run_stages

    if not isinstance(teacher, nn.Module):
        raise DataError(f"the teacher is a {type(teacher).__name__}; pass a trained nn.Module classifier")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise DataError(f"input_shape {tuple(input_shape)} is not (C, H, W); pass the shape of one image")
    cfg = resolve_config(config, overrides, **{"search.target_reduction": target_reduction,
                                               "select.min_reduction": target_reduction})
    _check_method(method)
    info = UserDataInfo("user", classes_of(teacher, shape), shape[0], shape[1], (), (), height=shape[1],
                        width=shape[2])
    with _run_dir(out_dir) as run_dir:
        device = _run_device(cfg)
        ctx = RunContext(cfg, run_dir, method=method, latency_iters=latency_iters, teacher_model=teacher,
                         data=user_bundle(train, val, test, info, device))
        run_stages(ctx)
        model, _ = load_pruned(run_dir / "pruned.pt", ctx.device)
        report = json.loads((run_dir / "report.json").read_text())
        selection = json.loads((run_dir / "selection.json").read_text())
    return PruneResult(model.eval(), _short_report(report, test is not None), selection)


def _run_device(cfg: Config) -> Any:
    """The device RunContext will run on (the batches move there as the stages read them)."""
    from amas import distributed
    from amas.distributed import resolve_device

    return distributed.device_for(distributed.context(), resolve_device(cfg.finetune.train.device))


def _short_report(report: dict, with_test: bool) -> dict:
    """The returned report: the pruned model's macs, params, reduction, accuracies, latency; the teacher's."""
    p = report["pruned"]
    out = {"macs": p["macs"], "params": p["params"], "macs_reduction": report["macs_reduction"],
           "params_reduction": report["params_reduction"], "val_acc": p["val_acc"],
           "latency_b1_ms": p["latency_b1_ms"], "latency_b64_ms": p["latency_b64_ms"],
           "latency_device": report["latency_device"], "teacher": dict(report["teacher"])}
    if with_test:
        out["test_acc"] = p["test_acc"]
    else:
        out["teacher"].pop("test_acc", None)
    return out


class _run_dir:
    """The given run directory, or a temporary one deleted on exit (nothing left on disk)."""

    def __init__(self, out_dir: str | os.PathLike | None) -> None:
        self.out_dir, self.tmp = out_dir, None

    def __enter__(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        from amas import distributed

        self.tmp = tempfile.TemporaryDirectory(prefix="amas-prune-")
        # every rank must use one directory: rank 0's name, sent to the others
        return Path(distributed.broadcast_object(self.tmp.name))

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
