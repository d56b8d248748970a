"""Weight initialisation shared by the zoo's plain CNNs (VGG, MobileNetV2)."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convs, unit BN scales, N(0, 0.01) linears; all biases zero."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # leaky_relu with slope 0 (torch's default) and relu have the same gain
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
