"""The stage table of `amas prune`, in pipeline order, and the runner that walks it.

Each stage declares its name, the artefacts it reads and writes (run-directory relative; ``{teacher}`` is the
teacher checkpoint), what ``--redo`` removes, the settings its fingerprint covers, and ``run(ctx)``. A stage is
finished when all its ``writes`` exist; a run started again skips finished stages and continues at the first
unfinished one (a half-done stage continues from the engine's saved training state). The fingerprint of a
stage is a hash of its settings chained through the stages before it: a stage whose recorded fingerprint
differs from the current settings is never reused silently.

The amas commands as library calls, each a subset of the stage table: `amas prune` (run_pipeline: teacher →
search → candidates → selection → final fine-tune → export → quantize, the last only when quant.mode is not none),
`amas train` (run_train: the teacher stage), `amas search` (run_search: the search stage) and `amas export`
(run_export: the export stage on a cut checkpoint).

The stages and their order are the stage table below; what each does is its module in amas.pipeline (teacher, search,
candidates, select, final, export, quantize); what they share (device, rank, sharded data, the teacher, the one
writer) is amas.pipeline.context.RunContext.

Each stage writes its artefact atomically; a stage is finished when its artefacts exist, and a run started
again with the same command skips finished stages and continues at the first unfinished one (a half-done
stage continues from the engine's saved training state). ``pipeline.json`` is the stage log: per stage its
status, a fingerprint of the settings it depends on (chained through the stages before it), wall time and
summary, plus a list of events (start, done, skip, redo). A stage whose recorded fingerprint differs from the
current settings is never reused silently: the run stops with one line suggesting ``--redo STAGE`` or
another ``--out``.

Run directory::

    config.yaml          resolved config
    pipeline.json        stage log
    teacher/             model.pt, metrics.json, train_state.pt, tb/  (only when no --teacher is given)
    search/              search.pt (student + masks), search_metrics.json, search_state.pt, tb/  (method amas)
    candidates/          cut.json, candN_cut.pt (as cut), candN.pt (fine-tuned), candN_state.pt, tb/, candidates.json
    selection.json       Pareto front, policy, winner;  pareto.png;  tb/select/ (figure + hparams table)
    final/               final.pt (winner after the final fine-tune), final_state.pt, tb/
    pruned.pt            the shipped model (amas.load_pruned), pruned.pt2 (torch.export), report.md, report.json
    pruned_int8.pt2      int8 PT2E model (quant.mode ptq|qat; pruned_int8.onnx: ptq + quant.onnx), report.json int8
    quantize/            quantize_state.pt, tb/  (quant.mode qat: the quantization-aware fine-tune)
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amas import distributed
from amas.config import Config, from_dict, to_dict
from amas.console import print_table
from amas.errors import PipelineError, Stopped
from amas.pipeline.candidates import candidates_stage
from amas.pipeline.context import ExportOptions, RunContext, now, seed_everything
from amas.pipeline.export import cut_checkpoint, export_stage
from amas.pipeline.final import final_stage
from amas.pipeline.quantize import PARTIAL, quantize_stage
from amas.pipeline.search import search_stage
from amas.pipeline.select import select_stage
from amas.pipeline.teacher import teacher_stage

__all__ = ["COMMANDS", "Stage", "STAGES", "STAGE_NAMES", "check_run_dir", "run_export", "run_pipeline", "run_search",
           "run_stages", "run_train", "stage_fingerprints", "stages_of"]

_VOLATILE = {"device", "progress", "log_every", "root", "download", "num_workers", "compile"}


@dataclass(frozen=True)
class Settings:
    """What fingerprints are computed from: the scrubbed config dict, the method and the teacher's identity."""

    d: dict
    method: str
    root: dict

    @property
    def searched(self) -> bool:
        """Whether the method cuts from the searched student (the mask search runs)."""
        from amas.criteria import get

        return get(self.method).source == "search"

    @property
    def residual(self) -> bool:
        """prune.residual_channels (recorded only when set, so runs from before it keep their hashes)."""
        return bool(self.d["prune"].get("residual_channels", False))


