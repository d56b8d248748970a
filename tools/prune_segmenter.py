"""Prune a torchvision semantic segmenter with your own weights on your own VOC-layout folder: pruned .pt2 and report.

    python tools/prune_segmenter.py --arch lraspp_mobilenet_v3_large --weights my_lraspp.pth --data /data/voc \
        --num-classes 21 --image-size 256 --target 0.5 --out runs/lraspp_50 [--config ...] [key.path=value ...]

--weights is a plain state_dict (torch.save(model.state_dict()), loaded with weights_only=True) of
torchvision.models.segmentation.<arch>(num_classes=<--num-classes>, weights_backbone=None) (aux_loss=True and other
builder options as model.kwargs.aux_loss=true); --data holds JPEGImages/, SegmentationClass/ (PNG label maps of class
indices, 255 = ignore) and ImageSets/Segmentation/train.txt, val.txt (and optionally test.txt). Every label map is
read once before any stage: a class >= --num-classes stops the run in one line. Mean IoU selects the candidates. A
thin layer over amas.pipeline.runner.run_pipeline (`amas prune` with task=segmentation and data.name=voc).
"""

from __future__ import annotations

import sys
from pathlib import Path

from amas.cli import run_tool, tool_parser

VOC = ("the VOC-layout folder that holds JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/",
       "task=segmentation", "data.name=voc")


def main(argv: list[str] | None = None) -> int:
    """Run `amas prune` with this tool's settings; 1 with one line on stderr for a mistake."""
    p = tool_parser(__doc__, "torchvision segmentation builder, e.g. lraspp_mobilenet_v3_large, "
                             "deeplabv3_mobilenet_v3_large, fcn_resnet50",
                    Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
                    "; label maps are resized by nearest neighbour",
                    data="VOC-layout folder: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/",
                    sizing="resized (not cropped) to")
    p.add_argument("--num-classes", type=int, required=True,
                   help="the segmenter's classes, background included (21 for Pascal VOC)")
    a, extra = p.parse_known_args(argv)
    return run_tool("prune_segmenter", a, extra, f"tv:{a.arch}", "torchvision",
                    (*VOC, f"data.num_classes={a.num_classes}"))


if __name__ == "__main__":
    sys.exit(main())
