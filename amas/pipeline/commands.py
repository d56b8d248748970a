"""The amas commands as library calls, each a subset of the stage table: `amas prune` (run_pipeline: teacher →
search → candidates → selection → final fine-tune → export), `amas train` (run_train: the teacher stage),
`amas search` (run_search: the search stage) and `amas export` (run_export: the export stage on a cut checkpoint).

The stages and their order are the stage table (amas.pipeline.runner); what each does is amas.pipeline.stages;
what they share (device, rank, sharded data, the teacher, the one writer) is amas.pipeline.context.RunContext.

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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from amas.config import Config
from amas.errors import PipelineError
from amas.pipeline.context import ExportOptions, RunContext
from amas.pipeline.runner import STAGE_NAMES, STAGES, check_run_dir, run_stages, stage_fingerprints, stages_of

__all__ = ["PipelineError", "STAGES", "STAGE_NAMES", "run_export", "run_pipeline", "run_search", "run_train",
           "stage_fingerprints"]


def _check_method(method: str) -> None:
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
    _check_method(method)
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
    from amas.config import from_dict, to_dict
    from amas.files.export import cut_checkpoint

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