def _candidate_settings(s: Settings) -> dict:
    sel = s.d["select"]
    # the policy's own settings decide which candidates train and their ranking
    own = ("min_reduction", "max_macs") if sel["policy"] == "budget" else ("tolerance", "indicator")
    finetune = copy.deepcopy(s.d["finetune"])
    finetune["train"].pop("epochs")  # only the final fine-tune uses finetune.train.epochs
    select = {k: sel[k] for k in ("levels", "budget_epochs", "policy", *own)}
    if sel.get("indicator") == "latency" or sel.get("max_latency", 0) > 0:  # candidates are timed: how counts
        select.update({k: sel[k] for k in ("indicator", *_LATENCY_SELECT_KEYS)})
    criteria = None if s.searched else s.d.get("criteria")
    return {"method": s.method, "prune": s.d["prune"], "select": select, "finetune": finetune, "criteria": criteria,
            **_task(s)}


def _task(s: Settings) -> dict:
    """The task where it is not classification (so runs from before config.task keep their hashes)."""
    return {} if s.d.get("task", "classification") == "classification" else {"task": s.d["task"]}


# latency settings, recorded only when in use, so runs fingerprinted before they existed keep their hashes
_LATENCY_PLAN_KEYS = ("cost", "target_latency", "latency_batch", "latency_runtime", "latency_tables", "block_removal")
_LATENCY_SELECT_KEYS = ("max_latency", "latency_batch", "latency_runtime")


def _search_settings(s: Settings) -> dict:
    if not s.searched:
        return {"method": s.method}
    ignore = s.d["prune"].get("ignore")
    return {"search": s.d["search"], **({"residual_channels": True} if s.residual else {}),
            **({"ignore": ignore} if ignore else {}), **_task(s)}


@dataclass(frozen=True)
class Stage:
    """One stage: its artefacts, what --redo removes, the settings it depends on, and what it does."""

    name: str
    reads: tuple[str, ...]  # what run(ctx) reads (documentation: earlier stages' writes, or the given teacher)
    writes: tuple[str, ...]
    owns: tuple[str, ...]
    settings: Callable[[Settings], Any]
    run: Callable[[RunContext], list[tuple[str, Any]]]
    source: str | None = None  # runs only for methods that cut from this source (amas.criteria: "search")
    state: str | None = None  # the engine's saved training state, which --resume continues
    enabled: Callable[[Config], bool] | None = None  # runs only when the config asks for it (else: not part of the run)

    def applies(self, method: str) -> bool:
        """Whether the stage runs for this --method."""
        from amas.criteria import get

        return self.source is None or get(method).source == self.source

    def wanted(self, cfg: Config) -> bool:
        """Whether the config turns the stage on (an off stage is left out of the run and of its stage log)."""
        return self.enabled is None or self.enabled(cfg)


