"""Latency a user can trust, for the CLI and reports: a config's latency table, and a model on every runtime.

``runtime_latency`` times a model (or several) on each available runtime at each batch size in alternating
rounds (amas.latency.timing) and says when the rounds' spread shows the machine was busy.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from amas.latency.runtimes import available_runtimes, make_runners
from amas.latency.timing import alternating_latency

if TYPE_CHECKING:
    from amas.latency.model import LatencyTable

__all__ = ["int8_comparison", "table_for_config", "runtime_latency", "shared_table", "runtime_comparison"]


def shared_table(model: nn.Module, groups: list, input_shape: Sequence[int], prune_cfg) -> LatencyTable:
    """The latency table of prune_cfg's target, measured on rank 0 only and read from its cache by the other ranks."""
    from amas.distributed import barrier, context
    from amas.latency.model import build_table

    kw = dict(batch_size=prune_cfg.latency_batch, runtime=prune_cfg.latency_runtime,
              cache_dir=Path(prune_cfg.latency_tables).expanduser())
    table = build_table(model, groups, tuple(input_shape), **kw) if context().is_main else None
    barrier()
    return table if table is not None else build_table(model, groups, tuple(input_shape), progress=False, **kw)


def table_for_config(cfg, batch_size: int | None = None, runtime: str | None = None, validate_plans: int = 0,
                     progress: bool = True) -> dict:
    """Build (or load) the latency table of cfg's model at prune.latency_batch on prune.latency_runtime."""
    from amas.channels.groups import find_groups
    from amas.data import dataset_info
    from amas.latency.model import build_table, cache_file, validate
    from amas.latency.whole import random_plans
    from amas.models import create_model

    info = dataset_info(cfg.data)
    shape = info.input_shape
    batch = int(batch_size or cfg.prune.latency_batch)
    runtime = runtime or cfg.prune.latency_runtime
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=shape[0]).eval()
    groups = find_groups(model, shape, residual=cfg.prune.residual_channels, ignore=cfg.prune.ignore)
    cache = Path(cfg.prune.latency_tables).expanduser()
    # keyed by the model's class, as the pipeline's shared_table keys it, so amas prune reuses this table
    table = build_table(model, groups, shape, batch_size=batch, runtime=runtime, cache_dir=cache, progress=progress)
    out = {"model": cfg.model.name, "input_shape": list(shape), "batch_size": batch, "runtime": runtime,
           "threads": table.key["threads"], "layers": len(table.layers), "measured_shapes": len(table.measured),
           "dense_ms": table.dense_ms, "overhead_ms": table.overhead_ms, "table": str(cache_file(cache, table.key))}
    if validate_plans:
        report = validate(table, model, groups, random_plans(groups, validate_plans, seed=cfg.seed))
        out.update(median_error=report["median_error"], max_error=report["max_error"], plans=len(report["plans"]))
    return out


def runtime_latency(models: dict[str, nn.Module], input_shape: Sequence[int], batches: Sequence[int] = (1, 64),
                    runtimes: Sequence[str] | None = None, rounds: int = 5, iters: int = 10,
                    int8_models: Collection[str] = ()) -> dict:
    """Median ms of each model on each runtime and batch, the models timed in alternating rounds; busy verdicts.

    The models named in int8_models run on each runtime's int8 variant (compiled_int8, onnx_int8); a runtime whose
    variants are not installed is left out.
    """
    here = available_runtimes()
    runtimes = [r for r in (runtimes or here) if r in here and (not int8_models or f"{r}_int8" in here)]
    out: dict = {"runtimes": runtimes, "batches": list(batches), "ms": {}, "busy": False, "warnings": []}
    xs = [torch.randn((b, *input_shape)) for b in batches]
    for rt in runtimes:
        by_model = {name: make_runners(m, xs, f"{rt}_int8" if name in int8_models else rt)
                    for name, m in models.items()}
        for i, b in enumerate(batches):
            runners = {name: fns[i] for name, fns in by_model.items()}
            r = alternating_latency(runners, rounds=rounds, iters=iters if b == 1 else max(2, iters // 4))
            for name, rec in r["models"].items():
                out["ms"].setdefault(name, {}).setdefault(rt, {})[f"b{b}"] = rec["median_ms"]
            if r["busy"]:
                out["busy"] = True
                out["warnings"].append(f"{rt} batch {b}: {r['warning']}")
    return out


def runtime_comparison(teacher: nn.Module, pruned: nn.Module, input_shape: Sequence[int], runtimes: Sequence[str],
                       iters: int = 10) -> dict:
    """Teacher vs pruned on each runtime at batch 1 and 64, timed in alternating rounds: ms, speed-ups, warnings."""
    r = runtime_latency({"teacher": copy.deepcopy(teacher).cpu().eval(), "pruned": copy.deepcopy(pruned).cpu().eval()},
                        input_shape, batches=(1, 64), runtimes=runtimes, iters=iters)
    rows = {}
    for rt in r["runtimes"]:
        t, p = r["ms"]["teacher"][rt], r["ms"]["pruned"][rt]
        rows[rt] = {f"{who}_{b}_ms": round(d[b], 4) for who, d in (("teacher", t), ("pruned", p))
                    for b in ("b1", "b64")}
        rows[rt].update(speedup_b1=round(t["b1"] / p["b1"], 3), speedup_b64=round(t["b64"] / p["b64"], 3))
    return {"by_runtime": rows, "busy": r["busy"], "warnings": r["warnings"]}


def int8_comparison(teacher: nn.Module, pruned: nn.Module, input_shape: Sequence[int], runtimes: Sequence[str],
                    iters: int = 10, rounds: int = 5) -> dict:
    """The float teacher, the float pruned model and the pruned model in int8 on each runtime (compiled, onnx; the
    int8 one on its int8 variant) at batch 1 and 64, timed in alternating rounds: ms, speed-ups over the teacher."""
    models = {m: copy.deepcopy(net).cpu().eval() for m, net in (("teacher", teacher), ("pruned", pruned),
                                                                 ("pruned_int8", pruned))}
    r = runtime_latency(models, input_shape, batches=(1, 64), runtimes=runtimes, rounds=rounds, iters=iters,
                        int8_models=("pruned_int8",))
    rows = {}
    for rt in r["runtimes"]:
        ms = {m: r["ms"][m][rt] for m in models}
        rows[rt] = {f"{m}_{b}_ms": round(ms[m][b], 4) for m in models for b in ("b1", "b64")}
        for m in ("pruned", "pruned_int8"):
            rows[rt].update({f"{m}_speedup_{b}": round(ms["teacher"][b] / ms[m][b], 3) for b in ("b1", "b64")})
    return {"by_runtime": rows, "busy": r["busy"], "warnings": r["warnings"]}
