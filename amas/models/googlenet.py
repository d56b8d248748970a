"""GoogLeNet for CIFAR (kuangliu/pytorch-cifar layout, as used by HRank and GAL)."""

from __future__ import annotations

import torch
from torch import nn

from amas.models.registry import register_model


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> list[nn.Module]:
    """Conv (with bias, as in the reference code), BN, ReLU."""
    return [nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2), nn.BatchNorm2d(out_ch), nn.ReLU()]


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; maxpool-1x1) concatenated on channels."""

    def __init__(
        self, in_planes: int, n1x1: int, n3x3red: int, n3x3: int, n5x5red: int, n5x5: int, pool_planes: int
    ) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_planes, n1x1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(in_planes, n3x3red, 1), *_conv_bn_relu(n3x3red, n3x3, 3))
        self.b3 = nn.Sequential(
            *_conv_bn_relu(in_planes, n5x5red, 1),
            *_conv_bn_relu(n5x5red, n5x5, 3),
            *_conv_bn_relu(n5x5, n5x5, 3),
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_planes, pool_planes, 1))
        self.out_planes = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    """CIFAR GoogLeNet: 3x3 stem to 192 channels, nine Inception modules, GAP, Linear 1024->classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu(in_channels, 192, 3))
        self.a3 = Inception(192, 64, 96, 128, 16, 32, 32)
        self.b3 = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = Inception(480, 192, 96, 208, 16, 48, 64)
        self.b4 = Inception(512, 160, 112, 224, 24, 64, 64)
        self.c4 = Inception(512, 128, 128, 256, 24, 64, 64)
        self.d4 = Inception(512, 112, 144, 288, 32, 64, 64)
        self.e4 = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a5 = Inception(832, 256, 160, 320, 32, 128, 128)
        self.b5 = Inception(832, 384, 192, 384, 48, 128, 128)
        # AvgPool2d(8) on the 8x8 map of a 32x32 input; adaptive so 28x28 inputs work too.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.a3(self.pre_layers(x)))
        x = self.maxpool1(x)
        x = self.e4(self.d4(self.c4(self.b4(self.a4(x)))))
        x = self.maxpool2(x)
        x = self.b5(self.a5(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


@register_model
def googlenet(num_classes: int = 10, in_channels: int = 3) -> GoogLeNet:
    """GoogLeNet (Inception v1) for CIFAR-sized inputs."""
    return GoogLeNet(num_classes=num_classes, in_channels=in_channels)
