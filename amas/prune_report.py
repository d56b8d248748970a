"""The pipeline's report: teacher vs pruned (test accuracy, MACs, params, latency), the selection, the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amas.config import atomic_write_text

if TYPE_CHECKING:
    from amas.run_context import RunContext

__all__ = ["comparison", "write_comparison"]


def comparison(run: RunContext, meta: dict, rp: dict, rt: dict, test_teacher: float, test_pruned: float, sel: dict,
                cand: dict, pt2: dict) -> dict:
    """report.json: teacher vs pruned (test acc, MACs, params, latency), the selection and the stage wall times."""
    w = sel["winner_row"]
    stages = run.log.data["stages"]
    return {
        "model": meta.get("model"),
        "dataset": meta.get("dataset"),
        "method": run.method,
        "input_shape": rp["input_shape"],
        "teacher": {
            "test_acc": round(test_teacher, 3),
            "val_acc": round(float(cand["teacher"]["val_acc"]), 3),
            "macs": rt["macs"],
            "params": rt["params"],
            "latency_b1_ms": rt["latency_b1_ms"],
            "latency_b64_ms": rt["latency_b64_ms"],
            "checkpoint": str(run.teacher_path),
        },
        "pruned": {
            "test_acc": round(test_pruned, 3),
            "val_acc": round(float(meta.get("val_acc", float("nan"))), 3),
            "macs": rp["macs"],
            "params": rp["params"],
            "latency_b1_ms": rp["latency_b1_ms"],
            "latency_b64_ms": rp["latency_b64_ms"],
            "checkpoint": str(run.dir / "pruned.pt"),
        },
        "test_acc_change": round(test_pruned - test_teacher, 3),
        "macs_reduction": round(1.0 - rp["macs"] / rt["macs"], 4),
        "params_reduction": round(1.0 - rp["params"] / rt["params"], 4),
        "speedup_b1": round(rt["latency_b1_ms"] / rp["latency_b1_ms"], 3),
        "speedup_b64": round(rt["latency_b64_ms"] / rp["latency_b64_ms"], 3),
        "latency_device": rp["latency_device"],
        "selection": {
            "policy": sel["policy"],
            "rule": sel["rule"],
            "selected": w["name"],
            "level": w["level"],
            "front": sel["front"],
            "candidates": len(sel["candidates"]),
            "budget_epochs": cand["halving"]["budget"],
            "finetune_epochs": meta.get("finetune_epochs"),
        },
        "files": {
            "pruned.pt": str(run.dir / "pruned.pt"),
            "pruned.pt2": str(run.dir / "pruned.pt2"),
            "pt2_dynamic_batch": pt2.get("dynamic_batch"),
            "selection": str(run.dir / "selection.json"),
            "pareto": str(run.dir / "pareto.png"),
        },
        "stage_wall_s": {k: v.get("wall_s") for k, v in stages.items() if v.get("wall_s") is not None},
    }


def _runtime_lines(report: dict) -> list[str]:
    """report.md's latency-by-runtime table (teacher and pruned timed in alternating rounds) and busy warnings."""
    rts = report.get("runtimes")
    if not rts or not rts["by_runtime"]:
        return []
    lines = ["## Latency by runtime (teacher and pruned timed in alternating rounds, ms)", "",
             "| runtime | teacher b1 | pruned b1 | speed-up b1 | teacher b64 | pruned b64 | speed-up b64 |",
             "|---|---|---|---|---|---|---|"]
    for rt, r in rts["by_runtime"].items():
        lines.append(f"| {rt} | {r['teacher_b1_ms']:.3f} | {r['pruned_b1_ms']:.3f} | {r['speedup_b1']:.2f}x | "
                     f"{r['teacher_b64_ms']:.3f} | {r['pruned_b64_ms']:.3f} | {r['speedup_b64']:.2f}x |")
    lines.append("")
    if rts["busy"]:
        lines += [f"**Warning**: {w}" for w in rts["warnings"]] + [""]
    return lines


def write_comparison(report: dict, out: Path) -> None:
    """report.md (teacher vs pruned, selection, files) and report.json, each atomically; JSON last (the marker)."""
    t, p = report["teacher"], report["pruned"]

    def row(name: str, a: Any, b: Any, change: str) -> str:
        return f"| {name} | {a} | {b} | {change} |"

    lines = [
        f"# amas prune: {report['model']} on {report['dataset']} ({report['method']})",
        "",
        "| | teacher | pruned | change |",
        "|---|---|---|---|",
        row(
            "test accuracy %",
            f"{t['test_acc']:.2f}",
            f"{p['test_acc']:.2f}",
            f"{report['test_acc_change']:+.2f} points",
        ),
        row(
            "validation accuracy %",
            f"{t['val_acc']:.2f}",
            f"{p['val_acc']:.2f}",
            f"{p['val_acc'] - t['val_acc']:+.2f} points",
        ),
        row("MACs", f"{t['macs'] / 1e6:.3f}M", f"{p['macs'] / 1e6:.3f}M", f"-{100 * report['macs_reduction']:.1f}%"),
        row(
            "params",
            f"{t['params'] / 1e6:.4f}M",
            f"{p['params'] / 1e6:.4f}M",
            f"-{100 * report['params_reduction']:.1f}%",
        ),
        row(
            "latency batch 1 (ms)",
            f"{t['latency_b1_ms']:.3f}",
            f"{p['latency_b1_ms']:.3f}",
            f"{report['speedup_b1']:.2f}x faster",
        ),
        row(
            "latency batch 64 (ms)",
            f"{t['latency_b64_ms']:.3f}",
            f"{p['latency_b64_ms']:.3f}",
            f"{report['speedup_b64']:.2f}x faster",
        ),
        "",
        f"Latency measured on {report['latency_device']}. Test accuracy is evaluated once, after selection; "
        "the selection used the held-out validation split only.",
        "",
        *_runtime_lines(report),
        "## Selection",
        "",
        f"- policy: {report['selection']['policy']} ({report['selection']['rule']})",
        f"- selected: {report['selection']['selected']} (cut at level {report['selection']['level']:.2f}) out of "
        f"{report['selection']['candidates']} candidates, {report['selection']['budget_epochs']} "
        f"candidate-epochs by successive "
        f"halving, then {report['selection']['finetune_epochs']} final fine-tuning epochs",
        "- candidates, Pareto front and the figure: `selection.json`, `pareto.png`",
        "",
        "## Files",
        "",
        f"- `pruned.pt`: `amas.load_pruned('{report['files']['pruned.pt']}')` (weights_only)",
        f"- `pruned.pt2`: `torch.export.load('{report['files']['pruned.pt2']}').module()` (no amas needed)",
        "",
        "## Stage wall times (s)",
        "",
    ]
    lines += [f"- {k}: {v:.1f}" for k, v in report["stage_wall_s"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
