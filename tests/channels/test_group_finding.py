"""Group finding ends in bounded time: a user's ShuffleNetV2, timm's rexnet_100, and the bound itself.

Torch-Pruning 1.6's group walk ran for hours on both models (a channel shuffle mapped as a flatten; rexnet's partial
residual concat with guessed input sizes). Each model is searched in a child process with a timeout, so a hang
fails the test instead of stalling the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import masked_and_cut, random_masks, randomize_norms
from torch import nn

from amas.channels import tracing
from amas.channels.groups import find_groups
from amas.channels.owners import OpOwners
from amas.errors import MaskError

SHAPE = (3, 32, 32)
CHILD_TIMEOUT = 90.0  # seconds for a child process: interpreter start, imports and the search
SEARCH_SECONDS = 20.0  # the search itself, generous (well under a second on one core)


# ---------------------------------------------------------------- ShuffleNetV2 as a user writes it (kuangliu's CIFAR)


class ShuffleBlock(nn.Module):
    """Channel shuffle: view as (groups, channels per group), swap, flatten back."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffle x's channels."""
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class SplitBlock(nn.Module):
    """Split the channels at ratio."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two channel slices."""
        c = int(x.size(1) * self.ratio)
        return x[:, :c, :, :], x[:, c:, :, :]


class BasicBlock(nn.Module):
    """Half the channels through 1x1, depthwise 3x3, 1x1; concatenated with the other half and shuffled."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        x1, x2 = self.split(x)
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class DownBlock(nn.Module):
    """Two strided branches, concatenated and shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output."""
        out1 = self.bn1(self.conv1(x))
        out1 = F.relu(self.bn2(self.conv2(out1)))
        out2 = F.relu(self.bn3(self.conv3(x)))
        out2 = self.bn4(self.conv4(out2))
        out2 = F.relu(self.bn5(self.conv5(out2)))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """kuangliu/pytorch-cifar's ShuffleNetV2 at tiny widths."""

    def __init__(self, out_channels: tuple[int, ...] = (16, 32, 64, 128), num_blocks: tuple[int, ...] = (3, 3, 3),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        for _ in range(num_blocks):
            layers.append(BasicBlock(out_channels))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


# ---------------------------------------------------------------- the search in a child process


def _model(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    if name == "shufflenet":
        return ShuffleNetV2().eval(), SHAPE
    import timm

    return timm.create_model("rexnet_100", pretrained=False, num_classes=10).eval(), (3, 64, 64)


def report(name: str) -> None:
    """Find the groups of model name and print the group names (or the error) and the seconds, as one JSON line."""
    torch.set_num_threads(1)
    model, shape = _model(name)
    start = time.monotonic()
    try:
        out: dict = {"groups": [g.name for g in find_groups(model, shape)]}
    except MaskError as e:
        out = {"error": str(e)}
    out["seconds"] = time.monotonic() - start
    print(json.dumps(out))


def _search_in_child(name: str) -> dict:
    """report(name) in a fresh interpreter under a timeout: a search that hangs fails here, it cannot stall pytest."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    code = f"import test_group_finding as t; t.report({name!r})"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=here.parent, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"channel-group search on {name} still running after {CHILD_TIMEOUT:g} s, with no message")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- tests


def test_user_shufflenet_finds_its_groups_in_bounded_time() -> None:
    got = _search_in_child("shufflenet")
    assert "error" not in got, got.get("error")
    assert got["seconds"] < SEARCH_SECONDS
    model = ShuffleNetV2().eval()
    groups = find_groups(model, SHAPE)
    assert [g.name for g in groups] == got["groups"]
    assert {"conv1", "layer1.1.conv1", "layer2.0.conv3", "layer3.2.conv1", "conv2"} <= set(got["groups"])
    # the shuffles are kept whole, exactly as when the user names them in prune.ignore
    shuffles = [n for n, m in model.named_modules() if isinstance(m, ShuffleBlock)]
    by_hand = find_groups(model, SHAPE, ignore=shuffles)
    assert [(g.name, g.size, g.index, g.in_layers, g.out_layers) for g in groups] == [
        (g.name, g.size, g.index, g.in_layers, g.out_layers) for g in by_hand]
    # and they are real groups: removing the masked channels equals masking them
    gen = torch.Generator().manual_seed(0)
    randomize_norms(model, gen)
    masks, keep = random_masks(groups, gen)
    masks = {k: v.float() for k, v in masks.items()}
    plain, masked, out, _ = masked_and_cut(model, groups, masks, keep, torch.randn(2, *SHAPE, generator=gen))
    assert (plain - masked).abs().max().item() > 1e-3
    assert (masked - out).abs().max().item() <= 1e-5 * max(1.0, masked.abs().max().item())


def test_timm_rexnet_finds_its_groups_in_bounded_time() -> None:
    pytest.importorskip("timm")
    got = _search_in_child("rexnet")
    assert "error" not in got, got.get("error")
    assert got["seconds"] < SEARCH_SECONDS
    # every block's expansion channels (features.1 to 15) and the head's
    assert {f"features.{i}.conv_exp.conv" for i in range(1, 16)} | {"features.16.conv"} <= set(got["groups"])


def test_a_walk_past_its_bound_names_the_layers_and_the_ignore_list_that_gets_through(monkeypatch) -> None:
    """As if amas did not repair Torch-Pruning's maps: the walk stops at WALK_STEPS with one line; its list works."""
    def owners_only(graph: tracing._Graph, rec: OpOwners) -> None:
        graph.amas_owner, graph.amas_multi = rec.owner, rec.multi

    monkeypatch.setattr(tracing._Graph, "adopt", owners_only)
    monkeypatch.setattr(tracing, "WALK_STEPS", 100_000)
    model = ShuffleNetV2().eval()
    start = time.monotonic()
    with pytest.raises(MaskError, match=r"channel-group walk on ShuffleNetV2 from layer '[\w.]+'.* did not end within "
                                        r"100000 steps .*keep them whole with prune.ignore: \[") as e:
        find_groups(model, SHAPE)
    assert time.monotonic() - start < SEARCH_SECONDS
    message = str(e.value)
    assert "\n" not in message
    ignore = message.rpartition("prune.ignore: [")[2].rstrip("]").split(", ")
    assert ignore and all(n.startswith("layer") for n in ignore)
    groups = find_groups(model, SHAPE, ignore=ignore)
    assert groups and not any(g.name.startswith(tuple(n + "." for n in ignore)) for g in groups)


def test_the_time_bound_stops_a_search_with_one_line(monkeypatch) -> None:
    monkeypatch.setattr(tracing, "WALK_SECONDS", 0.0)
    with pytest.raises(MaskError, match=r"did not end within 0 s .*raise WALK_STEPS or WALK_SECONDS$") as e:
        find_groups(ShuffleNetV2().eval(), SHAPE)
    assert "\n" not in str(e.value)
