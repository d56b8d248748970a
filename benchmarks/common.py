"""What the method-comparison benchmarks share (compare.py and equal_compute.py import it; not a script itself).

The repository's default teacher and AMAS recipe, the Torch-Pruning reference cut (``tp_magnitude_prune``), round_to
halved until a target is reachable (``feasible_round_to``), AMAS as a channel chooser (``amas_cut``, set up by a
``SearchSetup`` rather than a script's command-line options), a cut layer's channel count, the CPU latency of a model
at batch 64 and 1 and its re-timing after the runs (``cpu_latency``, ``relatency``), mean ± sd over seeds and its
table cell (``stats``, ``fmt``), and reading the result files given to ``--merge`` (``read_results``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.channels.cost import CostModel, count
from amas.channels.cut import prune_model
from amas.channels.plan import plan_keep
from amas.config import load_config
from amas.errors import AmasError, PruneError
from amas.files.checkpoint import load_model
from amas.latency.timing import latency

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = ROOT / "benchmarks" / "teachers" / "fmnist_resnet20.pt"
DEFAULT_AMAS_CONFIG = ROOT / "configs" / "fmnist_resnet20_amas.yaml"


# ---------------------------------------------------------------- Torch-Pruning reference


_TP_CACHE: dict[tuple[float, int, bool], tuple[nn.Module, float, int, float]] = {}


def tp_magnitude_prune(model: nn.Module, groups: list, target: float, shape: tuple[int, int, int], round_to: int,
                       refine: int = 7, fallback: bool = True) -> tuple[nn.Module, float, int, float]:
    """Torch-Pruning MagnitudePruner (L2, uniform per-layer ratio) on amas' groups: (model, ratio, round_to, search s).

    The ratio is the smallest on a 0.05 grid (refined by bisection) whose cut meets the target; the search time is
    returned with the cut (and again for a cached cut, so every seed's wall time counts it). Torch-Pruning
    rounds a layer's remaining channels *down* to round_to and leaves a layer alone when that gives zero, so with
    round_to 8 a 16-channel layer cannot go below 8 and a ResNet-20 tops out just under 50%; when the target is
    out of reach at round_to, the pruner runs without rounding (round_to 1) and the row says so, or, with
    fallback=False, a PruneError says the target is out of reach.
    """
    import torch_pruning as tp

    key = (float(target), int(round_to), bool(fallback))
    if key in _TP_CACHE:  # deterministic: the same cut for every seed
        m, ratio, used, took = _TP_CACHE[key]
        return copy.deepcopy(m), ratio, used, took
    t0 = time.perf_counter()
    roots = {g.name for g in groups}
    device = next(model.parameters()).device
    example = torch.randn(1, *shape, device=device)
    dense = count(model, shape)[0]

    def cut(ratio: float, rt: int) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model).eval()
        ignored = [mod for name, mod in m.named_modules()
                   if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and name not in roots]
        pruner = tp.pruner.MagnitudePruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=ignored, round_to=rt if rt > 1 else None)
        pruner.step()
        return m, 1.0 - count(m, shape)[0] / dense

    most = 0.0
    for rt in ([round_to, 1] if round_to > 1 and fallback else [round_to]):
        prev = 0.0
        for k in range(1, 20):
            ratio = k / 20
            m, red = cut(ratio, rt)
            most = max(most, red)
            if red >= target:
                lo, hi, best = prev, ratio, (m, red)
                for _ in range(refine):
                    mid = (lo + hi) / 2
                    m2, red2 = cut(mid, rt)
                    if red2 >= target:
                        hi, best = mid, (m2, red2)
                    else:
                        lo = mid
                took = time.perf_counter() - t0
                _TP_CACHE[key] = (best[0], hi, rt, took)
                return copy.deepcopy(best[0]), hi, rt, took
            prev = ratio
    raise PruneError(f"Torch-Pruning's magnitude pruner reaches only {100 * most:.1f}% MACs reduction on the "
                     f"prunable groups; lower the target")


def out_channels(module: nn.Module) -> int:
    """The output channels (conv) or features (linear) of a layer."""
    return int(module.out_channels if hasattr(module, "out_channels") else module.out_features)


# ---------------------------------------------------------------- planning and the AMAS cut


def feasible_round_to(cost: CostModel, target: float, round_to: int, min_channels: int) -> int:
    """round_to, halved until the target is reachable (e.g. a net whose groups are all narrower than it)."""
    uniform = {n: torch.ones(g.size) for n, g in cost.groups.items()}
    while True:
        try:
            plan_keep(uniform, cost, target, min_channels, round_to)
            return round_to
        except PruneError:
            if round_to <= 1:
                raise
            round_to = max(1, round_to // 2)


@dataclasses.dataclass(frozen=True)
class SearchSetup:
    """What amas_cut's search reads besides the target: the recipe, its length, the data split, device and teacher."""

    config: str | Path  # YAML whose search section the search uses
    search_epochs: int  # search epochs (0: the config's value)
    val_size: int  # held-out validation images
    train_subset: int  # first N training images only (0 = all)
    device: str  # cpu, cuda or auto
    teacher: str | Path  # dense amas model file


def amas_cut(
    target: float,
    seed: int,
    groups: list,
    cost: CostModel,
    setup: SearchSetup,
    prune_cfg: Any,
    device: torch.device,
    extra_overrides: list[str] | None = None,
    mask_scales: bool = False,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """AMAS as a channel chooser: search masks for the target from the teacher, cut the searched student there.

    mask_scales: also return the masks folded into each BN (info["_mask_scales"], amas.channels.step_scales)."""
    from amas.channels.step_scales import folded_mask_scales
    from amas.files.checkpoint import load_masked
    from amas.pipeline.search import search

    overrides = [
        *(extra_overrides or []),
        f"seed={seed}",
        f"search.target_reduction={target}",
        f"data.val_size={setup.val_size}",
        f"data.train_subset={setup.train_subset}",
        f"search.train.device={setup.device}",
        "search.train.progress=false",
    ]
    if setup.search_epochs:  # a benchmark that sets the length counts it: search.min_steps may not lengthen it
        overrides += [f"search.train.epochs={setup.search_epochs}", "search.min_steps=0"]
    acfg = load_config(setup.config, overrides)
    with tempfile.TemporaryDirectory(prefix="amas_compare_search_") as tmp:
        rec = search(acfg, tmp, setup.teacher)
        student, masks, _ = load_masked(Path(tmp) / "search.pt", "cpu")
    scores = {n: torch.as_tensor(m).abs() for n, m in masks.items()}
    keep = plan_keep(scores, cost, target, min_channels=prune_cfg.min_channels, round_to=prune_cfg.round_to)
    pruned = prune_model(student.requires_grad_(True), groups, keep, masks=masks, input_shape=cost.input_shape)
    info = {
        "search_epochs": int(rec["epochs"]),
        "search_macs_reduction": round(float(rec["macs_reduction"]), 4),
        "search_val_acc": round(float(rec.get("val_acc", float("nan"))), 3),
        "search_final_lr": rec.get("final_lr"),
    }
    if mask_scales:  # the same cut with the masks not folded gives each BN's folded mask
        plain = prune_model(student, groups, keep, input_shape=cost.input_shape)
        info["_mask_scales"] = folded_mask_scales(pruned, plain)
    return pruned, keep, info


# ---------------------------------------------------------------- latency


def cpu_latency(model: nn.Module, shape: tuple[int, int, int], iters: int) -> dict:
    """Median CPU latency in ms at batch 64 and batch 1: {"latency_b64_ms", "latency_b1_ms"}."""
    b64 = latency(model, shape, batch_size=64, warmup=2, iters=max(3, iters // 4), device="cpu")
    b1 = latency(model, shape, batch_size=1, warmup=3, iters=iters, device="cpu")
    return {"latency_b64_ms": round(b64["median_ms"], 3), "latency_b1_ms": round(b1["median_ms"], 3)}


def relatency(result: dict, iters: int) -> None:
    """Re-time every run whose kept counts are recorded, and the teacher, now (on an otherwise idle machine).

    Latency depends only on the architecture, so each run's model is rebuilt from its kept counts (random weights);
    runs without kept counts keep the latency measured during the run and say so.
    """
    from amas.channels.cut import make_recipe, model_from_recipe

    t = result["teacher"]
    path = Path(t["path"]) if Path(t["path"]).is_absolute() else ROOT / t["path"]  # repo-relative in new results
    teacher, obj = load_model(path, "cpu")
    rec = obj["model"]
    shape = (int(rec["data"]["in_channels"]), int(rec["data"]["image_size"]), int(rec["data"]["image_size"]))
    teacher_rec = {"name": rec["name"], "num_classes": int(rec["num_classes"]), "in_channels": shape[0]}
    t.update(cpu_latency(teacher.eval(), shape, iters))
    for run in result["runs"]:
        if not run.get("kept"):
            run["latency_source"] = "during the run"
            continue
        model = model_from_recipe(make_recipe(teacher_rec, shape, run["kept"]))
        run.update(cpu_latency(model, shape, iters))
        run["latency_source"] = "re-timed idle"
    result.setdefault("settings", {})["latency_retimed"] = {"threads": torch.get_num_threads(), "iters": iters}


# ---------------------------------------------------------------- summary and files


def run_tool(cmd: list[str]) -> tuple[float, str | None]:
    """Run a tool's command line (output captured): its wall seconds, and its last stderr line where it failed."""
    import subprocess

    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.perf_counter() - start, 1)
    if done.returncode == 0:
        return wall, None
    lines = [s for s in done.stderr.strip().splitlines() if s.strip()]
    return wall, lines[-1] if lines else f"exit {done.returncode}"


def stats(values: list[float | None]) -> dict | None:
    """Mean, sample sd, min, max and count of the values that are not None; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    """A stats() entry as a table cell: "mean ± sd" (the mean alone for one value, "–" for none)."""
    if s is None:
        return "–"
    if s["n"] == 1:
        return f"{s['mean'] * scale:.{digits}f}"
    return f"{s['mean'] * scale:.{digits}f} ± {s['sd'] * scale:.{digits}f}"


def read_results(paths: list[str], kind: str) -> list[dict]:
    """The JSON result files given to --merge, or a one-line error naming the unreadable one."""
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(Path(p).read_text()))
        except (OSError, ValueError) as e:
            raise AmasError(f"--merge {p}: cannot read it as {kind} result ({e}); "
                            "pass files this script wrote") from None
    return parts
