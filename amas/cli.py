"""Command line: `amas train|eval|...`; user mistakes end in one line and exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from amas.errors import AmasError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str) -> Callable:
    """Register a subcommand: the decorated function adds its arguments, `run_<name>` executes it."""

    def deco(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn

    return deco


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="YAML recipe (see configs/)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.epochs=5")


@command("train", "train a dense model (e.g. the teacher) with the one engine")
def _train_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue the run saved in the run directory")


@command("eval", "evaluate a checkpoint on the test set: accuracy, MACs, params, latency")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model.pt or pruned.pt written by amas")
    p.add_argument("--config", help="optional YAML for data settings (data.root, ...)")
    p.add_argument("--latency-iters", type=int, default=20, help="timed iterations per batch size")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


@command("search", "search channel masks for a copy of a trained teacher (AMAS: KD + adversarial + sparsity)")
def _search_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--teacher", required=True, help="dense model.pt of the trained teacher (from `amas train`)")
    p.add_argument("--resume", action="store_true", help="continue the search saved in the run directory")


def build_parser() -> argparse.ArgumentParser:
    """The amas argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="amas", description="structured channel pruning with adversarial alignment")
    from amas import __version__

    parser.add_argument("--version", action="version", version=f"amas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add) in COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help))
    return parser


def run_dir_for(args: argparse.Namespace) -> Path:
    """The run directory: --out, else runs/<config stem>."""
    if getattr(args, "out", None):
        return Path(args.out)
    return Path("runs") / Path(args.config).stem


def print_table(rows: list[tuple[str, Any]], title: str = "") -> None:
    """Print a two-column summary table."""
    if title:
        print(title)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        v = f"{v:.4g}" if isinstance(v, float) else v
        print(f"  {k:<{width}}  {v}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a dense model from a config and save it as model.pt in the run directory."""
    from amas.config import load_config, save_config
    from amas.stages import train_dense

    cfg = load_config(args.config, args.overrides)
    run_dir = run_dir_for(args)
    result = train_dense(cfg, run_dir, resume=args.resume)
    save_config(cfg, run_dir / "config.yaml")
    print_table(
        [("model", cfg.model.name), ("dataset", cfg.data.name), ("val acc %", result.get("val_acc", float("nan"))),
         ("test acc %", result["test_acc"]), ("MACs", f"{result['macs'] / 1e6:.2f}M"),
         ("params", f"{result['params'] / 1e6:.3f}M"), ("wall time s", result["wall_s"]),
         ("checkpoint", str(run_dir / "model.pt"))],
        title="train: done",
    )


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a saved checkpoint on its dataset's test split."""
    from amas.stages import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.config, args.overrides, latency_iters=args.latency_iters)
    print_table([(k, v) for k, v in result.items()], title=f"eval: {args.checkpoint}")
    print(json.dumps(result))


def cmd_search(args: argparse.Namespace) -> None:
    """Search soft channel masks for a student copy of the teacher and save search.pt in the run directory."""
    from amas.adversarial import search
    from amas.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = run_dir_for(args)
    result = search(cfg, run_dir, args.teacher, resume=args.resume)
    print_table(
        [("teacher", args.teacher), ("dataset", cfg.data.name),
         ("student val acc %", result.get("val_acc", float("nan"))),
         ("teacher val acc %", result.get("teacher_val_acc", float("nan"))),
         ("effective MACs", f"{result['effective_macs'] / 1e6:.2f}M of {result['total_macs'] / 1e6:.2f}M"),
         ("MACs reduction %", 100.0 * result["macs_reduction"]),
         ("target reduction %", 100.0 * result["target_reduction"]),
         ("kept channels", f"{result['kept_channels']} of {result['total_channels']}"),
         ("lambda", result["lambda"]), ("wall time s", result["wall_s"]),
         ("checkpoint", str(run_dir / "search.pt"))],
        title="search: done",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `amas` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = globals().get(f"cmd_{args.command}")
    try:
        handler(args)
    except AmasError as e:
        print(f"amas {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"amas {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
