"""The search stage: a copy of the teacher searched for channel masks (amas.search.objective) on the one engine."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from amas import distributed
from amas.config import Config, SearchConfig
from amas.files.atomic import atomic_write_text
from amas.pipeline.context import (
    Rows,
    RunContext,
    check_teacher_matches,
    prepare_run_dir,
    seed_everything,
    stage_data,
)
from amas.search.setup import build_search

__all__ = ["search", "search_stage"]


def search(cfg: Config, run_dir: str | Path, teacher_path: str | Path, resume: bool = False,
           on_epoch_end: Any = None, teacher: tuple[Any, dict] | None = None, data: Any = None,
           frozen: Any = None, task: Any = None) -> dict[str, Any]:
    """Search channel masks for a copy of the teacher; writes search.pt (student + masks) and search_state.pt.

    teacher, data: an in-memory (model, file record) and DataBundle used instead of teacher_path and cfg.data.
    frozen: the run's shared inference copy of the teacher (amas.engine.frozen.FrozenTeacher); else a private one.
    task: the amas.tasks Task the student learns and is validated on (None: classification).
    """
    from amas.channels.dense import tensor_part
    from amas.data import dataset_info
    from amas.distributed import resolve_device
    from amas.engine.loop import Trainer, evaluate
    from amas.files.checkpoint import load_model, save_masked

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    tcfg = cfg.search.train
    device = distributed.device_for(distributed.context(), resolve_device(tcfg.device))
    if teacher is None:
        teacher, tobj = load_model(teacher_path, device)
        info = dataset_info(cfg.data)
        check_teacher_matches(tobj["model"], info, teacher_path, cfg.data.name)
    else:
        teacher, tobj = teacher[0].to(device), teacher[1]
        info = data.info
    record = tobj["model"]
    if (run_dir / "search_state.pt").exists() and not resume:
        prepare_run_dir(run_dir, cfg, resume, "search_state.pt")  # refuses before any work
    seed_everything(cfg.seed)
    data = stage_data(cfg, tcfg, device) if data is None else data
    tcfg = dataclasses.replace(tcfg, epochs=search_epochs(cfg.search, len(data.train)))
    prepare_run_dir(run_dir, cfg, resume, "search_state.pt")
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    if task is not None:
        task.check_model(student)  # its align names (a detector's default: its backbone)
    # a torchvision detector's groups, costs and masks are on its tensor part (its backbone and heads)
    parts = build_search(tensor_part(student), frozen or teacher, cfg.search, info.input_shape, info.num_classes,
                         total_steps=tcfg.epochs * len(data.train), round_to=cfg.prune.round_to,
                         min_channels=cfg.prune.min_channels, residual=cfg.prune.residual_channels,
                         ignore=cfg.prune.ignore, task=task, what=f"model '{record['name']}'",
                         penalty_costs=lambda groups: _penalty_costs(cfg, student, groups, info.input_shape))
    groups, cost, masks, objective = parts.groups, parts.cost, parts.masks, parts.objective
    # a schedule longer than the search stops it part-way, where the fine-tuning that follows can continue it
    schedule = dataclasses.replace(tcfg, epochs=max(tcfg.epochs, cfg.search.schedule_epochs))
    trainer = Trainer(student, data.train, schedule, run_dir, num_classes=info.num_classes, val=data.val,
                      objective=objective, stage="search", device=device, on_epoch_end=on_epoch_end, task=task)
    try:
        history = trainer.fit(resume=resume, until_epoch=tcfg.epochs)
    except BaseException:
        objective.close()
        raise
    # evaluate the student with the final iterates x (FISTA leaves the extrapolated point in the parameters)
    values = objective.mask_values()
    masks.load_values(values)
    result: dict[str, Any] = {}
    if data.val is not None:
        result["val_acc"] = evaluate(trainer.model, data.val, info.num_classes, device, task=task)["acc"]
        result["teacher_val_acc"] = evaluate(teacher, data.val, info.num_classes, device, task=task)["acc"]
    objective.close()
    eff = objective.effective_macs()
    kept = objective.kept()
    result.update({
        "total_macs": int(cost.total_macs),
        "effective_macs": eff,
        "macs_ratio": eff / float(cost.total_macs),
        "macs_reduction": 1.0 - eff / float(cost.total_macs),
        "target_reduction": cfg.search.target_reduction,
        "lambda": objective.lam,
        "kept_channels": sum(kept.values()),
        "total_channels": sum(g.size for g in groups),
        "kept": kept,
        "epochs": tcfg.epochs,
        # the student's validation accuracy after each epoch: the first thing to read on a new model family (a search
        # that wrecks the student shows here before the masks bite)
        "val_acc_by_epoch": [round(float(h["val_acc"]), 2) for h in history if "val_acc" in h],
        "final_lr": float(trainer.optimizer.param_groups[0]["lr"]),
        "lr_scale": trainer.lr_scale,
        "optimizer": trainer.optimizer_kind,
        "wall_s": time.perf_counter() - t0,
    })
    if distributed.context().is_main:
        save_masked(run_dir / "search.pt", trainer.model, record, values, metrics=result)
        atomic_write_text(run_dir / "search_metrics.json", json.dumps({"result": result, "history": history}, indent=2))
    distributed.barrier()
    return result


def search_epochs(scfg: SearchConfig, steps_per_epoch: int) -> int:
    """The search's epochs: search.train.epochs, or more where its epochs are too short to reach search.min_steps
    optimiser steps (one line says so)."""
    from amas.console import say

    epochs = scfg.train.epochs
    if scfg.min_steps <= 0 or epochs <= 0 or steps_per_epoch <= 0 or epochs * steps_per_epoch >= scfg.min_steps:
        return epochs
    more = -(-scfg.min_steps // steps_per_epoch)
    say(f"search: {steps_per_epoch} steps an epoch, so {more} epochs instead of search.train.epochs={epochs}, to "
        f"train search.min_steps={scfg.min_steps} steps (search.min_steps=0 keeps the epochs as given)")
    return more


def _penalty_costs(cfg: Config, model: Any, groups: list, input_shape: tuple) -> dict[str, float] | None:
    """With search.penalty_cost latency: ms saved per channel over the dense ms, from the prune.latency_* table."""
    if cfg.search.penalty_cost != "latency":
        return None
    from amas.channels.dense import tensor_part
    from amas.latency.table import shared_table

    table = shared_table(tensor_part(copy.deepcopy(model).cpu()), groups, input_shape, cfg.prune)
    dense = table.predict({})
    return {n: c / dense for n, c in table.channel_costs().items()}


def search_stage(ctx: RunContext) -> Rows:
    """Search channel masks for a copy of the teacher (amas.pipeline.search.search) into search/."""
    out = ctx.stage_dir("search")
    r = search(ctx.cfg, out, ctx.teacher_path, resume=True, on_epoch_end=ctx.epoch_hook("search"),
               teacher=ctx.memory_teacher(), data=ctx.data("search") if ctx.memory_teacher() else None,
               frozen=ctx.frozen_teacher(ctx.cfg.search), task=ctx.task)
    val = ctx.label("val")  # 'val acc %', 'val mIoU %', ...
    return [
        ("teacher", str(ctx.teacher_path)), ("dataset", ctx.dataset_label),
        (f"student {val}", r.get("val_acc", float("nan"))), (f"teacher {val}", r.get("teacher_val_acc", float("nan"))),
        (f"student {val[:-2]} by epoch %", ", ".join(f"{a:.2f}" for a in r.get("val_acc_by_epoch", [])) or "–"),
        ("optimiser", f"{r.get('optimizer', 'sgd')} at x{r.get('lr_scale', 1.0):.3g} of its rate"),
        ("effective MACs", f"{r['effective_macs'] / 1e6:.2f}M of {r['total_macs'] / 1e6:.2f}M"),
        ("MACs reduction %", 100.0 * r["macs_reduction"]), ("target reduction %", 100.0 * r["target_reduction"]),
        ("kept channels", f"{r['kept_channels']} of {r['total_channels']}"), ("lambda", r["lambda"]),
        ("epochs", r["epochs"]), ("checkpoint", str(out / "search.pt")),
    ]
