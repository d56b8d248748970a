"""A user's model holding a TorchScript block (torch.jit.script'ed, as stochastic-depth ResNets often are): amas
names the block in one line instead of torch's "register_forward_hook is not supported on ScriptModules"."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import amas
from amas.errors import AmasError


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent torch
            self.block = torch.jit.script(Block(16))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.block(self.mid(self.stem(x))).mean((2, 3)))


def test_a_scripted_block_is_named_in_one_line() -> None:
    teacher = Net().eval()
    import copy

    with pytest.raises(AmasError, match=r"'block' of Net is a TorchScript module") as e:
        amas.MaskSearch(copy.deepcopy(teacher), teacher, input_shape=(1, 8, 8))
    assert "\n" not in str(e.value) and "plain nn.Module" in str(e.value)
