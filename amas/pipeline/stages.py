"""What each stage of `amas prune` does, as run(ctx) functions of the stage table (amas.pipeline.runner).

Every function trains on the context's sharded data, lets only rank 0 write (``ctx.write``) and returns the
summary rows printed and logged for its stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from amas.pipeline.context import RunContext

Rows = list[tuple[str, Any]]

__all__ = ["run_teacher", "run_search", "run_candidates", "run_select", "run_final", "run_export"]


def run_teacher(ctx: RunContext) -> Rows:
    """Use the given teacher, or train one in teacher/ (amas.pipeline.teacher.train_dense)."""
    if ctx.in_memory:
        from amas.files.checkpoint import save_model
        from amas.models.registry import MEMORY_PREFIX

        model, obj = ctx.teacher
        ctx.write(save_model, ctx.teacher_path, model, obj["model"])
        name = obj["model"]["name"]
        where = ("pruned.pt loads in this process only (the class does not import or rebuild this model), or "
                 "elsewhere with amas.load_pruned(path, base=YourModel(...)); pruned.pt2 loads anywhere"
                 ) if name.startswith(MEMORY_PREFIX) else f"pruned.pt rebuilds it as {name}"
        return [("teacher", f"in memory ({obj['model']['source_class']}), recorded in {ctx.teacher_path}"),
                ("dataset", ctx.dataset_label), ("val acc %", _teacher_val_acc(ctx)), ("rebuild", where)]
    name = ctx.cfg.model.name
    if ctx.teacher_arg:
        _, obj = ctx.teacher
        r, name = dict(obj.get("metrics", {})), obj["model"]["name"]
        if "val_acc" not in r:  # the user's plain state_dict (or a model.pt without a validation split) says nothing
            r["val_acc"] = _teacher_val_acc(ctx)
    else:
        from amas.pipeline.teacher import train_dense

        r = train_dense(ctx.cfg, ctx.stage_dir("teacher"), resume=True)
    rows = [("model", name), ("dataset", ctx.dataset_label), ("val acc %", r["val_acc"] if "val_acc" in r else
                                                               _no_val(ctx))]
    rows.append(("test acc %", r["test_acc"] if "test_acc" in r else "measured once, in the export stage"))
    if "macs" in r:
        rows += [("MACs", f"{r['macs'] / 1e6:.2f}M"), ("params", f"{r['params'] / 1e6:.3f}M"),
                 ("epochs", r.get("epochs", "–"))]
    return [*rows, ("checkpoint", str(ctx.teacher_path))]


def _no_val(ctx: RunContext) -> str:
    """Why there is no validation accuracy: the data has no held-out split."""
    return "no validation split (data.val_size=0)" if not ctx.user_data else "no validation batches"


def _teacher_val_acc(ctx: RunContext) -> float | str:
    """The given teacher's accuracy (%) on the validation split, or why there is none."""
    from amas.engine.loop import evaluate

    data = ctx.data("finetune")
    if data.val is None:
        return _no_val(ctx)
    return evaluate(ctx.teacher[0], data.val, data.info.num_classes, ctx.device)["acc"]


def run_search(ctx: RunContext) -> Rows:
    """Search channel masks for a copy of the teacher (amas.pipeline.search.search) into search/."""
    from amas.pipeline.search import search

    out = ctx.stage_dir("search")
    r = search(ctx.cfg, out, ctx.teacher_path, resume=True, on_epoch_end=ctx.epoch_hook("search"),
               teacher=ctx.memory_teacher(), data=ctx.data("search") if ctx.memory_teacher() else None)
    return [
        ("teacher", str(ctx.teacher_path)), ("dataset", ctx.dataset_label),
        ("student val acc %", r.get("val_acc", float("nan"))),
        ("teacher val acc %", r.get("teacher_val_acc", float("nan"))),
        ("effective MACs", f"{r['effective_macs'] / 1e6:.2f}M of {r['total_macs'] / 1e6:.2f}M"),
        ("MACs reduction %", 100.0 * r["macs_reduction"]), ("target reduction %", 100.0 * r["target_reduction"]),
        ("kept channels", f"{r['kept_channels']} of {r['total_channels']}"), ("lambda", r["lambda"]),
        ("epochs", r["epochs"]), ("checkpoint", str(out / "search.pt")),
    ]


