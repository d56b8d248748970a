"""Multi-indicator architecture selection: candidates, their adversarial fine-tuning, Pareto front and policies.

**Candidates.** From the searched masks (scores = mask values) or a criterion's scores, one architecture is
cut at each MACs-reduction level of ``select.levels`` with ``amas.prune.plan_keep`` / ``prune_model`` (masks
folded in). Levels whose plans keep exactly the same channels are cut once; a level the model cannot reach
is reported and skipped.

**Fine-tuning.** Candidates train with ``FinetuneObjective`` (the search objective with no masks: CE + mu·KD +
adversarial against the frozen teacher, discriminator steps inside) through the one engine. The candidate
budget ``select.budget_epochs`` (candidate-epochs in all) is spent by successive halving: with n candidates
the rounds hold n, ⌈n/2⌉, ⌈n/4⌉, …, 1 of them; each round gets an equal share of the budget split evenly
over its candidates (whole epochs, at least one per candidate before a cut), the last round (the survivor
alone) takes whatever is left, so exactly the given budget is spent. After each round the weaker half by the
selection score is dropped and the rest continue their own schedule: every candidate's learning-rate
schedule spans the epochs a survivor gets, so candidates are compared at the same point of it.

**Selection** uses accuracy on the held-out validation split only (never the test split).

* The Pareto front over (cost, val acc), cost = MACs or kept channels (``select.indicator``): the candidates
  that no other candidate beats on both (lower-or-equal cost and higher-or-equal accuracy, one strictly).
* ``budget``: the highest val acc among candidates with MACs ≤ bound (``select.max_macs``, else
  (1 − ``select.min_reduction``) × teacher MACs); ties → fewer MACs → fewer params → lower candidate id.
  Candidates over the bound are cut and evaluated but not trained (they could never be chosen).
* ``tolerance``: the lowest cost among candidates with val acc ≥ teacher val acc − ``select.tolerance``;
  ties → higher val acc → fewer MACs → fewer params → lower candidate id.
* Accuracies are compared exactly (val acc on N images moves in steps of 100/N, so exact ties happen).
* No feasible candidate: one SelectionError line naming the best available trade-off and the setting to change.

The halving score is the policy's own order: ``budget`` ranks by the tie-break order above; ``tolerance``
ranks candidates that meet the threshold first (cheapest first), then the others by accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.adversarial import SearchObjective, last_global_pool
from amas.config import FinetuneConfig, SearchConfig, SelectConfig, atomic_write_text
from amas.errors import AmasError

__all__ = [
    "SelectionError", "FinetuneObjective", "finetune_trainer", "halving_schedule", "successive_halving",
    "pareto_front", "budget_bound", "choose", "halving_score", "cut_candidates", "run_candidates",
    "select_candidates", "plot_front",
]


class SelectionError(AmasError):
    """A selection that cannot be made: no feasible candidate, a budget too small, unusable levels."""


# ---------------------------------------------------------------- the fine-tuning objective


def search_config_for(cfg: FinetuneConfig) -> SearchConfig:
    """A SearchConfig carrying the fine-tuning loss settings, with the mask penalty and controller off."""
    shared = {f.name for f in dataclasses.fields(SearchConfig)}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FinetuneConfig) if f.name in shared}
    values.update(lam=0.0, target_reduction=0.0)
    return dataclasses.replace(SearchConfig(), **values)


class FinetuneObjective(SearchObjective):
    """CE + mu·KD + adversarial against the frozen teacher for a pruned model: the search objective without masks."""

    def __init__(self, teacher: nn.Module, cfg: FinetuneConfig, model: nn.Module, input_shape: tuple[int, int, int],
                 num_classes: int) -> None:
        from amas.masks import ChannelMasks, CostModel

        if cfg.d_input == "features":
            pools = last_global_pool(teacher), last_global_pool(model)
            if None not in pools:
                wt = SearchObjective._feature_width(teacher, pools[0], input_shape)
                ws = SearchObjective._feature_width(model, pools[1], input_shape)
                if wt != ws:
                    raise SelectionError(
                        f"finetune.d_input=features needs the pruned model's pooled features as wide as the teacher's "
                        f"({ws} vs {wt}); use finetune.d_input=logits")
        super().__init__(teacher, [], ChannelMasks([]), CostModel(model, [], input_shape), search_config_for(cfg),
                         input_shape, num_classes)

    def after_step(self, model: nn.Module, lr: float, step: int) -> None:
        """No masks to update."""

    def scalars(self) -> dict[str, float]:
        """No mask or lambda scalars (the loss terms and D outputs are logged by the engine)."""
        return {}

    def end_epoch(self, model: nn.Module, epoch: int, writer: Any) -> None:
        """No mask histograms."""


def finetune_trainer(model: nn.Module, teacher: nn.Module, cfg: FinetuneConfig, epochs: int, data: Any, run_dir: Path,
                     stage: str, device: torch.device, on_epoch_end: Callable | None = None) -> Any:
    """An engine Trainer that fine-tunes model against teacher for epochs epochs (state in run_dir/<stage>_state.pt)."""
    from amas.engine import Trainer

    info = data.info
    tcfg = dataclasses.replace(cfg.train, epochs=int(epochs))
    objective = FinetuneObjective(teacher, cfg, model, info.input_shape, info.num_classes)
    return Trainer(model, data.train, tcfg, run_dir, num_classes=info.num_classes, val=data.val, objective=objective,
                   stage=stage, device=device, on_epoch_end=on_epoch_end)


# ---------------------------------------------------------------- successive halving


def halving_schedule(n: int, budget: int) -> list[tuple[int, int]]:
    """[(candidates alive, epochs each)] per round of successive halving; Σ alive·epochs == budget exactly."""
    if n < 1:
        raise SelectionError("successive halving needs at least one candidate; check select.levels")
    if budget < 1:
        raise SelectionError(f"select.budget_epochs={budget} must be at least 1")
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / 2))
    if len(counts) == 1:
        return [(1, int(budget))]
    need = sum(counts[:-1])
    if budget < need:
        raise SelectionError(
            f"select.budget_epochs={budget} is below the {need} epochs successive halving needs for {n} candidates "
            f"(one epoch each before every cut); raise select.budget_epochs to at least {need} or use fewer "
            f"select.levels"
        )
    share = budget / len(counts)
    epochs = [max(1, int(share // c)) for c in counts[:-1]]
    while (
        sum(c * e for c, e in zip(counts[:-1], epochs, strict=True)) > budget
    ):  # forced minimum of 1 overshot the shares
        r = max(i for i, e in enumerate(epochs) if e > 1)
        epochs[r] -= 1
    epochs.append(budget - sum(c * e for c, e in zip(counts[:-1], epochs, strict=True)))  # the survivor takes the rest
    return list(zip(counts, epochs, strict=True))


def successive_halving(ids: list[int], budget: int, train: Callable[[int, int], float],
                       score: Callable[[int, float], tuple], on_round: Callable[[dict], None] | None = None) -> dict:
    """Spend budget epochs over ids by successive halving.

    train(id, until_epoch) trains candidate id up to epoch until_epoch of its schedule and returns its val acc;
    score(id, acc) is the sort key (higher is better). Returns the rounds, epochs and last accuracy per id,
    the epochs spent (== budget) and the survivor.
    """
    schedule = halving_schedule(len(ids), budget)
    alive = list(ids)
    until = 0
    acc: dict[int, float] = {}
    epochs = {i: 0 for i in ids}
    rounds: list[dict] = []
    spent = 0
    for r, (n, e) in enumerate(schedule):
        assert len(alive) == n, (alive, n)
        until += e
        for cid in alive:
            if e > 0:
                acc[cid] = float(train(cid, until))
                epochs[cid] = until
                spent += e
        ranked = sorted(alive, key=lambda c: score(c, acc.get(c, float("nan"))), reverse=True)
        keep = ranked[: schedule[r + 1][0]] if r + 1 < len(schedule) else ranked
        record = {"round": r + 1, "alive": list(alive), "epochs_each": e, "until_epoch": until,
                  "val_acc": {str(c): acc.get(c) for c in alive}, "kept": keep,
                  "dropped": [c for c in alive if c not in keep]}
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        alive = keep
    return {"schedule": [list(s) for s in schedule], "rounds": rounds, "epochs": epochs, "val_acc": acc,
            "spent": spent, "budget": int(budget), "survivor": alive[0], "horizon": until}


# ---------------------------------------------------------------- Pareto front and policies


def _cost(row: dict, indicator: str) -> float:
    return float(row["channels"] if indicator == "channels" else row["macs"])


def pareto_front(rows: list[dict], indicator: str = "macs") -> list[int]:
    """Ids of the rows no other row dominates on (cost ↓, val_acc ↑), sorted by cost then id."""
    front = []
    for a in rows:
        ca, aa = _cost(a, indicator), float(a["val_acc"])
        dominated = any(
            _cost(b, indicator) <= ca
            and float(b["val_acc"]) >= aa
            and (_cost(b, indicator) < ca or float(b["val_acc"]) > aa)
            for b in rows
            if b is not a
        )
        if not dominated:
            front.append(a)
    return [r["id"] for r in sorted(front, key=lambda r: (_cost(r, indicator), r["id"]))]


def budget_bound(cfg: SelectConfig, teacher_macs: int) -> int:
    """The budget policy's MACs bound per image: select.max_macs, else (1 − select.min_reduction) × teacher MACs."""
    if cfg.max_macs > 0:
        return int(cfg.max_macs)
    return int(math.floor((1.0 - cfg.min_reduction) * teacher_macs))


