"""Pruning methods at equal compute: every method gets the same E training epochs over the same data.

Each run takes a copy of one dense teacher to a MACs-reduction target and trains for exactly ``E`` epochs in all
(``--budgets``), counted as passes over the training split with the teacher's forward in every step:

* a criterion (``l1``, ``fpgm``, ``taylor``, ``random``, any of ``amas.criteria.METHODS``) scores the teacher's
  channels (a few batches for the data-driven ones; a criterion that trains to score, network slimming, counts its
  epochs against E), the cut is made at the target and fine-tuned for the rest of E;
* ``tp_magnitude``: Torch-Pruning's MagnitudePruner (L2, uniform per-layer ratio) at the same round_to, only where its
  rounding can reach the target (otherwise the cell is skipped and the table says so), then fine-tuned for E;
* ``amas``: the mask search from the teacher to the target for S = round(E × f) epochs
  (``--amas-search-fraction``; at least 1, at most E − 1; the recipe's search section), the searched student cut at the
  target by its masks (folded in), then fine-tuned for E − S epochs.

Fine-tuning is the pipeline's (amas.pipeline.candidates.finetune_trainer: CE + KD + adversarial against the same
teacher, the recipe's ``finetune`` section, cosine schedule) for every method; ``--finetune-lr METHOD=LR`` sets one
method's learning rate (chosen on the validation split, see the README), so methods differ only in how channels are
chosen, what the weights went through before the cut and, where set, that learning rate. Validation accuracy comes from
the held-out split of the training set (the teacher never saw it); the test split is only evaluated.

Rows go to ``benchmarks/results/<name>.json`` (``"rows"``: method, target, budget_epochs, seed, test_acc, val_acc,
macs_reduction, params, latency_b64_ms, latency_b1_ms, wall_s and details; ``"teacher"``), rewritten after every
run; ``--resume`` skips the runs already there, so a grid can be spread over processes and sessions and merged
(``--merge A.json B.json --retime-latency``, on an idle machine: each architecture is rebuilt from its kept counts
and timed again). ``--markdown`` and ``--plot`` write the table (mean ± sd over seeds) and accuracy against MACs per
budget.

Smoke run (seconds)::

    python benchmarks/equal_compute.py --methods l1,amas --targets 0.5 --budgets 2 --seeds 0 \\
        --train-subset 512 --test-subset 256 --val-size 256 --name smoke
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
from amas.channels.step_scales import scale_folded_grads
from amas.config import load_config, to_dict
from amas.criteria import METHODS, channel_scores, check_method, plan_for_method, prepare_model
from amas.data import build_data
from amas.distributed import resolve_device
from amas.engine.loop import evaluate
from amas.errors import AmasError, PruneError
from amas.files.atomic import atomic_path, atomic_write_text
from amas.files.checkpoint import load_model
from amas.pipeline.candidates import finetune_trainer
from amas.pipeline.context import seed_everything

ALL_METHODS = ("amas",) + METHODS + ("tp_magnitude", "amas_arch")
DEFAULT_METHODS = ("amas", "taylor", "fpgm", "l1", "random", "tp_magnitude")
ROW_KEYS = ("method", "target", "budget_epochs", "seed", "test_acc", "val_acc", "macs_reduction", "params",
            "latency_b64_ms", "latency_b1_ms", "wall_s")


def search_epochs(budget: int, fraction: float) -> int:
    """AMAS search epochs S out of a budget of E: round(E·fraction), at least 1, leaving at least 1 to fine-tune."""
    if budget < 2:
        raise AmasError(f"an AMAS run needs a budget of at least 2 epochs (search + fine-tune), got {budget}")
    return max(1, min(budget - 1, int(round(budget * fraction))))


def _val(model: nn.Module, data: Any, device: torch.device) -> float | None:
    return None if data.val is None else evaluate(model, data.val, data.info.num_classes, device)["acc"]


def amas_search_cut(
    target: float,
    seed: int,
    epochs: int,
    budget: int,
    groups: list,
    cost: CostModel,
    cfg: Any,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[nn.Module, dict]:
    """AMAS search for `epochs` epochs from the teacher to the target, its student cut there by the masks."""
    # with --amas-continue-schedule the search runs the first S epochs of one E-epoch schedule
    cont = [f"search.schedule_epochs={budget}"] if args.amas_continue_schedule else []
    setup = SearchSetup(config=args.config, search_epochs=epochs, val_size=args.val_size,
                        train_subset=args.train_subset, device=args.device, teacher=args.teacher)
    overrides = [*args.overrides, f"prune.round_to={cfg.prune.round_to}", *cont]
    pruned, keep, info = amas_cut(target, seed, groups, cost, setup, cfg.prune, device, extra_overrides=overrides,
                                  mask_scales=args.amas_keep_mask_scale)
    info["kept"] = {n: int(v.numel()) for n, v in keep.items()}
    return pruned, info


def criterion_cut(method: str, target: float, seed: int, teacher: nn.Module, groups: list, cost: CostModel, data: Any,
                  cfg: Any) -> tuple[nn.Module, dict, int]:
    """Score the teacher's channels by a criterion and cut at the target: (model, details, epochs spent scoring)."""
    source = copy.deepcopy(teacher).requires_grad_(True)
    spent = 0
    if method == "bn_scale" and cfg.criteria.bn_sparsity:
        spent = int(cfg.criteria.bn_sparsity_train.epochs)  # network slimming trains before it scores
    prepare_model(method, source, groups, data.train, cfg.criteria, num_classes=data.info.num_classes)
    keep = plan_for_method(method, copy.deepcopy(source), groups, cost, target, train=data.train, val=data.val,
                           cfg=cfg.criteria, prune_cfg=cfg.prune, num_classes=data.info.num_classes, seed=seed)
    return prune_model(source, groups, keep), {"kept": {n: int(v.numel()) for n, v in keep.items()}}, spent


