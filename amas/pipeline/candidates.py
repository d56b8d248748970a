"""The candidates stage: architectures cut from the scores at the MACs levels, fine-tuned by successive halving.

**Candidates.** From the searched masks (scores = mask values) or a criterion's scores, one architecture is
cut at each MACs-reduction level of ``select.levels`` with ``amas.channels.plan.plan_keep`` /
``amas.channels.cut.prune_model`` (masks
folded in). Levels whose plans keep exactly the same channels are cut once; a level the model cannot reach
is reported and skipped.

**Fine-tuning.** Candidates train with ``AlignmentObjective`` (amas.search.alignment: CE + mu·KD + adversarial
against the frozen teacher, discriminator steps inside) through the one engine. The candidate
budget ``select.budget_epochs`` (candidate-epochs in all) is spent by successive halving: with n candidates
the rounds hold n, ⌈n/2⌉, ⌈n/4⌉, …, 1 of them; each round gets an equal share of the budget split evenly
over its candidates (whole epochs, at least one per candidate before a cut), the last round (the survivor
alone) takes whatever is left, so exactly the given budget is spent. After each round the weaker half by the
selection score is dropped and the rest continue their own schedule: every candidate's learning-rate
schedule spans the epochs a survivor gets, so candidates are compared at the same point of it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.channels.dense import whole
from amas.config import FinetuneConfig
from amas.errors import PruneError, SelectionError
from amas.files.atomic import atomic_write_text
from amas.pipeline.context import Rows, RunContext
from amas.pipeline.halving import halving_schedule, successive_halving
from amas.pipeline.select import budget_bound, choose, halving_score, latency_bound
from amas.search.alignment import AlignmentObjective

__all__ = ["Candidate", "candidates_stage", "cut_candidates", "finetune_trainer", "run_candidates"]


def finetune_trainer(model: nn.Module, teacher: nn.Module, cfg: FinetuneConfig, epochs: int, data: Any, run_dir: Path,
                     stage: str, device: torch.device, on_epoch_end: Callable | None = None, task: Any = None) -> Any:
    """An engine Trainer that fine-tunes model against teacher (a module, or the run's shared FrozenTeacher) for
    epochs epochs (state in run_dir/<stage>_state.pt); task: the amas.tasks Task (None: classification)."""
    from amas.engine.loop import Trainer

    info = data.info
    tcfg = dataclasses.replace(cfg.train, epochs=int(epochs))
    objective = AlignmentObjective(teacher, cfg, info.input_shape, info.num_classes, student=model, section="finetune",
                                   task=task)
    return Trainer(model, data.train, tcfg, run_dir, num_classes=info.num_classes, val=data.val, objective=objective,
                   stage=stage, device=device, on_epoch_end=on_epoch_end, task=task)


@dataclass
class Candidate:
    """One cut architecture: its table row and the pruned model (weights as cut)."""

    row: dict
    model: nn.Module
    keep: dict[str, torch.Tensor]


def cut_candidates(
    model: nn.Module,
    groups: list,
    cost: Any,
    plan: Callable[[float], dict[str, torch.Tensor]],
    levels: list[float],
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[list[Candidate], list[dict]]:
    """Cut one pruned model per level (plan(level) → kept indices), deduplicated; returns (candidates, skipped)."""
    from amas.channels.blocks import prune_with_blocks
    from amas.channels.cost import count
    from amas.channels.plan import kept_counts

    bad = [lv for lv in levels if not 0.0 < float(lv) < 1.0]
    if not levels or bad:
        raise SelectionError(
            f"select.levels must be MACs reductions between 0 and 1 (e.g. [0.3, 0.5, 0.7]), got {levels}"
        )
    shape = cost.input_shape
    total_channels = sum(g.size for g in groups)
    out: list[Candidate] = []
    skipped: list[dict] = []
    seen: dict[tuple, int] = {}
    for level in sorted(set(float(lv) for lv in levels)):
        try:
            keep = plan(level)
        except PruneError as e:
            skipped.append({"level": level, "reason": str(e)})
            continue
        key = tuple((n, tuple(int(i) for i in torch.as_tensor(v).tolist())) for n, v in sorted(keep.items()))
        if key in seen:
            skipped.append({"level": level, "reason": f"same channels as cand{seen[key]}"})
            continue
        pruned = prune_with_blocks(model, groups, keep, masks=masks, input_shape=shape).eval()  # = prune_model
        # unless a group keeps no channel (prune.block_removal): then its residual block becomes its shortcut
        macs, params = count(pruned, shape)
        counts = kept_counts(keep)
        cid = len(out)
        seen[key] = cid
        row = {
            "id": cid, "name": f"cand{cid}", "level": level, "macs": int(macs), "params": int(params),
            "channels": int(sum(counts.get(g.name, g.size) for g in groups)), "total_channels": int(total_channels),
            "macs_reduction": round(1.0 - macs / float(cost.total_macs), 6), "kept": counts,
        }
        out.append(Candidate(row, whole(pruned), keep))  # a detector's tensor part: the cut detector
    if not out:
        raise SelectionError(
            f"no level of select.levels={levels} could be cut ({skipped[0]['reason']}); choose other levels"
        )
    return out, skipped


def _val_acc_at(history: list[dict], epoch: int) -> float:
    for rec in history:
        if int(rec["epoch"]) == epoch and "val_acc" in rec:
            return float(rec["val_acc"])
    raise SelectionError("candidate fine-tuning has no validation accuracy; set data.val_size > 0")


def _cut_once(cfg: Any, out_dir: Path, *, teacher: nn.Module, record: dict, source: nn.Module, planner: Callable,
              masks: dict[str, torch.Tensor] | None, data: Any, device: torch.device, method: str, task: Any,
              counts: tuple[int, int]) -> dict:
    """The candidates cut from source at select.levels (evaluated, saved as <name>_cut.pt, timed where selection reads
    latency) and cut.json; or cut.json as an earlier attempt of this run wrote it (architectures, starting weights)."""
    from amas.channels.cost import CostModel
    from amas.channels.cut import make_recipe
    from amas.channels.dense import tensor_part
    from amas.channels.groups import find_groups
    from amas.distributed import barrier, on_main
    from amas.engine.loop import evaluate
    from amas.files.pruned import save_pruned

    sel, info, shape = cfg.select, data.info, data.info.input_shape
    teacher_macs, teacher_params = counts
    cut_path = out_dir / "cut.json"
    cut_before = cut_path.is_file()
    barrier()  # every rank has looked before rank 0 writes cut.json
    if cut_before:  # cut earlier in this run: the cut files hold the architectures and starting weights
        return json.loads(cut_path.read_text())
    source = tensor_part(source.to(device).eval())  # a detector: its backbone and heads (amas.channels.dense)
    groups = find_groups(source, shape, residual=cfg.prune.residual_channels, ignore=cfg.prune.ignore)
    if not groups:
        raise SelectionError(f"model '{record['name']}' has no prunable channel groups; choose another model")
    cost = CostModel(source, groups, shape)
    cands, skipped = cut_candidates(
        source, groups, cost, lambda lv: planner(lv, source, groups, cost), sel.levels, masks
    )
    rows = []
    for c in cands:
        c.row["val_acc_cut"] = evaluate(c.model.to(device), data.val, info.num_classes, device, task=task)["acc"]
        meta = _metadata(record, shape, c.row, teacher_macs, teacher_params, cfg, method)
        recipe = make_recipe(record, shape, c.keep, cfg.prune.ignore)
        on_main(save_pruned, out_dir / f"{c.row['name']}_cut.pt", c.model, recipe, meta)
        rows.append(c.row)
    cut = {"rows": rows, "skipped": skipped, "total_channels": sum(g.size for g in groups)}
    if _times_latency(sel):
        on_main(_time_candidates, cut, teacher, {c.row["name"]: c.model for c in cands}, shape, sel)
    on_main(atomic_write_text, cut_path, json.dumps(cut, indent=2))
    if _times_latency(sel):  # rank 0 timed them: every rank selects on the same numbers
        cut = json.loads(cut_path.read_text())
    return cut


def run_candidates(cfg: Any, out_dir: Path, *, teacher: nn.Module, record: dict, source: nn.Module,
                   planner: Callable[[float, nn.Module, list, Any], dict[str, torch.Tensor]],
                   masks: dict[str, torch.Tensor] | None,
                   data: Any, device: torch.device, method: str, on_epoch_end: Callable | None = None,
                   log: Callable[[str], None] = print, frozen: Any = None, task: Any = None) -> dict:
    """Cut candidates from source, fine-tune them by successive halving, write out_dir/candidates.json; return it.

    planner(level, source, groups, cost_model) returns the kept channel indices per group at a MACs reduction.
    frozen: the run's shared inference copy of the teacher the fine-tuning reads (else each candidate makes one).
    task: the amas.tasks Task they fine-tune on and are selected by (val_acc holds its metric; None: top-1).
    """
    from amas.channels.cost import count
    from amas.distributed import context, on_main
    from amas.engine.loop import evaluate

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    on_main(out_dir.mkdir, parents=True, exist_ok=True)
    if not context().is_main:
        log = _quiet
    sel, fin = cfg.select, cfg.finetune
    info = data.info
    shape = info.input_shape
    if data.val is None:
        raise SelectionError("selection needs a held-out validation split; set data.val_size > 0")
    teacher = teacher.to(device).eval()
    teacher_macs, teacher_params = count(teacher, shape)
    teacher_val = evaluate(teacher, data.val, info.num_classes, device, task=task)["acc"]

    cut = _cut_once(cfg, out_dir, teacher=teacher, record=record, source=source, planner=planner, masks=masks,
                    data=data, device=device, method=method, task=task, counts=(teacher_macs, teacher_params))
    rows = cut["rows"]
    limits = _budget_limits(sel, cut, teacher_macs, teacher_val)
    trainable = [r["id"] for r in rows if r["status"] == "cut"]
    if not trainable:  # the budget policy's feasibility is known before any training: fail before spending it
        choose(rows, "budget", teacher_macs=teacher_macs, bound=limits["bound_macs"],
               latency_bound=limits["bound_latency"])
    rounds = _Halving(rows, out_dir, teacher if frozen is None else frozen, fin, data, device, task, log,
                      on_epoch_end, horizon=sum(e for _, e in halving_schedule(len(trainable), sel.budget_epochs)),
                      score_by=dict(policy=sel.policy, min_acc=limits["min_acc"], indicator=sel.indicator))
    sh = successive_halving(trainable, sel.budget_epochs, rounds.train, rounds.score, rounds.on_round)
    rounds.by_id[sh["survivor"]]["status"] = "survivor"
    result = {
        "method": method,
        "teacher": {"val_acc": teacher_val, "macs": int(teacher_macs), "params": int(teacher_params),
                    "channels": int(cut["total_channels"]), **limits["teacher_latency"]},
        "policy": sel.policy, "bound_macs": limits["bound_macs"], "min_acc": limits["min_acc"],
        "rows": rows, "skipped": cut["skipped"], "halving": sh, "wall_s": round(time.perf_counter() - t0, 2),
        **({"compiled": rounds.compiled} if rounds.compiled else {}),
    }
    on_main(atomic_write_text, out_dir / "candidates.json", json.dumps(result, indent=2))
    return result


def _budget_limits(sel: Any, cut: dict, teacher_macs: int, teacher_val: float) -> dict:
    """The selection's bounds (MACs, latency, accuracy) for select.policy; marks each cut row 'cut' (to be trained)
    or 'over budget (not trained)', with its cut accuracy as its val_acc at epoch 0."""
    bound = budget_bound(sel, teacher_macs) if sel.policy == "budget" else None
    teacher_lat = {"latency_ms": cut["teacher_latency_ms"]} if "teacher_latency_ms" in cut else {}
    lat_bound = latency_bound(sel, teacher_lat) if sel.policy == "budget" else None
    for r in cut["rows"]:
        r["val_acc"], r["epochs"] = r["val_acc_cut"], 0
        over = (r["latency_ms"] > lat_bound) if lat_bound is not None else (bound is not None and r["macs"] > bound)
        r["status"] = "over budget (not trained)" if over else "cut"
    return {"bound_macs": bound, "bound_latency": lat_bound, "teacher_latency": teacher_lat,
            "min_acc": teacher_val - sel.tolerance if sel.policy == "tolerance" else None}


class _Halving:
    """Successive halving's three callbacks over the cut candidates: train one to an epoch (resuming its own
    checkpoint, saving <name>.pt), score it for the policy, log a round; sums compilations over candidates."""

    def __init__(self, rows: list[dict], out_dir: Path, teacher: Any, fin: Any, data: Any, device: torch.device,
                 task: Any, log: Callable[[str], None], on_epoch_end: Callable | None, horizon: int,
                 score_by: dict) -> None:
        self.by_id = {r["id"]: r for r in rows}
        self.out_dir, self.teacher, self.fin, self.data, self.device = out_dir, teacher, fin, data, device
        self.task, self.log, self.on_epoch_end, self.horizon, self.score_by = task, log, on_epoch_end, horizon, score_by
        self.compiled: dict[str, int] = {}  # compilations and recompilations over every candidate (train.compile)

    def train(self, cid: int, until: int) -> float:
        """Fine-tune candidate cid to epoch until (its schedule spans the whole budget); its val metric there."""
        from amas.distributed import on_main
        from amas.files.pruned import load_pruned, save_pruned

        row = self.by_id[cid]
        model, obj = load_pruned(self.out_dir / f"{row['name']}_cut.pt", self.device)
        hook = self.on_epoch_end
        trainer = finetune_trainer(model, self.teacher, self.fin, self.horizon, self.data, self.out_dir, row["name"],
                                   self.device, task=self.task,
                                   on_epoch_end=(lambda e, rec, s=row["name"]: hook(s, e, rec)) if hook else None)
        try:
            history = trainer.fit(resume=True, until_epoch=until)
        finally:
            trainer.objective.close()
        for k, v in (trainer.compiler.counts() or {}).items():
            self.compiled[k] = self.compiled.get(k, 0) + v
        acc = _val_acc_at(history, until)
        row.update(val_acc=acc, epochs=until)
        meta = dict(obj["metadata"], val_acc=acc, epochs=until)
        on_main(save_pruned, self.out_dir / f"{row['name']}.pt", trainer.model, obj["recipe"], meta)
        return acc

    def score(self, cid: int, acc: float) -> tuple:
        """The halving order of candidate cid at accuracy acc under the selection policy."""
        return halving_score(dict(self.by_id[cid], val_acc=acc), **self.score_by)

    def on_round(self, rec: dict) -> None:
        """Mark the dropped candidates and log the round in one line."""
        by_id = self.by_id
        for c in rec["dropped"]:
            by_id[c]["status"] = f"dropped after round {rec['round']}"
        accs = ", ".join(f"{by_id[int(c)]['name']} {a:.2f}%" for c, a in rec["val_acc"].items() if a is not None)
        self.log(
            f"candidates: round {rec['round']} ({rec['epochs_each']} epoch(s) each, to epoch "
            f"{rec['until_epoch']}): {accs}"
            + (f"; dropped {', '.join(by_id[c]['name'] for c in rec['dropped'])}" if rec["dropped"] else "")
        )


def _times_latency(sel: Any) -> bool:
    """Whether selection needs every candidate's measured latency (select.indicator latency or a latency bound)."""
    return sel.indicator == "latency" or sel.max_latency > 0


