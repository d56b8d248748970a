"""The quantize stage (quant.mode ptq): int8 PT2E post-training quantization of the exported pruned.pt, calibrated
on training batches only, written as pruned_int8.pt2 (pruned_int8.onnx with quant.onnx); its validation and test
top-1 go into report.json (``int8``) and report.md."""

from __future__ import annotations

import os

from amas.pipeline.context import Rows, RunContext
from amas.quant import top1_accuracy

__all__ = ["quantize_stage"]

# the int8 .pt2 is written here first and renamed once the report holds its accuracies (the stage's commit point)
PARTIAL = "pruned_int8.partial.pt2"


def quantize_stage(ctx: RunContext) -> Rows:
    """int8 pruned_int8.pt2 (and .onnx) of pruned.pt and its accuracies in the report (rank 0; the others wait)."""
    report = ctx.write(_quantize, ctx)
    if report is None:  # not rank 0: nothing to report
        return []
    q = report["int8"]
    return [("calibration batches (train)", q["calib_batches"]),
            ("int8 / float conv+linear layers", f"{q['quantized_layers']} / {q['float_layers']}"),
            ("val acc % float → int8", f"{_fmt(report['pruned'].get('val_acc'))} → {_fmt(q['val_acc'])}"),
            ("test acc % float → int8", f"{_fmt(report['pruned'].get('test_acc'))} → {_fmt(q['test_acc'])}"),
            ("pruned_int8.pt2 bytes", q["pt2_bytes"]), ("pruned_int8.onnx bytes", q["onnx_bytes"] or "–"),
            ("report", str(ctx.path("report.md")))]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _quantize(ctx: RunContext) -> dict:
    """Rank 0: quantize, evaluate the int8 model on val and test, write the files and the report's int8 block."""
    from amas.files.pruned import load_pruned
    from amas.pipeline.report import write_report
    from amas.quant import calibration_inputs, quantize_onnx, quantize_pt2e

    cfg = ctx.cfg.quant
    model, obj = load_pruned(ctx.path("pruned.pt"), "cpu")
    shape = tuple(int(s) for s in obj["metadata"]["input_shape"])
    # the training split only (this rank's shard under torchrun); never validation or test data
    calib = calibration_inputs(ctx.data("finetune").train, cfg.calib_batches)
    partial, pt2 = ctx.path(PARTIAL), ctx.path("pruned_int8.pt2")
    result = quantize_pt2e(model, None, shape, path=partial, inputs=calib)
    evaluation = ctx.data("finetune", sharded=False)  # every image of val and test, on this one rank
    batch = None if result.dynamic_batch else 2  # a static export takes the batch it was traced with
    val_acc = top1_accuracy(result.model, evaluation.val, batch)
    test_acc = top1_accuracy(result.model, evaluation.test, batch)
    report = ctx.read_json("report.json")
    notes = [n for n in report["notes"] if "int8" not in n]
    onnx_path = None
    if cfg.onnx:
        from amas.files.export import onnx_available

        if onnx_available():
            onnx_path = quantize_onnx(model, None, shape, ctx.path("pruned_int8.onnx"), inputs=calib)
        else:
            notes.append("pruned_int8.onnx skipped: install the onnx extra (pip install 'amas[onnx]')")
    if not result.dynamic_batch:
        notes.append("pruned_int8.pt2 has a fixed batch size of 2 (the model did not export with a dynamic batch)")
    files = {k: v for k, v in report["files"].items() if not k.startswith("pruned_int8")}
    files["pruned_int8.pt2"] = str(pt2)
    if onnx_path:
        files["pruned_int8.onnx"] = onnx_path
    report.update(files=files, notes=notes, int8={
        "mode": "ptq", "calib_batches": result.calib_batches, "val_acc": _round(val_acc), "test_acc": _round(test_acc),
        "pt2_bytes": os.path.getsize(partial), "onnx_bytes": os.path.getsize(onnx_path) if onnx_path else None,
        "quantized_layers": len(result.quantized_layers), "float_layers": len(result.float_layers),
        "dynamic_batch": result.dynamic_batch})
    write_report(report, ctx.path("report.json").parent)
    os.replace(partial, pt2)
    return report


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
