"""CIFAR ResNet-20/32/56/110 (He et al. 2016) with the option-A (zero-pad) shortcut."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from amas.models.registry import register_model


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsample by `stride`, then route input channels to output channels, zeros elsewhere.

    Unpruned, input channel i goes to output channel i + (out_planes - in_planes) // 2 (the zero-pad of He et al.).
    ``route[j]`` is the input channel that output j copies (``in_planes`` = a zero channel) and ``scale[j]`` its factor;
    channel pruning (``amas.channels.shortcut``) and mask folding edit them, so stage channels of a pruned net stay
    exact.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"ShortcutA cannot shrink channels ({in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride
        pad = (out_planes - in_planes) // 2
        route = torch.full((out_planes,), in_planes, dtype=torch.long)
        route[pad:pad + in_planes] = torch.arange(in_planes)
        self.register_buffer("route", route)
        self.register_buffer("scale", torch.ones(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample, then gather the routed channels (a zero channel for the padding) and scale them."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])], dim=1)
        return x.index_select(1, self.route) * self.scale.view(1, -1, 1, 1).to(x.dtype)

    def fold_out_scale(self, factor: torch.Tensor) -> None:
        """Multiply output channel j by factor[j] (folding a channel mask into the shortcut)."""
        with torch.no_grad():
            self.scale.mul_(factor.to(self.scale))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for key in ("route", "scale"):  # files written before the shortcut had them (unpruned shortcuts)
            state_dict.setdefault(prefix + key, getattr(self, key).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_planes={self.in_planes}, out_planes={self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, three stages of `depth_n` blocks (16/32/64 ch), GAP, fc."""

    def __init__(self, depth_n: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, depth_n, stride=1)
        self.layer2 = self._stage(16, 32, depth_n, stride=2)
        self.layer3 = self._stage(32, 64, depth_n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _resnet(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    """Build a CIFAR ResNet of `depth` = 6n + 2 layers."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)


def _register(depth: int) -> Callable[..., CifarResNet]:
    """Register resnet<depth> (timm style: a constructor named after the model)."""

    def build(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
        return _resnet(depth, num_classes, in_channels)

    build.__name__ = build.__qualname__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} blocks per stage)."
    return register_model(build)


resnet20, resnet32, resnet56, resnet110 = (_register(d) for d in (20, 32, 56, 110))