def _time_candidates(cut: dict, teacher: nn.Module, models: dict[str, nn.Module], shape: tuple, sel: Any) -> None:
    """Add latency_ms (teacher and candidates timed in alternating rounds on the CPU) to the cut's rows."""
    import copy

    from amas.latency.runtimes import available_runtimes, install_hint
    from amas.latency.table import runtime_latency

    if sel.latency_runtime not in available_runtimes():
        raise SelectionError(f"select.latency_runtime={sel.latency_runtime} is not installed here; "
                             f"{install_hint(sel.latency_runtime)} or use select.latency_runtime=eager")
    nets = {name: copy.deepcopy(m).cpu().eval() for name, m in {"teacher": teacher, **models}.items()}
    b, rt = sel.latency_batch, sel.latency_runtime
    r = runtime_latency(nets, shape, batches=(b,), runtimes=[rt])
    cut["teacher_latency_ms"] = r["ms"]["teacher"][rt][f"b{b}"]
    for row in cut["rows"]:
        row["latency_ms"] = r["ms"][row["name"]][rt][f"b{b}"]
    cut["latency"] = {"batch": b, "runtime": rt, "busy": r["busy"], "warnings": r["warnings"]}
    for w in r["warnings"]:
        print(f"candidates: warning: {w}")


def _quiet(line: str) -> None:
    """The progress log of ranks other than 0."""


