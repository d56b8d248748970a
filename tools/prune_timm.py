"""Prune a timm model with your own weights on your own ImageFolder data: pruned .pt2 and report.

    python tools/prune_timm.py --arch resnet50 --weights my_timm_resnet50.pth --data /data/mine \
        --image-size 224 --target 0.5 --out runs/timm_r50_50 [--config configs/quickstart.yaml] [key.path=value ...]

--weights is a plain state_dict (torch.save(model.state_dict()), loaded with weights_only=True) of
timm.create_model(<arch>, num_classes=<classes of --data>); --data holds train/ and val/ (and optionally test/)
with one folder per class. Needs timm (pip install amas[timm]). A thin layer over amas.pipeline.runner.run_pipeline
(`amas prune` with model.name=timm:<arch> and these settings).
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from amas.cli import IMAGENET_NORM, run_tool, tool_parser

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def main(argv: list[str] | None = None) -> int:
    """Run `amas prune` with this tool's settings; 1 with one line on stderr for a mistake."""
    p = tool_parser(__doc__, "timm model name, e.g. resnet50 or mobilenetv3_small_100 (timm.list_models())",
                    Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
                    norm=", not the mean/std of --arch's timm pretrained_cfg: weights trained with other values (e.g. "
                         "0.5/0.5 for timm's ViTs) see shifted inputs until the fine-tuning adapts them")
    a, extra = p.parse_known_args(argv)
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:
        print("prune_timm: error: timm is not installed; pip install amas[timm]", file=sys.stderr)
        return 1
    if not timm.is_model(a.arch):
        close = difflib.get_close_matches(a.arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"prune_timm: error: --arch '{a.arch}' is not a timm model{hint}; see timm.list_models() for the names",
              file=sys.stderr)
        return 1
    cfg = get_pretrained_cfg(a.arch)
    if cfg is not None and (tuple(cfg.mean), tuple(cfg.std)) != IMAGENET:
        print(f"prune_timm: note: timm's {a.arch} expects mean {tuple(cfg.mean)} and std {tuple(cfg.std)}; --data is "
              f"normalised with {IMAGENET_NORM}", file=sys.stderr)
    return run_tool("prune_timm", a, extra, f"timm:{a.arch}", "timm")


if __name__ == "__main__":
    sys.exit(main())