def arch_cut(target: float, budget: int, seed: int, teacher: nn.Module, groups: list, cfg: Any,
             args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Ablation: the kept counts of the AMAS run in --arch-from, channels chosen by L1 from the teacher's weights."""
    row = args.arch_rows.get((target, budget, seed))
    if row is None:
        raise AmasError(f"--arch-from has no amas row for target {target}, E={budget}, seed {seed}")
    source = copy.deepcopy(teacher).requires_grad_(True)
    scores = channel_scores("l1", source, groups, None, cfg.criteria)
    keep = {g.name: torch.sort(torch.topk(scores[g.name], row["kept"][g.name]).indices).values for g in groups}
    return prune_model(source, groups, keep), {"kept": dict(row["kept"]), "arch_from": str(args.arch_from),
                                               "ablation": "AMAS kept counts, L1 channels, teacher weights, E epochs"}


def run_one(method: str, target: float, budget: int, seed: int, teacher: nn.Module, groups: list, cost: CostModel,
            data: Any, cfg: Any, args: argparse.Namespace, device: torch.device) -> dict | None:
    """One (method, target, budget, seed): cut, fine-tune for what is left of the budget, evaluate; the row."""
    shape = data.info.input_shape
    cfg = dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, round_to=args.round_tos[target]))
    seed_everything(seed)
    t0 = time.perf_counter()
    spent = 0
    if method == "amas":
        spent = search_epochs(budget, args.amas_search_fraction)
        pruned, extra = amas_search_cut(target, seed, spent, budget, groups, cost, cfg, args, device)
    elif method == "tp_magnitude":
        try:
            pruned, ratio, used, took = tp_magnitude_prune(
                copy.deepcopy(teacher).requires_grad_(True), groups, target, shape, cfg.prune.round_to, fallback=False
            )
        except PruneError as e:
            print(f"tp_magnitude target {target}: skipped ({e})", flush=True)
            return None
        t0 -= took  # a cut reused from an earlier run still counts its search time
        extra = {"tp_pruning_ratio": round(ratio, 4), "tp_round_to": used,
                 "kept": {g.name: out_channels(pruned.get_submodule(g.name)) for g in groups}}
    elif method == "amas_arch":
        pruned, extra = arch_cut(target, budget, seed, teacher, groups, cfg, args)
    else:
        pruned, extra, spent = criterion_cut(method, target, seed, teacher, groups, cost, data, cfg)
    pruned = pruned.to(device)
    scales = extra.pop("_mask_scales", None)
    if scales:
        scale_folded_grads(pruned, scales)  # fine-tune at the step sizes the search trained the channels with
    val_before = _val(pruned, data, device)
    ft_epochs = budget - spent
    ft = copy.deepcopy(cfg.finetune)
    lr = args.finetune_lr.get(method)
    if method == "amas" and args.amas_continue_schedule:
        lr = extra["search_final_lr"]  # fine-tuning takes the search's schedule up where the search stopped
    if lr is not None:
        ft = dataclasses.replace(ft, train=dataclasses.replace(ft.train, lr=lr))
    ft = dataclasses.replace(ft, train=dataclasses.replace(ft.train, device=args.device, progress=False))
    curve: list[float] = []
    if ft_epochs > 0:
        with tempfile.TemporaryDirectory(prefix="amas_equal_") as tmp:
            trainer = finetune_trainer(
                pruned, copy.deepcopy(teacher), ft, ft_epochs, data, Path(tmp), "finetune", device
            )
            history = trainer.fit()
            trainer.objective.close()
            pruned = trainer.model
            curve = [round(float(h["val_acc"]), 3) for h in history if "val_acc" in h]
    wall = time.perf_counter() - t0
    test_acc = evaluate(pruned, data.test, data.info.num_classes, device)["acc"]
    val_acc = _val(pruned, data, device)
    pruned = pruned.cpu().eval()
    macs, params = count(pruned, shape)
    return {
        "method": method,
        "target": target,
        "budget_epochs": budget,
        "seed": seed,
        "test_acc": round(test_acc, 3),
        "val_acc": None if val_acc is None else round(val_acc, 3),
        "macs_reduction": round(1.0 - macs / cost.total_macs, 4),
        "params": int(params),
        **cpu_latency(pruned, shape, args.latency_iters),
        "wall_s": round(wall, 1),
        "macs": int(macs),
        "search_epochs": spent if method == "amas" else 0,
        "scoring_epochs": 0 if method == "amas" else spent,
        "finetune_epochs": ft_epochs,
        "finetune_lr": ft.train.lr,
        "val_before_ft": None if val_before is None else round(val_before, 3),
        "val_curve": curve,
        "round_to": cfg.prune.round_to,
        **extra,
    }


