"""What each stage of `amas prune` does, as run(ctx) functions of the stage table (amas.stage_table).

Every function trains on the context's sharded data, lets only rank 0 write (``ctx.write``) and returns the
summary rows printed and logged for its stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from amas.run_context import RunContext

Rows = list[tuple[str, Any]]

__all__ = ["run_teacher", "run_search", "run_candidates", "run_select", "run_final", "run_export"]


def run_teacher(ctx: RunContext) -> Rows:
    """Use the given teacher, or train one in teacher/ (amas.stages.train_dense)."""
    if ctx.in_memory:
        from amas.checkpoint import save_model
        from amas.models.registry import MEMORY_PREFIX

        model, obj = ctx.teacher
        ctx.write(save_model, ctx.teacher_path, model, obj["model"])
        name = obj["model"]["name"]
        where = ("pruned.pt loads in this process only (the class does not import or rebuild this model); use "
                 "pruned.pt2 elsewhere") if name.startswith(MEMORY_PREFIX) else f"pruned.pt rebuilds it as {name}"
        return [("teacher", f"in memory ({obj['model']['source_class']}), recorded in {ctx.teacher_path}"),
                ("rebuild", where)]
    if ctx.teacher_arg:
        _, obj = ctx.teacher
        m = obj.get("metrics", {})
        return [("teacher", str(ctx.teacher_path)), ("model", obj["model"]["name"]),
                ("val acc %", m.get("val_acc", float("nan"))), ("test acc %", m.get("test_acc", float("nan")))]
    from amas.stages import train_dense

    r = train_dense(ctx.cfg, ctx.dir / "teacher", resume=True)
    return [("teacher", str(ctx.teacher_path)), ("model", ctx.cfg.model.name),
            ("val acc %", r.get("val_acc", float("nan"))), ("test acc %", r["test_acc"]),
            ("MACs", f"{r['macs'] / 1e6:.2f}M"), ("params", f"{r['params'] / 1e6:.3f}M"), ("epochs", r["epochs"])]


def run_search(ctx: RunContext) -> Rows:
    """Search channel masks for a copy of the teacher (amas.search_stage.search) into search/."""
    from amas.search_stage import search

    r = search(ctx.cfg, ctx.dir / "search", ctx.teacher_path, resume=True, on_epoch_end=ctx.epoch_hook("search"),
               teacher=ctx.memory_teacher(), data=ctx.data("search") if ctx.memory_teacher() else None)
    return [
        ("student val acc %", r.get("val_acc", float("nan"))),
        ("teacher val acc %", r.get("teacher_val_acc", float("nan"))),
        ("effective MACs", f"{r['effective_macs'] / 1e6:.2f}M of {r['total_macs'] / 1e6:.2f}M"),
        ("MACs reduction %", 100.0 * r["macs_reduction"]),
        ("kept channels", f"{r['kept_channels']} of {r['total_channels']}"),
        ("epochs", r["epochs"]),
    ]


def _teacher_copy(ctx: RunContext) -> tuple[nn.Module, dict | None]:
    """A trainable copy of the teacher (Torch-Pruning traces the channel groups through autograd), no masks."""
    return copy.deepcopy(ctx.teacher[0]).requires_grad_(True), None


def _searched_student(ctx: RunContext) -> tuple[nn.Module, dict | None]:
    """The search stage's student and its masks (folded into the cut)."""
    from amas.checkpoint import load_masked

    student, masks, _ = load_masked(ctx.dir / "search" / "search.pt", ctx.device)
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
    """Cut candidates at select.levels and fine-tune them by successive halving (amas.select) into candidates/."""
    from amas.candidates import run_candidates as cut_and_finetune

    teacher, obj = ctx.teacher
    source, masks, planner = _planner(ctx)
    r = cut_and_finetune(ctx.cfg, ctx.dir / "candidates", teacher=teacher, record=obj["model"], source=source,
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
    from amas.select import select_candidates

    r = ctx.write(select_candidates, ctx.read_json("candidates/candidates.json"), ctx.cfg.select, ctx.dir)
    if r is None:  # not rank 0: nothing to report
        return []
    w = r["winner_row"]
    names = {c["id"]: c["name"] for c in r["candidates"]}
    return [("policy", r["policy"]), ("rule", r["rule"]), ("Pareto front", ", ".join(names[i] for i in r["front"])),
            ("selected", f"{w['name']} (level {w['level']:.2f})"),
            ("val acc %", w["val_acc"]), ("MACs", f"{w['macs'] / 1e6:.3f}M (-{100 * w['macs_reduction']:.1f}%)"),
            ("figure", str(ctx.dir / "pareto.png"))]


def run_final(ctx: RunContext) -> Rows:
    """Fine-tune the selected candidate for finetune.train.epochs into final/final.pt."""
    from amas.candidates import finetune_trainer
    from amas.export import load_pruned, save_pruned

    sel = ctx.read_json("selection.json")
    name = sel["winner_name"]
    cdir = ctx.dir / "candidates"
    src = cdir / f"{name}.pt" if (cdir / f"{name}.pt").is_file() else cdir / f"{name}_cut.pt"
    model, obj = load_pruned(src, ctx.device)
    teacher, _ = ctx.teacher
    epochs = ctx.cfg.finetune.train.epochs
    out = ctx.dir / "final"
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
    """Test accuracy of teacher and winner, pruned.pt, pruned.pt2 and report.md/json (rank 0 writes)."""
    from amas.engine import evaluate

    model, obj = _load_final(ctx)
    teacher, _ = ctx.teacher
    data = ctx.data("finetune")
    info = data.info
    # the test split, evaluated once, here, for both models (sharded: every rank takes part); amas.prune may have none
    test_pruned = test_teacher = float("nan")
    if data.test is not None:
        test_pruned = evaluate(model, data.test, info.num_classes, ctx.device)["acc"]
        test_teacher = evaluate(teacher, data.test, info.num_classes, ctx.device)["acc"]
    rows = ctx.write(_write_export, ctx, model, obj, teacher, test_pruned, test_teacher)
    return rows or []


def _load_final(ctx: RunContext) -> tuple[nn.Module, dict]:
    from amas.export import load_pruned

    return load_pruned(ctx.dir / "final" / "final.pt", ctx.device)


def _write_export(ctx: RunContext, model: nn.Module, obj: dict, teacher: nn.Module, test_pruned: float,
                  test_teacher: float) -> Rows:
    """Rank 0's part of the export stage: the shipped files, latency and the report."""
    from amas.export import build_report, export_pt2, save_pruned
    from amas.prune_report import comparison, write_comparison

    shape = ctx.data("finetune").info.input_shape
    sel, cand = ctx.read_json("selection.json"), ctx.read_json("candidates/candidates.json")
    meta = dict(obj["metadata"], test_acc=round(test_pruned, 3), teacher_test_acc=round(test_teacher, 3),
                method=ctx.method, policy=sel["policy"], selection_rule=sel["rule"])
    save_pruned(ctx.dir / "pruned.pt", model, obj["recipe"], meta)
    pt2 = export_pt2(model.cpu(), shape, ctx.dir / "pruned.pt2")
    rp = build_report(model.cpu(), shape, meta, latency_iters=ctx.latency_iters, device="cpu")
    rt = build_report(teacher.cpu(), shape, {}, latency_iters=ctx.latency_iters, device="cpu")
    report = comparison(ctx, meta, rp, rt, test_teacher, test_pruned, sel, cand, pt2)
    if ctx.cfg.prune.report_runtimes:
        from amas.latency_report import runtime_comparison

        report["runtimes"] = runtime_comparison(teacher, model, shape, ctx.cfg.prune.report_runtimes,
                                                iters=ctx.latency_iters)
    write_comparison(report, ctx.dir)
    reduction = 100 * (1 - rp["macs"] / rt["macs"])
    return [
        ("teacher test acc %", round(test_teacher, 3)),
        ("pruned test acc %", round(test_pruned, 3)),
        ("MACs", f"{rp['macs'] / 1e6:.3f}M of {rt['macs'] / 1e6:.3f}M (-{reduction:.1f}%)"),
        ("params", f"{rp['params'] / 1e6:.4f}M of {rt['params'] / 1e6:.4f}M"),
        ("latency b64 ms", f"{rp['latency_b64_ms']:.3g} vs {rt['latency_b64_ms']:.3g} (teacher)"),
        ("files", f"{ctx.dir / 'pruned.pt'}, {ctx.dir / 'pruned.pt2'}"),
        ("report", str(ctx.dir / "report.md")),
    ]
