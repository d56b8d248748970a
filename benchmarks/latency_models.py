"""Latency of saved models against the first one, timed in alternating rounds in one run, on each runtime.

    python benchmarks/latency_models.py teacher=runs/a/teacher/model.pt macs=runs/a/final/pruned.pt \\
        latency=runs/b/final/pruned.pt [--runtimes eager,compiled,onnx] [--rounds 5] [--threads 1] [--out F.json]

Each NAME=FILE is an amas model.pt or pruned.pt; the first is the reference of the speed-ups. The models are
timed in turn, round after round, at batch 1 and 64 on each runtime installed (amas.latency.table), so a
background load hits all alike, and the output says when the spread shows the machine was busy. Prints a table
and writes JSON (default benchmarks/results/latency_models.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from amas.errors import CheckpointError
from amas.files.checkpoint import load_model
from amas.files.pruned import load_pruned
from amas.latency.table import runtime_latency

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str) -> tuple[torch.nn.Module, list[int]]:
    """The model in a model.pt or pruned.pt, and the input shape its file records."""
    try:
        model, obj = load_pruned(path)
        return model, list(obj.get("input_shape") or obj["recipe"]["input_shape"])
    except CheckpointError as e:
        if "'pruned' file is needed" not in str(e):
            raise SystemExit(f"error: {e}") from None
    model, obj = load_model(path)
    data = obj["model"]["data"]
    return model, [data["in_channels"], data["image_size"], data["image_size"]]


def main(argv: list[str] | None = None) -> dict:
    """Load the models, time them in alternating rounds, print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=FILE")
    p.add_argument("--runtimes", default="eager,compiled,onnx", help="those installed are timed")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_models.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    models, shapes = {}, set()
    for item in a.models:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r} is not NAME=FILE; name each model, e.g. teacher=runs/x/model.pt")
        models[name], shape = _load(path)
        shapes.add(tuple(shape))
    if len(shapes) != 1:
        raise SystemExit(f"error: the models take different inputs {sorted(shapes)}; compare models of one dataset")
    shape = shapes.pop()
    r = runtime_latency(models, shape, batches=(1, 64), runtimes=a.runtimes.split(","), rounds=a.rounds)
    ref = next(iter(models))
    print(f"{'model':<12}" + "".join(f"{rt + ' b' + b:>22}" for rt in r["runtimes"] for b in ("1", "64")))
    for name in models:
        cells = []
        for rt in r["runtimes"]:
            for b in ("b1", "b64"):
                ms, base = r["ms"][name][rt][b], r["ms"][ref][rt][b]
                cells.append(f"{ms:9.3f} ms {base / ms:5.2f}x")
        print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells))
    for w in r["warnings"]:
        print(f"warning: {w}")
    result = {**r, "reference": ref, "files": dict(item.partition("=")[::2] for item in a.models),
              "input_shape": list(shape), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
