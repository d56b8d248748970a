"""The teacher stage (the given teacher, or one trained on the config: train_dense) and `amas eval`'s evaluation of a
checkpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from amas import distributed
from amas.config import Config, load_config
from amas.data import build_data
from amas.distributed import resolve_device
from amas.engine.loop import Trainer, evaluate
from amas.files.atomic import atomic_write_text
from amas.files.checkpoint import model_record, save_model
from amas.pipeline.context import Rows, RunContext, prepare_run_dir, seed_everything, stage_data


def train_dense(cfg: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train cfg.model on cfg.data from scratch, evaluate it once on the test set, and save model.pt."""
    from amas.channels.cost import count
    from amas.models import create_model

    run_dir = Path(run_dir)
    if (run_dir / "train_state.pt").exists() and not resume:
        prepare_run_dir(run_dir, cfg, resume, "train_state.pt")  # refuses before any work
    t0 = time.perf_counter()
    device = distributed.device_for(distributed.context(), resolve_device(cfg.train.device))
    seed_everything(cfg.seed)
    from amas.dense.batches import check_task_data
    from amas.engine.objective import TaskObjective
    from amas.tasks import make_task

    check_task_data(cfg)  # a task on data it cannot read, a VOC folder's files and classes: before any file
    task = make_task(cfg.task)
    data = stage_data(cfg, cfg.train, device)
    info = data.info
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         **cfg.model.kwargs)
    prepare_run_dir(run_dir, cfg, resume, "train_state.pt")  # data and model are valid: now the run directory
    trainer = Trainer(model, data.train, cfg.train, run_dir, num_classes=info.num_classes, val=data.val, stage="train",
                      device=device, task=task, objective=None if task.name == "classification" else
                      TaskObjective(task, cfg.train.label_smoothing))
    history = trainer.fit(resume=resume)
    test = evaluate(trainer.model, data.test, info.num_classes, device, task=task)  # float32, as exported models run
    macs, params = count(model, info.input_shape)
    result: dict[str, Any] = {
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "macs": macs,
        "params": params,
        "epochs": cfg.train.epochs,
        "wall_s": time.perf_counter() - t0,
    }
    if history and "val_acc" in history[-1]:
        result["val_acc"] = history[-1]["val_acc"]
    record = model_record(cfg.model.name, info.num_classes, info.in_channels, info, cfg.model.kwargs)
    if distributed.context().is_main:
        save_model(run_dir / "model.pt", trainer.model, record, metrics=result)
        atomic_write_text(run_dir / "metrics.json", json.dumps({"result": result, "history": history}, indent=2))
    distributed.barrier()
    return result


_TASK_OF_DATA = {"voc": "segmentation", "coco": "detection"}


