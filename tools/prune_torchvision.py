"""Prune a torchvision classifier with your own weights on your own ImageFolder data: pruned .pt2 and report.

    python tools/prune_torchvision.py --arch resnet50 --weights my_resnet50.pth --data /data/mine \
        --image-size 224 --target 0.5 --out runs/resnet50_50 [--config configs/quickstart.yaml] [key.path=value ...]

--weights is a plain state_dict (torch.save(model.state_dict()), loaded with weights_only=True) of
torchvision.models.<arch>(num_classes=<classes of --data>); --data holds train/ and val/ (and optionally test/)
with one folder per class. A thin layer over amas.pipeline.runner.run_pipeline (`amas prune` with these settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amas.cli import main as amas_main

# the config keys (and `amas prune` flag) this tool sets from its own flags: its errors name the flag the user typed
FLAGS = {"data.root": "--data", "data.image_size": "--image-size", "model.name": "--arch",
         "search.target_reduction": "--target", "select.min_reduction": "--target", "--teacher": "--weights"}


def parser() -> argparse.ArgumentParser:
    """The tool's arguments; anything else goes on to `amas prune`."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any amas config key can follow as key.path=value, e.g. search.train.epochs=10 (the mask search), "
               "select.budget_epochs=6 (the candidates' fine-tuning by halving), finetune.train.epochs=20 (the "
               "winner's fine-tune), search.train.batch_size=64; every key: configs/REFERENCE.md")
    p.add_argument("--arch", required=True, help="torchvision classifier name, e.g. resnet50")
    p.add_argument("--weights", required=True, help="plain state_dict .pth of that architecture")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--target", type=float, default=0.5, help="fraction of the MACs to remove")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                   help="recipe for the search and fine-tuning (default: configs/quickstart.yaml)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `amas prune` with this tool's settings; 1 with one line on stderr for a mistake."""
    a, extra = parser().parse_known_args(argv)
    # the tool's own paths, checked here so the message names the tool's flags
    if not Path(a.weights).is_file():
        print(f"prune_torchvision: error: --weights '{a.weights}' does not exist; pass the .pth file of "
              f"torch.save(model.state_dict()) for torchvision's {a.arch}", file=sys.stderr)
        return 1
    if not Path(a.data).is_dir():
        print(f"prune_torchvision: error: --data '{a.data}' is not a directory; pass the ImageFolder root that holds "
              "train/ and val/ with one folder per class", file=sys.stderr)
        return 1
    keys = [e for e in extra if "=" in e and not e.startswith("-")]  # key.path=value overrides go last
    options = [e for e in extra if e not in keys]  # other `amas prune` options, e.g. --latency-iters 5
    return amas_main(["prune", "--config", a.config, "--teacher", a.weights, "--out", a.out, *options,
                      f"model.name=tv:{a.arch}", "data.name=imagefolder", f"data.root={a.data}",
                      f"data.image_size={a.image_size}", f"search.target_reduction={a.target}",
                      f"select.min_reduction={a.target}", *keys],
                     flags={k: f for k, f in FLAGS.items() if not any(e.startswith(f"{k}=") for e in keys)})


if __name__ == "__main__":
    sys.exit(main())
