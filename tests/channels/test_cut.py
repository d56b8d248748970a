"""Removal equals masking on every zoo model and five torchvision classifiers; planning at a MACs target."""

from __future__ import annotations

import pytest
import torch
from conftest import random_masks, randomize_norms
from torch import nn

from amas.channels.cost import CostModel, count
from amas.channels.cut import make_recipe, model_from_recipe, prune_model
from amas.channels.groups import find_groups
from amas.channels.masks import ChannelMasks
from amas.channels.plan import kept_counts, plan_keep
from amas.errors import PruneError
from amas.models import create_model

MODELS = [
    ("resnet20", (3, 8, 8)),
    ("resnet32", (1, 8, 8)),
    ("resnet56", (3, 8, 8)),
    ("resnet110", (1, 8, 8)),
    ("vgg16_bn", (3, 16, 16)),
    ("googlenet", (3, 8, 8)),
    ("mobilenetv2", (3, 8, 8)),
    ("tv:resnet18", (3, 32, 32)),
    ("tv:mobilenet_v2", (3, 32, 32)),
    ("tv:googlenet", (3, 32, 32)),
    ("tv:densenet121", (3, 32, 32)),
    ("tv:efficientnet_b0", (3, 32, 32)),
]


CASES = [(m, s, False) for m, s in MODELS] + [("resnet20", (3, 8, 8), True), ("resnet56", (1, 8, 8), True)]


@pytest.mark.parametrize("name,shape,residual", CASES, ids=[m + ("+residual" if r else "") for m, _, r in CASES])
def test_removal_equals_masking(name: str, shape: tuple[int, int, int], residual: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    randomize_norms(model, gen)
    groups = find_groups(
        model, shape, residual=residual
    )  # traced in float32 (float64 depthwise convs with autograd are slow on CPU)
    assert groups
    cost = CostModel(model, groups, shape)
    model.double()
    masks, keep = random_masks(groups, gen)
    hooks = ChannelMasks(groups).double()
    hooks.load_values(masks)
    hooks.attach(model)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        masked = model(x)
        pruned = prune_model(model, groups, keep, masks=masks)
        out = pruned(x)
    assert (masked - out).abs().max().item() <= 1e-5
    # the pruned model is a plain module without hooks, smaller, and the caller's model is untouched
    assert not any(m._forward_hooks for m in pruned.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count(pruned, shape)[0] == cost.macs(kept_counts(keep)) < cost.total_macs
    hooks.detach()


def _resnet(shape=(1, 8, 8)):
    model = create_model("resnet56", num_classes=4, in_channels=shape[0]).eval()
    groups = find_groups(model, shape)
    return model, groups, CostModel(model, groups, shape)


@pytest.mark.parametrize("round_to", [1, 8])
def test_plan_meets_the_target_closely(round_to: int) -> None:
    model, groups, cost = _resnet()
    scores = {g.name: torch.rand(g.size) for g in groups}
    keep = plan_keep(scores, cost, 0.4, round_to=round_to)
    counts = kept_counts(keep)
    macs = cost.macs(counts)
    budget = 0.6 * cost.total_macs
    assert macs <= budget
    assert macs >= budget - (8 if round_to > 1 else 1) * max(cost.channel_costs().values())
    for g in groups:
        assert counts[g.name] >= 1 and (counts[g.name] % round_to == 0 or counts[g.name] == g.size)
        # each group keeps its highest-scoring channels
        kept = set(keep[g.name].tolist())
        dropped = [i for i in range(g.size) if i not in kept]
        if dropped and kept:
            assert max(scores[g.name][dropped]) <= min(scores[g.name][list(kept)])
    assert count(prune_model(model, groups, keep), (1, 8, 8))[0] == macs


def test_zero_masks_go_first_and_min_channels_hold() -> None:
    _, groups, cost = _resnet()
    scores = {g.name: torch.ones(g.size) for g in groups}
    scores["layer3.4.conv1"][:40] = 0.0  # the cheapest channels, but their masks are zero
    keep = plan_keep(scores, cost, 0.05, min_channels=4)
    assert set(range(40)).isdisjoint(keep["layer3.4.conv1"].tolist())
    keep = plan_keep(scores, cost, 0.45, min_channels=4)
    assert min(kept_counts(keep).values()) >= 4


def test_dead_group_keeps_min_channels_unrounded() -> None:
    """A group whose scores are all zero keeps min_channels, not round_to, and the MACs go to live groups."""
    _, groups, cost = _resnet()
    scores = {g.name: torch.rand(g.size) + 0.5 for g in groups}
    scores["layer1.2.conv1"] = torch.zeros(16)
    keep = plan_keep(scores, cost, 0.3, min_channels=1, round_to=8)
    counts = kept_counts(keep)
    assert counts["layer1.2.conv1"] == 1
    assert all(c % 8 == 0 for n, c in counts.items() if n != "layer1.2.conv1")  # live groups stay rounded
    assert cost.macs(counts) <= 0.7 * cost.total_macs


def test_unreachable_target_is_one_line() -> None:
    _, groups, cost = _resnet()
    scores = {g.name: torch.rand(g.size) for g in groups}
    with pytest.raises(PruneError) as e:
        plan_keep(scores, cost, 0.9, round_to=8)
    assert "out of reach" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PruneError, match="which this model does not have"):
        plan_keep({"fc": torch.ones(4)}, cost, 0.3)


def test_residual_groups_cover_the_stages() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=1)
    inner = {g.name for g in find_groups(model, (1, 8, 8))}
    both = {g.name: g for g in find_groups(model, (1, 8, 8), residual=True)}
    assert set(both) - inner == {"conv1", "layer2.0.conv2", "layer3.0.conv2"}
    assert "layer2.0.shortcut" in both["layer2.0.conv2"].producers and both["conv1"].size == 16


