"""The export stage (pruned.pt, pruned.pt2 or ONNX, the report) and the cut of a checkpoint that `amas export`
gives it (cut_checkpoint: a searched student's masks, or a dense model by L1, planned at a MACs target)."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.errors import CheckpointError, ExportError
from amas.files.checkpoint import load_file, load_masked, load_model
from amas.files.pruned import peek_format, save_pruned
from amas.pipeline.context import Rows, RunContext

__all__ = ["cut_checkpoint", "export_stage"]


def export_stage(ctx: RunContext) -> Rows:
    """Test accuracy of teacher and pruned model, pruned.pt, pruned.pt2 (pruned.onnx) and report.md/json (rank 0)."""
    from amas.engine.loop import evaluate

    model, obj = ctx.final()
    teacher, _ = ctx.teacher
    # the test split, evaluated once, here (sharded: every rank takes part); amas.prune may have none, amas export
    # --no-eval skips it, and amas export does not evaluate the dense model it cut from
    test = ctx.test_split()
    classes = int(obj["metadata"]["num_classes"])
    acc = {"pruned": None, "teacher": None}
    if test is not None:
        acc["pruned"] = evaluate(model, test, classes, ctx.device, task=ctx.task)["acc"]
        if ctx.export.teacher_test:
            acc["teacher"] = evaluate(teacher, test, classes, ctx.device, task=ctx.task)["acc"]
    report = ctx.write(_write_export, ctx, model, obj, teacher, acc)
    if report is None:  # not rank 0: nothing to report
        return []
    from amas.pipeline.report import report_rows

    return [*report_rows(report), ("report", str(ctx.path("report.md")))]


DENSE_BATCHES = (8,)  # a dense model's reports also time batch 8 (its deployments batch a few frames, not 64)
DETECTOR_NOTE = ("pruned.pt2 (and pruned.onnx) hold the detector's tensor part: backbone and heads on images already "
                 "normalised and resized by its transform, returning the heads' raw outputs; the transform, anchor "
                 "decoding, proposal selection and NMS are left out (pruned.pt runs the whole detector); MACs and "
                 "latency are the tensor part's")


def _write_export(ctx: RunContext, model: nn.Module, obj: dict, teacher: nn.Module, acc: dict) -> dict:
    """Rank 0's part of the export stage: the shipped files, latency and the report; returns the report."""
    from amas.channels.dense import tensor_part
    from amas.files.export import export_onnx, export_pt2
    from amas.pipeline.report import export_report, measure, write_report

    meta, teacher_obj = obj["metadata"], ctx.teacher[1]
    shape = tuple(meta["input_shape"])
    sel = ctx.read_json("selection.json") if ctx.export.selection else None
    cand = ctx.read_json("candidates/candidates.json") if ctx.export.selection else None
    meta = dict(meta, test_acc=None if acc["pruned"] is None else round(acc["pruned"], 3), method=ctx.method)
    if sel is not None:
        meta.update(teacher_test_acc=None if acc["teacher"] is None else round(acc["teacher"], 3),
                    policy=sel["policy"], selection_rule=sel["rule"])
    files = {"pruned.pt": str(ctx.path("pruned.pt")), "pruned.pt2": str(ctx.path("pruned.pt2"))}
    save_pruned(files["pruned.pt"], model, obj["recipe"], meta)
    model, teacher = model.cpu(), teacher.cpu()
    dense = ctx.task.name != "classification"  # dict outputs: the program's outputs are checked against eager's
    net = tensor_part(model)  # a torchvision detector: its backbone and heads (amas.channels.dense.DetectorTensors)
    pt2 = export_pt2(net, shape, files["pruned.pt2"], check=dense)
    notes = [] if pt2["dynamic_batch"] else ["pruned.pt2 has a fixed batch size (the model did not export with a "
                                             "dynamic batch)"]
    if net is not model:
        notes.append(DETECTOR_NOTE)
    if ctx.export.onnx:
        from amas.files.export import onnx_available

        if onnx_available():
            files["pruned.onnx"] = export_onnx(net, shape, ctx.path("pruned.onnx"))["path"]
        else:
            notes.append("pruned.onnx skipped: install the onnx extra (pip install 'amas[onnx]')")
    teacher_val = cand["teacher"]["val_acc"] if cand else teacher_obj.get("metrics", {}).get("val_acc")
    report = export_report(
        command=ctx.command, model=meta.get("model"), dataset=meta.get("dataset"), method=ctx.method,
        input_shape=shape, reference=ctx.export.reference,
        pruned=measure(model, shape, ctx.latency_iters, acc["pruned"], meta.get("val_acc"), files["pruned.pt"],
                       batches=DENSE_BATCHES if dense else ()),
        teacher=measure(teacher, shape, ctx.latency_iters, acc["teacher"], teacher_val, str(ctx.teacher_path),
                        batches=DENSE_BATCHES if dense else ()),
        cut={k: meta.get(k) for k in ("target_reduction", "round_to", "min_channels", "source")},
        selection=_selection(sel, cand, meta) if sel else None,
        files={**files, **({"selection": str(ctx.path("selection.json")), "pareto": str(ctx.path("pareto.png"))}
                           if sel else {})},
        stage_wall_s={k: v["wall_s"] for k, v in ctx.log.data["stages"].items() if v.get("wall_s") is not None},
        notes=notes, metric=ctx.task.metric_name if dense else None)
    if ctx.cfg.prune.report_runtimes:
        from amas.latency.table import runtime_comparison

        report["runtimes"] = runtime_comparison(teacher, model, shape, ctx.cfg.prune.report_runtimes,
                                                iters=ctx.latency_iters)
    write_report(report, ctx.path("report.json").parent)
    return report


def _selection(sel: dict, cand: dict, meta: dict) -> dict:
    """The report's selection block: policy, rule, the winner and its budget."""
    w = sel["winner_row"]
    return {"policy": sel["policy"], "rule": sel["rule"], "selected": w["name"], "level": w["level"],
            "front": sel["front"], "candidates": len(sel["candidates"]), "budget_epochs": cand["halving"]["budget"],
            "finetune_epochs": meta.get("finetune_epochs")}


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
