"""CPU latency of ResNet-56 pruned to 50% MACs against the unpruned model, measured in one run.

    python benchmarks/latency.py [--checkpoint model.pt] [--shape 3x32x32] [--target 0.5] [--round-to 8]
                                 [--batch 64] [--rounds 5] [--iters 10] [--threads N]

The model is a random-init ResNet-56 (or the dense amas model file given by --checkpoint). Channels are
ranked by filter L1 norm per unit of MAC cost (amas.channels.plan.plan_keep), kept counts rounded to multiples of
--round-to, removed with Torch-Pruning (amas.channels.cut.prune_model). Latency is amas.latency.timing.latency (eval,
inference_mode, channels_last): dense and pruned are timed in alternating rounds so a background load on
the machine hits both alike; the median over rounds of each round's median is reported. Pass criterion:
speedup >= 0.8 x the MACs ratio. Writes benchmarks/results/latency.json.

    python benchmarks/latency.py --cost latency [--validate 20] [--runtimes eager,compiled,onnx]

plans by measured latency instead (issue 14): per-layer latency tables of the dense model at --batch and at
batch 1 (amas.latency.model, cached in --tables), then two L1 plans (amas.latency.plan): one to --target-latency
of the dense batch-64 latency, one to --target-latency of its batch-1 latency with block removal allowed. Each
plan is timed against the dense model in alternating rounds on eager PyTorch (with a busy-machine verdict) and
on the other runtimes; the tables' prediction error on --validate random plans is reported. Last line:
``speed-up: batch 64 N.NNx, batch 1 N.NNx`` (eager, each plan at its own batch size). Writes
benchmarks/results/latency_cost.json by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amas.channels.cost import CostModel, count  # noqa: E402
from amas.channels.cut import prune_model  # noqa: E402
from amas.channels.groups import find_groups  # noqa: E402
from amas.channels.plan import kept_counts, plan_keep  # noqa: E402
from amas.config import CriteriaConfig  # noqa: E402
from amas.criteria import channel_scores  # noqa: E402
from amas.files.atomic import atomic_write_text  # noqa: E402
from amas.files.checkpoint import load_model  # noqa: E402
from amas.latency.timing import alternating_latency, latency  # noqa: E402
from amas.models import create_model  # noqa: E402


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, tuple[int, int, int], dict]:
    """The dense model, its pruned copy, the input shape and the plan's numbers."""
    shape = tuple(int(s) for s in args.shape.split("x"))
    if args.checkpoint:
        dense, obj = load_model(args.checkpoint)
        data = obj["model"]["data"]
        shape = (int(data["in_channels"]), int(data["image_size"]), int(data["image_size"]))
        name = obj["model"]["name"]
    else:
        torch.manual_seed(0)
        name = args.model
        dense = create_model(name, num_classes=10, in_channels=shape[0])
    dense.eval()
    groups = find_groups(dense, shape, residual=args.residual)
    cost = CostModel(dense, groups, shape)
    scores = channel_scores("l1", dense, groups, None, CriteriaConfig())  # amas' one L1 criterion
    keep = plan_keep(scores, cost, args.target, round_to=args.round_to)
    pruned = prune_model(dense, groups, keep, input_shape=shape).eval()
    counts = kept_counts(keep)
    dense_macs, dense_params = count(dense, shape)
    macs, params = count(pruned, shape)
    assert macs == cost.macs(counts), "pruned MACs differ from the plan"
    plan = {
        "model": name,
        "input_shape": list(shape),
        "target_reduction": args.target,
        "round_to": args.round_to,
        "residual_channels": args.residual,
        "dense_macs": dense_macs,
        "pruned_macs": macs,
        "dense_params": dense_params,
        "pruned_params": params,
        "macs_ratio": dense_macs / macs,
        "kept": counts,
        "group_sizes": {g.name: g.size for g in groups},
    }
    return dense, pruned, shape, plan


