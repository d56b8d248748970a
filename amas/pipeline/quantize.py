"""The quantize stage: int8 PT2E of the exported pruned.pt, written as pruned_int8.pt2; its validation and test top-1
go into report.json (``int8``) and report.md.

quant.mode ptq calibrates on training batches only (pruned_int8.onnx too with quant.onnx); quant.mode qat fine-tunes
a fake-quantized copy for quant.qat_epochs against the teacher with the fine-tuning objective (KD + adversarial,
on logits) in the engine's loop (every rank, sharded data, state in quantize/ for --resume), then converts it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from amas.pipeline.context import Rows, RunContext
from amas.quant import int8_score

__all__ = ["quantize_stage"]

# the int8 .pt2 is written here first and renamed once the report holds its accuracies (the stage's commit point)
PARTIAL = "pruned_int8.partial.pt2"


def quantize_stage(ctx: RunContext) -> Rows:
    """int8 pruned_int8.pt2 (and .onnx) of pruned.pt and its accuracies in the report (rank 0; the others wait)."""
    trained = _qat(ctx) if ctx.cfg.quant.mode == "qat" else None
    report = ctx.write(_quantize, ctx, trained)
    if report is None:  # not rank 0: nothing to report
        return []
    q = report["int8"]
    first = (("QAT epochs", q["qat_epochs"]) if q["mode"] == "qat" else
             ("calibration batches (train)", q["calib_batches"]))
    return [("mode", q["mode"]), first,
            ("int8 / float conv+linear layers", f"{q['quantized_layers']} / {q['float_layers']}"),
            ("val acc % float → int8", f"{_fmt(report['pruned'].get('val_acc'))} → {_fmt(q['val_acc'])}"),
            ("test acc % float → int8", f"{_fmt(report['pruned'].get('test_acc'))} → {_fmt(q['test_acc'])}"),
            ("pruned_int8.pt2 bytes", q["pt2_bytes"]), ("pruned_int8.onnx bytes", q["onnx_bytes"] or "–"),
            ("report", str(ctx.path("report.md")))]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _qat(ctx: RunContext) -> dict:
    """Every rank: quantization-aware fine-tuning of a fake-quantized copy of pruned.pt against the teacher."""
    from amas.files.pruned import load_pruned
    from amas.pipeline.candidates import finetune_trainer
    from amas.quant import prepare_qat

    cfg = ctx.cfg.quant
    model, obj = load_pruned(ctx.path("pruned.pt"), "cpu")
    shape = tuple(int(s) for s in obj["metadata"]["input_shape"])
    # an exported graph has no layers to tap: the discriminator reads logits; amp, channels_last and compile stay off
    train = dataclasses.replace(ctx.cfg.finetune.train, lr=cfg.qat_lr, amp="off", channels_last=False, compile="off")
    section = dataclasses.replace(ctx.cfg.finetune, d_input="logits", feature_kd=0.0, train=train)
    out = ctx.stage_dir("quantize")
    ctx.write(out.mkdir, parents=True, exist_ok=True)
    teacher = ctx.frozen_teacher(section)  # the run's one inference copy of the teacher
    trainer = finetune_trainer(prepare_qat(model, shape), teacher, section, cfg.qat_epochs, ctx.data("finetune"),
                               out, "quantize", ctx.device, on_epoch_end=ctx.epoch_hook("quantize"))
    try:
        history = trainer.fit(resume=True)
    finally:
        trainer.objective.close()
    return {"model": trainer.model, "steps": trainer.global_step, "val_acc": history[-1].get("val_acc")}


def _quantize(ctx: RunContext, trained: dict[str, Any] | None) -> dict:
    """Rank 0: quantize (or convert the QAT copy), evaluate on val and test, write the files and the int8 block."""
    from amas.files.pruned import load_pruned
    from amas.pipeline.report import write_report
    from amas.quant import calibration_inputs, convert_qat, quantize_onnx, quantize_pt2e

    cfg = ctx.cfg.quant
    model, obj = load_pruned(ctx.path("pruned.pt"), "cpu")
    shape = tuple(int(s) for s in obj["metadata"]["input_shape"])
    partial, pt2 = ctx.path(PARTIAL), ctx.path("pruned_int8.pt2")
    calib = None
    if trained is None:
        # the training split only (this rank's shard under torchrun); never validation or test data
        calib = calibration_inputs(ctx.data("finetune").train, cfg.calib_batches)
        result = quantize_pt2e(model, None, shape, path=partial, inputs=calib)
    else:
        result = convert_qat(trained["model"], shape, partial, trained["steps"])
    evaluation = ctx.data("finetune", sharded=False)  # every image of val and test, on this one rank
    batch = None if result.dynamic_batch else 2  # a static export takes the batch it was traced with
    # the task's metric (a segmenter's mean IoU), as the float model's was measured
    val_acc, test_acc = (int8_score(result.model, b, batch, ctx.task, evaluation.info.num_classes)
                         for b in (evaluation.val, evaluation.test))
    report = ctx.read_json("report.json")
    notes = [n for n in report["notes"] if "int8" not in n]
    onnx_path = None
    if cfg.onnx and calib is None:
        notes.append("pruned_int8.onnx is written with quant.mode ptq only (ONNX Runtime quantizes the float model; "
                     "the QAT weights live in pruned_int8.pt2)")
    elif cfg.onnx:
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
        "mode": cfg.mode, "calib_batches": result.calib_batches if calib is not None else 0,
        "qat_epochs": cfg.qat_epochs if trained is not None else 0,
        "qat_fake_quant_val_acc": _round(trained["val_acc"]) if trained is not None else None,
        "val_acc": _round(val_acc), "test_acc": _round(test_acc),
        "pt2_bytes": os.path.getsize(partial), "onnx_bytes": os.path.getsize(onnx_path) if onnx_path else None,
        "quantized_layers": len(result.quantized_layers), "float_layers": len(result.float_layers),
        "dynamic_batch": result.dynamic_batch})
    if cfg.report_runtimes:
        from amas.latency.table import int8_comparison

        teacher, _ = ctx.teacher
        report["int8"]["runtimes"] = int8_comparison(teacher, model, shape, cfg.report_runtimes,
                                                     iters=ctx.latency_iters)
    write_report(report, ctx.path("report.json").parent)
    os.replace(partial, pt2)
    return report


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
