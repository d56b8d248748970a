"""The engine's optimiser, chosen from what the model is made of when train.optimizer is auto.

Plain convolution + BatchNorm networks (ResNets, VGG, GoogLeNet) are trained and fine-tuned with SGD at rates near
0.01-0.1. Networks built from depthwise or grouped convolutions, or normalised by LayerNorm/GroupNorm (MobileNetV2/V3,
EfficientNet, RegNet, ConvNeXt, ViT-style hybrids) are trained with AdamW or RMSprop; SGD at a ResNet's rate moves
their weights so far per step that the eval-mode accuracy of a trained one falls to chance within a few steps
(measured: timm efficientnet_b0, AdamW-trained, SGD 0.01 -> 10% after 4 steps; 1e-4 keeps it). AdamW's step is
about lr per weight whatever the gradient's scale, so one rate holds across those families.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["adaptive_reason", "make_optimizer", "resolve_optimizer"]

_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def adaptive_reason(model: nn.Module) -> str | None:
    """Why model wants an adaptive optimiser (its depthwise/grouped convolutions or non-batch norms), or None."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            return "depthwise convolutions" if m.groups == m.in_channels else "grouped convolutions"
        if isinstance(m, _OTHER_NORMS) or "LayerNorm" in type(m).__name__:
            return f"{type(m).__name__} layers"
    return None


def resolve_optimizer(name: str, model: nn.Module) -> str:
    """sgd or adamw: name itself, or for auto, adamw when the model is made of what adaptive_reason finds."""
    if name != "auto":
        return name
    return "adamw" if adaptive_reason(model) is not None else "sgd"


def make_optimizer(groups: list[dict], cfg: Any, kind: str) -> tuple[torch.optim.Optimizer, float]:
    """The optimiser of kind over groups with cfg's settings for it, and its base learning rate."""
    if kind == "adamw":
        lr, wd = cfg.adamw_lr, cfg.adamw_weight_decay
        for g in groups:
            g.setdefault("lr", lr)
            g.setdefault("weight_decay", wd)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd), lr
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g.setdefault("weight_decay", cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay), cfg.lr
