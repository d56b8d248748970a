"""Prune a torchvision detector with your own weights on your own COCO JSON folder: pruned .pt, .pt2 and report.

    python tools/prune_detector.py --arch fasterrcnn_mobilenet_v3_large_320_fpn --weights my_frcnn.pth \
        --data /data/coco --num-classes 91 --image-size 320 --target 0.5 --out runs/frcnn_50 [key.path=value ...]

--weights is a plain state_dict (torch.save(model.state_dict()), loaded with weights_only=True) of
torchvision.models.detection.<arch>(num_classes=<--num-classes>, weights_backbone=None, min_size=<--image-size>,
max_size=<--image-size>) (SSD builders fix their size: no min_size/max_size; other builder options as
model.kwargs.<name>=value; the weights of a detector fine-tuned from a pretrained backbone, FrozenBatchNorm2d there,
build it so: model.kwargs.frozen_backbone=true, found by itself); --data holds annotations/instances_train.json,
instances_val.json (and optionally
instances_test.json) in COCO JSON and images/ with the files they name. Category ids are the labels (1..num_classes-1,
0 is the background). Every annotation file is read before any stage: an empty file, a box with a negative width or
height (x2 < x1), a category >= --num-classes stops the run in one line. Box mAP@[.5:.95] selects the candidates;
MACs, latency and pruned.pt2 are of the detector's tensor part (backbone and heads: no transform, no NMS). A thin layer
over amas.pipeline.runner.run_pipeline (`amas prune` with task=detection and data.name=coco).
"""

from __future__ import annotations

import sys
from pathlib import Path

from amas.cli import run_tool, tool_parser

COCO = ("the COCO JSON folder that holds annotations/instances_train.json, instances_val.json and images/",
        "task=detection", "data.name=coco")


def main(argv: list[str] | None = None) -> int:
    """Run `amas prune` with this tool's settings; 1 with one line on stderr for a mistake."""
    p = tool_parser(__doc__, "torchvision detection builder, e.g. fasterrcnn_mobilenet_v3_large_320_fpn, "
                             "ssdlite320_mobilenet_v3_large, retinanet_resnet50_fpn_v2, fcos_resnet50_fpn",
                    Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
                    " by the detector itself (its transform); the boxes are scaled with the images",
                    data="COCO JSON folder: annotations/instances_{train,val}.json, images/",
                    sizing="resized (not cropped) to")
    p.add_argument("--num-classes", type=int, required=True,
                   help="the detector's classes, background included (91 for COCO)")
    a, extra = p.parse_known_args(argv)
    sizes = [] if a.arch.startswith("ssd") else [f"model.kwargs.{k}={a.image_size}" for k in ("min_size", "max_size")
                                                 if not any(e.startswith(f"model.kwargs.{k}=") for e in extra)]
    return run_tool("prune_detector", a, extra, f"tv:{a.arch}", "torchvision",
                    (*COCO, f"data.num_classes={a.num_classes}", *sizes))


if __name__ == "__main__":
    sys.exit(main())
