"""The part of a dense-prediction model that returns tensors: what channel groups, masks and the cut work on.

A torchvision **segmenter** (FCN, DeepLabV3, LRASPP) returns a dict of tensors (``{"out": ..., "aux": ...}``) from an
image tensor: it is traced as it is. A torchvision **detector** returns post-processed boxes in eval mode and losses
in train mode; its tensor part is ``DetectorTensors``: the detector's backbone (with its FPN) and heads, run on a
batch of images the detector's ``transform`` has already normalised and resized, returning the heads' raw outputs
(class logits, box regressions, objectness/centerness; for the R-CNNs the RPN's outputs and the box head's on fixed
proposals). Its children are the detector's own modules under the detector's names, so groups found on it name
the detector's layers, ``ChannelMasks`` attach to either, and the cut of it (``amas.channels.cut.prune_model``
copies it whole) carries the cut detector as ``.model``.

The layers whose width the task fixes (class logits, box, anchor, objectness and centerness outputs, the
segmentation heads' class convs) are the ones whose outputs are the model's outputs, in a tensor, dict, list or
tuple: ``amas.channels.groups`` leaves their groups out by itself (``amas.channels.tracing.is_model_output``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DetectorTensors", "is_detector", "tensor_part", "whole"]

_RCNN_PARTS = ("backbone", "rpn", "roi_heads")
_ONE_STAGE_PARTS = ("backbone", "head")
_PROPOSALS = ((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75))


def is_detector(model: nn.Module) -> bool:
    """Whether model is a torchvision detector (R-CNN, RetinaNet, FCOS, SSD): it returns boxes, not tensors."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))


def tensor_part(model: nn.Module) -> nn.Module:
    """The part of model to trace, mask and cut: DetectorTensors for a torchvision detector, else model itself."""
    if isinstance(model, DetectorTensors) or not is_detector(model):
        return model
    return DetectorTensors(model)


def whole(model: nn.Module) -> nn.Module:
    """The model a tensor part belongs to (the cut detector of a cut DetectorTensors); any other model as it is."""
    return model.model if isinstance(model, DetectorTensors) else model


class DetectorTensors(nn.Module):
    """A torchvision detector's backbone and heads on transformed images, returning the heads' raw output tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not is_detector(model):
            raise TypeError(f"{type(model).__name__} is not a torchvision detector (R-CNN, RetinaNet, FCOS, SSD)")
        object.__setattr__(self, "_detector", model)  # not a child: the parts below are, under the detector's names
        self.training = model.training
        self.rcnn = all(hasattr(model, p) for p in _RCNN_PARTS)
        for part in _RCNN_PARTS if self.rcnn else _ONE_STAGE_PARTS:
            self.add_module(part, getattr(model, part))

    @property
    def model(self) -> nn.Module:
        """The whole detector these parts belong to (the cut detector, on a cut copy)."""
        return self._detector

    def train(self, mode: bool = True) -> DetectorTensors:
        """Set the detector's mode (and so its parts')."""
        super().train(mode)
        self._detector.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        """The heads' raw outputs for a batch of transformed images (N, 3, H, W)."""
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        levels = list(features.values())
        if not self.rcnn:
            return dict(self.head(levels))
        objectness, deltas = self.rpn.head(levels)
        out: dict[str, Any] = {"objectness": objectness, "rpn_box_deltas": deltas}
        h, w = images.shape[-2:]
        scale = images.new_tensor([w, h, w, h])
        boxes = [images.new_tensor(_PROPOSALS) * scale for _ in range(images.shape[0])]
        sizes = [(int(h), int(w))] * images.shape[0]
        roi = self.roi_heads
        out["class_logits"], out["box_regression"] = roi.box_predictor(roi.box_head(roi.box_roi_pool(
            features, boxes, sizes)))
        if getattr(roi, "mask_head", None) is not None:
            out["mask_logits"] = roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, boxes, sizes)))
        if getattr(roi, "keypoint_head", None) is not None:
            out["keypoint_logits"] = roi.keypoint_predictor(roi.keypoint_head(roi.keypoint_roi_pool(
                features, boxes, sizes)))
        return out
