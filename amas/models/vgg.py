"""VGG-16-BN for CIFAR-sized inputs (the cfg used by HRank, GAL and most pruning papers)."""

from __future__ import annotations

import torch
from torch import nn

from amas.models.init import init_weights
from amas.models.registry import register_model

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)


def _features(cfg: tuple[int | str, ...], in_channels: int) -> nn.Sequential:
    """Build 3x3 conv(bias)-BN-ReLU layers with 'M' as 2x2 max-pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=True), nn.BatchNorm2d(int(v)), nn.ReLU()]
            channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BN: conv features, global average pool, Linear-BN1d-ReLU-Linear classifier."""

    def __init__(self, cfg: tuple[int | str, ...] = VGG16_CFG, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        width = int([v for v in cfg if v != "M"][-1])
        self.features = _features(cfg, in_channels)
        # AvgPool2d(2) on the 2x2 map of a 32x32 input; adaptive so 28x28 inputs (1x1 map) work too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(width, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register_model
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with batch norm, CIFAR configuration."""
    return VGG(VGG16_CFG, num_classes=num_classes, in_channels=in_channels)
