"""report.json / report.md of the export stage (`amas prune` and `amas export`): one schema, one builder, one writer.

The schema is the README's ("The export report"): model, dataset, method, command, input_shape; the teacher and
pruned blocks (test_acc, val_acc, macs, params, latency_b1_ms, latency_b64_ms, checkpoint) and reference (what the
teacher block describes); the changes (test_acc_change, macs_reduction, params_reduction, speedup_b1, speedup_b64)
and latency_device; cut (target_reduction, round_to, min_channels, source); selection (None for `amas export`);
files; stage_wall_s; notes (e.g. a skipped ONNX file); runtimes when timed. test_acc, macs, params, latency_b1_ms
and latency_b64_ms at the top level are the pruned model's, as the `amas export` report had them. A value not
measured is None. A dense task's report adds ``metric`` (``miou``: mean IoU; ``map``: box mAP@[.5:.95]), which
its test_acc and val_acc fields then hold (in %); a classifier's report has no ``metric`` (top-1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from amas.files.atomic import atomic_write_text

__all__ = ["export_report", "measure", "report_rows", "write_report"]

MIRRORED = ("test_acc", "macs", "params", "latency_b1_ms", "latency_b64_ms")


def _num(v: Any, digits: int = 3) -> float | None:
    """v rounded, or None when it was not measured (None or NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return round(float(v), digits)


def measure(model: nn.Module, input_shape: tuple[int, ...], latency_iters: int = 20, test_acc: float | None = None,
            val_acc: float | None = None, checkpoint: str | None = None, batches: tuple[int, ...] = ()) -> dict:
    """One model's block of the report: accuracies given, MACs and params counted, CPU latency at batch 1 and 64
    (and at each of batches: latency_b<N>_ms)."""
    from amas.channels.cost import count
    from amas.channels.dense import tensor_part
    from amas.latency.timing import latency

    macs, params = count(model, input_shape)
    model = tensor_part(model)  # a detector: its backbone and heads are timed (not its transform nor NMS)
    warmup = min(5, latency_iters)
    lat1 = latency(model, input_shape, batch_size=1, device="cpu", warmup=warmup, iters=latency_iters)
    lat64 = latency(model, input_shape, batch_size=64, device="cpu", warmup=min(warmup, 3),
                    iters=max(3, latency_iters // 4))
    more = {f"latency_b{b}_ms": round(latency(model, input_shape, batch_size=b, device="cpu", warmup=min(warmup, 3),
                                              iters=max(3, latency_iters // 2))["median_ms"], 4) for b in batches}
    return {"test_acc": _num(test_acc), "val_acc": _num(val_acc), "macs": int(macs), "params": int(params),
            "latency_b1_ms": round(lat1["median_ms"], 4), "latency_b64_ms": round(lat64["median_ms"], 4), **more,
            "latency_device": lat1["device"], "checkpoint": checkpoint}


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return None if a is None or b is None or not b else round(a / b, digits)


def export_report(*, command: str, model: str | None, dataset: str | None, method: str, input_shape: Any,
                  pruned: dict, teacher: dict, reference: str, cut: dict, files: dict, selection: dict | None = None,
                  stage_wall_s: dict | None = None, notes: list[str] | None = None, metric: str | None = None) -> dict:
    """The report dict of an export: teacher vs pruned (from measure), the cut, the selection and the files;
    metric: the dense task's metric the accuracy fields hold (None: top-1, no ``metric`` key)."""
    p, t = dict(pruned), dict(teacher)
    device = p.pop("latency_device", None)
    t.pop("latency_device", None)
    change = None if p["test_acc"] is None or t["test_acc"] is None else round(p["test_acc"] - t["test_acc"], 3)
    report = {
        "model": model, "dataset": dataset, "method": method, "command": command, "input_shape": list(input_shape),
        "reference": reference, "teacher": t, "pruned": p,
        "test_acc_change": change,
        "macs_reduction": round(1.0 - p["macs"] / t["macs"], 4),
        "params_reduction": round(1.0 - p["params"] / t["params"], 4),
        "speedup_b1": _ratio(t["latency_b1_ms"], p["latency_b1_ms"]),
        "speedup_b64": _ratio(t["latency_b64_ms"], p["latency_b64_ms"]),
        "latency_device": device,
        "cut": dict(cut), "selection": selection, "files": dict(files), "stage_wall_s": dict(stage_wall_s or {}),
        "notes": list(notes or []),
    }
    report.update({k: p[k] for k in MIRRORED})
    for key in _more_batches(report):  # latency at further batches (a dense task's batch 8): speedup_b<N>
        report[f"speedup_{key[8:-3]}"] = _ratio(t[key], p[key])
    if metric is not None:
        report["metric"] = metric
    return report


_METRIC_NAMES = {"miou": "mean IoU", "map": "box mAP"}


def _metric_name(report: dict) -> str:
    """What the report's accuracy fields hold, as report.md names it."""
    return _METRIC_NAMES.get(report.get("metric", ""), "accuracy")


def report_rows(report: dict) -> list[tuple[str, Any]]:
    """The export stage's summary rows (both commands print them)."""
    t, p = report["teacher"], report["pruned"]
    what = "acc" if "metric" not in report else _metric_name(report)
    rows: list[tuple[str, Any]] = [("model", report["model"]), ("dataset", report["dataset"]),
                                   (f"{report['reference']} test {what} %", _cell(t["test_acc"])),
                                   (f"pruned test {what} %", _cell(p["test_acc"])),
                                   ("MACs", f"{p['macs'] / 1e6:.3f}M of {t['macs'] / 1e6:.3f}M "
                                            f"(-{100 * report['macs_reduction']:.1f}%)"),
                                   ("params", f"{p['params'] / 1e6:.4f}M of {t['params'] / 1e6:.4f}M"),
                                   ("latency b1 ms", f"{p['latency_b1_ms']:.3g} vs {t['latency_b1_ms']:.3g}"),
                                   ("latency b64 ms", f"{p['latency_b64_ms']:.3g} vs {t['latency_b64_ms']:.3g}")]
    rows += [(f"latency {k[8:-3]} ms", f"{p[k]:.3g} vs {t[k]:.3g}") for k in _more_batches(report)]
    rows += [(k, v) for k, v in report["files"].items() if k.startswith("pruned")]
    rows += [("note", n) for n in report["notes"]]
    return rows


def _more_batches(report: dict) -> list[str]:
    """The latency_b<N>_ms keys beyond batch 1 and 64 that both blocks hold (a dense task's batch 8)."""
    t, p = report["teacher"], report["pruned"]
    return [k for k in p if k.startswith("latency_b") and k not in MIRRORED and k in t]


def _cell(v: Any, spec: str = ".2f") -> str:
    """A report.md cell: v formatted, '–' when not measured."""
    return "–" if v is None else format(v, spec)


def _runtime_lines(report: dict) -> list[str]:
    """report.md's latency-by-runtime table (reference and pruned timed in alternating rounds) and busy warnings."""
    rts = report.get("runtimes")
    if not rts or not rts["by_runtime"]:
        return []
    ref = report["reference"]
    lines = [f"## Latency by runtime ({ref} and pruned timed in alternating rounds, ms)", "",
             f"| runtime | {ref} b1 | pruned b1 | speed-up b1 | {ref} b64 | pruned b64 | speed-up b64 |",
             "|---|---|---|---|---|---|---|"]
    for rt, r in rts["by_runtime"].items():
        lines.append(f"| {rt} | {r['teacher_b1_ms']:.3f} | {r['pruned_b1_ms']:.3f} | {r['speedup_b1']:.2f}x | "
                     f"{r['teacher_b64_ms']:.3f} | {r['pruned_b64_ms']:.3f} | {r['speedup_b64']:.2f}x |")
    lines.append("")
    if rts["busy"]:
        lines += [f"**Warning**: {w}" for w in rts["warnings"]] + [""]
    return lines


def _selection_lines(report: dict) -> list[str]:
    """How the pruned model was chosen: the pipeline's selection, or `amas export`'s one cut."""
    s, c = report["selection"], report["cut"]
    if s is None:
        return ["## Cut", "", f"- {c['source']}: cut to -{100 * c['target_reduction']:.1f}% MACs, kept channels "
                f"rounded to multiples of {c['round_to']} (at least {c['min_channels']} per group), not fine-tuned",
                ""]
    return ["## Selection", "", f"- policy: {s['policy']} ({s['rule']})",
            f"- selected: {s['selected']} (cut at level {s['level']:.2f}) out of {s['candidates']} candidates, "
            f"{s['budget_epochs']} candidate-epochs by successive halving, then {s['finetune_epochs']} final "
            "fine-tuning epochs",
            "- candidates, Pareto front and the figure: `selection.json`, `pareto.png`", ""]


def _int8_lines(report: dict) -> list[str]:
    """report.md's int8 files (the quantize stage's block of report.json, when it ran)."""
    q, files = report.get("int8"), report["files"]
    if not q:
        return []
    how = (f"quantization-aware, {q['qat_epochs']} epochs against the teacher" if q.get("mode") == "qat" else
           f"{q['calib_batches']} training batches calibrated")
    lines = [f"- `pruned_int8.pt2`: int8 (PT2E, {how}), top-1 "
             f"{_cell(q['val_acc'])}% val / {_cell(q['test_acc'])}% test, {q['pt2_bytes']} bytes; "
             "`import torch.ao.quantization.fx._decomposed`, then "
             f"`torch.export.load('{files['pruned_int8.pt2']}').module()`"]
    if q.get("onnx_bytes"):
        lines.append(f"- `pruned_int8.onnx`: int8 QDQ, {q['onnx_bytes']} bytes")
    rts = (q.get("runtimes") or {}).get("by_runtime")
    if rts:
        ref = report["reference"]
        lines += ["", f"int8 latency ({ref} float32, pruned float32 and pruned int8 timed in alternating rounds, ms; "
                  f"speed-ups over the {ref}):", "",
                  "| runtime | batch | " + f"{ref} | pruned | pruned int8 | speed-up pruned | speed-up pruned int8 |",
                  "|---|---|---|---|---|---|---|"]
        for rt, r in rts.items():
            for b in ("b1", "b64"):
                lines.append(f"| {rt} | {b[1:]} | {r[f'teacher_{b}_ms']:.3f} | {r[f'pruned_{b}_ms']:.3f} | "
                             f"{r[f'pruned_int8_{b}_ms']:.3f} | {r[f'pruned_speedup_{b}']:.2f}x | "
                             f"{r[f'pruned_int8_speedup_{b}']:.2f}x |")
        lines += [f"**Warning**: {w}" for w in q["runtimes"]["warnings"]]
    return lines


def write_report(report: dict, out: str | Path) -> None:
    """report.md (teacher vs pruned, how it was chosen, files) and report.json, each atomically; JSON last."""
    out = Path(out)
    t, p, ref = report["teacher"], report["pruned"], report["reference"]

    def row(name: str, a: str, b: str, change: str) -> str:
        return f"| {name} | {a} | {b} | {change} |"

    acc_change = "–" if report["test_acc_change"] is None else f"{report['test_acc_change']:+.2f} points"
    val_change = "–" if None in (t["val_acc"], p["val_acc"]) else f"{p['val_acc'] - t['val_acc']:+.2f} points"
    lines = [
        f"# amas {report['command']}: {report['model']} on {report['dataset']} ({report['method']})", "",
        f"| | {ref} | pruned | change |", "|---|---|---|---|",
        row(f"test {_metric_name(report)} %", _cell(t["test_acc"]), _cell(p["test_acc"]), acc_change),
        row(f"validation {_metric_name(report)} %", _cell(t["val_acc"]), _cell(p["val_acc"]), val_change),
        row("MACs", f"{t['macs'] / 1e6:.3f}M", f"{p['macs'] / 1e6:.3f}M", f"-{100 * report['macs_reduction']:.1f}%"),
        row("params", f"{t['params'] / 1e6:.4f}M", f"{p['params'] / 1e6:.4f}M",
            f"-{100 * report['params_reduction']:.1f}%"),
        row("latency batch 1 (ms)", f"{t['latency_b1_ms']:.3f}", f"{p['latency_b1_ms']:.3f}",
            f"{report['speedup_b1']:.2f}x faster"),
        row("latency batch 64 (ms)", f"{t['latency_b64_ms']:.3f}", f"{p['latency_b64_ms']:.3f}",
            f"{report['speedup_b64']:.2f}x faster"),
        *[row(f"latency batch {k[9:-3]} (ms)", f"{t[k]:.3f}", f"{p[k]:.3f}",
              f"{report['speedup_' + k[8:-3]]:.2f}x faster") for k in _more_batches(report)],
        "", f"Latency measured on {report['latency_device']}. Test {_metric_name(report)} is evaluated once, at export"
        + ("; the selection used the held-out validation split only." if report["selection"] else "."), "",
        *_runtime_lines(report), *_selection_lines(report),
        "## Files", "",
        f"- `pruned.pt`: `amas.load_pruned('{report['files']['pruned.pt']}')` (weights_only)",
        f"- `pruned.pt2`: `torch.export.load('{report['files']['pruned.pt2']}').module()` (no amas needed)",
    ]
    if "pruned.onnx" in report["files"]:
        lines.append(f"- `pruned.onnx`: onnxruntime `InferenceSession('{report['files']['pruned.onnx']}')`")
    lines += _int8_lines(report)
    lines += [f"- {n}" for n in report["notes"]]
    if report["stage_wall_s"]:
        lines += ["", "## Stage wall times (s)", ""] + [f"- {k}: {v:.1f}" for k, v in report["stage_wall_s"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