@pytest.mark.parametrize("residual", [False, True])
def test_recipe_rebuilds_the_architecture(residual: bool) -> None:
    model = create_model("resnet56", num_classes=4, in_channels=1).eval()
    groups = find_groups(model, (1, 8, 8), residual=residual)
    cost = CostModel(model, groups, (1, 8, 8))
    keep = plan_keep({g.name: torch.rand(g.size) for g in groups}, cost, 0.5, round_to=8)
    pruned = prune_model(model, groups, keep)
    recipe = make_recipe({"name": "resnet56", "num_classes": 4, "in_channels": 1}, (1, 8, 8), keep)
    rebuilt = model_from_recipe(recipe)
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned.eval()(x))


class _GroupedNet(nn.Module):
    """ResNeXt's shape in small: 1x1 conv, a 3x3 conv with 4 groups, 1x1 conv, a residual add, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.c(self.b(self.a(x))))
        return self.head(x.mean((2, 3)))


def test_grouped_convs_prune_the_same_positions_in_every_conv_group() -> None:
    """A grouped conv keeps its groups: one mask entry per position in a conv group, removed from all four groups;
    removal equals masking, the rounding counts channels, the MACs are the plan's, and every criterion scores it."""
    from amas.config import CriteriaConfig
    from amas.criteria import channel_scores

    gen = torch.Generator().manual_seed(0)
    shape = (1, 8, 8)
    model = _GroupedNet().eval()
    randomize_norms(model, gen)
    groups = {g.name: g for g in find_groups(model, shape)}
    assert {n: (g.size, g.conv_groups) for n, g in groups.items()} == {"stem.0": (16, 1), "a.0": (8, 4), "b.0": (8, 4)}
    cost = CostModel(model, list(groups.values()), shape)
    model.double()
    masks, keep = random_masks(groups.values(), gen)
    hooks = ChannelMasks(list(groups.values())).double()
    hooks.load_values(masks)
    hooks.attach(model)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        masked = model(x)
        pruned = prune_model(model, list(groups.values()), keep, masks=masks)
        assert (masked - pruned(x)).abs().max().item() <= 1e-9
    hooks.detach()
    conv = pruned.b[0]
    assert conv.groups == 4 and (conv.in_channels, conv.out_channels) == (4 * len(keep["a.0"]), 4 * len(keep["b.0"]))
    assert count(pruned, shape)[0] == cost.macs(kept_counts(keep))

    model.float()
    keep = plan_keep({n: torch.rand(g.size, generator=gen) for n, g in groups.items()}, cost, 0.3, round_to=8)
    kept = kept_counts(keep)
    assert kept["a.0"] % 2 == 0 and kept["b.0"] % 2 == 0  # 4 conv groups x kept positions: multiples of 8 channels
    assert count(prune_model(model, list(groups.values()), keep), shape)[0] == cost.macs(kept_counts(keep))
    batches = [(torch.randn(4, *shape, generator=gen), torch.randint(0, 4, (4,), generator=gen))]
    for method, on in [(m, "bn") for m in ("l1", "l2", "fpgm", "bn_scale", "random", "taylor", "hrank", "apoz")] + [
            ("taylor", "weight")]:
        cfg = CriteriaConfig(batches=1, taylor_on=on)
        scores = channel_scores(method, model, list(groups.values()), batches, cfg)
        assert {n: s.numel() for n, s in scores.items()} == {"stem.0": 16, "a.0": 8, "b.0": 8}


class _CountBranch(nn.Module):
    """A forward that reads a channel count (NASNet-style cells do): cutting conv1 changes what it computes."""

    def __init__(self, crash: bool = False) -> None:
        super().__init__()
        self.crash = crash
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.crash:
            h = h.view(h.shape[0], 8, h.shape[2], h.shape[3])  # the width written into the forward
        elif h.size(1) != 8:
            h = h * 2.0
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("crash", [False, True])
def test_a_cut_that_changes_what_the_forward_computes_stops_in_one_line(crash):
    from amas.channels.cut import prune_model
    from amas.channels.groups import find_groups
    from amas.errors import PruneError

    torch.manual_seed(0)
    model = _CountBranch(crash).eval()
    groups = find_groups(model, (3, 8, 8))
    keep = {"conv1": torch.arange(4)}
    with pytest.raises(PruneError) as e:
        prune_model(model, groups, keep, input_shape=(3, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg and "prune.ignore=['conv1']" in msg
    assert ("fails (RuntimeError" in msg) == crash and ("differs" in msg) != crash
    # the fix it names works: conv1 kept whole, the other group still cuts and matches
    groups = find_groups(model, (3, 8, 8), ignore=["conv1"])
    assert "conv1" not in {g.name for g in groups}
    small = prune_model(model, groups, {"conv2": torch.arange(4)}, input_shape=(3, 8, 8))
    assert small.conv2.out_channels == 4
