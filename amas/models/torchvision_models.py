"""Any torchvision classifier, semantic segmenter or detector by name, the first conv adapted to the input channels."""

from __future__ import annotations

from functools import lru_cache

import torchvision
from torch import nn

from amas.errors import AmasError

# Families whose constructors take aux heads that break single-output training and tracing.
_AUX_FAMILIES = ("googlenet", "inception_v3")


@lru_cache(maxsize=1)
def torchvision_classifiers() -> list[str]:
    """Return the names of torchvision's classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@lru_cache(maxsize=1)
def torchvision_segmenters() -> list[str]:
    """Return the names of torchvision's semantic segmentation models (LRASPP, DeepLabV3, FCN)."""
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


@lru_cache(maxsize=1)
def torchvision_detectors() -> list[str]:
    """Return the names of torchvision's detectors (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD)."""
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def detector_builds(model: nn.Module) -> list[tuple[str, dict]]:
    """(name, kwargs) of each torchvision detection builder returning model's class, with the transform's sizes
    read from model (min_size/max_size; SSD builders fix their size), to try in turn."""
    import inspect

    kwargs: dict = {}
    transform = getattr(model, "transform", None)
    if transform is not None and type(model).__name__ != "SSD":
        kwargs = {"min_size": int(transform.min_size[0]) if len(transform.min_size) == 1 else
                  [int(v) for v in transform.min_size], "max_size": int(transform.max_size)}
    out = []
    for name in torchvision_detectors():
        ret = inspect.signature(torchvision.models.get_model_builder(name)).return_annotation
        if ret is type(model) or getattr(ret, "__name__", None) == type(model).__name__:
            out.append((name, dict(kwargs)))
    return out


def segmenter_builds(model: nn.Module) -> list[tuple[str, dict]]:
    """(name, kwargs) of each torchvision segmentation builder whose model has model's class and heads (aux or
    not), to try in turn: torchvision's builders name their classes in their return annotations."""
    import inspect

    out = []
    for name in torchvision_segmenters():
        fn = torchvision.models.get_model_builder(name)
        sig = inspect.signature(fn)
        if sig.return_annotation is not type(model) and getattr(sig.return_annotation, "__name__", None) != \
                type(model).__name__:
            continue
        kwargs: dict = {}
        if "aux_loss" in sig.parameters:
            kwargs["aux_loss"] = getattr(model, "aux_classifier", None) is not None
        out.append((name, kwargs))
    return out


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """Return (parent, attribute, conv) of the first Conv2d registered in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise AmasError(f"{type(model).__name__} has no Conv2d to adapt to the input channels; use in_channels=3")


def _replace_input_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the model's input conv for one with `in_channels` inputs and the same other settings."""
    parent, attr, conv = _first_conv(model)
    if conv.groups != 1:
        raise AmasError(f"cannot adapt {type(model).__name__}: its first conv is grouped; use in_channels=3")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    setattr(parent, attr, new)


def freeze_backbone_norms(model: nn.Module) -> nn.Module:
    """A detector's backbone BatchNorms replaced by torchvision's FrozenBatchNorm2d (default eps), in place: the
    detector torchvision builds when a pretrained backbone is asked for (weights_backbone), whose weights a user's
    fine-tuned state_dict then holds."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(model.backbone.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, child_name, FrozenBatchNorm2d(child.num_features))
    return model


def create_torchvision_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build torchvision model `name` without pretrained weights for `num_classes` and `in_channels`; a detector
    with frozen_backbone=True has the FrozenBatchNorm2d backbone torchvision builds for a pretrained one."""
    frozen = bool(kwargs.pop("frozen_backbone", False))
    if frozen and name not in torchvision_detectors():
        raise AmasError(f"model.kwargs.frozen_backbone is for torchvision detectors, not {name!r}; drop it")
    if name in _AUX_FAMILIES:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
        if in_channels != 3:
            kwargs.setdefault("transform_input", False)
    if name in torchvision_segmenters() or name in torchvision_detectors():
        kwargs.setdefault("weights_backbone", None)  # random init, as weights=None: never a download
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise AmasError(f"torchvision model {name!r} rejected its options: {exc}; fix the model options") from None
    if in_channels != 3:
        _replace_input_conv(model, in_channels)
    return freeze_backbone_norms(model) if frozen else model