def _teacher_copy(ctx: RunContext) -> tuple[nn.Module, dict | None]:
    """A trainable copy of the teacher (Torch-Pruning traces the channel groups through autograd), no masks."""
    return copy.deepcopy(ctx.teacher[0]).requires_grad_(True), None


def _searched_student(ctx: RunContext) -> tuple[nn.Module, dict | None]:
    """The search stage's student and its masks (folded into the cut)."""
    from amas.files.checkpoint import load_masked

    student, masks, _ = load_masked(ctx.path("search/search.pt"), ctx.device)
    return student, masks


_SOURCES = {"teacher": _teacher_copy, "search": _searched_student}


def _planner(ctx: RunContext) -> tuple[nn.Module, dict | None, Callable]:
    """(model to cut from, masks to fold, planner(level, model, groups, cost) -> kept indices) of ctx.method."""
    from amas.criteria import get

    criterion = get(ctx.method)
    source, masks = _SOURCES[criterion.source](ctx)
    # every rank plans on the whole (unsharded) data, so data-driven criteria cut the same channels everywhere
    data = ctx.data("finetune", sharded=False) if criterion.reads_data else None
    train, val = (data.train, data.val) if data is not None else (None, None)
    num_classes = ctx.data("finetune").info.num_classes

    def plan(level: float, model: nn.Module, groups: list, cost: Any) -> dict:
        # in place and once (e.g. bn_scale's sparsity training): the candidates are cut from the prepared model
        criterion.prepare(model, groups, train, ctx.cfg.criteria, num_classes=num_classes)
        return criterion.plan(copy.deepcopy(model), groups, cost, level, train=train, val=val, cfg=ctx.cfg.criteria,
                              prune_cfg=ctx.cfg.prune, num_classes=num_classes, seed=ctx.cfg.seed, masks=masks)

    return source, masks, plan


def run_candidates(ctx: RunContext) -> Rows:
    """Cut candidates at select.levels and fine-tune them by successive halving (amas.pipeline.select) into
    candidates/."""
    from amas.pipeline.candidates import run_candidates as cut_and_finetune

    teacher, obj = ctx.teacher
    source, masks, planner = _planner(ctx)
    r = cut_and_finetune(ctx.cfg, ctx.stage_dir("candidates"), teacher=teacher, record=obj["model"], source=source,
                         planner=planner, masks=masks, data=ctx.data("finetune"), device=ctx.device, method=ctx.method,
                         on_epoch_end=ctx.epoch_hook())
    rows = [(f"{c['name']} (level {c['level']:.2f})",
             f"-{100 * c['macs_reduction']:.1f}% MACs, {c['channels']}/{c['total_channels']} ch, "
             f"val {c['val_acc']:.2f}% after {c['epochs']} ep, {c['status']}") for c in r["rows"]]
    rows += [(f"skipped level {s['level']:.2f}", s["reason"]) for s in r["skipped"]]
    rows += [("teacher val acc %", r["teacher"]["val_acc"]),
             ("budget spent", f"{r['halving']['spent']} of {r['halving']['budget']} candidate-epochs")]
    return rows


def run_select(ctx: RunContext) -> Rows:
    """Pareto front and policy over the fine-tuned candidates: selection.json, pareto.png (rank 0)."""
    from amas.pipeline.select import select_candidates

    r = ctx.write(select_candidates, ctx.read_json("candidates/candidates.json"), ctx.cfg.select, ctx.dir)
    if r is None:  # not rank 0: nothing to report
        return []
    w = r["winner_row"]
    names = {c["id"]: c["name"] for c in r["candidates"]}
    return [("policy", r["policy"]), ("rule", r["rule"]), ("Pareto front", ", ".join(names[i] for i in r["front"])),
            ("selected", f"{w['name']} (level {w['level']:.2f})"),
            ("val acc %", w["val_acc"]), ("MACs", f"{w['macs'] / 1e6:.3f}M (-{100 * w['macs_reduction']:.1f}%)"),
            ("figure", str(ctx.path("pareto.png")))]