def measure(dense: torch.nn.Module, pruned: torch.nn.Module, shape: tuple[int, int, int], batch: int,
            rounds: int, iters: int) -> dict:
    """Median-of-round-medians latency (ms) of dense and pruned at one batch size, timed alternately."""
    d, p = [], []
    for _ in range(rounds):
        d.append(latency(dense, shape, batch_size=batch, warmup=2, iters=iters)["median_ms"])
        p.append(latency(pruned, shape, batch_size=batch, warmup=2, iters=iters)["median_ms"])
    dm, pm = statistics.median(d), statistics.median(p)
    return {
        "batch": batch,
        "dense_ms": dm,
        "pruned_ms": pm,
        "speedup": dm / pm,
        "dense_rounds_ms": d,
        "pruned_rounds_ms": p,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, write the JSON; returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--checkpoint", help="dense amas model.pt instead of a random-init model")
    ap.add_argument("--shape", default="3x32x32", help="C x H x W, e.g. 3x32x32 or 1x28x28")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of MACs to remove")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                    help="also prune the residual-stage channels (find_groups(residual=True)); --no-residual: "
                         "block-inner channels only")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="alternating (dense, pruned) timing rounds")
    ap.add_argument("--iters", type=int, default=10, help="timed forward passes per round")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", help="JSON result (default: benchmarks/results/latency.json, latency_cost.json with "
                                  "--cost latency)")
    ap.add_argument("--cost", choices=["macs", "latency"], default="macs", help="plan to a MACs or a latency target")
    ap.add_argument("--target-latency", type=float, default=0.5, help="with --cost latency: fraction of the dense "
                                                                      "latency to keep")
    ap.add_argument("--validate", type=int, default=20, help="with --cost latency: random plans to check the tables on")
    ap.add_argument("--runtimes", default="eager,compiled,onnx", help="with --cost latency: runtimes to time on")
    ap.add_argument("--tables", default=str(ROOT / "benchmarks" / "results" / "latency_tables"),
                    help="cache directory of the latency tables")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cost == "latency":
        args.out = args.out or str(ROOT / "benchmarks" / "results" / "latency_cost.json")
        return by_latency(args)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "latency.json")

    dense, pruned, shape, plan = build(args)
    at_batch = measure(dense, pruned, shape, args.batch, args.rounds, args.iters)
    at_one = measure(dense, pruned, shape, 1, args.rounds, args.iters * 4)
    ok = at_batch["speedup"] >= 0.8 * plan["macs_ratio"]
    result = {
        **plan,
        "latency": {f"batch_{args.batch}": at_batch, "batch_1": at_one},
        "criterion": "speedup at batch >= 0.8 x MACs ratio",
        "passed": ok,
        "threads": torch.get_num_threads(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    rows = [
        ("model", f"{plan['model']} {args.shape if not args.checkpoint else shape}"),
        ("MACs dense / pruned", f"{plan['dense_macs'] / 1e6:.2f}M / {plan['pruned_macs'] / 1e6:.2f}M "
                                f"(-{100 * (1 - 1 / plan['macs_ratio']):.1f}%, ratio {plan['macs_ratio']:.2f}x)"),
        ("params dense / pruned", f"{plan['dense_params'] / 1e6:.3f}M / {plan['pruned_params'] / 1e6:.3f}M"),
        (f"latency b{args.batch} dense / pruned", f"{at_batch['dense_ms']:.2f} / {at_batch['pruned_ms']:.2f} ms "
                                                  f"(speedup {at_batch['speedup']:.2f}x)"),
        ("latency b1 dense / pruned", f"{at_one['dense_ms']:.3f} / {at_one['pruned_ms']:.3f} ms "
                                      f"(speedup {at_one['speedup']:.2f}x)"),
        ("criterion", f"{at_batch['speedup']:.2f} >= 0.8 x {plan['macs_ratio']:.2f} = {0.8 * plan['macs_ratio']:.2f}: "
                      f"{'PASS' if ok else 'FAIL'}"),
        ("threads / load avg", f"{result['threads']} / {result['load_avg']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("latency: ResNet-56 pruned vs dense (CPU, channels_last, eval)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"  {'json':<{width}}  {args.out}")
    return result


def by_latency(args: argparse.Namespace) -> dict:
    """--cost latency: plan to half the batch-64 and half the batch-1 latency, time both plans against dense."""
    from amas.channels.blocks import prune_with_blocks, removable_groups
    from amas.latency.model import build_table, validate
    from amas.latency.plan import plan_keep_latency
    from amas.latency.table import runtime_latency
    from amas.latency.whole import random_plans

    shape = tuple(int(s) for s in args.shape.split("x"))
    torch.manual_seed(0)
    dense = create_model(args.model, num_classes=10, in_channels=shape[0]).eval()
    groups = find_groups(dense, shape, residual=args.residual)
    cost = CostModel(dense, groups, shape)
    scores = channel_scores("l1", dense, groups, None, CriteriaConfig())
    blocks = removable_groups(dense, groups)
    result: dict = {"model": args.model, "input_shape": list(shape), "target_latency": args.target_latency,
                    "round_to": args.round_to, "residual_channels": args.residual, "plans": {}}
    speedups = {}
    for batch, allow_blocks in ((args.batch, False), (1, True)):
        table = build_table(dense, groups, shape, batch_size=batch, model_name=args.model, cache_dir=args.tables,
                            iters=args.iters)
        keep = plan_keep_latency(scores, table, args.target_latency, round_to=args.round_to,
                                 blocks=blocks if allow_blocks else None)
        counts = kept_counts(keep)
        pruned = prune_with_blocks(dense, groups, keep, input_shape=shape).eval()
        x = torch.randn((batch, *shape))
        eager = alternating_latency({"dense": _eager(dense, x), "pruned": _eager(pruned, x)}, rounds=args.rounds,
                                    iters=args.iters if batch > 1 else args.iters * 4)
        others = [r for r in args.runtimes.split(",") if r and r != "eager"]
        rt = runtime_latency({"dense": dense, "pruned": pruned}, shape, batches=(batch,), runtimes=others,
                             rounds=args.rounds, iters=args.iters) if others else {"ms": {}, "warnings": []}
        check = validate(table, dense, groups, random_plans(groups, args.validate, seed=1), rounds=3,
                         iters=args.iters if batch > 1 else args.iters * 4) if args.validate else {}
        d, p = eager["models"]["dense"]["median_ms"], eager["models"]["pruned"]["median_ms"]
        speedups[batch] = d / p
        result["plans"][f"batch_{batch}"] = {
            "batch": batch, "block_removal": allow_blocks, "kept": counts,
            "removed_blocks": sorted({blocks[n] for n, k in counts.items() if k == 0 and n in blocks}),
            "macs": cost.macs(counts) if not allow_blocks else count(pruned, shape)[0], "dense_macs": cost.total_macs,
            "predicted_ms": table.predict(counts), "dense_predicted_ms": table.predict({}),
            "eager": {"dense_ms": d, "pruned_ms": p, "speedup": d / p, "busy": eager["busy"],
                      "warning": eager["warning"], "rounds": eager["models"]},
            "runtimes": {r: _ratio(rt["ms"]["dense"][r][f"b{batch}"], rt["ms"]["pruned"][r][f"b{batch}"])
                         for r in rt["ms"].get("dense", {})},
            "runtime_warnings": rt["warnings"],
            "table_median_error": check.get("median_error"), "table_max_error": check.get("max_error"),
        }
        plan = result["plans"][f"batch_{batch}"]
        print(f"batch {batch}: {len(plan['removed_blocks'])} blocks removed, MACs -"
              f"{100 * (1 - plan['macs'] / cost.total_macs):.1f}%, predicted {plan['predicted_ms']:.3f} of "
              f"{plan['dense_predicted_ms']:.3f} ms; eager {d:.3f} -> {p:.3f} ms ({d / p:.2f}x)"
              + "".join(f"; {r} {v['speedup']:.2f}x" for r, v in plan["runtimes"].items())
              + (f"; table error median {100 * check['median_error']:.1f}% max {100 * check['max_error']:.1f}%"
                 if check else ""))
        for w in ([eager["warning"]] if eager["busy"] else []) + rt["warnings"]:
            print(f"  warning: {w}")
    result.update(threads=torch.get_num_threads(), torch=torch.__version__,
                  load_avg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                  cpu=platform.processor() or platform.machine())
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"json: {args.out}")
    print(f"speed-up: batch {args.batch} {speedups[args.batch]:.2f}x, batch 1 {speedups[1]:.2f}x")
    return result


def _ratio(dense_ms: float, pruned_ms: float) -> dict:
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms}


def _eager(model: torch.nn.Module, x: torch.Tensor):
    """One eager forward pass of model on x (eval, inference mode, channels_last), as amas.latency.timing.latency runs
    it."""
    from amas.latency.runtimes import make_runner

    return make_runner(model, x, "eager")


if __name__ == "__main__":
    main()