def evaluate_checkpoint(path: str, config: str | None, overrides: list[str], latency_iters: int = 20,
                        int8: str | None = None) -> dict[str, Any]:
    """Accuracy on the test split, MACs, params and CPU/GPU latency of a saved amas model (and of its int8 .pt2)."""
    from amas.channels.cost import count
    from amas.channels.dense import tensor_part
    from amas.files.pruned import load_any_model
    from amas.latency.timing import latency
    from amas.tasks import make_task

    model, obj = load_any_model(path)  # dense 'model' or 'pruned' file
    rec = obj["model"]
    # the task the model was pruned for (recorded in pruned.pt), else the one its data format implies
    task = obj.get("metadata", {}).get("task") or _TASK_OF_DATA.get(rec["data"]["name"], "classification")
    dense = [f"task={task}", f"data.num_classes={rec['num_classes']}"] if task != "classification" else []
    # the image size it was pruned at (an ImageFolder, VOC or COCO folder is resized to the configured size)
    size = [f"data.image_size={rec['data']['image_size']}"] if rec["data"].get("image_size") else []
    cfg = load_config(config, [f"data.name={rec['data']['name']}", "data.val_size=0", *size, *dense, *overrides])
    device = resolve_device(cfg.train.device)
    model = model.to(device)
    data = build_data(cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, device=device, seed=cfg.seed)
    shape = (rec["data"]["in_channels"], rec["data"]["image_size"], rec["data"]["image_size"])
    the_task = make_task(cfg.task)
    test = evaluate(model, data.test, rec["num_classes"], device, task=the_task)
    net = tensor_part(model)  # a detector: its backbone and heads (what MACs and latency describe)
    macs, params = count(net, shape)
    lat1 = latency(net, shape, batch_size=1, iters=latency_iters)
    lat64 = latency(net, shape, batch_size=64, iters=max(3, latency_iters // 4))
    out = {
        "test_acc": round(test["acc"], 3),
        **({"metric": the_task.metric_name} if task != "classification" else {}),
        "macs_M": round(macs / 1e6, 3),
        "params_M": round(params / 1e6, 4),
        "latency_b1_ms": round(lat1["median_ms"], 3),
        "latency_b64_ms": round(lat64["median_ms"], 3),
        "device": str(device),
    }
    if int8 is not None:
        from amas.errors import QuantizeError
        from amas.quant import int8_score, load_int8

        if not os.path.isfile(int8):
            raise QuantizeError(f"--int8 {int8}: no such file; pass the int8 .pt2 the quantize stage wrote "
                                "(pruned_int8.pt2 in the run directory)")
        acc = int8_score(load_int8(int8), data.test, task=the_task, num_classes=rec["num_classes"])
        out.update(int8_test_acc=None if acc is None else round(acc, 3), int8_pt2_bytes=os.path.getsize(int8),
                   pt_bytes=os.path.getsize(path))
    return out


__all__ = ["evaluate_checkpoint", "teacher_stage", "train_dense"]


def teacher_stage(ctx: RunContext) -> Rows:
    """Use the given teacher, or train one in teacher/ (amas.pipeline.teacher.train_dense)."""
    if ctx.in_memory:
        from amas.models.registry import MEMORY_PREFIX

        model, obj = ctx.teacher
        ctx.write(save_model, ctx.teacher_path, model, obj["model"])
        name = obj["model"]["name"]
        where = ("pruned.pt loads in this process only (the class does not import or rebuild this model), or "
                 "elsewhere with amas.load_pruned(path, base=YourModel(...)); pruned.pt2 loads anywhere"
                 ) if name.startswith(MEMORY_PREFIX) else f"pruned.pt rebuilds it as {name}"
        return [("teacher", f"in memory ({obj['model']['source_class']}), recorded in {ctx.teacher_path}"),
                ("dataset", ctx.dataset_label), (ctx.label("val"), _teacher_val_acc(ctx)), ("rebuild", where)]
    name = ctx.cfg.model.name
    if ctx.teacher_arg:
        _, obj = ctx.teacher
        r, name = dict(obj.get("metrics", {})), obj["model"]["name"]
        if "val_acc" not in r:  # the user's plain state_dict (or a model.pt without a validation split) says nothing
            r["val_acc"] = _teacher_val_acc(ctx)
    else:
        r = train_dense(ctx.cfg, ctx.stage_dir("teacher"), resume=True)
    rows = [("model", name), ("dataset", ctx.dataset_label),
            (ctx.label("val"), r["val_acc"] if "val_acc" in r else _no_val(ctx))]  # 'val acc %', 'val mIoU %', ...
    rows.append((ctx.label("test"), r["test_acc"] if "test_acc" in r else "measured once, in the export stage"))
    if "macs" in r:
        rows += [("MACs", f"{r['macs'] / 1e6:.2f}M"), ("params", f"{r['params'] / 1e6:.3f}M"),
                 ("epochs", r.get("epochs", "–"))]
    return [*rows, ("checkpoint", str(ctx.teacher_path))]


def _no_val(ctx: RunContext) -> str:
    """Why there is no validation accuracy: the data has no held-out split."""
    return "no validation split (data.val_size=0)" if not ctx.user_data else "no validation batches"


def _teacher_val_acc(ctx: RunContext) -> float | str:
    """The given teacher's accuracy (%) on the validation split, or why there is none."""
    data = ctx.data("finetune")
    if data.val is None:
        return _no_val(ctx)
    return evaluate(ctx.teacher[0], data.val, data.info.num_classes, ctx.device, task=ctx.task)["acc"]