# ---------------------------------------------------------------- summary, table, plot


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (budget, target, method)."""
    out = []
    keys = sorted({(r["budget_epochs"], r["target"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for budget, target in keys:
        for m in methods:
            cell = [r for r in rows if (r["method"], r["target"], r["budget_epochs"]) == (m, target, budget)]
            if not cell:
                continue
            entry: dict[str, Any] = {"budget_epochs": budget, "target": target, "method": m, "seeds": len(cell)}
            for k in ("test_acc", "val_acc", "val_before_ft", "macs_reduction", "params", "latency_b64_ms",
                      "latency_b1_ms", "wall_s"):
                entry[k] = stats([r.get(k) for r in cell])
            out.append(entry)
    return out


def markdown(result: dict) -> str:
    """Tables per (budget, target), methods by mean test accuracy."""
    t = result["teacher"]
    s = result["settings"]
    lines = [
        f"# Pruning methods at equal compute: {t['model']} on {t['dataset']}",
        "",
        f"Commands: `{result['command']}`",
        "",
        f"Teacher: test {t['test_acc']:.2f}%, val {t['val_acc']:.2f}%, {t['macs'] / 1e6:.2f}M MACs, "
        f"{t['params'] / 1e6:.4f}M params, latency {t['latency_b64_ms']:.2f} ms (batch 64) / "
        f"{t['latency_b1_ms']:.3f} ms (batch 1).",
        "",
        f"Every method trains E epochs in all (AMAS: search S = round(E × {s['amas_search_fraction']}) + fine-tune "
        f"E − S); fine-tuning: CE + KD + adversarial against the teacher, cosine, lr {s['finetune_lr']} "
        f"unless a row's method has its own ({s['finetune_lr_by_method'] or 'none'}); kept channels rounded to "
        f"multiples of {s['round_to']} (per target: {s.get('round_to_by_target')}); train images "
        f"{s['train_images']}, val {s['val_images']}, test "
        f"{s['test_images']}. Mean ± sample sd over seeds.",
        "",
    ]
    if s.get("latency_retimed"):
        lt = s["latency_retimed"]
        lines += [
            f"Latency re-timed after the runs on an idle machine ({lt['threads']} threads, CPU, channels-last).",
            "",
        ]
    for budget in sorted({x["budget_epochs"] for x in result["summary"]}):
        for target in sorted({x["target"] for x in result["summary"] if x["budget_epochs"] == budget}):
            cell = [x for x in result["summary"] if (x["budget_epochs"], x["target"]) == (budget, target)]
            cell.sort(key=lambda x: -(x["test_acc"]["mean"] if x["test_acc"] else -math.inf))
            lines += [
                f"## E = {budget} epochs, target −{100 * target:.0f}% MACs",
                "",
                "| method | seeds | MACs ↓ % | params (M) | val before FT % | val % | test % | Δ test vs teacher | "
                "latency b64 ms | latency b1 ms | wall s |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for x in cell:
                delta = (
                    None if x["test_acc"] is None else dict(x["test_acc"], mean=x["test_acc"]["mean"] - t["test_acc"])
                )
                f = fmt
                lines.append(
                    f"| {x['method']} | {x['seeds']} | {f(x['macs_reduction'], 1, 100)} | {f(x['params'], 4, 1e-6)} | "
                    f"{f(x['val_before_ft'])} | {f(x['val_acc'])} | {f(x['test_acc'])} | {f(delta)} | "
                    f"{f(x['latency_b64_ms'])} | {f(x['latency_b1_ms'], 3)} | {f(x['wall_s'], 0)} |"
                )
            skipped = [m for m in s.get("skipped", {}).get(f"{budget}/{target}", [])]
            if skipped:
                lines += ["", f"Not run here: {', '.join(skipped)} (cannot reach the target at this round_to)."]
            lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Test accuracy (mean ± sd) against MACs reduction, one panel per budget, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({x["budget_epochs"] for x in result["summary"]})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False)
    t = result["teacher"]
    methods = list(dict.fromkeys(x["method"] for x in result["summary"]))
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # a method keeps its colour in every panel
    for ax, budget in zip(axes[0], budgets, strict=True):
        cells = [x for x in result["summary"] if x["budget_epochs"] == budget and x["test_acc"]]
        for m in dict.fromkeys(x["method"] for x in cells):
            pts = sorted((x["macs_reduction"]["mean"] * 100, x["test_acc"]["mean"], x["test_acc"]["sd"])
                         for x in cells if x["method"] == m)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=m, color=colour[m], lw=2.2 if m == "amas" else 1.2)
        ax.axhline(t["test_acc"], color="grey", ls="--", lw=1, label="teacher")
        ax.set_title(f"E = {budget} epochs")
        ax.set_xlabel("MACs reduction (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path, name: str, md: bool = True, png: bool = False) -> None:
    """NAME.json (and NAME.md, NAME.png) atomically."""
    result["summary"] = summarise(result["rows"])
    atomic_write_text(out_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    if md:
        atomic_write_text(out_dir / f"{name}.md", markdown(result) + "\n")
    if png:
        plot(result, out_dir / f"{name}.png")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(DEFAULT_TEACHER), help="dense amas model file (amas train's model.pt)")
    p.add_argument("--config", default=str(DEFAULT_AMAS_CONFIG),
                   help="recipe whose search, finetune, prune and criteria sections every run uses")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.8], help="MACs reduction targets")
    p.add_argument("--budgets", type=int, nargs="+", default=[5], help="total training epochs E per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(ALL_METHODS)}")
    p.add_argument("--amas-search-fraction", type=float, default=0.4,
                   help="share f of each budget E the AMAS search takes: S = round(E·f) epochs, the rest fine-tunes")
    p.add_argument("--amas-continue-schedule", action="store_true",
                   help="AMAS: search and fine-tuning share one E-epoch schedule (the search stops at epoch S, "
                        "fine-tuning starts at the rate reached there) instead of two")
    p.add_argument("--amas-keep-mask-scale", action="store_true",
                   help="fine-tune AMAS's cut with its folded BN gradients scaled by mask² (amas.channels.step_scales)")
    p.add_argument("--finetune-lr", action="append", default=[], metavar="METHOD=LR",
                   help="fine-tuning learning rate for one method (repeatable); others use finetune.train.lr")
    p.add_argument("--train-subset", type=int, default=0, help="first N training images only (0 = all)")
    p.add_argument("--test-subset", type=int, default=0, help="first N test images only (0 = all)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out validation images (the teacher's split)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--latency-iters", type=int, default=10)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="equal_compute", help="output file stem")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON and skip them")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files into --name")
    p.add_argument(
        "--retime-latency", action="store_true", help="with --merge: re-time every architecture now (idle machine)"
    )
    p.add_argument("--plot", action="store_true", help="also write NAME.png")
    p.add_argument("--arch-from", metavar="JSON", help="for the ablation method amas_arch: a result file whose amas "
                   "rows give the kept counts (fine-tuned from the teacher's weights for all E epochs)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides for every run")
    args = p.parse_args(argv)
    lrs = {}
    for item in args.finetune_lr:
        m, _, v = item.partition("=")
        try:
            lrs[check_method(m, ALL_METHODS)] = float(v)
        except ValueError:
            p.error(f"--finetune-lr {item}: write METHOD=LR, e.g. amas=0.005")
    args.finetune_lr = lrs
    return args


def _repo_relative(path: Path) -> str:
    """The path relative to this repository when it (or a copy of the repository holding it) has the file."""
    parts = path.resolve().parts
    for i in range(1, len(parts)):  # /elsewhere/copy/benchmarks/teachers/x.pt -> benchmarks/teachers/x.pt
        if (ROOT.joinpath(*parts[i:])).is_file():
            return str(Path(*parts[i:]))
    return str(path)


def _teacher_key(t: dict) -> tuple:
    """What makes two result files one teacher's: its file name and its measured accuracy and size."""
    return Path(t["path"]).name, t["model"], t["dataset"], t["test_acc"], t["val_acc"], t["macs"], t["params"]