STAGES: tuple[Stage, ...] = (
    Stage("teacher", reads=(), writes=("{teacher}",), owns=("teacher",),
          settings=lambda s: {**s.root, "data": s.d["data"], "seed": s.d["seed"]}, run=teacher_stage,
          state="teacher/train_state.pt"),
    Stage("search", reads=("{teacher}",), writes=("search/search.pt",), owns=("search",),
          settings=_search_settings, run=search_stage, source="search", state="search/search_state.pt"),
    Stage("candidates", reads=("{teacher}", "search/search.pt"), writes=("candidates/candidates.json",),
          owns=("candidates",), settings=_candidate_settings, run=candidates_stage),
    Stage("select", reads=("candidates/candidates.json",), writes=("pareto.png", "selection.json"),
          owns=("pareto.png", "selection.json", "tb/select"), settings=lambda s: {"select": s.d["select"]},
          run=select_stage),
    Stage("final", reads=("selection.json", "candidates"), writes=("final/final.pt",), owns=("final",),
          settings=lambda s: {"finetune_epochs": s.d["finetune"]["train"]["epochs"]}, run=final_stage),
    Stage("export", reads=("{teacher}", "final/final.pt", "selection.json", "candidates/candidates.json"),
          writes=("pruned.pt", "pruned.pt2", "report.md", "report.json"),
          owns=("pruned.pt", "pruned.pt2", "pruned.onnx", "report.md", "report.json"), settings=lambda s: {},
          run=export_stage),
    Stage("quantize", reads=("pruned.pt", "report.json"), writes=("pruned_int8.pt2",),
          owns=("pruned_int8.pt2", PARTIAL, "pruned_int8.onnx", "quantize"),
          settings=lambda s: {"quant": s.d["quant"]}, run=quantize_stage, state="quantize/quantize_state.pt",
          enabled=lambda cfg: cfg.quant.mode != "none"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

# what each amas command runs: the whole table, or one stage of it (in the run directory itself, see RunContext)
COMMANDS: dict[str, tuple[str, ...]] = {"prune": STAGE_NAMES, "train": ("teacher",), "search": ("search",),
                                        "export": ("export",)}


def stages_of(command: str) -> tuple[Stage, ...]:
    """The stages an amas command runs, in table order."""
    return tuple(s for s in STAGES if s.name in COMMANDS[command])


def check_run_dir(ctx: RunContext, stages: tuple[Stage, ...], resume: bool) -> None:
    """amas train/search: refuse a run directory holding the stage's run unless resuming, and --resume of nothing."""
    held = [p for s in stages for p in (*s.writes, s.state) if p and ctx.path(p).exists()]
    if held and not resume:
        raise PipelineError(f"run directory '{ctx.dir}' already holds a run; pass --resume to continue it or choose "
                            "another --out")
    states = [ctx.path(s.state) for s in stages if s.state]
    if resume and not held and states:
        raise PipelineError(f"nothing to resume in '{ctx.dir}' (no {states[0].name}); drop --resume to start a new "
                            "run there")


def _scrub(d: Any) -> Any:
    """Drop settings that do not change results (device, progress bars, paths to the data) from a config dict."""
    if isinstance(d, dict):
        return {k: _scrub(v) for k, v in d.items() if k not in _VOLATILE}
    return d


def _amp_as_bool(d: dict) -> None:
    """Every train section's amp auto/off hashed as the bool true/false it was, so earlier runs keep their hashes."""
    for k, v in d.items():
        if isinstance(v, dict):
            _amp_as_bool(v)
        elif k == "amp":
            d[k] = {"auto": True, "off": False}.get(v, v)


def stage_fingerprints(cfg: Config, method: str = "amas", teacher: str | None = None) -> dict[str, str]:
    """A short hash per stage of the settings it depends on, chained through the stages before it."""
    d = _scrub(to_dict(cfg))
    if not d["prune"].get("residual_channels", False):
        d["prune"].pop("residual_channels", None)
    if not d["prune"].get("ignore"):
        d["prune"].pop("ignore", None)
    d["prune"].pop("report_runtimes", None)  # the report's timing, not the run's results
    for key, default in (("penalty_cost", "macs"), ("penalty_power", 1.0), ("schedule_epochs", 0),
                         ("hold_budget", False), ("min_steps", 300)):
        if d["search"].get(key, default) == default:
            d["search"].pop(key, None)  # hashed only when set, so runs from before the key keep their hashes
    if d["prune"].get("cost", "macs") != "latency":
        for k in _LATENCY_PLAN_KEYS:
            d["prune"].pop(k, None)
    if d["select"].get("indicator") != "latency" and not d["select"].get("max_latency", 0):
        for k in _LATENCY_SELECT_KEYS:
            d["select"].pop(k, None)
    if not d["model"].get("kwargs"):
        d["model"].pop("kwargs", None)  # recorded only when set, so runs from before model.kwargs keep their hashes
    _amp_as_bool(d)
    if teacher:
        p = Path(teacher)
        st = p.stat() if p.is_file() else None
        root: dict = {"teacher": str(p.resolve()), "size": st.st_size if st else None,
                      "mtime_ns": st.st_mtime_ns if st else None}
    else:
        root = {"model": d["model"], "train": d["train"]}
    s = Settings(d, method, root)
    out, prev = {}, ""
    for stage in STAGES:
        prev = hashlib.sha256((prev + json.dumps(stage.settings(s), sort_keys=True)).encode()).hexdigest()[:16]
        out[stage.name] = prev
    return out


def _summary(rows: list[tuple[str, Any]]) -> list[list[Any]]:
    return [[k, v if isinstance(v, (int, float, str)) else str(v)] for k, v in rows]


def _title(ctx: RunContext, stage: str) -> str:
    """What a stage's summary is headed: the stage, or the command that runs it alone (amas train: the teacher)."""
    return stage if ctx.command == "prune" else ctx.command


def run_stages(ctx: RunContext, stages: tuple[Stage, ...] = STAGES, redo: str | None = None) -> dict:
    """Run (or continue) the given stages of the table in order in ctx's run directory; returns the stage log."""
    log, names = ctx.log, [s.name for s in stages]
    fps = stage_fingerprints(ctx.cfg, ctx.method, ctx.teacher_arg)
    ctx.check_data()  # before --redo removes anything and before the run directory is written
    if redo is not None:
        for stage in stages[names.index(redo):]:
            ctx.remove(stage.owns)
            log.set(stage.name, None)
        log.event(redo, "redo")
    stages = tuple(s for s in stages if s.wanted(ctx.cfg))
    for stage in stages:  # refuse before touching anything when the directory holds another run's stages
        rec = log.stage(stage.name)
        if rec is not None and rec.get("fingerprint") != fps[stage.name]:
            raise PipelineError(
                f"run directory '{ctx.dir}' holds stage '{stage.name}' made with other settings; repeat the original "
                f"command, pass --redo {stage.name} to redo it and the stages after it, or choose another --out")
    ctx.prepare_dir()
    t_all = time.perf_counter()
    for stage in stages:
        name, fp = stage.name, fps[stage.name]
        if not stage.applies(ctx.method):
            if log.stage(name) is None:
                log.set(name, {"status": "skipped", "fingerprint": fp, "reason": f"method {ctx.method} plans on the "
                               "teacher"})
            continue
        rec = log.stage(name)
        given = name == "teacher" and ctx.teacher_arg is not None and rec is None  # record a given teacher once
        finished = not given and all(ctx.path(p).exists() for p in stage.writes)
        distributed.barrier()  # every rank has looked before rank 0 writes this stage's files
        if finished:
            if rec is None or rec.get("status") != "done":
                rec = {**(rec or {}), "status": "done", "fingerprint": fp, "finished": now()}
                log.set(name, rec)
            log.event(name, "skip")
            print_table([("status", "done earlier, not redone"), *[(k, v) for k, v in rec.get("summary", [])]],
                        title=f"{_title(ctx, name)}: done (artefact {ctx.path(stage.writes[-1])})")
            continue
        resumed = rec is not None and rec.get("status") == "running"
        log.set(name, {"status": "running", "fingerprint": fp, "started": now()})
        log.event(name, "resume" if resumed else "start")
        t0 = time.perf_counter()
        # each stage starts from the config's seed: its random draws (e.g. a fine-tuning discriminator's init) do not
        # depend on which stages ran before it in this process, nor on the process count
        seed_everything(ctx.cfg.seed)
        try:
            summary = stage.run(ctx)
        except Stopped as e:
            log.event(name, "stopped")
            again = "the same command again with --resume" if ctx.flat else "the same command again"
            raise Stopped(f"stopped by a signal during stage '{name}' with its training state saved in '{ctx.dir}'; "
                          f"run {again} to continue", e.signum) from None
        wall = round(time.perf_counter() - t0, 2)
        log.set(name, {"status": "done", "fingerprint": fp, "finished": now(), "wall_s": wall,
                       "summary": _summary(summary)})
        log.event(name, "done", wall_s=wall)
        print_table([*summary, ("wall time s", wall)], title=f"{_title(ctx, name)}: done")
        after = ctx.hooks.get("after_stage")
        if after is not None:
            after(name)
    log.event("pipeline", "complete", wall_s=round(time.perf_counter() - t_all, 2))
    return log.data


# ---------------------------------------------------------------- the commands as library calls


def check_method(method: str) -> None:
    """A one-line PipelineError unless method names a registered criterion (amas, or a baseline)."""
    from amas.criteria import REGISTRY

    if method not in REGISTRY:
        raise PipelineError(f"unknown --method '{method}'; choose one of {', '.join(REGISTRY)}")


def _check_teacher(teacher: str | None) -> None:
    if teacher is not None and not Path(teacher).is_file():
        raise PipelineError(
            f"teacher checkpoint '{teacher}' does not exist; pass a model.pt from `amas train`, a plain state_dict "
            "for model.name, or drop --teacher")


def run_pipeline(cfg: Config, run_dir: str | Path, *, teacher: str | None = None, method: str = "amas",
                 redo: str | None = None, latency_iters: int = 20, hooks: dict[str, Callable] | None = None) -> dict:
    """Run (or continue) the whole pruning pipeline in run_dir; returns the stage log.

    hooks: optional {"after_stage": f(stage), "on_epoch_end": f(stage, epoch, record)} (used by tests).
    """
    check_method(method)
    if redo is not None and redo not in STAGE_NAMES:
        raise PipelineError(f"--redo {redo} is not a stage; choose one of {', '.join(STAGE_NAMES)}")
    _check_teacher(teacher)
    ctx = RunContext(cfg, run_dir, teacher=teacher, method=method, latency_iters=latency_iters, hooks=hooks)
    if ctx.plain_teacher:
        ctx.teacher  # noqa: B018 -- the user's weights must fit model.name before anything is written
    return run_stages(ctx, STAGES, redo)


def _run_one(command: str, ctx: RunContext, resume: bool) -> dict:
    """amas train / amas search: the command's stage in the run directory itself, refused there unless resuming."""
    stages = stages_of(command)
    check_run_dir(ctx, stages, resume)
    run_stages(ctx, stages)
    return ctx.log.stage(stages[-1].name) or {}


def run_train(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """`amas train`: the teacher stage (a dense model trained on cfg) in run_dir; returns its stage record."""
    return _run_one("train", RunContext(cfg, run_dir, command="train"), resume)


def run_search(cfg: Config, run_dir: str | Path, teacher: str, resume: bool = False) -> dict:
    """`amas search`: the search stage (masks for a copy of the teacher file) in run_dir; returns its stage record."""
    _check_teacher(teacher)
    ctx = RunContext(cfg, run_dir, teacher=teacher, command="search")
    if ctx.plain_teacher:
        ctx.teacher  # noqa: B018 -- the user's weights must fit model.name before anything is written
    return _run_one("search", ctx, resume)


def run_export(checkpoint: str | Path, out_dir: str | Path, target_reduction: float, *, cfg: Config | None = None,
               round_to: int = 1, min_channels: int = 1, criterion: str | None = None, residual: bool = False,
               onnx: bool = False, evaluate: bool = False, latency_iters: int = 20, ignore: Sequence[str] = ()) -> dict:
    """`amas export`: cut a searched student (or a dense model by L1) at the target, then the export stage.

    Writes pruned.pt, pruned.pt2 (pruned.onnx with onnx) and report.json/report.md into out_dir and returns the
    report. cfg: data settings for the test accuracy (evaluate; the checkpoint's dataset) and prune.report_runtimes.
    """
    pruned, record, dense, obj = cut_checkpoint(checkpoint, target_reduction, round_to=round_to,
                                                min_channels=min_channels, criterion=criterion, residual=residual,
                                                ignore=ignore)
    base = to_dict(cfg) if cfg is not None else {}
    base.setdefault("data", {}).update(name=obj["model"]["data"]["name"], val_size=0)  # the test split only
    cfg = from_dict(base)
    export = ExportOptions(onnx=onnx, test=evaluate, teacher_test=False, selection=False,
                           reference="dense checkpoint")
    given = {"teacher": (dense, obj), "final": (pruned, record)}
    ctx = RunContext(cfg, out_dir, method=record["metadata"]["method"], latency_iters=latency_iters, command="export",
                     given=given, export=export)
    run_stages(ctx, stages_of("export"), redo="export")  # an export overwrites the one before it
    return json.loads(ctx.path("report.json").read_text())
