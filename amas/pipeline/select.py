"""Multi-indicator architecture selection: the Pareto front over (cost, val acc) and the two policies.

**Selection** uses accuracy on the held-out validation split only (never the test split).

* The Pareto front over (cost, val acc), cost = MACs, kept channels or latency in ms (``select.indicator``; a row's
  ``latency_ms``, measured at ``select.latency_batch`` on ``select.latency_runtime``): the candidates
  that no other candidate beats on both (lower-or-equal cost and higher-or-equal accuracy, one strictly).
* ``budget``: the highest val acc among candidates with MACs ≤ bound (``select.max_macs``, else
  (1 − ``select.min_reduction``) × teacher MACs); ties → fewer MACs → fewer params → lower candidate id.
  Candidates over the bound are cut and evaluated but not trained (they could never be chosen). With
  ``select.max_latency`` > 0 the bound is on latency instead: latency_ms ≤ max_latency × the teacher's.
* ``tolerance``: the lowest cost among candidates with val acc ≥ teacher val acc − ``select.tolerance``;
  ties → higher val acc → fewer MACs → fewer params → lower candidate id.
* Accuracies are compared exactly (val acc on N images moves in steps of 100/N, so exact ties happen).
* No feasible candidate: one SelectionError line naming the best available trade-off and the setting to change.

The halving score is the policy's own order: ``budget`` ranks by the tie-break order above; ``tolerance``
ranks candidates that meet the threshold first (cheapest first), then the others by accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amas.config import SelectConfig
from amas.errors import SelectionError
from amas.files.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from amas.pipeline.context import Rows, RunContext

__all__ = ["select_stage", "pareto_front", "budget_bound", "latency_bound", "choose", "halving_score",
           "select_candidates", "plot_front"]

_COST_KEY = {"channels": "channels", "macs": "macs", "latency": "latency_ms"}


def _cost(row: dict, indicator: str) -> float:
    key = _COST_KEY.get(indicator, "macs")
    if key not in row:
        raise SelectionError(f"candidate {row.get('name', row.get('id'))} has no {key}; select.indicator={indicator} "
                             f"needs candidates timed at select.latency_batch (re-run the candidates stage)")
    return float(row[key])


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


_LABEL = {"channels": "kept channels", "macs": "MACs", "latency": "latency (ms)"}


def latency_bound(cfg: SelectConfig, teacher: dict) -> float | None:
    """The budget policy's latency bound in ms (select.max_latency × the teacher's latency_ms), None when unset."""
    if cfg.max_latency <= 0:
        return None
    if "latency_ms" not in teacher:
        raise SelectionError("select.max_latency needs the teacher's latency; re-run the candidates stage")
    return float(cfg.max_latency) * float(teacher["latency_ms"])


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
           indicator: str = "macs", tolerance: float | None = None, latency_bound: float | None = None) -> dict:
    """The row the policy selects (see the module docstring for the order and ties), or one-line SelectionError."""
    if not rows:
        raise SelectionError("there are no candidates to select from; check select.levels")
    if policy == "budget" and latency_bound is not None:
        feasible = [r for r in rows if _cost(r, "latency") <= latency_bound]
        if not feasible:
            best = min(rows, key=lambda r: (_cost(r, "latency"), -float(r["val_acc"]), int(r["id"])))
            raise SelectionError(
                f"no candidate fits the latency budget ({latency_bound:.3g} ms): the fastest is {best['name']} "
                f"({best['latency_ms']:.3g} ms, {float(best['val_acc']):.2f}% val acc); add a higher level to "
                f"select.levels or raise select.max_latency"
            )
        return max(feasible, key=lambda r: (float(r["val_acc"]), -_cost(r, "latency"), -int(r["macs"]), -int(r["id"])))
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


def select_candidates(cand: dict, cfg: SelectConfig, run_dir: Path, writer: Any = None) -> dict:
    """Pareto front + policy over the fine-tuned candidates; writes selection.json, pareto.png and TensorBoard."""
    rows = cand["rows"]
    teacher = cand["teacher"]
    tmacs = int(teacher["macs"])
    bound = budget_bound(cfg, tmacs) if cfg.policy == "budget" else None
    lat_bound = latency_bound(cfg, teacher) if cfg.policy == "budget" else None
    min_acc = float(teacher["val_acc"]) - cfg.tolerance if cfg.policy == "tolerance" else None
    front = pareto_front(rows, cfg.indicator)
    winner = choose(rows, cfg.policy, teacher_macs=tmacs, bound=bound, min_acc=min_acc, indicator=cfg.indicator,
                    tolerance=cfg.tolerance, latency_bound=lat_bound)
    if lat_bound is not None:
        rule = (f"highest val acc with latency <= {lat_bound:.4g} ms ({cfg.max_latency} x the teacher's at batch "
                f"{cfg.latency_batch}, {cfg.latency_runtime}); ties: lower latency, fewer MACs, lower id")
    elif cfg.policy == "budget":
        rule = f"highest val acc with MACs <= {bound} ({_pct(bound, tmacs)}); ties: fewer MACs, fewer params, lower id"
    else:
        rule = (
            f"fewest {_LABEL[cfg.indicator]} with val acc >= {min_acc:.3f}% "
            f"(teacher {teacher['val_acc']:.3f}% - {cfg.tolerance}); ties: higher val acc, fewer MACs, fewer "
            f"params, lower id"
        )
    result = {
        "policy": cfg.policy, "indicator": cfg.indicator, "rule": rule, "bound_macs": bound, "min_acc": min_acc,
        "bound_latency_ms": lat_bound,
        "teacher": teacher, "front": front, "winner": winner["id"], "winner_name": winner["name"],
        "winner_row": winner, "on_front": winner["id"] in front, "candidates": rows, "split": "validation",
    }
    run_dir = Path(run_dir)
    fig = plot_front(rows, front, winner["id"], teacher, cfg.indicator, bound=bound, min_acc=min_acc,
                     latency_bound=lat_bound)
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
                **({"latency_ms": float(r["latency_ms"])} if "latency_ms" in r else {}),
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
               bound: int | None = None, min_acc: float | None = None, latency_bound: float | None = None) -> Any:
    """Matplotlib figure: candidates (cost vs val acc), Pareto front, teacher, the policy's limit, the winner."""
    from matplotlib.figure import Figure

    scale, label = (1e-6, "MACs (M)") if indicator == "macs" else (1.0, _LABEL[indicator])
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
    tx = _cost(teacher, indicator) * scale
    ax.scatter([tx], [teacher["val_acc"]], marker="*", s=140, c="black", label="teacher", zorder=3)
    if bound is not None and indicator == "macs":
        ax.axvline(bound * scale, ls="--", c="gray", label="MACs budget")
    if latency_bound is not None and indicator == "latency":
        ax.axvline(latency_bound, ls="--", c="gray", label="latency budget")
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def select_stage(ctx: RunContext) -> Rows:
    """Pareto front and policy over the fine-tuned candidates: selection.json, pareto.png (rank 0)."""
    r = ctx.write(select_candidates, ctx.read_json("candidates/candidates.json"), ctx.cfg.select, ctx.dir)
    if r is None:  # not rank 0: nothing to report
        return []
    w = r["winner_row"]
    names = {c["id"]: c["name"] for c in r["candidates"]}
    return [("policy", r["policy"]), ("rule", r["rule"]), ("Pareto front", ", ".join(names[i] for i in r["front"])),
            ("selected", f"{w['name']} (level {w['level']:.2f})"),
            (ctx.label("val"), w["val_acc"]), ("MACs", f"{w['macs'] / 1e6:.3f}M (-{100 * w['macs_reduction']:.1f}%)"),
            ("figure", str(ctx.path("pareto.png")))]
