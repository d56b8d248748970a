"""Shipping a pruned model: torch.export `.pt2`, ONNX, and the cut of a checkpoint that `amas export` ships.

The report of an export is amas.pipeline.report; `amas export` itself is amas.pipeline.commands.run_export.
``pruned.pt2`` is a ``torch.export`` program: it loads with ``torch.export.load`` in a Python without amas.
The ``pruned.pt`` file format (save_pruned, load_pruned) is amas.files.pruned.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.errors import CheckpointError, ExportError
from amas.files.atomic import temp_beside
from amas.files.checkpoint import load_file
from amas.files.pruned import load_any_model, load_pruned, peek_format, save_pruned

__all__ = [
    "ExportError", "save_pruned", "load_pruned", "load_any_model", "export_pt2", "export_onnx", "onnx_available",
    "cut_checkpoint",
]


# ---------------------------------------------------------------- torch.export and ONNX


def _example(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.randn((batch, *input_shape), device=device, dtype=dtype)


def export_pt2(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike,
               dynamic_batch: bool = True) -> dict:
    """torch.export the eval-mode model (dynamic batch when possible) and save it; returns {'dynamic_batch': bool}."""
    was_training = model.training
    model.eval()
    x = _example(model, tuple(input_shape))
    ep = None
    dynamic = False
    try:
        if dynamic_batch:
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
                dynamic = True
            except Exception:
                ep = None
        if ep is None:
            try:
                ep = torch.export.export(model, (x,))
            except Exception as e:
                raise ExportError(f"torch.export cannot trace this model ({type(e).__name__}); "
                                  "ship pruned.pt (amas.load_pruned) instead") from None
    finally:
        model.train(was_training)
    p = Path(path)
    tmp = temp_beside(p, suffix=f".tmp{p.suffix}")  # torch.export.save and onnx want the real suffix
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": str(p), "dynamic_batch": dynamic}


def onnx_available() -> bool:
    """Whether the optional onnx extra (onnx, onnxruntime, onnxscript) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike,
                check: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Export ONNX (dynamic batch when possible) and, with check, compare onnxruntime with PyTorch outputs."""
    if not onnx_available():
        raise ExportError("ONNX export needs the onnx extra; install it with: pip install 'amas[onnx]'")
    import contextlib
    import io
    import warnings

    p0 = next(model.parameters(), None)
    if p0 is not None and (p0.dtype != torch.float32 or p0.device.type != "cpu"):
        model = copy.deepcopy(model).float().cpu()
    was_training = model.training
    model.eval()
    x = _example(model, tuple(input_shape))
    p = Path(path)
    tmp = temp_beside(p, suffix=f".tmp{p.suffix}")  # torch.export.save and onnx want the real suffix
    dynamic = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: batch},), external_data=False, verbose=False)
                dynamic = True
            except Exception:
                try:
                    torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                                      external_data=False, verbose=False)
                except Exception as e:
                    raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                      "ship pruned.pt2 instead") from None
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    info: dict[str, Any] = {"path": str(p), "dynamic_batch": dynamic}
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        xs = _example(model, tuple(input_shape), batch=3) if dynamic else x
        with torch.no_grad():
            ref = model(xs).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
        diff = float(abs(got - ref).max())
        info["max_abs_diff"] = diff
        if not (abs(got - ref) <= atol + rtol * abs(ref)).all():
            raise ExportError(
                f"the ONNX model's outputs differ from PyTorch's by up to {diff:.2e}; ship pruned.pt2 instead"
            )
    model.train(was_training)
    return info


# ---------------------------------------------------------------- cutting a checkpoint (amas export)


def _record_shape(record: dict, path: Any) -> tuple[int, int, int]:
    try:
        data = record["data"]
        return (int(data["in_channels"]), int(data["image_size"]), int(data["image_size"]))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"'{path}' does not record its input shape; re-create it with this amas version"
        ) from None


def _load_for_cut(checkpoint: str | os.PathLike, criterion: str | None) -> tuple[nn.Module, dict | None, dict]:
    """(model, masks or None, file object) of a searched student or, with criterion l1, a dense model."""
    from amas.files.checkpoint import load_masked, load_model

    fmt = peek_format(checkpoint)
    if fmt == "pruned":
        load_file(checkpoint, "pruned")  # a newer format version says so first
        raise ExportError(
            f"'{checkpoint}' is already pruned; pass the searched student (search.pt) or a dense model.pt"
        )
    if fmt == "model":
        if criterion != "l1":
            raise ExportError(
                f"'{checkpoint}' is a dense model without masks; pass --criterion l1 or a searched student (search.pt)"
            )
        model, obj = load_model(checkpoint)
        return model, None, obj
    return load_masked(checkpoint)  # also gives the one-line errors for bad files


def cut_checkpoint(checkpoint: str | os.PathLike, target_reduction: float, round_to: int = 1, min_channels: int = 1,
                   criterion: str | None = None, residual: bool = False, ignore: Sequence[str] = ()
                   ) -> tuple[nn.Module, dict, nn.Module, dict]:
    """Cut a searched student (its masks) or a dense model (criterion='l1') at a MACs target.

    Returns (pruned model, its pruned.pt record {'recipe', 'metadata'}, the dense model it was cut from, the
    checkpoint's file object): what `amas export` gives the export stage.
    """
    from amas.channels.cost import CostModel, count
    from amas.channels.cut import make_recipe, prune_model
    from amas.channels.groups import find_groups
    from amas.channels.plan import kept_counts, plan_keep
    from amas.config import CriteriaConfig
    from amas.criteria import channel_scores

    model, masks, obj = _load_for_cut(checkpoint, criterion)
    record = obj["model"]
    shape = _record_shape(record, checkpoint)
    model.eval()
    # searched masks name the groups they were found with; a dense model is planned over the groups asked for
    groups = find_groups(model, shape, residual=residual or masks is not None, ignore=ignore)
    if masks is not None:
        unknown = [n for n in masks if n not in {g.name for g in groups}]
        if unknown:
            raise ExportError(f"the masks name group {unknown[0]!r}, which {record['name']} does not have here; "
                              "re-run the search with this amas version")
        groups = [g for g in groups if g.name in masks]
    if not groups:
        raise ExportError(f"model '{record['name']}' has no prunable channel groups; nothing to export")
    if masks is not None:
        scores = {n: torch.as_tensor(m).abs() for n, m in masks.items()}
    else:
        scores = channel_scores("l1", model, groups, None, CriteriaConfig())  # the L1 of `amas prune --method l1`
    cost = CostModel(model, groups, shape)
    keep = plan_keep(scores, cost, target_reduction, min_channels=min_channels, round_to=round_to)
    dense = copy.deepcopy(model)
    pruned = prune_model(model, groups, keep, masks=masks, input_shape=shape).eval()
    macs, params = count(pruned, shape)
    planned = cost.macs(kept_counts(keep))
    if macs != planned:
        raise ExportError(f"pruned MACs ({macs}) differ from the plan ({planned}); please report this model")
    data = record.get("data", {})
    metadata = {
        "model": record["name"], "dataset": data.get("name"), "data": data, "input_shape": list(shape),
        "mean": data.get("mean"), "std": data.get("std"), "num_classes": int(record["num_classes"]),
        "search_metrics": {k: v for k, v in obj.get("metrics", {}).items() if isinstance(v, (int, float, str))},
        "macs": int(macs), "params": int(params), "dense_macs": int(cost.total_macs),
        "dense_params": int(sum(p.numel() for p in dense.parameters())), "target_reduction": float(target_reduction),
        "round_to": int(round_to), "min_channels": int(min_channels),
        "source": f"{Path(checkpoint).name} ({'masks' if masks is not None else 'l1'})",
        "method": "amas" if masks is not None else "l1",
    }
    return pruned, {"recipe": make_recipe(record, shape, keep, ignore), "metadata": metadata}, dense.eval(), obj