def _budget_key(row: dict) -> tuple:
    return (float(row["val_acc"]), -int(row["macs"]), -int(row["params"]), -int(row["id"]))


def _tolerance_key(row: dict, indicator: str) -> tuple:
    return (-_cost(row, indicator), float(row["val_acc"]), -int(row["macs"]), -int(row["params"]), -int(row["id"]))


def halving_score(row: dict, policy: str, *, min_acc: float | None = None, indicator: str = "macs") -> tuple:
    """Successive halving's sort key for a candidate row (higher is better), in the policy's own order."""
    if policy == "budget":
        return (1,) + _budget_key(row)
    meets = float(row["val_acc"]) >= float(min_acc if min_acc is not None else -math.inf)
    if meets:
        return (1,) + _tolerance_key(row, indicator)
    return (0, float(row["val_acc"]), -_cost(row, indicator), -int(row["macs"]), -int(row["params"]), -int(row["id"]))


def _pct(macs: int, teacher_macs: int) -> str:
    return f"-{100.0 * (1.0 - macs / teacher_macs):.1f}% MACs" if teacher_macs else f"{macs} MACs"


def choose(rows: list[dict], policy: str, *, teacher_macs: int, bound: int | None = None, min_acc: float | None = None,
           indicator: str = "macs", tolerance: float | None = None) -> dict:
    """The row the policy selects (see the module docstring for the order and ties), or one-line SelectionError."""
    if not rows:
        raise SelectionError("there are no candidates to select from; check select.levels")
    if policy == "budget":
        if bound is None:
            raise SelectionError("the budget policy needs a MACs bound (select.min_reduction or select.max_macs)")
        feasible = [r for r in rows if int(r["macs"]) <= bound]
        if not feasible:
            best = min(rows, key=lambda r: (int(r["macs"]), -float(r["val_acc"]), int(r["id"])))
            need = 1.0 - bound / teacher_macs if teacher_macs else 0.0
            raise SelectionError(
                f"no candidate fits the MACs budget ({bound / 1e6:.3g}M, {_pct(bound, teacher_macs)}): the best "
                f"available "
                f"trade-off is {best['name']} ({best['macs'] / 1e6:.3g}M, {_pct(int(best['macs']), teacher_macs)}, "
                f"{float(best['val_acc']):.2f}% val acc); add a level of at least {need:.2f} to select.levels or lower "
                f"select.min_reduction (or raise select.max_macs)"
            )
        return max(feasible, key=_budget_key)
    if policy == "tolerance":
        if min_acc is None:
            raise SelectionError("the tolerance policy needs the teacher's val acc and select.tolerance")
        feasible = [r for r in rows if float(r["val_acc"]) >= min_acc]
        if not feasible:
            best = max(rows, key=_budget_key)
            short = min_acc - float(best["val_acc"])
            tol = f"{(tolerance or 0.0) + short:.2f}"
            raise SelectionError(
                f"no candidate reaches {min_acc:.2f}% val acc (teacher − select.tolerance): the best available "
                f"trade-off is "
                f"{best['name']} ({_pct(int(best['macs']), teacher_macs)}, {float(best['val_acc']):.2f}% val acc); "
                f"raise select.tolerance to at least {tol}, add a lower level to select.levels or raise "
                f"select.budget_epochs"
            )
        return max(feasible, key=lambda r: _tolerance_key(r, indicator))
    raise SelectionError(f"unknown selection policy '{policy}'; use select.policy=budget or select.policy=tolerance")


