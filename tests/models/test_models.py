"""Model zoo: shapes, structure the pruning code relies on, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amas.errors import AmasError
from amas.models import ShortcutA, create_model, list_models

ZOO = ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "googlenet", "mobilenetv2"]


def test_list_models_has_the_zoo() -> None:
    assert sorted(ZOO) == list_models()


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_zoo_output_shape(name: str, in_channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=in_channels)
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_resnet18_shape(in_channels: int) -> None:
    model = create_model("tv:resnet18", num_classes=7, in_channels=in_channels)
    assert model.conv1.in_channels == in_channels
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)


def test_cifar_resnet_structure() -> None:
    model = create_model("resnet20")
    first, down = model.layer1[0], model.layer2[0]
    assert isinstance(first.shortcut, nn.Identity)
    assert isinstance(down.shortcut, ShortcutA)
    assert (down.shortcut.in_planes, down.shortcut.out_planes, down.shortcut.stride) == (16, 32, 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) == 1 + 2 * 9
    assert model.fc.in_features == 64


def test_shortcut_a_pads_with_zeros() -> None:
    x = torch.randn(1, 4, 6, 6)
    y = ShortcutA(4, 8, 2)(x)
    assert y.shape == (1, 8, 3, 3)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert y[:, :2].abs().sum() == 0 and y[:, 6:].abs().sum() == 0


def test_unknown_model_suggests_closest_name() -> None:
    with pytest.raises(AmasError, match=r"unknown model 'resnt20' \(did you mean 'resnet20'.*available: .*vgg16_bn"):
        create_model("resnt20")


def test_unknown_torchvision_model_suggests_closest_name() -> None:
    with pytest.raises(AmasError, match=r"did you mean 'tv:resnet18'"):
        create_model("tv:resnet181")


def test_unexpected_option_is_a_user_error() -> None:
    with pytest.raises(AmasError, match="does not accept"):
        create_model("resnet20", width=2)