def _metadata(record: dict, shape: tuple, row: dict, teacher_macs: int, teacher_params: int, cfg: Any,
              method: str) -> dict:
    """pruned.pt metadata for a candidate (dataset, shape, normalisation, costs, how it was cut)."""
    data = record.get("data", {})
    return {
        "model": record["name"], "dataset": data.get("name"), "data": data, "input_shape": list(shape),
        "mean": data.get("mean"), "std": data.get("std"), "num_classes": int(record["num_classes"]),
        "macs": int(row["macs"]), "params": int(row["params"]), "dense_macs": int(teacher_macs),
        "dense_params": int(teacher_params), "target_reduction": float(row["level"]),
        "round_to": int(cfg.prune.round_to), "min_channels": int(cfg.prune.min_channels),
        "source": f"{method} candidate {row['name']}", "task": cfg.task,
    }


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
    from amas.criteria import ScoreInputs, get, plan_with

    criterion = get(ctx.method)
    source, masks = _SOURCES[criterion.source](ctx)
    # every rank plans on the whole (unsharded) data, so data-driven criteria cut the same channels everywhere
    data = ctx.data("finetune", sharded=False) if criterion.reads_data else None
    train, val = (data.train, data.val) if data is not None else (None, None)
    inputs = ScoreInputs(train=train, val=val, cfg=ctx.cfg.criteria, prune=ctx.cfg.prune, seed=ctx.cfg.seed,
                         num_classes=ctx.data("finetune").info.num_classes, masks=masks)

    def plan(level: float, model: nn.Module, groups: list, cost: Any) -> dict:
        # in place and once (e.g. bn_scale's sparsity training): the candidates are cut from the prepared model
        criterion.prepare(model, groups, inputs)
        return plan_with(criterion, copy.deepcopy(model), groups, cost, level, inputs)

    return source, masks, plan


