"""Compare pruning methods on one teacher: every criterion in amas.criteria, Torch-Pruning's MagnitudePruner, and AMAS.

For each MACs-reduction target (default 50% and 75%) and seed (default 0 and 1), every method cuts a copy of the
same dense teacher to the target, the cut model is evaluated on the test split (accuracy before fine-tuning),
fine-tuned with the same budget for all (the engine's Trainer with the default cross-entropy Objective,
``--epochs`` epochs, SGD + cosine, ``--lr``), and evaluated again. Rows: accuracy before and after fine-tuning,
MACs and params (amas.channels.cost.count), measured CPU latency at batch 64 and 1 (amas.latency.timing.latency), and
wall time (planning + cutting, fine-tuning). The summary gives mean ± sample standard deviation over the seeds, so a
difference between methods can be told from noise; JSON and Markdown go to ``benchmarks/results/``, rewritten
after every run (``--resume`` skips the runs already in the JSON).

Methods: ``amas.criteria.METHODS`` (planned by ``plan_for_method`` with the config's ``criteria`` and ``prune``
sections: round_to, min_channels; where a target is out of reach at ``prune.round_to``, round_to is halved for
that target, for every method alike, and the tables say so; a dead group, all scores zero, keeps min_channels
unrounded) and
``tp_magnitude``: ``tp.pruner.MagnitudePruner`` with L2 magnitude importance and Torch-Pruning's own uniform
per-layer ratio, restricted to amas' prunable groups (the option-A shortcut trap), with the same
round_to where Torch-Pruning's rounding can reach the target (see ``common.tp_magnitude_prune``), its ratio the smallest
that meets the MACs target. ``amas``: the AMAS search (``adversarial.search`` with the search section of
``--amas-config``, the pipeline recipe by default; ``--amas-search-epochs`` shortens it) from the same teacher to the
target, then the searched student is cut at the target by its masks (folded in) and fine-tuned like every other
method; its wall time includes the search. ``--amas-run DIR`` (repeatable) adds an ``amas_pipeline`` row from a
finished ``amas prune`` run: its ``pruned.pt`` is evaluated here on the same test split (MACs, params, latency
measured here too; it was fine-tuned by the pipeline with its own, larger budget, so "before" is empty); its wall
time is the pipeline's stage times from ``report.json``; the row joins the target nearest its MACs reduction.
``--merge A.json B.json`` combines runs made in parallel (e.g. one process per target) into one table.

The data split is the one the teacher was trained on (its record names the dataset); fine-tuning uses the
training split without the held-out validation images, which only blend's fitness reads; the test split is only
ever evaluated.

Smoke run (seconds to minutes; tiny subsets, one target)::

    python benchmarks/compare.py --teacher T.pt --methods l1,tp_magnitude --targets 0.5 --seeds 0 1 --epochs 1 \\
        --train-subset 512 --test-subset 256 --val-size 256
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    DEFAULT_AMAS_CONFIG,
    DEFAULT_TEACHER,
    ROOT,
    SearchSetup,
    amas_cut,
    cpu_latency,
    feasible_round_to,
    fmt,
    out_channels,
    read_results,
    relatency,
    stats,
    tp_magnitude_prune,
)
from torch import nn

from amas.channels.cost import CostModel, count
from amas.channels.cut import prune_model
from amas.channels.groups import find_groups
from amas.config import TrainConfig, load_config, to_dict
from amas.criteria import METHODS, check_method, plan_for_method, prepare_model
from amas.data import build_data
from amas.distributed import resolve_device
from amas.engine.loop import Trainer, evaluate
from amas.errors import AmasError, CriteriaError
from amas.files.atomic import atomic_write_text
from amas.files.checkpoint import load_model
from amas.pipeline.context import seed_everything

OUTSIDE = ("tp_magnitude",)
ALL_METHODS = ("amas",) + METHODS + OUTSIDE


# ---------------------------------------------------------------- one run


def _finetune_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
                       weight_decay=5e-4, schedule="cosine", device=args.device, progress=False, log_every=10_000,
                       amp=False, channels_last=True)


def run_one(method: str, target: float, seed: int, teacher: nn.Module, groups: list, cost: CostModel, data: Any,
            cfg: Any, args: argparse.Namespace, device: torch.device, round_to: int) -> dict:
    """Cut, evaluate, fine-tune and evaluate one (method, target, seed); returns the row."""
    info = data.info
    prune_cfg = dataclasses.replace(cfg.prune, round_to=round_to)
    shape = info.input_shape
    seed_everything(seed)
    t0 = time.perf_counter()
    source = copy.deepcopy(teacher)
    extra: dict[str, Any] = {}
    if method == "amas":
        setup = SearchSetup(config=args.amas_config, search_epochs=args.amas_search_epochs, val_size=args.val_size,
                            train_subset=args.train_subset, device=args.device, teacher=args.teacher)
        pruned, keep, search_info = amas_cut(target, seed, groups, cost, setup, prune_cfg, device)
        extra["kept"] = {n: int(v.numel()) for n, v in keep.items()}
        extra.update(search_info)
    elif method == "tp_magnitude":
        pruned, ratio, used, search_s = tp_magnitude_prune(source, groups, target, shape, round_to)
        extra["tp_pruning_ratio"] = round(ratio, 4)
        extra["kept"] = {g.name: int(out_channels(pruned.get_submodule(g.name))) for g in groups}
        extra["tp_round_to"] = used
        t0 = time.perf_counter() - search_s  # a cut reused from an earlier seed still counts its search time
    else:
        prepare_model(method, source, groups, data.train, cfg.criteria, num_classes=info.num_classes)
        keep = plan_for_method(method, copy.deepcopy(source), groups, cost, target, train=data.train, val=data.val,
                               cfg=cfg.criteria, prune_cfg=prune_cfg, num_classes=info.num_classes, seed=seed)
        pruned = prune_model(source, groups, keep)
        extra["kept"] = {n: int(v.numel()) for n, v in keep.items()}
    plan_s = time.perf_counter() - t0
    pruned = pruned.to(device)
    before = evaluate(pruned, data.test, info.num_classes, device)["acc"]
    t1 = time.perf_counter()
    if args.epochs > 0:
        with tempfile.TemporaryDirectory(prefix="amas_compare_") as tmp:
            trainer = Trainer(pruned, data.train, _finetune_cfg(args), tmp, num_classes=info.num_classes,
                              stage="finetune", device=device)
            trainer.fit()
            pruned = trainer.model
    ft_s = time.perf_counter() - t1
    after = evaluate(pruned, data.test, info.num_classes, device)["acc"]
    pruned = pruned.cpu().eval()
    macs, params = count(pruned, shape)
    lat = cpu_latency(pruned, shape, args.latency_iters)
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "acc_before": round(before, 3),
        "acc_after": round(after, 3),
        "macs": int(macs),
        "params": int(params),
        "macs_reduction": round(1.0 - macs / cost.total_macs, 4),
        "round_to": round_to,
        **lat,
        "plan_s": round(plan_s, 2),
        "finetune_s": round(ft_s, 2),
        "wall_s": round(plan_s + ft_s, 2),
        **extra,
    }


def amas_rows(run_dirs: list[str], targets: list[float], teacher_macs: int, data: Any, args: argparse.Namespace,
              device: torch.device) -> list[dict]:
    """Rows for finished `amas prune` runs: their pruned.pt measured here on the same test split."""
    from amas.files.pruned import load_pruned

    rows = []
    for d in run_dirs:
        path = Path(d) / "pruned.pt"
        if not path.is_file():
            raise AmasError(f"--amas-run {d}: no pruned.pt there; pass the run directory of a finished `amas prune`")
        model, obj = load_pruned(path, device)
        shape = tuple(int(s) for s in obj["recipe"]["input_shape"])
        acc = evaluate(model, data.test, data.info.num_classes, device)["acc"]
        model = model.cpu().eval()
        macs, params = count(model, shape)
        red = 1.0 - macs / teacher_macs
        wall = None
        report = Path(d) / "report.json"
        if report.is_file():
            stages = json.loads(report.read_text()).get("stage_wall_s") or {}
            wall = round(sum(float(v) for v in stages.values()), 2) if stages else None
        rows.append({"method": "amas_pipeline", "target": min(targets, key=lambda t: abs(t - red)), "seed": None,
                     "acc_before": None, "acc_after": round(acc, 3), "macs": int(macs), "params": int(params),
                     "macs_reduction": round(red, 4), **cpu_latency(model, shape, args.latency_iters),
                     "plan_s": None, "finetune_s": None, "wall_s": wall, "run_dir": str(d)})
    return rows


# ---------------------------------------------------------------- summary and files


def summarise(runs: list[dict], methods: list[str], targets: list[float]) -> list[dict]:
    """Mean ± sd over seeds per (target, method)."""
    out = []
    for t in targets:
        for m in list(dict.fromkeys(["amas", *methods, "amas_pipeline"])):
            rows = [r for r in runs if r["method"] == m and r["target"] == t]
            if not rows:
                continue
            entry = {"target": t, "method": m, "seeds": len(rows)}
            for k in (
                "acc_before",
                "acc_after",
                "macs_reduction",
                "params",
                "latency_b64_ms",
                "latency_b1_ms",
                "wall_s",
            ):
                entry[k] = stats([r.get(k) for r in rows])
            out.append(entry)
    return out


def markdown(result: dict) -> str:
    """The comparison as Markdown tables, one per target."""
    t = result["teacher"]
    lines = [
        f"# Pruning methods compared: {t['model']} on {t['dataset']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Teacher: test acc {t['test_acc']:.2f}%, {t['macs'] / 1e6:.3f}M MACs, {t['params'] / 1e6:.4f}M params, "
        f"latency {t['latency_b64_ms']:.2f} ms (batch 64) / {t['latency_b1_ms']:.3f} ms (batch 1).",
        "",
        f"Fine-tuning for every method: {result['settings']['epochs']} epochs, SGD lr "
        f"{result['settings']['lr']} cosine, "
        f"batch {result['settings']['batch_size']}; seeds "
        f"{result['settings']['seeds']}; train images {result['settings']['train_images']}, test images "
        f"{result['settings']['test_images']}. Values: mean ± sample sd over seeds.",
        "",
    ]
    rt = result["settings"].get("latency_retimed")
    if rt:
        lines += [f"Latency: re-timed after the runs with nothing else running ({rt['threads']} thread(s), CPU, "
                  "channels-last), each architecture rebuilt from its kept channel counts; † marks rows timed during "
                  "the runs instead.", ""]
    for target in result["settings"]["targets"]:
        rt = result["settings"].get("round_to_by_target", {}).get(str(target), result["settings"]["round_to"])
        lines += [f"## Target: {100 * target:.0f}% MACs reduction (kept channels rounded up to multiples of {rt})", "",
                  "| method | MACs ↓ % | params (M) | acc before FT % | acc after FT % | Δ vs teacher | latency b64 ms "
                  "| latency b1 ms | wall s |", "|---|---|---|---|---|---|---|---|---|"]
        rows = [s for s in result["summary"] if s["target"] == target]
        rows.sort(key=lambda s: -(s["acc_after"]["mean"] if s["acc_after"] else -math.inf))
        for s in rows:
            delta = (
                None if s["acc_after"] is None else dict(s["acc_after"], mean=s["acc_after"]["mean"] - t["test_acc"])
            )
            during = any(r.get("latency_source") == "during the run" for r in result["runs"]
                         if r["method"] == s["method"] and r["target"] == target)
            lines.append(
                f"| {s['method']}{' †' if rt and during else ''} | {fmt(s['macs_reduction'], 1, 100)} | "
                f"{fmt(s['params'], 4, 1e-6)} | "
                f"{fmt(s['acc_before'])} | {fmt(s['acc_after'])} | {fmt(delta)} | "
                f"{fmt(s['latency_b64_ms'])} | {fmt(s['latency_b1_ms'], 3)} | {fmt(s['wall_s'], 1)} |"
            )
        tp_rt = {
            r.get("tp_round_to") for r in result["runs"] if r["method"] == "tp_magnitude" and r["target"] == target
        }
        if tp_rt and tp_rt != {rt}:
            lines += ["", f"tp_magnitude: Torch-Pruning rounds remaining channels down to round_to and skips a layer "
                          f"that would reach zero, so it could not reach this target at round_to {rt}; it ran with "
                          f"round_to {', '.join(str(x) for x in sorted(tp_rt))} (ragged widths, slower per MAC)."]
        lines.append("")
    return "\n".join(lines)


def write(result: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.json and NAME.md atomically."""
    j, m = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(j, json.dumps(result, indent=2) + "\n")
    atomic_write_text(m, markdown(result) + "\n")
    return j, m


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="dense amas model file (amas train's model.pt)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75], help="MACs reduction targets")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs, the same for every method")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--train-subset", type=int, default=0, help="first N training images only (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="first N test images only (0 = all)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out validation images (blend's fitness)")
    p.add_argument("--amas-config", default=str(DEFAULT_AMAS_CONFIG),
                   help="YAML whose search section the in-process amas method uses (default: the pipeline recipe)")
    p.add_argument("--amas-search-epochs", type=int, default=0,
                   help="search epochs for the amas method (0: the --amas-config value)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files (same teacher and "
                   "settings, e.g. one per target from parallel runs) into --name and print the table")
    p.add_argument("--retime-latency", action="store_true", help="with --merge: re-time every run's architecture "
                   "(rebuilt from its kept counts) and the teacher now; run it on an otherwise idle machine")
    p.add_argument("--amas-run", action="append", default=[], help="finished `amas prune` run directory (repeatable)")
    p.add_argument("--config", help="optional YAML whose criteria/prune sections are used (e.g. prune.round_to)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--latency-iters", type=int, default=20)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", help="output file stem (default compare_<dataset>_<model>)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON and skip them")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. prune.round_to=1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit status."""
    args = parse_args(argv)
    try:
        return _main(args, argv)
    except AmasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def merge(paths: list[str], out_dir: Path, name: str | None, retime: bool = False, iters: int = 20) -> int:
    """Merge result files of the same teacher (e.g. one per target, run in parallel) into one; print the table."""
    parts = read_results(paths, "a compare")
    teachers = {json.dumps(r["teacher"].get("path")) for r in parts}
    if len(teachers) > 1:
        raise AmasError(
            f"--merge: the files come from different teachers ({', '.join(sorted(teachers))}); merge one teacher's runs"
        )
    result = copy.deepcopy(parts[0])
    settings = result["settings"]
    runs: dict[tuple, dict] = {}
    for r in parts:
        for run in r["runs"]:
            runs[(run["method"], run["target"], run["seed"], run.get("run_dir"))] = run
        s = r["settings"]
        settings["targets"] = sorted(set(settings["targets"]) | set(s["targets"]))
        settings["seeds"] = sorted(set(settings["seeds"]) | set(s["seeds"]))
        settings["methods"] = settings["methods"] + [m for m in s["methods"] if m not in settings["methods"]]
        settings.setdefault("round_to_by_target", {}).update(s.get("round_to_by_target", {}))
    result["runs"] = list(runs.values())
    result["command"] = " ; ".join(dict.fromkeys(r["command"] for r in parts))
    if retime:
        relatency(result, iters)
    result["summary"] = summarise(result["runs"], settings["methods"], settings["targets"])
    j, m = write(result, out_dir, name or Path(paths[0]).stem)
    print(markdown(result))
    print(f"wrote {j} and {m}")
    return 0


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.merge:
        return merge(args.merge, Path(args.out_dir), args.name, args.retime_latency, args.latency_iters)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        check_method(m, ALL_METHODS)
    teacher_path = Path(args.teacher)
    if not teacher_path.is_file():
        raise CriteriaError(f"teacher '{teacher_path}' does not exist; train one with `amas train --config "
                            f"configs/fmnist_resnet20.yaml` and pass its model.pt with --teacher")
    device = resolve_device(args.device)
    teacher, obj = load_model(teacher_path, "cpu")
    rec = obj["model"]
    data_name = rec["data"]["name"]
    cfg = load_config(args.config, [f"data.name={data_name}", f"data.val_size={args.val_size}",
                                    f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
                                    *args.overrides])
    shape = (rec["data"]["in_channels"], rec["data"]["image_size"], rec["data"]["image_size"])
    groups = find_groups(teacher, shape, residual=cfg.prune.residual_channels)
    cost = CostModel(teacher, groups, shape)
    out_dir = Path(args.out_dir)
    name = args.name or f"compare_{data_name}_{rec['name']}"
    command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])

    data0 = build_data(cfg.data, args.batch_size, args.eval_batch_size, device=device, seed=args.seeds[0],
                       channels_last=True)
    t_acc = evaluate(teacher.to(device), data0.test, data0.info.num_classes, device)["acc"]
    teacher = teacher.cpu().eval()
    t_macs, t_params = count(teacher, shape)
    result: dict[str, Any] = {
        "command": command,
        "teacher": {"path": str(teacher_path), "model": rec["name"], "dataset": data_name, "test_acc": round(t_acc, 3),
                    "num_classes": int(data0.info.num_classes), "input_shape": list(shape),
                    "macs": int(t_macs), "params": int(t_params), **cpu_latency(teacher, shape, args.latency_iters)},
        "settings": {"targets": args.targets, "seeds": args.seeds, "methods": methods, "epochs": args.epochs,
                     "lr": args.lr, "batch_size": args.batch_size, "round_to": cfg.prune.round_to,
                     "min_channels": cfg.prune.min_channels, "train_images": data0.train.num_samples,
                     "val_images": data0.val.num_samples if data0.val is not None else 0,
                     "test_images": data0.test.num_samples, "device": str(device), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "criteria": to_dict(cfg.criteria)},
        "runs": [], "summary": [],
    }
    jpath = out_dir / f"{name}.json"
    if args.resume and jpath.is_file():
        result["runs"] = [r for r in json.loads(jpath.read_text()).get("runs", []) if r["method"] != "amas_pipeline"]
    done = {(r["method"], r["target"], r["seed"]) for r in result["runs"]}
    datas = {args.seeds[0]: data0}
    round_tos = {t: feasible_round_to(cost, t, cfg.prune.round_to, cfg.prune.min_channels) for t in args.targets}
    result["settings"]["round_to_by_target"] = {str(t): r for t, r in round_tos.items()}
    for target in args.targets:
        for seed in args.seeds:
            if seed not in datas:  # the seed drives the fine-tuning shuffle and augmentation
                datas[seed] = build_data(cfg.data, args.batch_size, args.eval_batch_size, device=device, seed=seed,
                                         channels_last=True)
            data = datas[seed]
            for method in methods:
                if (method, target, seed) in done:
                    continue
                row = run_one(method, target, seed, teacher, groups, cost, data, cfg, args, device, round_tos[target])
                result["runs"].append(row)
                result["summary"] = summarise(result["runs"], methods, args.targets)
                write(result, out_dir, name)
                print(f"{method:>12} target {target:.2f} seed {seed}: -{100 * row['macs_reduction']:.1f}% MACs, "
                      f"acc {row['acc_before']:.2f} -> {row['acc_after']:.2f}, b64 {row['latency_b64_ms']:.2f} ms, "
                      f"{row['wall_s']:.1f} s", flush=True)
    if args.amas_run:
        result["runs"] += amas_rows(args.amas_run, args.targets, t_macs, data0, args, device)
    result["summary"] = summarise(result["runs"], methods, args.targets)
    j, m = write(result, out_dir, name)
    print(markdown(result))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