# ---------------------------------------------------------------- cutting candidates


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
    from amas.cost import count
    from amas.prune import PruneError, kept_counts, prune_model

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
        pruned = prune_model(model, groups, keep, masks=masks, input_shape=shape).eval()
        macs, params = count(pruned, shape)
        counts = kept_counts(keep)
        cid = len(out)
        seen[key] = cid
        row = {
            "id": cid, "name": f"cand{cid}", "level": level, "macs": int(macs), "params": int(params),
            "channels": int(sum(counts.get(g.name, g.size) for g in groups)), "total_channels": int(total_channels),
            "macs_reduction": round(1.0 - macs / float(cost.total_macs), 6), "kept": counts,
        }
        out.append(Candidate(row, pruned, keep))
    if not out:
        raise SelectionError(
            f"no level of select.levels={levels} could be cut ({skipped[0]['reason']}); choose other levels"
        )
    return out, skipped


# ---------------------------------------------------------------- the candidates stage


def _val_acc_at(history: list[dict], epoch: int) -> float:
    for rec in history:
        if int(rec["epoch"]) == epoch and "val_acc" in rec:
            return float(rec["val_acc"])
    raise SelectionError("candidate fine-tuning has no validation accuracy; set data.val_size > 0")


def run_candidates(cfg: Any, out_dir: Path, *, teacher: nn.Module, record: dict, source: nn.Module,
                   planner: Callable[[float, nn.Module, list, Any], dict[str, torch.Tensor]],
                   masks: dict[str, torch.Tensor] | None,
                   data: Any, device: torch.device, method: str, on_epoch_end: Callable | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Cut candidates from source, fine-tune them by successive halving, write out_dir/candidates.json; return it.

    planner(level, source, groups, cost_model) returns the kept channel indices per group at a MACs reduction.
    """
    from amas.cost import count
    from amas.distributed import barrier, context, on_main
    from amas.engine import evaluate
    from amas.export import load_pruned, save_pruned
    from amas.masks import CostModel, find_groups
    from amas.prune import make_recipe

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
    teacher_val = evaluate(teacher, data.val, info.num_classes, device)["acc"]

    cut_path = out_dir / "cut.json"
    cut_before = cut_path.is_file()
    barrier()  # every rank has looked before rank 0 writes cut.json
    if cut_before:  # cut earlier in this run: the cut files hold the architectures and starting weights
        cut = json.loads(cut_path.read_text())
        rows, skipped = cut["rows"], cut["skipped"]
    else:
        source = source.to(device).eval()
        groups = find_groups(source, shape, residual=cfg.prune.residual_channels)
        if not groups:
            raise SelectionError(f"model '{record['name']}' has no prunable channel groups; choose another model")
        cost = CostModel(source, groups, shape)
        cands, skipped = cut_candidates(
            source, groups, cost, lambda lv: planner(lv, source, groups, cost), sel.levels, masks
        )
        rows = []
        for c in cands:
            c.row["val_acc_cut"] = evaluate(c.model.to(device), data.val, info.num_classes, device)["acc"]
            meta = _metadata(record, shape, c.row, teacher_macs, teacher_params, cfg, method)
            on_main(save_pruned, out_dir / f"{c.row['name']}_cut.pt", c.model, make_recipe(record, shape, c.keep), meta)
            rows.append(c.row)
        cut = {"rows": rows, "skipped": skipped, "total_channels": sum(g.size for g in groups)}
        on_main(atomic_write_text, cut_path, json.dumps(cut, indent=2))
    total_channels = int(cut["total_channels"])

    bound = budget_bound(sel, teacher_macs) if sel.policy == "budget" else None
    min_acc = teacher_val - sel.tolerance if sel.policy == "tolerance" else None
    for r in rows:
        r["val_acc"], r["epochs"] = r["val_acc_cut"], 0
        r["status"] = "over budget (not trained)" if bound is not None and r["macs"] > bound else "cut"
    trainable = [r["id"] for r in rows if r["status"] == "cut"]
    if not trainable:  # the budget policy's feasibility is known before any training: fail before spending it
        choose(rows, "budget", teacher_macs=teacher_macs, bound=bound)
    by_id = {r["id"]: r for r in rows}

    schedule = halving_schedule(len(trainable), sel.budget_epochs)
    horizon = sum(e for _, e in schedule)

    def train(cid: int, until: int) -> float:
        row = by_id[cid]
        model, obj = load_pruned(out_dir / f"{row['name']}_cut.pt", device)
        trainer = finetune_trainer(
            model,
            teacher,
            fin,
            horizon,
            data,
            out_dir,
            row["name"],
            device,
            on_epoch_end=(lambda e, rec, s=row["name"]: on_epoch_end(s, e, rec)) if on_epoch_end else None,
        )
        try:
            history = trainer.fit(resume=True, until_epoch=until)
        finally:
            trainer.objective.close()
        acc = _val_acc_at(history, until)
        row.update(val_acc=acc, epochs=until)
        meta = dict(obj["metadata"], val_acc=acc, epochs=until)
        on_main(save_pruned, out_dir / f"{row['name']}.pt", trainer.model, obj["recipe"], meta)
        return acc

    def score(cid: int, acc: float) -> tuple:
        return halving_score(dict(by_id[cid], val_acc=acc), sel.policy, min_acc=min_acc, indicator=sel.indicator)

    def on_round(rec: dict) -> None:
        for c in rec["dropped"]:
            by_id[c]["status"] = f"dropped after round {rec['round']}"
        accs = ", ".join(f"{by_id[int(c)]['name']} {a:.2f}%" for c, a in rec["val_acc"].items() if a is not None)
        log(
            f"candidates: round {rec['round']} ({rec['epochs_each']} epoch(s) each, to epoch "
            f"{rec['until_epoch']}): {accs}"
            + (f"; dropped {', '.join(by_id[c]['name'] for c in rec['dropped'])}" if rec["dropped"] else "")
        )

    sh = successive_halving(trainable, sel.budget_epochs, train, score, on_round)
    by_id[sh["survivor"]]["status"] = "survivor"
    result = {
        "method": method,
        "teacher": {"val_acc": teacher_val, "macs": int(teacher_macs), "params": int(teacher_params),
                    "channels": total_channels},
        "policy": sel.policy, "bound_macs": bound, "min_acc": min_acc,
        "rows": rows, "skipped": skipped, "halving": sh, "wall_s": round(time.perf_counter() - t0, 2),
    }
    on_main(atomic_write_text, out_dir / "candidates.json", json.dumps(result, indent=2))
    return result


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
        "source": f"{method} candidate {row['name']}",
    }


# ---------------------------------------------------------------- the selection stage


def select_candidates(cand: dict, cfg: SelectConfig, run_dir: Path, writer: Any = None) -> dict:
    """Pareto front + policy over the fine-tuned candidates; writes selection.json, pareto.png and TensorBoard."""
    rows = cand["rows"]
    teacher = cand["teacher"]
    tmacs = int(teacher["macs"])
    bound = budget_bound(cfg, tmacs) if cfg.policy == "budget" else None
    min_acc = float(teacher["val_acc"]) - cfg.tolerance if cfg.policy == "tolerance" else None
    front = pareto_front(rows, cfg.indicator)
    winner = choose(rows, cfg.policy, teacher_macs=tmacs, bound=bound, min_acc=min_acc, indicator=cfg.indicator,
                    tolerance=cfg.tolerance)
    if cfg.policy == "budget":
        rule = f"highest val acc with MACs <= {bound} ({_pct(bound, tmacs)}); ties: fewer MACs, fewer params, lower id"
    else:
        rule = (
            f"fewest {'kept channels' if cfg.indicator == 'channels' else 'MACs'} with val acc >= {min_acc:.3f}% "
            f"(teacher {teacher['val_acc']:.3f}% - {cfg.tolerance}); ties: higher val acc, fewer MACs, fewer "
            f"params, lower id"
        )
    result = {
        "policy": cfg.policy, "indicator": cfg.indicator, "rule": rule, "bound_macs": bound, "min_acc": min_acc,
        "teacher": teacher, "front": front, "winner": winner["id"], "winner_name": winner["name"],
        "winner_row": winner, "on_front": winner["id"] in front, "candidates": rows, "split": "validation",
    }
    run_dir = Path(run_dir)
    fig = plot_front(rows, front, winner["id"], teacher, cfg.indicator, bound=bound, min_acc=min_acc)
    _save_figure(fig, run_dir / "pareto.png")
    own = writer is None
    if own:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb" / "select"))
    try:
        writer.add_figure("select/pareto", fig, close=True)
        for r in rows:
            hp = {
                "candidate": r["name"],
                "level": float(r["level"]),
                "macs_M": r["macs"] / 1e6,
                "params_M": r["params"] / 1e6,
                "kept_channels": int(r["channels"]),
                "epochs": int(r["epochs"]),
                "status": r["status"],
                "on_front": r["id"] in front,
                "selected": r["id"] == winner["id"],
            }
            writer.add_hparams(
                hp,
                {"hparam/val_acc": float(r["val_acc"]), "hparam/macs_reduction": float(r["macs_reduction"])},
                run_name=r["name"],
            )
        writer.flush()
    finally:
        if own:
            writer.close()
    atomic_write_text(run_dir / "selection.json", json.dumps(result, indent=2))
    return result


def plot_front(rows: list[dict], front: list[int], winner: int, teacher: dict, indicator: str = "macs", *,
               bound: int | None = None, min_acc: float | None = None) -> Any:
    """Matplotlib figure: candidates (cost vs val acc), Pareto front, teacher, the policy's limit, the winner."""
    from matplotlib.figure import Figure

    scale, label = (1.0, "kept channels") if indicator == "channels" else (1e-6, "MACs (M)")
    x = lambda r: _cost(r, indicator) * scale  # noqa: E731
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([x(r) for r in rows], [r["val_acc"] for r in rows], c="tab:blue", label="candidates", zorder=3)
    for r in rows:
        ax.annotate(
            f"{r['name']} ({r['epochs']} ep)",
            (x(r), r["val_acc"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    fr = sorted((r for r in rows if r["id"] in front), key=lambda r: (x(r), r["id"]))
    ax.plot(
        [x(r) for r in fr],
        [r["val_acc"] for r in fr],
        "-",
        c="tab:orange",
        drawstyle="steps-post",
        label="Pareto front",
        zorder=2,
    )
    w = next(r for r in rows if r["id"] == winner)
    ax.scatter(
        [x(w)], [w["val_acc"]], s=160, facecolors="none", edgecolors="tab:red", linewidths=2, label="selected", zorder=4
    )
    tx = teacher["channels"] if indicator == "channels" else teacher["macs"] * scale
    ax.scatter([tx], [teacher["val_acc"]], marker="*", s=140, c="black", label="teacher", zorder=3)
    if bound is not None and indicator == "macs":
        ax.axvline(bound * scale, ls="--", c="gray", label="MACs budget")
    if min_acc is not None:
        ax.axhline(min_acc, ls=":", c="gray", label="teacher − tolerance")
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("candidates: cost vs validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    """Save a figure as PNG through a temp file and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