def merge(paths: list[str], out_dir: Path, name: str, retime: bool, iters: int, png: bool) -> int:
    """Combine result files of one teacher (e.g. one per target or session) into NAME; optionally re-time latency."""
    parts = read_results(paths, "an equal-compute")
    if len({_teacher_key(r["teacher"]) for r in parts}) > 1:
        raise AmasError("--merge: the files come from different teachers; merge one teacher's runs")
    result = copy.deepcopy(parts[0])
    result["teacher"]["path"] = _repo_relative(Path(result["teacher"]["path"]))
    rows: dict[tuple, dict] = {}
    for r in parts:
        for row in r["rows"]:
            rows[(row["method"], row["target"], row["budget_epochs"], row["seed"])] = row
        for k, v in r["settings"].get("skipped", {}).items():
            result["settings"].setdefault("skipped", {})[k] = sorted(
                set(result["settings"]["skipped"].get(k, [])) | set(v)
            )
        result["settings"]["finetune_lr_by_method"].update(r["settings"].get("finetune_lr_by_method", {}))
    result["rows"] = sorted(rows.values(), key=lambda r: (r["budget_epochs"], r["target"], r["method"], r["seed"]))
    result["command"] = " ; ".join(dict.fromkeys(r["command"] for r in parts))
    if retime:
        view = {"teacher": result["teacher"], "runs": result["rows"]}
        relatency(view, iters)
        result["settings"]["latency_retimed"] = view["settings"]["latency_retimed"]
    write(result, out_dir, name, png=png)
    print(markdown(result))
    return 0


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    out_dir = Path(args.out_dir)
    if args.merge:
        return merge(args.merge, out_dir, args.name, args.retime_latency, args.latency_iters, args.plot)
    methods = [check_method(m.strip(), ALL_METHODS) for m in args.methods.split(",") if m.strip()]
    args.arch_rows = {}
    if args.arch_from:
        rows = read_results([args.arch_from], "an equal-compute")[0]["rows"]
        args.arch_rows = {(r["target"], r["budget_epochs"], r["seed"]): r for r in rows if r["method"] == "amas"}
    teacher_path = Path(args.teacher)
    if not teacher_path.is_file():
        raise AmasError(f"teacher '{teacher_path}' does not exist; pass an amas model.pt with --teacher")
    device = resolve_device(args.device)
    teacher, obj = load_model(teacher_path, "cpu")
    rec = obj["model"]
    cfg = load_config(args.config, [f"data.name={rec['data']['name']}", f"data.val_size={args.val_size}",
                                    f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
                                    *args.overrides])
    shape = (rec["data"]["in_channels"], rec["data"]["image_size"], rec["data"]["image_size"])
    groups = find_groups(teacher, shape, residual=cfg.prune.residual_channels)
    cost = CostModel(teacher, groups, shape)
    # round_to halved where a target is out of reach at the recipe's (e.g. ResNet-20 inner channels past -70% at 8),
    # for every method alike
    args.round_tos = {
        t: feasible_round_to(cost, t, cfg.prune.round_to, cfg.prune.min_channels) for t in args.targets
    }
    bs, ebs = cfg.finetune.train.batch_size, cfg.finetune.train.eval_batch_size
    datas = {s: build_data(cfg.data, bs, ebs, device=device, seed=s, channels_last=True) for s in args.seeds}
    d0 = datas[args.seeds[0]]
    teacher = teacher.to(device).eval()
    t_test = evaluate(teacher, d0.test, d0.info.num_classes, device)["acc"]
    t_val = _val(teacher, d0, device)
    teacher = teacher.cpu()
    macs, params = count(teacher, shape)
    command = "python benchmarks/equal_compute.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command,
        "teacher": {
            "method": "teacher",
            "path": _repo_relative(teacher_path),
            "model": rec["name"],
            "dataset": rec["data"]["name"],
            "test_acc": round(t_test, 3),
            "val_acc": None if t_val is None else round(t_val, 3),
            "macs_reduction": 0.0,
            "macs": int(macs),
            "params": int(params),
            **cpu_latency(teacher, shape, args.latency_iters),
        },
        "settings": {
            "config": str(args.config),
            "overrides": list(args.overrides),
            "targets": args.targets,
            "budgets": args.budgets,
            "seeds": args.seeds,
            "methods": methods,
            "amas_search_fraction": args.amas_search_fraction,
            "amas_continue_schedule": args.amas_continue_schedule,
            "amas_keep_mask_scale": args.amas_keep_mask_scale,
            "finetune_lr": cfg.finetune.train.lr,
            "finetune_lr_by_method": dict(args.finetune_lr),
            "round_to": cfg.prune.round_to,
            "round_to_by_target": {str(t): r for t, r in args.round_tos.items()},
            "train_images": d0.train.num_samples,
            "val_images": d0.val.num_samples if d0.val else 0,
            "test_images": d0.test.num_samples,
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "finetune": to_dict(cfg.finetune),
            "search": to_dict(cfg.search),
            "skipped": {},
        },
        "rows": [],
        "summary": [],
    }
    jpath = out_dir / f"{args.name}.json"
    if args.resume and jpath.is_file():
        old = json.loads(jpath.read_text())
        result["rows"] = old.get("rows", [])
        result["settings"]["skipped"] = old.get("settings", {}).get("skipped", {})
    done = {(r["method"], r["target"], r["budget_epochs"], r["seed"]) for r in result["rows"]}
    for budget in args.budgets:
        for target in args.targets:
            for seed in args.seeds:
                for method in methods:
                    if (method, target, budget, seed) in done:
                        continue
                    row = run_one(method, target, budget, seed, teacher, groups, cost, datas[seed], cfg, args, device)
                    if row is None:
                        result["settings"]["skipped"].setdefault(f"{budget}/{target}", [])
                        if method not in result["settings"]["skipped"][f"{budget}/{target}"]:
                            result["settings"]["skipped"][f"{budget}/{target}"].append(method)
                        continue
                    result["rows"].append(row)
                    write(result, out_dir, args.name)
                    print(
                        f"{method:>12} E={budget} target {target:.2f} seed {seed}: -{100 * row['macs_reduction']:.1f}% "
                        f"MACs, val {row['val_before_ft']} -> {row['val_acc']}, test {row['test_acc']:.2f}, "
                        f"{row['wall_s']:.0f} s",
                        flush=True,
                    )
    write(result, out_dir, args.name, png=args.plot)
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    try:
        return _main(args, argv)
    except AmasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
