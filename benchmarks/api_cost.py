"""Wall time of amas.prune against `amas prune` on the quickstart slice: same teacher, data, machine, settings.

    python benchmarks/api_cost.py [--rounds 2] [--threads 2] [--quick] [--out benchmarks/results/api_cost.json]

Trains the quickstart teacher once (not timed), then runs, alternating round by round so a background load hits
both alike: `amas prune --config configs/quickstart.yaml --teacher T` and a script that loads T and calls
amas.prune(teacher, train=..., val=..., test=...) on the same Fashion-MNIST slice (amas' own batches of it, as
`amas prune` builds them). Each run is a fresh Python process, timed from start to exit, so imports and start-up
count on both sides; both run the stages after the teacher (search, candidates, select, final, export) with
progress bars off. --quick shrinks every stage to check the script itself in about a minute (not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
QUIET = ["train.progress=false", "search.train.progress=false", "finetune.train.progress=false"]
QUICK = ["data.train_subset=1024", "data.val_size=256", "train.epochs=1", "search.train.epochs=1",
         "finetune.train.epochs=1", "select.levels=[0.5]", "select.budget_epochs=1"]

API_RUN = """
import sys
import amas
from amas.files.checkpoint import load_model
from amas.config import load_config
from amas.pipeline.teacher import stage_data
import torch

config, teacher_path, out_dir, *overrides = sys.argv[1:]
cfg = load_config(config, overrides)
data = stage_data(cfg, cfg.search.train, torch.device("cpu"))  # the slice's batches, as amas prune builds them
teacher, _ = load_model(teacher_path)
amas.prune(teacher, train=data.train, val=data.val, test=data.test, input_shape=data.info.input_shape,
           target_reduction=cfg.search.target_reduction, config=cfg, out_dir=out_dir)
"""


def _timed(cmd: list[str], env: dict) -> float:
    """Seconds from start to exit of cmd (which must succeed)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{r.stderr[-3000:]}")
    return wall


def _stage_walls(run: Path) -> dict[str, float]:
    """Seconds per stage, from the run directory's pipeline.json."""
    log = json.loads((run / "pipeline.json").read_text())
    return {n: r.get("wall_s", 0.0) for n, r in log["stages"].items() if r.get("status") == "done"}


def main(argv: list[str] | None = None) -> dict:
    """Train the teacher, time both entry points in alternating rounds, print and write the result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="tiny stages: checks the script, measures nothing")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "api_cost.json"))
    a = p.parse_args(argv)
    overrides = QUIET + (QUICK if a.quick else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory(prefix="amas-api-cost-") as tmp:
        work = Path(tmp)
        _timed([sys.executable, "-m", "amas", "train", "--config", str(CONFIG), "--out", str(work / "teacher"),
                *overrides], env)
        teacher = work / "teacher" / "model.pt"
        cli = [sys.executable, "-m", "amas", "prune", "--config", str(CONFIG), "--teacher", str(teacher)]
        api = [sys.executable, "-c", API_RUN, str(CONFIG), str(teacher)]
        walls: dict[str, list[float]] = {"amas prune": [], "amas.prune": []}
        stages: dict[str, list[dict]] = {"amas prune": [], "amas.prune": []}
        for i in range(a.rounds):
            order = [("amas prune", cli + ["--out", str(work / f"cli{i}")], work / f"cli{i}"),
                     ("amas.prune", api + [str(work / f"api{i}")], work / f"api{i}")]
            for name, cmd, run in order if i % 2 == 0 else order[::-1]:
                walls[name].append(round(_timed(cmd + overrides, env), 2))
                stages[name].append(_stage_walls(run))
                print(f"round {i + 1}: {name} {walls[name][-1]:.1f} s {stages[name][-1]}", flush=True)
    result = {"config": str(CONFIG.relative_to(ROOT)), "quick": a.quick, "rounds": a.rounds, "threads": a.threads,
              "wall_s": walls, "median_s": {k: statistics.median(v) for k, v in walls.items()}, "stage_s": stages,
              "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
              "python": platform.python_version()}
    print(json.dumps(result["median_s"]))
    if not a.quick:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
