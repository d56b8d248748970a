"""Command line: `amas train|eval|...`; user mistakes end in one line and exit status 1."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from amas.console import print_table
from amas.errors import AmasError, Stopped

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


def _config_latency_overrides(p: argparse.ArgumentParser, config_help: str) -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--latency-iters", type=int, default=20, help="timed iterations per batch size")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


@command("train", "train a dense model (e.g. the teacher) with the one engine")
def _train_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue the run saved in the run directory")


@command("eval", "evaluate a checkpoint on the test set: accuracy, MACs, params, latency")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model.pt or pruned.pt written by amas")
    p.add_argument("--runtimes", help="also time these runtimes in alternating rounds at batch 1 and 64, with a "
                                      "busy-machine warning: eager,compiled,onnx,compiled_int8,onnx_int8 (those "
                                      "installed; the int8 ones time the model quantized as amas.quantize does)")
    p.add_argument("--int8", help="also the test accuracy and size of this int8 .pt2 of the model (the quantize "
                                  "stage's pruned_int8.pt2)")
    _config_latency_overrides(p, "optional YAML for data settings (data.root, ...)")


@command("latency-table", "measure (or load from the cache) the per-layer latency table of a config's model")
def _latency_table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML recipe: model, data and the prune.latency_* settings")
    p.add_argument("--batch", type=int, help="batch size (default: prune.latency_batch)")
    p.add_argument("--runtime", choices=["eager", "compiled", "onnx", "compiled_int8", "onnx_int8"],
                   help="default: prune.latency_runtime")
    p.add_argument("--validate", type=int, default=0, metavar="N",
                   help="also time N random plans as whole models and report the table's prediction error")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


@command("search", "search channel masks for a copy of a trained teacher (AMAS: KD + adversarial + sparsity)")
def _search_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--teacher", required=True, help="dense model.pt of the trained teacher (from `amas train`)")
    p.add_argument("--resume", action="store_true", help="continue the search saved in the run directory")


@command("export", "prune a searched student to a MACs target and export pruned.pt, pruned.pt2 (ONNX) and a report")
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="searched student (search.pt) or, with --criterion l1, a dense model.pt"
    )
    p.add_argument(
        "--target-reduction", "--target-flops", dest="target_reduction", type=float,
        help="fraction of the MACs to remove, e.g. 0.5 (default: prune.target_reduction; old name: --target-flops)"
    )
    p.add_argument("--round-to", type=int, help="round kept channels up to a multiple of N (default: prune.round_to)")
    p.add_argument("--min-channels", type=int, help="channels every group keeps at least (default: prune.min_channels)")
    p.add_argument("--criterion", choices=["l1"], help="score a dense model's channels by filter L1 norm")
    p.add_argument("--out", help="output directory (default: <checkpoint dir>/export)")
    p.add_argument("--onnx", action="store_true", help="also write pruned.onnx, checked with onnxruntime")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set accuracy")
    _config_latency_overrides(p, "optional YAML for data and prune settings")


@command("prune", "the whole pipeline: teacher -> search -> candidates -> selection -> final fine-tune -> export")
def _prune_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--teacher", help="trained dense model.pt, or a plain state_dict (torch.save(model.state_dict())) for the "
        "architecture model.name names (default: train one with the config's model and train settings)"
    )
    from amas.config import BASELINE_METHODS
    from amas.pipeline.runner import STAGE_NAMES

    p.add_argument("--method", default="amas", metavar="METHOD",
                   help=f"amas (searched masks, default) or a baseline criterion: {', '.join(BASELINE_METHODS)}")

    p.add_argument("--redo", choices=STAGE_NAMES,
                   help="redo this stage and every stage after it (after changing their settings)")
    p.add_argument("--latency-iters", type=int, default=20, help="timed iterations per batch size in the report")


_EPILOG = ("Any config key can follow as key.path=value (e.g. search.target_reduction=0.6 finetune.train.epochs=5); "
           "every key, its type, default and allowed values: configs/REFERENCE.md")


def build_parser() -> argparse.ArgumentParser:
    """The amas argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="amas", description="structured channel pruning with adversarial alignment")
    from amas import __version__

    parser.add_argument("--version", action="version", version=f"amas {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, add) in COMMANDS.items():
        add(sub.add_parser(name, help=help, description=help, epilog=_EPILOG))
    return parser


def run_dir_for(args: argparse.Namespace) -> Path:
    """The run directory: --out, else runs/<config stem>; refuses an --out that names a file."""
    return _out_dir(Path(args.out) if getattr(args, "out", None) else Path("runs") / Path(args.config).stem)


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise AmasError(f"--out '{path}' is a file, not a directory; choose another --out")
    return path


def cmd_train(args: argparse.Namespace) -> None:
    """Train a dense model from a config and save it as model.pt in the run directory (the teacher stage)."""
    from amas.config import load_config
    from amas.pipeline.runner import run_train

    run_train(load_config(args.config, args.overrides), run_dir_for(args), resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a saved checkpoint on its dataset's test split."""
    from amas.pipeline.teacher import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.config, args.overrides, latency_iters=args.latency_iters,
                                 int8=args.int8)
    if args.runtimes:
        from amas.channels.dense import tensor_part
        from amas.files.pruned import load_any_model
        from amas.latency.table import runtime_latency

        model, obj = load_any_model(args.checkpoint)
        d = obj["model"]["data"]
        shape = (d["in_channels"], d["image_size"], d["image_size"])
        rt = runtime_latency({"model": tensor_part(model.eval())}, shape, runtimes=args.runtimes.split(","),
                             iters=args.latency_iters)
        for runtime, by_batch in rt["ms"]["model"].items():
            for b, ms in by_batch.items():
                result[f"latency_{runtime}_{b}_ms"] = round(ms, 3)
        if rt["warnings"]:
            result["latency_warning"] = "; ".join(rt["warnings"])
    print_table([(k, v) for k, v in result.items()], title=f"eval: {args.checkpoint}")
    print(json.dumps(result))


def cmd_latency_table(args: argparse.Namespace) -> None:
    """Build the latency table of the config's model and print where it is and how well it predicts."""
    from amas.config import load_config
    from amas.latency.table import table_for_config

    cfg = load_config(args.config, args.overrides)
    r = table_for_config(cfg, batch_size=args.batch, runtime=args.runtime, validate_plans=args.validate)
    rows = [(k, v) for k, v in r.items()]
    print_table(rows, title="latency-table: done")


def cmd_search(args: argparse.Namespace) -> None:
    """Search soft channel masks for a student copy of the teacher into search.pt (the search stage)."""
    from amas.config import load_config
    from amas.pipeline.runner import run_search

    run_search(load_config(args.config, args.overrides), run_dir_for(args), args.teacher, resume=args.resume)


def cmd_export(args: argparse.Namespace) -> None:
    """Cut a searched student (or a dense model by L1) to the MACs target and export it (the export stage)."""
    from amas.config import PruneConfig, load_config
    from amas.pipeline.runner import run_export

    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    prune = cfg.prune if cfg is not None else PruneConfig()
    out = _out_dir(Path(args.out) if args.out else Path(args.checkpoint).parent / "export")
    run_export(args.checkpoint, out, prune.target_reduction if args.target_reduction is None else args.target_reduction,
               cfg=cfg, round_to=prune.round_to if args.round_to is None else args.round_to,
               min_channels=prune.min_channels if args.min_channels is None else args.min_channels,
               criterion=args.criterion, residual=prune.residual_channels, onnx=args.onnx, evaluate=not args.no_eval,
               latency_iters=args.latency_iters, ignore=prune.ignore)


def cmd_prune(args: argparse.Namespace) -> None:
    """Run (or continue) the whole pruning pipeline in the run directory."""
    from amas.config import load_config
    from amas.pipeline.runner import run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_dir = run_dir_for(args)
    run_pipeline(
        cfg, run_dir, teacher=args.teacher, method=args.method, redo=args.redo, latency_iters=args.latency_iters
    )
    from amas import distributed

    if distributed.context().is_main:  # one closing line under torchrun, as each stage prints one summary
        print(f"prune: all stages done in {run_dir}; report: {run_dir / 'report.md'}; TensorBoard: tensorboard "
              f"--logdir {run_dir}")


def _name_flags(message: str, flags: dict[str, str]) -> str:
    """message with each config key in flags named by the flag that set it (a tool's --data for data.root)."""
    for key, flag in flags.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", flag, message)
    return message


def main(argv: list[str] | None = None, flags: dict[str, str] | None = None) -> int:
    """Entry point of the `amas` console script; flags: {config key: flag} for a tool that sets those keys from its
    own flags, so its errors name the flag the user typed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = globals().get(f"cmd_{args.command.replace('-', '_')}")
    from amas import distributed

    try:
        distributed.init_from_env(_device_hint(args))
        handler(args)
    except Stopped as e:
        print(f"amas {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except AmasError as e:
        print(f"amas {args.command}: error: {_name_flags(str(e), flags or {})}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"amas {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0



# the config keys (and `amas prune` flag) a prune tool sets from its own flags: its errors name the flag the user typed
TOOL_FLAGS = {"data.root": "--data", "data.image_size": "--image-size", "model.name": "--arch",
              "search.target_reduction": "--target", "select.min_reduction": "--target", "--teacher": "--weights",
              "data.num_classes": "--num-classes"}
IMAGENET_NORM = "ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)"


class ToolParser(argparse.ArgumentParser):
    """A tool's parser whose mistakes (a missing or malformed flag) end in one line and exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `<prog>: error: message` and exit 1."""
        self.exit(1, f"{self.prog.removesuffix('.py')}: error: {message}; see {self.prog} --help\n")


def tool_parser(doc: str, arch: str, config: Path, norm: str = "",
                data: str = "ImageFolder root with train/ and val/", sizing: str = "cropped to") -> ToolParser:
    """The arguments of a prune tool (tools/prune_torchvision.py, tools/prune_timm.py, tools/prune_segmenter.py): doc
    is the tool's docstring, arch --arch's help, config the default recipe, norm more on the images' normalisation,
    data --data's help, sizing how the images become --image-size squares; anything else on the command line goes on
    to `amas prune`."""
    p = ToolParser(
        description=doc.splitlines()[0],
        epilog="Any amas config key can follow as key.path=value, e.g. search.train.epochs=10 (the mask search), "
               "select.budget_epochs=6 (the candidates' fine-tuning by halving), finetune.train.epochs=20 (the "
               "winner's fine-tune), search.train.batch_size=64; every key: configs/REFERENCE.md. The --data images "
               f"are {sizing} --image-size squares and normalised with {IMAGENET_NORM}{norm}.")
    p.add_argument("--arch", required=True, help=arch)
    p.add_argument("--weights", required=True, help="plain state_dict .pth of that architecture")
    p.add_argument("--data", required=True, help=data)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--target", type=float, default=0.5, help="fraction of the MACs to remove")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(config),
                   help=f"recipe for the search and fine-tuning (default: configs/{config.name})")
    return p