def candidates_stage(ctx: RunContext) -> Rows:
    """Cut candidates at select.levels and fine-tune them by successive halving (amas.pipeline.select) into
    candidates/."""
    teacher, obj = ctx.teacher
    source, masks, planner = _planner(ctx)
    r = run_candidates(ctx.cfg, ctx.stage_dir("candidates"), teacher=teacher, record=obj["model"], source=source,
                       planner=planner, masks=masks, data=ctx.data("finetune"), device=ctx.device, method=ctx.method,
                       on_epoch_end=ctx.epoch_hook(), frozen=ctx.frozen_teacher(ctx.cfg.finetune), task=ctx.task)
    rows = [(f"{c['name']} (level {c['level']:.2f})",
             f"-{100 * c['macs_reduction']:.1f}% MACs, {c['channels']}/{c['total_channels']} ch, "
             f"val {c['val_acc']:.2f}% after {c['epochs']} ep, {c['status']}") for c in r["rows"]]
    rows += [(f"skipped level {s['level']:.2f}", s["reason"]) for s in r["skipped"]]
    rows += [(f"teacher {ctx.label('val')}", r["teacher"]["val_acc"]),
             ("budget spent", f"{r['halving']['spent']} of {r['halving']['budget']} candidate-epochs")]
    if "compiled" in r:  # train.compile: the forwards compiled over the candidates' architectures
        rows.append(("compiled forwards", "{compilations} compilation(s), {recompilations} recompilation(s)"
                     .format(**r["compiled"])))
    return rows
