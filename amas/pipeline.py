"""`amas prune` as a library call: teacher → search → candidates → selection → final fine-tune → export.

The stages and their order are the stage table (amas.stage_table); what each does is amas.pipeline_stages;
what they share (device, rank, sharded data, the teacher, the one writer) is amas.run_context.RunContext.

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

from collections.abc import Callable
from pathlib import Path

from amas.config import Config
from amas.run_context import PipelineError, RunContext
from amas.stage_table import STAGE_NAMES, STAGES, run_stages, stage_fingerprints

__all__ = ["PipelineError", "STAGES", "STAGE_NAMES", "run_pipeline", "stage_fingerprints"]


def _check_method(method: str) -> None:
    from amas.criteria import REGISTRY

    if method not in REGISTRY:
        raise PipelineError(f"unknown --method '{method}'; choose one of {', '.join(REGISTRY)}")


def run_pipeline(cfg: Config, run_dir: str | Path, *, teacher: str | None = None, method: str = "amas",
                 redo: str | None = None, latency_iters: int = 20, hooks: dict[str, Callable] | None = None) -> dict:
    """Run (or continue) the whole pruning pipeline in run_dir; returns the stage log.

    hooks: optional {"after_stage": f(stage), "on_epoch_end": f(stage, epoch, record)} (used by tests).
    """
    _check_method(method)
    if redo is not None and redo not in STAGE_NAMES:
        raise PipelineError(f"--redo {redo} is not a stage; choose one of {', '.join(STAGE_NAMES)}")
    if teacher is not None and not Path(teacher).is_file():
        raise PipelineError(
            f"teacher checkpoint '{teacher}' does not exist; pass a model.pt from `amas train`, a plain state_dict "
            "for model.name, or drop --teacher")
    ctx = RunContext(cfg, run_dir, teacher=teacher, method=method, latency_iters=latency_iters, hooks=hooks)
    if ctx.plain_teacher:
        ctx.teacher  # noqa: B018 -- the user's weights must fit model.name before anything is written
    return run_stages(ctx, STAGES, redo)
