"""The run context of one pipeline run: device and rank, sharded data per training section, the teacher (loaded
once), the stage log, and the one writer of files (rank 0, with the barriers that needs); and what every stage
runs on: seeding, the run directory guard and the stage's sharded data."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from amas import distributed
from amas.config import Config, TrainConfig, save_config
from amas.errors import AmasError, PipelineError, SearchError
from amas.files.atomic import atomic_write_text

if TYPE_CHECKING:
    from amas.data import DataBundle

__all__ = ["ExportOptions", "Rows", "RunContext", "StageLog", "check_teacher_matches", "prepare_run_dir",
           "seed_everything", "stage_data"]

# the summary rows a stage returns, printed and logged for it
Rows = list[tuple[str, Any]]


def now() -> str:
    """The local time to the second, as the stage log records it."""
    return _dt.datetime.now().isoformat(timespec="seconds")


@dataclass(frozen=True)
class ExportOptions:
    """How the export stage runs: `amas prune`'s (the defaults) or `amas export`'s (one cut, no selection)."""

    onnx: bool = False  # also write pruned.onnx, checked against PyTorch with onnxruntime
    test: bool = True  # evaluate on the test split
    teacher_test: bool = True  # evaluate the teacher too (amas export does not evaluate the dense model it cut)
    selection: bool = True  # the report's selection block, from selection.json and candidates.json
    reference: str = "teacher"  # what the report's teacher block describes


class StageLog:
    """pipeline.json: stage records and events; every rank keeps it in memory, rank 0 rewrites it atomically.

    persist=False keeps it in memory only (the single-stage commands, which write no pipeline.json).
    """

    def __init__(self, path: Path, persist: bool = True) -> None:
        self.path, self.persist = path, persist
        self.data: dict = {"stages": {}, "events": []}
        if persist and path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise PipelineError(
                    f"'{path}' is damaged; delete it to rebuild the stage log from the artefacts"
                ) from None

    def stage(self, name: str) -> dict | None:
        """The record of stage name, or None."""
        return self.data["stages"].get(name)

    def set(self, name: str, record: dict | None) -> None:
        """Replace (or, with None, drop) the record of stage name."""
        if record is None:
            self.data["stages"].pop(name, None)
        else:
            self.data["stages"][name] = record
        self.save()

    def event(self, stage: str, event: str, **extra: Any) -> None:
        """Append an event (start, done, skip, redo, ...)."""
        self.data["events"].append({"time": now(), "stage": stage, "event": event, **extra})
        self.save()

    def save(self) -> None:
        """Write pipeline.json (rank 0 only)."""
        if self.persist and distributed.context().is_main:
            atomic_write_text(self.path, json.dumps(self.data, indent=2))


class RunContext:
    """What the stages of one run share, built once: paths, device, rank, sharded data, the teacher, the log.

    teacher: a model.pt path, or None to train one in the run directory (stage ``teacher``).
    teacher_model, data: the user's trained classifier and DataBundle in memory (amas.prune); with them the teacher
    stage only records the model in teacher/model.pt and every stage reads these data.
    command: the amas command running (a subset of) the stage table; every command but prune keeps its stage's
    files in the run directory itself (no stage folders) and writes neither pipeline.json nor config.yaml.
    given: artefacts in memory instead of files: {"teacher": (model, file object), "final": (model, pruned.pt
    record)} (amas export gives its cut and the dense model it was cut from).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, teacher: str | Path | None = None, method: str = "amas",
                 latency_iters: int = 20, hooks: dict[str, Callable] | None = None,
                 teacher_model: nn.Module | None = None, data: Any = None, command: str = "prune",
                 given: dict[str, tuple[nn.Module, dict]] | None = None,
                 export: ExportOptions | None = None, task: Any = None) -> None:
        from amas.distributed import resolve_device
        from amas.tasks import make_task

        self.cfg, self.dir, self.method = cfg, Path(run_dir), method
        # what the stages train, align and select by (config.task; amas.prune may hand a Task with its loss_fn)
        self.task = make_task(task if task is not None else cfg.task)
        self.command, self.flat = command, command != "prune"
        self.given, self.export = dict(given or {}), export or ExportOptions()
        self.teacher_arg = None if teacher is None else str(teacher)
        self.latency_iters, self.hooks = latency_iters, dict(hooks or {})
        self.dist = distributed.context()
        self.device = distributed.device_for(self.dist, resolve_device(cfg.finetune.train.device))
        self._teacher: tuple[nn.Module, dict] | None = None
        self._task_checked = False
        self._frozen: dict[bool, Any] = {}  # the teacher's inference copies by fast_teacher (one in a default run)
        self._data: dict[tuple[str, bool], Any] = {}
        self.in_memory = teacher_model is not None
        from amas.files.checkpoint import is_plain_state_dict

        self.plain_teacher = self.teacher_arg is not None and is_plain_state_dict(self.teacher_arg)
        if teacher_model is not None:
            record = _memory_record(teacher_model, data.info, cfg.model.kwargs)
            # a private frozen copy: the caller's module keeps its device, mode, flags and memory format
            self._teacher = (copy.deepcopy(teacher_model).to(self.device).eval().requires_grad_(False), record)
        if "teacher" in self.given:
            model, obj = self.given["teacher"]
            self._teacher = (model.to(self.device).eval().requires_grad_(False), obj)
        self.user_data = data is not None
        if data is not None:
            self._data = {(s, sh): data for s in ("train", "search", "finetune") for sh in (True, False)}
        self.log = StageLog(self.dir / "pipeline.json", persist=not self.flat)
        distributed.barrier()  # every rank has read the log before rank 0 rewrites it

    # ---------------------------------------------------------------- files

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""
        return self.dist.is_main

    @property
    def teacher_path(self) -> Path:
        """The teacher checkpoint: the one given, else the teacher stage's model.pt."""
        return Path(self.teacher_arg) if self.teacher_arg else self.stage_dir("teacher") / "model.pt"

    def stage_dir(self, folder: str) -> Path:
        """A stage's folder (teacher/, search/, candidates/, final/); the run directory itself for other commands."""
        return self.dir if self.flat else self.dir / folder

    def path(self, rel: str) -> Path:
        """An artefact path of the stage table: '{teacher}' is the teacher checkpoint, the rest is run-dir relative
        (its stage folder dropped for the single-stage commands)."""
        if rel == "{teacher}":
            return self.teacher_path
        return self.dir / Path(rel).name if self.flat else self.dir / rel

    def write(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run fn on rank 0 only, then wait for every rank (the one writer of the run)."""
        return distributed.on_main(fn, *args, **kwargs)

    def remove(self, rels: tuple[str, ...]) -> None:
        """Delete these run-dir files or folders (rank 0), as --redo does."""

        def rm() -> None:
            for rel in rels:
                p = self.path(rel)
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

        self.write(rm)

    def prepare_dir(self) -> None:
        """amas prune: create the run directory and write the resolved config (rank 0). The single-stage commands'
        stages create it themselves, once their inputs are checked."""

        def make() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.dir / "config.yaml")

        if not self.flat:
            self.write(make)

    def check_data(self) -> None:
        """Stop on configured data that cannot work (an ImageFolder class folder without images, a file that is not
        an image) before any stage runs or writes; the user's in-memory batches were checked when given."""
        from amas.dense.batches import check_task_data

        check_task(self.cfg, self.method, self.task)
        if self.user_data or (self.command == "export" and not self.export.test):
            return
        check_task_data(self.cfg)  # a task on data it cannot read; a VOC folder's files and classes
        from amas.data import check_images, dataset_info

        dataset_info(self.cfg.data)
        if self.cfg.data.name == "imagefolder":
            check_images(self.cfg.data)  # a corrupt file would stop a stage mid-run with a PIL traceback

    def label(self, split: str) -> str:
        """How a summary row names the task's metric on a split: 'val acc %', 'val mIoU %', 'test box mAP %'."""
        return f"{split} {self.task.metric_label}"

    @property
    def dataset_label(self) -> str:
        """The data the run trains on, as the stage summaries name it."""
        return "your batches (in memory)" if self.user_data else self.cfg.data.name

    def read_json(self, rel: str) -> dict:
        """A JSON artefact of an earlier stage."""
        return json.loads(self.path(rel).read_text())

    # ---------------------------------------------------------------- shared inputs

    def data(self, section: str = "finetune", sharded: bool = True) -> Any:
        """The data for a training section (its batch sizes); sharded over the ranks unless sharded=False."""
        sharded = sharded and self.dist.enabled
        key = (section, sharded)
        if key not in self._data:
            from amas.data import build_data

            cfg = self.cfg
            t = getattr(cfg, section).train
            if sharded:
                bundle = stage_data(cfg, t, self.device)
            else:
                bundle = build_data(cfg.data, t.batch_size, t.eval_batch_size, device=self.device, seed=cfg.seed,
                                    channels_last=t.channels_last)
            self._data[key] = bundle
        return self._data[key]

    @property
    def teacher(self) -> tuple[nn.Module, dict]:
        """The frozen teacher and its file record, loaded once and checked against the configured data."""
        if self._teacher is None:
            from amas.data import dataset_info
            from amas.files.checkpoint import load_model, load_plain_teacher

            info = dataset_info(self.cfg.data)
            if self.plain_teacher:  # the user's weights for the architecture model.name names
                model, obj = load_plain_teacher(self.teacher_path, self.cfg.model.name, info, self.cfg.model.kwargs,
                                                self.device)
            else:
                model, obj = load_model(self.teacher_path, self.device)
                check_teacher_matches(obj["model"], info, self.teacher_path, self.cfg.data.name)
            self._teacher = (model.eval().requires_grad_(False), obj)
        if not self._task_checked:
            # the task's align names resolve on the teacher: a baseline or resumed run has no search stage to do it
            self.task.check_model(self._teacher[0])
            self._task_checked = True
        return self._teacher

    def frozen_teacher(self, section: Any) -> Any:
        """The teacher's one inference copy (amas.engine.frozen.FrozenTeacher) every stage of the run reads: conv+BN
        folded when section.fast_teacher (search or finetune) and the fold keeps its outputs; built once per run."""
        fold = bool(section.fast_teacher) and self.task.fold_teacher
        if fold not in self._frozen:
            from amas.data import dataset_info
            from amas.engine.frozen import FrozenTeacher

            info = self.data("finetune").info if self.user_data else dataset_info(self.cfg.data)
            self._frozen[fold] = FrozenTeacher(self.teacher[0], info.input_shape, fold=fold)
        return self._frozen[fold]

    def final(self) -> tuple[nn.Module, dict]:
        """The model the export stage ships and its pruned.pt record: final/final.pt, or the cut given in memory."""
        if "final" in self.given:
            model, obj = self.given["final"]
            return model.to(self.device).eval(), obj
        from amas.files.pruned import load_pruned

        return load_pruned(self.path("final/final.pt"), self.device)

    def test_split(self) -> Any:
        """The test batches the export stage evaluates, or None (none given, or not asked for)."""
        return self.data("finetune").test if self.export.test else None

    def memory_teacher(self) -> tuple[nn.Module, dict] | None:
        """The in-memory teacher and its record, or None when the teacher is a file."""
        return self.teacher if self.in_memory or self.plain_teacher else None

    def epoch_hook(self, stage: str | None = None) -> Callable | None:
        """The on_epoch_end hook for a trainer: f(epoch, record), or f(stage, epoch, record) when stage is None."""
        hook = self.hooks.get("on_epoch_end")
        if hook is None or stage is None:
            return hook
        return lambda e, rec: hook(stage, e, rec)


def _memory_record(model: nn.Module, info: Any, kwargs: dict | None = None) -> dict:
    """The file record of an in-memory teacher: 'package.module:Class' (+ kwargs) when its class rebuilds it, so
    pruned.pt loads wherever the class imports; else a name that rebuilds it as a copy in this process only."""
    from amas.files.checkpoint import model_record
    from amas.inputs import importable_name, torchvision_record
    from amas.models.registry import MEMORY_PREFIX, register_memory_model

    cls = type(model)
    shape, k = info.input_shape, info.num_classes
    name = importable_name(model, shape, k, kwargs)  # as arch_name, with torchvision's segmenters in between
    tv = None if name else torchvision_record(model, shape, k)
    name = name or (tv[0] if tv else register_memory_model(model))
    record = model_record(name, k, info.in_channels, info, tv[1] if tv else
                          None if name.startswith(MEMORY_PREFIX) else kwargs)
    return {"model": dict(record, source_class=f"{cls.__module__}:{cls.__qualname__}"), "metrics": {}}


# baselines that read class labels (a classifier's CE or top-1): not for dense tasks
_LABEL_METHODS = {"taylor": "its scores are gradients of a classifier's cross-entropy",
                  "blend": "its search scores candidates by top-1 on validation batches"}


def check_task(cfg: Config, method: str, task: Any) -> None:
    """One line, before any stage runs, for what a dense task cannot do yet: a baseline that reads class labels,
    quantization-aware training, int8 of a detector, data only the user's batches give."""
    if task.name == "classification":
        return
    why = _LABEL_METHODS.get(method)
    if method == "bn_scale" and cfg.criteria.bn_sparsity:
        why = "its sparsity training (criteria.bn_sparsity) trains a classifier's cross-entropy"
    if why:
        raise PipelineError(f"method {method} cannot prune a {task.name} model: {why}; use l1, l2, fpgm, random, srr, "
                            "hrank, apoz or amas")
    if cfg.quant.mode == "qat" or (cfg.quant.mode == "ptq" and task.name == "detection"):
        why = ("its fine-tune aligns a classifier's logits" if cfg.quant.mode == "qat" else
               "a detector's int8 program would be its tensor part; box mAP needs the transform and NMS around it")
        raise PipelineError(f"quant.mode={cfg.quant.mode} cannot quantize a {task.name} model ({why}); use "
                            f"{'quant.mode=ptq' if task.name == 'segmentation' else 'quant.mode=none'}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, cfg: Config, resume: bool, marker: str) -> None:
    """Create run_dir; refuse to overwrite an earlier run unless resuming."""
    if (run_dir / marker).exists() and not resume:
        raise AmasError(
            f"run directory '{run_dir}' already holds a run; pass --resume to continue it or choose another --out"
        )
    distributed.barrier()  # every rank checks before rank 0 writes
    if distributed.context().is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")


def stage_data(cfg: Config, train_cfg: TrainConfig, device: torch.device) -> DataBundle:
    """The run's data for one stage: train.batch_size is the global batch, sharded over the ranks."""
    from amas.data import build_data

    ctx = distributed.context()
    if train_cfg.batch_size % ctx.world_size:
        raise AmasError(
            f"batch size {train_cfg.batch_size} does not split over {ctx.world_size} processes; "
            "use a multiple of the process count"
        )
    return build_data(cfg.data, train_cfg.batch_size // ctx.world_size, train_cfg.eval_batch_size, device=device,
                      seed=cfg.seed, channels_last=train_cfg.channels_last, rank=ctx.rank, world_size=ctx.world_size)


def check_teacher_matches(record: dict, info: Any, teacher_path: str | Path, data_name: str) -> None:
    """The teacher must have been trained on the configured dataset (classes, channels, image size)."""
    rd = record.get("data", {})
    same = (
        rd.get("name", data_name) == data_name
        and int(record["num_classes"]) == info.num_classes
        and int(record["in_channels"]) == info.in_channels
        and int(rd.get("image_size", info.image_size)) == info.image_size
    )
    if not same:
        raise SearchError(
            f"teacher '{teacher_path}' was trained on {rd.get('name', '?')} ({record['num_classes']} classes, "
            f"{record['in_channels']} channels), but the config's data is {data_name} ({info.num_classes} classes, "
            f"{info.in_channels} channels); set data.name={rd.get('name', '?')} or pass a teacher trained on "
            f"{data_name}"
        )
