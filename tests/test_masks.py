"""Channel groups, mask hooks, the proximal operator and the cost model (tiny inputs, eval mode)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amas.cost import count
from amas.masks import ChannelMasks, CostModel, MaskError, find_groups, prox_nonneg_l1
from amas.models import create_model


def test_prox_nonneg_l1_exact() -> None:
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.75, 2.0])
    assert torch.equal(prox_nonneg_l1(x, 0.5), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, 1.5]))
    t = torch.tensor([0.5, 0.0, 0.0, 0.25, 1.0, 3.0])  # per-channel thresholds (cost-weighted penalty)
    assert torch.equal(prox_nonneg_l1(x, t), torch.tensor([0.0, 0.0, 0.25, 0.25, 0.0, 0.0]))


def test_option_a_resnet_keeps_stage_channels_out() -> None:
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    groups = find_groups(model, (1, 8, 8))
    # one group per block: the inner channels of layerX.Y (conv1 -> bn1 -> conv2); stem, stages and fc stay whole
    assert [g.name for g in groups] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert [g.size for g in groups] == [16] * 3 + [32] * 3 + [64] * 3
    assert all(g.producers == [g.name.replace("conv1", "bn1")] for g in groups)


def test_groups_are_deterministic_and_never_hold_logits() -> None:
    model = create_model("googlenet", num_classes=10).eval()
    a = find_groups(model, (3, 8, 8))
    b = find_groups(model, (3, 8, 8))
    assert [(g.name, g.size, g.producers) for g in a] == [(g.name, g.size, g.producers) for g in b]
    assert "linear" not in {g.name for g in a} and all("linear" not in g.producers for g in a)
    # every Inception branch's last conv is its own group (concat), and the branch inner convs too
    names = {g.name for g in a}
    assert {"a3.b1.0", "a3.b2.0", "a3.b2.3", "a3.b3.0", "a3.b3.3", "a3.b3.6", "a3.b4.1"} <= names
    assert len(a) == 1 + 9 * 7


def test_depthwise_and_residual_channels_share_a_group() -> None:
    model = create_model("mobilenetv2", num_classes=10).eval()
    groups = {g.name: g for g in find_groups(model, (3, 8, 8))}
    # expand conv, depthwise conv and their BNs move together; both BNs are masked
    g = groups["layers.1.conv1"]
    assert g.producers == ["layers.1.bn1", "layers.1.bn2"]
    assert set(g.out_layers) == {"layers.1.conv1", "layers.1.conv2"}
    # a residual stage: every block's projection BN carries the same channels
    g = groups["layers.1.conv3"]
    assert g.producers == ["layers.1.bn3", "layers.1.shortcut.1", "layers.2.bn3"]


def _bn_random(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


def test_masks_at_one_change_nothing_and_detach_restores() -> None:
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    _bn_random(model)
    x = torch.randn(2, 1, 8, 8)
    groups = find_groups(model, (1, 8, 8))
    masks = ChannelMasks(groups)
    with torch.no_grad():
        ref = model(x)
        masks.attach(model)
        assert torch.equal(model(x), ref)
        values = masks.values()
        values["layer2.1.conv1"][:5] = 0.0
        masks.load_values(values)
        assert not torch.allclose(model(x), ref)
        masks.detach()
        assert torch.equal(model(x), ref)


def test_mask_zero_silences_its_channel_and_gets_gradients() -> None:
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    _bn_random(model)
    groups = find_groups(model, (1, 8, 8))
    masks = ChannelMasks(groups)
    masks.attach(model)
    seen = {}
    model.layer1[0].relu1.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    with torch.no_grad():
        masks.masks[0][3] = 0.0
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert torch.count_nonzero(seen["a"][:, 3]) == 0 and torch.count_nonzero(seen["a"][:, 2]) > 0
    assert all(m.grad is not None and torch.isfinite(m.grad).all() for m in masks.masks)
    masks.detach()


def test_load_values_checks_names_and_shapes() -> None:
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    masks = ChannelMasks(find_groups(model, (1, 8, 8)), init=0.5)
    values = masks.values()
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in values.values())
    bad = dict(values)
    bad.pop("layer1.0.conv1")
    with pytest.raises(MaskError, match="missing 'layer1.0.conv1'"):
        masks.load_values(bad)
    bad = dict(values, **{"layer1.0.conv1": torch.ones(3)})
    with pytest.raises(MaskError, match="shape"):
        masks.load_values(bad)


@pytest.mark.parametrize("name,shape", [("resnet20", (1, 8, 8)), ("vgg16_bn", (3, 16, 16))])
def test_cost_model_totals_and_channel_costs(name: str, shape: tuple[int, int, int]) -> None:
    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    groups = find_groups(model, shape)
    cost = CostModel(model, groups, shape)
    assert cost.total_macs == count(model, shape)[0]
    assert cost.macs({}) == cost.total_macs == cost.macs({g.name: g.size for g in groups})
    costs = cost.channel_costs()
    assert set(costs) == {g.name for g in groups} and all(c > 0 for c in costs.values())
    if name == "resnet20":
        # a layer1 inner channel: conv1 out (16*9 MACs per pixel) + conv2 in (16*9), on 8x8 pixels
        assert costs["layer1.0.conv1"] == 2 * 16 * 9 * 64
    with pytest.raises(MaskError, match="unknown channel group"):
        cost.macs({"nope": 1})
