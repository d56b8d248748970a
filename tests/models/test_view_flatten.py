"""A user's CNN that flattens its feature map with ``x.view(n, -1)`` (as many CIFAR model collections do), pruned
with amas' defaults (train.channels_last=true): the run falls back to the contiguous format with one line instead
of stopping with "view size is not compatible with input tensor's size and stride"."""

from __future__ import annotations

import torch
from conftest import loaders, trained_teacher
from test_api import tiny
from torch import nn

import amas


class ViewNet(nn.Module):
    """conv-BN-ReLU, a strided conv-BN-ReLU, then the 8x8 feature map flattened by .view into a linear layer."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(torch.relu(self.bn2(self.conv2(out))))
        out = out.view(out.size(0), -1)
        return self.fc(out)


def test_a_view_flattening_model_prunes_under_the_default_channels_last(capsys) -> None:
    train, val, _ = loaders()
    teacher = trained_teacher(train, ViewNet)
    with torch.no_grad():
        x = next(iter(val))[0]
        want = teacher(x)
    result = amas.prune(teacher, train=train, val=val, input_shape=(1, 16, 16), target_reduction=0.5,
                        overrides=tiny(**{"prune.round_to": 1}), latency_iters=2)
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if "contiguous" in line]
    assert len(lines) == 1 and "ViewNet" in lines[0] and ".view" in lines[0]  # said once, not silently
    assert "view size" not in out.err
    assert result.model(x).shape == (64, 4)
    with torch.no_grad():  # the caller's teacher keeps its format: it still runs as it did
        assert torch.equal(teacher(x), want)
    assert all(p.is_contiguous() for p in teacher.parameters())
