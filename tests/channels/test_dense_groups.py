"""Channel groups of dense-prediction models: torchvision segmenters and detectors and a YOLO-style detector.

For each model (random init, 64x64 inputs, 3 classes): the groups cover backbone, neck and heads; the layers whose
width the task fixes (class logits, box, anchor, objectness and centerness outputs) are in no group without being
listed; random masks with zeroed channels give the same outputs as the cut model (eval mode, float64), output
shapes unchanged; the planner's MACs are the cut model's; the cut exports with torch.export (four of them).
Detectors are traced through their tensor part (amas.channels.dense.DetectorTensors) and the cut detector still runs
its own forward (boxes) on images.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import random_masks, randomize_norms
from torch import nn
from torch.utils._pytree import tree_leaves

from amas.channels.cost import CostModel, count
from amas.channels.cut import prune_model
from amas.channels.dense import DetectorTensors, tensor_part
from amas.channels.groups import find_groups
from amas.channels.masks import ChannelMasks
from amas.channels.plan import kept_counts
from amas.files.export import export_onnx

SHAPE = (3, 64, 64)
class ConvBNAct(nn.Module):
    """Conv, BN, SiLU."""

    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two convs with a residual add."""

    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBNAct(c, c, 1), ConvBNAct(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class CSP(nn.Module):
    """C3: two 1x1 branches, bottlenecks on one, concat, 1x1 fuse."""

    def __init__(self, c1, c2, n=1, shortcut=True):
        super().__init__()
        h = c2 // 2
        self.cv1, self.cv2, self.cv3 = ConvBNAct(c1, h), ConvBNAct(c1, h), ConvBNAct(2 * h, c2)
        self.m = nn.Sequential(*(Bottleneck(h, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    """Three chained max-pools, concatenated."""

    def __init__(self, c1, c2):
        super().__init__()
        h = c1 // 2
        self.cv1, self.cv2, self.pool = ConvBNAct(c1, h), ConvBNAct(4 * h, c2), nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class TinyYOLO(nn.Module):
    """Anchor-free single-stage detector: CSP backbone, PAN neck (upsample + concat), decoupled head per level."""

    def __init__(self, num_classes=3, w=16):
        super().__init__()
        self.stem = ConvBNAct(3, w, 3, 2)
        self.dark2 = nn.Sequential(ConvBNAct(w, 2 * w, 3, 2), CSP(2 * w, 2 * w))
        self.dark3 = nn.Sequential(ConvBNAct(2 * w, 4 * w, 3, 2), CSP(4 * w, 4 * w, 2))
        self.dark4 = nn.Sequential(ConvBNAct(4 * w, 8 * w, 3, 2), CSP(8 * w, 8 * w))
        self.dark5 = nn.Sequential(ConvBNAct(8 * w, 8 * w, 3, 2), SPPF(8 * w, 8 * w), CSP(8 * w, 8 * w, 1, False))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lat5 = ConvBNAct(8 * w, 4 * w)
        self.td4 = CSP(12 * w, 4 * w, 1, False)
        self.lat4 = ConvBNAct(4 * w, 2 * w)
        self.td3 = CSP(6 * w, 2 * w, 1, False)
        self.down3 = ConvBNAct(2 * w, 2 * w, 3, 2)
        self.bu4 = CSP(4 * w, 4 * w, 1, False)
        self.down4 = ConvBNAct(4 * w, 4 * w, 3, 2)
        self.bu5 = CSP(8 * w, 8 * w, 1, False)
        self.stems = nn.ModuleList(ConvBNAct(c, 2 * w) for c in (2 * w, 4 * w, 8 * w))
        self.cls_convs = nn.ModuleList(nn.Sequential(ConvBNAct(2 * w, 2 * w, 3), ConvBNAct(2 * w, 2 * w, 3))
                                       for _ in range(3))
        self.reg_convs = nn.ModuleList(nn.Sequential(ConvBNAct(2 * w, 2 * w, 3), ConvBNAct(2 * w, 2 * w, 3))
                                       for _ in range(3))
        self.cls_preds = nn.ModuleList(nn.Conv2d(2 * w, num_classes, 1) for _ in range(3))
        self.reg_preds = nn.ModuleList(nn.Conv2d(2 * w, 4, 1) for _ in range(3))
        self.obj_preds = nn.ModuleList(nn.Conv2d(2 * w, 1, 1) for _ in range(3))

    def forward(self, x):
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        p5 = self.lat5(c5)
        p4 = self.td4(torch.cat([self.up(p5), c4], 1))
        q4 = self.lat4(p4)
        n3 = self.td3(torch.cat([self.up(q4), c3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), q4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        outs = []
        for i, f in enumerate((n3, n4, n5)):
            f = self.stems[i](f)
            c, r = self.cls_convs[i](f), self.reg_convs[i](f)
            outs.append(torch.cat([self.reg_preds[i](r), self.obj_preds[i](r), self.cls_preds[i](c)], 1))
        return outs


# name -> (layers whose output width the task fixes, prefixes of the layers the groups must reach: backbone, neck,
# heads). RetinaNet v2 and FCOS heads normalise with GroupNorm, whose channel removal is not masking: their towers
# stay whole, and only the FPN's outputs feeding them (the heads' input channels) are cut.
CASES = {
    "yolo": (r"_preds\.", ("dark2.", "dark5.", "td3.", "bu5.", "stems.", "cls_convs.", "reg_convs.")),
    "lraspp_mobilenet_v3_large": (r"classifier\.(low|high)_classifier", ("backbone.", "classifier.cbr")),
    "deeplabv3_mobilenet_v3_large": (r"classifier\.4$", ("backbone.", "classifier.0.convs", "classifier.1")),
    "fcn_resnet50": (r"classifier\.4$", ("backbone.layer1", "backbone.layer4", "classifier.0")),
    "ssdlite320_mobilenet_v3_large": (r"module_list\.\d+\.1$", ("backbone.features", "backbone.extra", "head.")),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (r"cls_logits|bbox_pred|cls_score",
                                              ("backbone.body", "backbone.fpn", "rpn.head.conv", "roi_heads.box_head")),
    "retinanet_resnet50_fpn_v2": (r"cls_logits|bbox_reg", ("backbone.body", "backbone.fpn", "head.")),
    "fcos_resnet50_fpn": (r"cls_logits|bbox_reg|bbox_ctrness", ("backbone.body", "backbone.fpn", "head.")),
}
GROUP_NORM_HEADS = ("retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
DETECTORS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", *GROUP_NORM_HEADS)
# torch.export takes seconds a model (the ResNet-50 ones the most): one segmenter, two detectors and the YOLO net
EXPORTED = ("yolo", "lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large",
            "fasterrcnn_mobilenet_v3_large_320_fpn")
ONNX = ("lraspp_mobilenet_v3_large",)  # and to ONNX, its dict output checked by onnxruntime


def _model(name: str) -> nn.Module:
    if name == "yolo":
        return TinyYOLO(num_classes=3)
    from torchvision.models import detection, segmentation

    if hasattr(segmentation, name):
        return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    size = {} if name.startswith("ssd") else {"min_size": SHAPE[1], "max_size": SHAPE[2]}  # the detector's resize
    return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3, **size)


def _masked_and_cut(net: nn.Module, groups: list, masks: dict, keep: dict, gen: torch.Generator) -> tuple:
    """In float64 on one random input: (input, plain outputs, masked outputs, the cut model, its outputs)."""
    net.double()
    hooks = ChannelMasks(groups).double()
    hooks.load_values(masks)
    x = torch.randn(2, *SHAPE, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        plain = tree_leaves(net(x))
        hooks.attach(net)
        try:
            masked = tree_leaves(net(x))
            pruned = prune_model(net, groups, keep, masks=masks)
        finally:
            hooks.detach()
        return x, plain, masked, pruned, tree_leaves(pruned(x))


@pytest.mark.parametrize("name", list(CASES))
def test_dense_removal_equals_masking_and_exports(name: str) -> None:
    fixed, parts = CASES[name]
    gen = torch.Generator().manual_seed(0)
    model = _model(name).eval()
    randomize_norms(model, gen)
    net = tensor_part(model)
    assert isinstance(net, DetectorTensors) == (name in DETECTORS)
    assert not net.training
    groups = find_groups(net, SHAPE)
    assert len(groups) >= 25
    touched = {n for g in groups for n in (*g.out_layers, *g.in_layers)}
    assert not [n for g in groups for n in g.out_layers if re.search(fixed, n)]  # output widths whole, unlisted
    if name not in GROUP_NORM_HEADS:
        assert [n for n in touched if re.search(fixed, n)]  # ... though their inputs are cut
    for prefix in parts:
        assert any(n.startswith(prefix) for n in touched), prefix
    cost = CostModel(net, groups, SHAPE)
    masks, keep = random_masks(groups, gen)
    x, plain, masked, pruned, out = _masked_and_cut(net, groups, masks, keep, gen)
    assert [t.shape for t in out] == [t.shape for t in masked] == [t.shape for t in plain]
    assert max((a - b).abs().max().item() for a, b in zip(plain, masked, strict=True)) > 1e-3
    scale = max(1.0, max(t.abs().max().item() for t in masked))
    assert max((a - b).abs().max().item() for a, b in zip(masked, out, strict=True)) <= 1e-8 * scale
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in net.parameters())
    pruned.float()
    assert count(pruned, SHAPE)[0] == cost.macs(kept_counts(keep))  # planner = cut (R-CNN: the RoI head per box)
    xf = x.float()
    if name in EXPORTED:
        with torch.no_grad():
            eager = tree_leaves(pruned(xf))
            got = tree_leaves(torch.export.export(pruned, (xf,)).module()(xf))
        assert max((a - b).abs().max().item() for a, b in zip(eager, got, strict=True)) <= 1e-4 * scale
    if name in ONNX:  # every output checked against eager by onnxruntime (ExportError otherwise)
        with tempfile.TemporaryDirectory() as d:
            assert export_onnx(pruned, SHAPE, Path(d) / "m.onnx")["max_abs_diff"] <= 1e-3 * scale
    if isinstance(pruned, DetectorTensors):  # the cut detector's own forward: boxes from images
        with torch.no_grad():
            dets = pruned.model.eval()([xf[0].sigmoid()])
        assert set(dets[0]) >= {"boxes", "labels", "scores"}


class _Features(nn.Module):
    """Returns a feature map that the next layer also reads, in a dict with the logits (or the logits alone)."""

    def __init__(self, both: bool) -> None:
        super().__init__()
        self.both = both
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.feat = nn.Conv2d(8, 8, 3, padding=1)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.logits = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        f = self.feat(self.stem(x))
        y = self.logits(self.inner(f))
        return {"features": [f], "logits": y} if self.both else y


def test_a_layer_whose_output_is_returned_keeps_its_width_though_other_layers_read_it() -> None:
    shape = (3, 16, 16)
    alone = {g.name for g in find_groups(_Features(both=False).eval(), shape)}
    both = {g.name for g in find_groups(_Features(both=True).eval(), shape)}
    assert alone == {"stem.0", "feat", "inner.0"}
    assert both == {"stem.0", "inner.0"}  # feat's output is one of the model's outputs (in a list in a dict)


def test_a_detector_with_a_frozen_backbone_prunes_as_with_batchnorms(tmp_path: Path) -> None:
    """FrozenBatchNorm2d backbones (every torchvision detector fine-tuned from a pretrained backbone) give the
    groups the BatchNorm backbone gives, removal equals masking, and the cut keeps frozen BNs with sliced buffers
    through save_pruned/load_pruned (they were plain arithmetic to the tracer: the backbone stayed whole)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from amas.files.pruned import load_pruned, save_pruned
    from amas.models.torchvision_models import freeze_backbone_norms

    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    gen = torch.Generator().manual_seed(0)
    model = _model(name).eval()
    randomize_norms(model, gen)
    plain_groups = find_groups(tensor_part(model), SHAPE)
    state = model.state_dict()
    frozen = freeze_backbone_norms(model)  # what torchvision builds on a pretrained backbone
    frozen.load_state_dict(state)  # the same statistics (FrozenBatchNorm2d drops the step counters itself)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) > 40
    net = tensor_part(frozen)
    groups = find_groups(net, SHAPE)
    assert [(g.name, g.producers) for g in groups] == [(g.name, g.producers) for g in plain_groups]
    masks, keep = random_masks(groups, gen)
    x, _, masked, pruned, out = _masked_and_cut(net, groups, masks, keep, gen)
    scale = max(1.0, max(t.abs().max().item() for t in masked))
    assert max((a - b).abs().max().item() for a, b in zip(masked, out, strict=True)) <= 1e-8 * scale
    stem = pruned.get_submodule("model.backbone.body.0.1")
    assert type(stem) is FrozenBatchNorm2d and stem.running_mean.shape == (len(keep[groups[0].name]),)
    pruned.float()
    save_pruned(tmp_path / "p.pt", pruned.model, {"model": {"name": name, "num_classes": 3, "in_channels": 3}},
                {"input_shape": list(SHAPE)})
    back = load_pruned(tmp_path / "p.pt", base=freeze_backbone_norms(_model(name)))[0]
    with torch.no_grad():
        again = tree_leaves(tensor_part(back)(x.float()))
    assert max((a - b).abs().max().item() for a, b in zip(out, again, strict=True)) <= 1e-4 * scale
