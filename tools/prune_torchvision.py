"""Prune a torchvision classifier with your own weights on your own ImageFolder data: pruned .pt2 and report.

    python tools/prune_torchvision.py --arch resnet50 --weights my_resnet50.pth --data /data/mine \
        --image-size 224 --target 0.5 --out runs/resnet50_50 [--config configs/quickstart.yaml] [key.path=value ...]

--weights is a plain state_dict (torch.save(model.state_dict()), loaded with weights_only=True) of
torchvision.models.<arch>(num_classes=<classes of --data>); --data holds train/ and val/ (and optionally test/)
with one folder per class. A thin layer over amas.pipeline.runner.run_pipeline (`amas prune` with these settings).
"""

from __future__ import annotations

import sys
from pathlib import Path

from amas.cli import run_tool, tool_parser


def main(argv: list[str] | None = None) -> int:
    """Run `amas prune` with this tool's settings; 1 with one line on stderr for a mistake."""
    p = tool_parser(__doc__, "torchvision classifier name, e.g. resnet50",
                    Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    a, extra = p.parse_known_args(argv)
    return run_tool("prune_torchvision", a, extra, f"tv:{a.arch}", "torchvision")


if __name__ == "__main__":
    sys.exit(main())
