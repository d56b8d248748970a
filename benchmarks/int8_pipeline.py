"""Prune → int8 in one `amas prune` run: accuracy, size and speed-up over the float32 teacher, from each run's report.

    amas prune --config configs/fmnist_resnet20_amas.yaml --teacher benchmarks/teachers/fmnist_resnet20.pt \\
        --out runs/fmnist_amas70_int8 search.target_reduction=0.7 select.min_reduction=0.7 \\
        "select.levels=[0.7,0.75,0.8]" prune.round_to=4 quant.mode=ptq quant.onnx=true
    cp -r runs/fmnist_amas70_int8 runs/fmnist_amas70_qat   # the same pruned model, quantized by QAT instead
    amas prune ... --out runs/fmnist_amas70_qat quant.mode=qat --redo quantize
    python benchmarks/int8_pipeline.py runs/fmnist_amas70_int8 runs/fmnist_amas70_qat

Reads report.json of each run directory (its int8 block: the quantize stage's accuracies, file sizes and the float
teacher / float pruned / int8 pruned latency timed in alternating rounds on each runtime). Prints a table, writes JSON.
With --retime, times the run's teacher and pruned.pt again on --threads threads for --rounds alternating rounds
(amas.latency.table.int8_comparison) instead of reading the stage's timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def retime(run: Path, report: dict, rounds: int) -> dict:
    """The run's float teacher, float pruned.pt and int8 pruned model timed again (int8_comparison's result)."""
    from amas.files.pruned import load_any_model, load_pruned
    from amas.latency.table import int8_comparison

    teacher, _ = load_any_model(report["teacher"]["checkpoint"], "cpu")
    pruned, obj = load_pruned(run / "pruned.pt", "cpu")
    shape = tuple(int(s) for s in obj["metadata"]["input_shape"])
    return int8_comparison(teacher, pruned, shape, ["compiled", "onnx"], iters=20, rounds=rounds)


def rows_of(run: Path, rounds: int = 0) -> list[dict]:
    """One row per runtime of a run's report: accuracies, sizes, ms and speed-ups over the teacher."""
    report = json.loads((run / "report.json").read_text())
    q = report.get("int8")
    if not q:
        raise SystemExit(f"{run}/report.json has no int8 block: run amas prune with quant.mode=ptq or qat")
    if rounds:
        q["runtimes"] = retime(run, report, rounds)
    base = {"run": str(run), "mode": q["mode"], "macs_reduction": report["macs_reduction"],
            "teacher_test_acc": report["teacher"]["test_acc"], "pruned_test_acc": report["pruned"]["test_acc"],
            "int8_test_acc": q["test_acc"], "int8_val_acc": q["val_acc"], "pruned_val_acc": report["pruned"]["val_acc"],
            "pruned_pt2_bytes": os.path.getsize(report["files"]["pruned.pt2"]), "int8_pt2_bytes": q["pt2_bytes"],
            "int8_onnx_bytes": q["onnx_bytes"], "qat_epochs": q.get("qat_epochs", 0)}
    out = []
    for rt, r in ((q.get("runtimes") or {}).get("by_runtime") or {"–": None}).items():
        row = dict(base, runtime=rt)
        if r is not None:
            row.update(r)
        row["busy_warnings"] = (q.get("runtimes") or {}).get("warnings", [])
        out.append(row)
    return out


def _cells(row: dict, batch: str, kind: str, spec: str, unit: str) -> str:
    """'a / b / c' of the row's ms (kind '_ms': teacher, pruned, int8) or speed-ups (kind '': pruned, int8)."""
    keys = ([f"teacher_{batch}_ms", f"pruned_{batch}_ms", f"pruned_int8_{batch}_ms"] if kind else
            [f"pruned_speedup_{batch}", f"pruned_int8_speedup_{batch}"])
    return " / ".join(f"{row[k]:{spec}}{unit}" for k in keys) if all(k in row for k in keys) else "–"


def main(argv: list[str] | None = None) -> int:
    """Print the table of the given runs and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="amas prune run directories with a quantize stage")
    p.add_argument("--out", default="benchmarks/results/int8_pipeline.json")
    p.add_argument("--retime", action="store_true", help="time teacher, pruned and int8 again (not the stage's)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds with --retime")
    p.add_argument("--threads", type=int, default=0, help="torch threads with --retime (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = [row for run in args.runs for row in rows_of(Path(run), args.rounds if args.retime else 0)]
    head = ("| mode | MACs ↓ | test % teacher / pruned / int8 | int8 .pt2 bytes | runtime | b1 ms teacher / pruned / "
            "int8 | b1 speed-up pruned / int8 | b64 ms teacher / pruned / int8 | b64 speed-up pruned / int8 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['mode']} | {100 * r['macs_reduction']:.1f}% | {r['teacher_test_acc']:.2f} / "
              f"{r['pruned_test_acc']:.2f} / {r['int8_test_acc']:.2f} | {r['int8_pt2_bytes']:,} | {r['runtime']} | "
              f"{_cells(r, 'b1', '_ms', '.2f', '')} | {_cells(r, 'b1', '', '.2f', '×')} | "
              f"{_cells(r, 'b64', '_ms', '.2f', '')} | {_cells(r, 'b64', '', '.2f', '×')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