def run_final(ctx: RunContext) -> Rows:
    """Fine-tune the selected candidate for finetune.train.epochs into final/final.pt."""
    from amas.files.export import load_pruned, save_pruned
    from amas.pipeline.candidates import finetune_trainer

    sel = ctx.read_json("selection.json")
    name = sel["winner_name"]
    cdir = ctx.stage_dir("candidates")
    src = cdir / f"{name}.pt" if (cdir / f"{name}.pt").is_file() else cdir / f"{name}_cut.pt"
    model, obj = load_pruned(src, ctx.device)
    teacher, _ = ctx.teacher
    epochs = ctx.cfg.finetune.train.epochs
    out = ctx.stage_dir("final")
    ctx.write(out.mkdir, parents=True, exist_ok=True)
    val_acc = sel["winner_row"]["val_acc"]
    if epochs > 0:
        trainer = finetune_trainer(model, teacher, ctx.cfg.finetune, epochs, ctx.data("finetune"), out, "final",
                                   ctx.device, on_epoch_end=ctx.epoch_hook("final"))
        try:
            history = trainer.fit(resume=True)
        finally:
            trainer.objective.close()
        model = trainer.model
        val_acc = float(history[-1]["val_acc"])
    meta = dict(obj["metadata"], val_acc=val_acc, selected=name, finetune_epochs=epochs)
    ctx.write(save_pruned, out / "final.pt", model, obj["recipe"], meta)
    return [("selected", name), ("fine-tune epochs", epochs), ("val acc before %", sel["winner_row"]["val_acc"]),
            ("val acc after %", val_acc), ("checkpoint", str(out / "final.pt"))]


def run_export(ctx: RunContext) -> Rows:
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
        acc["pruned"] = evaluate(model, test, classes, ctx.device)["acc"]
        if ctx.export.teacher_test:
            acc["teacher"] = evaluate(teacher, test, classes, ctx.device)["acc"]
    report = ctx.write(_write_export, ctx, model, obj, teacher, acc)
    if report is None:  # not rank 0: nothing to report
        return []
    from amas.pipeline.report import report_rows

    return [*report_rows(report), ("report", str(ctx.path("report.md")))]


def _write_export(ctx: RunContext, model: nn.Module, obj: dict, teacher: nn.Module, acc: dict) -> dict:
    """Rank 0's part of the export stage: the shipped files, latency and the report; returns the report."""
    from amas.files.export import export_onnx, export_pt2, save_pruned
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
    pt2 = export_pt2(model, shape, files["pruned.pt2"])
    notes = [] if pt2["dynamic_batch"] else ["pruned.pt2 has a fixed batch size (the model did not export with a "
                                             "dynamic batch)"]
    if ctx.export.onnx:
        from amas.files.export import onnx_available

        if onnx_available():
            files["pruned.onnx"] = export_onnx(model, shape, ctx.path("pruned.onnx"))["path"]
        else:
            notes.append("pruned.onnx skipped: install the onnx extra (pip install 'amas[onnx]')")
    teacher_val = cand["teacher"]["val_acc"] if cand else teacher_obj.get("metrics", {}).get("val_acc")
    report = export_report(
        command=ctx.command, model=meta.get("model"), dataset=meta.get("dataset"), method=ctx.method,
        input_shape=shape, reference=ctx.export.reference,
        pruned=measure(model, shape, ctx.latency_iters, acc["pruned"], meta.get("val_acc"), files["pruned.pt"]),
        teacher=measure(teacher, shape, ctx.latency_iters, acc["teacher"], teacher_val, str(ctx.teacher_path)),
        cut={k: meta.get(k) for k in ("target_reduction", "round_to", "min_channels", "source")},
        selection=_selection(sel, cand, meta) if sel else None,
        files={**files, **({"selection": str(ctx.path("selection.json")), "pareto": str(ctx.path("pareto.png"))}
                           if sel else {})},
        stage_wall_s={k: v["wall_s"] for k, v in ctx.log.data["stages"].items() if v.get("wall_s") is not None},
        notes=notes)
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