IMAGE_FOLDER = ("the ImageFolder root that holds train/ and val/ with one folder per class", "data.name=imagefolder")


def run_tool(tool: str, a: argparse.Namespace, extra: list[str], model: str, library: str,
             data: tuple[str, ...] = IMAGE_FOLDER) -> int:
    """`amas prune` with a prune tool's settings: a and extra from its tool_parser's parse_known_args, model the
    model.name of --arch (tv:resnet50), library names the architecture's library in a --weights error, data what
    --data must be (for its error) and then the config keys that read it; 1 with one line on stderr for a mistake."""
    # the tool's own paths, checked here so the message names the tool's flags
    if not Path(a.weights).is_file():
        print(f"{tool}: error: --weights '{a.weights}' does not exist; pass the .pth file of "
              f"torch.save(model.state_dict()) for {library}'s {a.arch}", file=sys.stderr)
        return 1
    if not Path(a.data).is_dir():
        print(f"{tool}: error: --data '{a.data}' is not a directory; pass {data[0]}", file=sys.stderr)
        return 1
    keys = [e for e in extra if "=" in e and not e.startswith("-")]  # key.path=value overrides go last
    options = [e for e in extra if e not in keys]  # other `amas prune` options, e.g. --latency-iters 5
    return main(["prune", "--config", a.config, "--teacher", a.weights, "--out", a.out, *options,
                 f"model.name={model}", *data[1:], f"data.root={a.data}",
                 f"data.image_size={a.image_size}", f"search.target_reduction={a.target}",
                 f"select.min_reduction={a.target}", *keys],
                flags={k: f for k, f in TOOL_FLAGS.items() if not any(e.startswith(f"{k}=") for e in keys)})


def _device_hint(args: argparse.Namespace) -> str:
    """train.device from the overrides or the YAML, so torchrun picks gloo for CPU runs on GPU machines."""
    for item in reversed(getattr(args, "overrides", None) or []):
        if item.startswith("train.device="):
            return item.split("=", 1)[1]
    config = getattr(args, "config", None)
    if config and Path(config).is_file():
        from amas.config_yaml import read_yaml

        train = read_yaml(config).get("train") or {}
        if isinstance(train, dict):
            return str(train.get("device", "auto"))
    return "auto"


if __name__ == "__main__":
    sys.exit(main())
