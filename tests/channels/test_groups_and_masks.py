"""Channel groups, mask hooks, the proximal operator and the cost model (tiny inputs, eval mode)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from amas.channels.cost import CostModel, count
from amas.channels.groups import find_groups
from amas.channels.masks import ChannelMasks, prox_nonneg_l1
from amas.errors import MaskError
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


# ---------------------------------------------------------------- where masks go, and groups amas cannot cut


class _ActBN(nn.BatchNorm2d):
    """A BN that runs its activation inside its own forward, as timm's BatchNormAct2d."""

    def __init__(self, c: int, act: nn.Module | None = None) -> None:
        super().__init__(c)
        self.act = act if act is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """act(bn(x))."""
        return self.act(super().forward(x))


class _ClampBN(nn.BatchNorm2d):
    """A BN with a hidden clamp after its affine: no mask site equals folding the mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bn(x) clamped at 0.5."""
        return super().forward(x).clamp(max=0.5)


class _PlainBN(nn.BatchNorm2d):
    """A BN subclass whose own forward changes nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """bn(x)."""
        return super().forward(x)


class _StdConv(nn.Conv2d):
    """A weight-standardised conv (timm's StdConv2d): a mask folded into its weights is normalised away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv with each output channel's weights standardised."""
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _Pair(nn.Module):
    """conv → norm → conv → norm → linear, with the two norms given."""

    def __init__(self, bn1: nn.Module, bn2: nn.Module, conv2: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), bn1
        self.conv2, self.bn2 = conv2 or nn.Conv2d(8, 8, 3, padding=1, bias=False), bn2
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def _cut_equals_masked(model: nn.Module, shape: tuple[int, int, int]) -> list:
    """The model's groups, after checking that a random partial cut equals the masked model."""
    from conftest import masked_and_cut, random_cut, randomize_norms

    gen = torch.Generator().manual_seed(0)
    model.eval()
    randomize_norms(model, gen)
    groups = find_groups(model, shape)
    masks, keep = random_cut(groups, gen)
    _, masked, cut, _ = masked_and_cut(model, groups, masks, keep, torch.randn(2, *shape, generator=gen))
    assert (masked - cut).abs().max().item() <= 1e-5 * max(1.0, masked.abs().max().item())
    return groups


def test_a_bn_with_its_own_activation_is_masked_before_it_and_the_hooks_come_off() -> None:
    import copy

    from amas.channels.masks import mask_site, remove_mask_hooks

    model = _Pair(_ActBN(8), _ActBN(8, nn.Hardswish()))
    groups = _cut_equals_masked(model, (3, 8, 8))
    assert [g.producers for g in groups] == [["bn1"], ["bn2"]]  # the BNs, not the convs before them
    assert mask_site(model.bn1) is model.bn1.act and mask_site(nn.BatchNorm2d(4)) is None
    masks = ChannelMasks(groups, init=0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        masks.attach(model)
        twin = copy.deepcopy(model)
        assert len(model.bn1.act._forward_pre_hooks) == 1 and not model.bn1._forward_hooks
        remove_mask_hooks(twin)
        assert not twin.bn1.act._forward_pre_hooks and torch.equal(twin(x), ref)
        assert not torch.allclose(model(x), ref)
        masks.detach()
        assert torch.equal(model(x), ref)


def test_bn_subclasses_amas_cannot_mask_exactly_are_left_out_and_standardised_convs_are_baked() -> None:
    shared = nn.SiLU()
    cases = {
        "clamp": _Pair(_ClampBN(8), nn.BatchNorm2d(8)),  # a hidden step after the affine
        "shared": _Pair(_ActBN(8, shared), _ActBN(8, shared)),  # one activation module, two BNs
        "sigmoid": _Pair(_ActBN(8, nn.Sigmoid()), nn.BatchNorm2d(8)),  # a zero mask would not silence the channel
        # removing its input channels changes the standardisation of the weights left: the cut bakes it first
        "stdconv": _Pair(nn.BatchNorm2d(8), nn.BatchNorm2d(8), conv2=_StdConv(8, 8, 3, padding=1, bias=False)),
    }
    assert [g.name for g in _cut_equals_masked(cases["clamp"], (3, 8, 8))] == ["conv2"]
    assert [g.name for g in _cut_equals_masked(cases["shared"], (3, 8, 8))] == []
    assert [g.name for g in _cut_equals_masked(cases["sigmoid"], (3, 8, 8))] == ["conv2"]
    assert [g.name for g in _cut_equals_masked(cases["stdconv"], (3, 8, 8))] == ["conv1", "conv2"]
    plain = _cut_equals_masked(_Pair(_PlainBN(8), nn.BatchNorm2d(8)), (3, 8, 8))  # nothing hidden: kept
    assert [g.producers for g in plain] == [["bn1"], ["bn2"]]


def test_torchvision_conv_norm_activation_needs_nothing_special() -> None:
    from torchvision.ops.misc import Conv2dNormActivation

    model = nn.Sequential(Conv2dNormActivation(3, 8, activation_layer=nn.Hardswish),
                          Conv2dNormActivation(8, 8, groups=8, activation_layer=nn.SiLU),
                          Conv2dNormActivation(8, 16, kernel_size=1, activation_layer=nn.Hardswish),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    groups = _cut_equals_masked(model, (3, 8, 8))
    assert [g.producers for g in groups] == [["0.1", "1.1"], ["2.1"]]


class _Mixed(nn.Module):
    """Two convs concatenated, then split again by fixed sizes into two convs (MixNet's mixed convs), or sliced."""

    def __init__(self, split: bool) -> None:
        super().__init__()
        self.split = split
        self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(8)
        self.a, self.b, self.w = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        y = torch.relu(self.bn(torch.cat([self.c1(x), self.c2(x)], 1)))
        if self.split:
            p, q = torch.split(y, [4, 4], dim=1)
            y = torch.cat([self.a(p), self.b(q)], 1)
        else:  # a slice that keeps every channel
            y = self.w(y[:, :8])
        return self.fc(y.mean((2, 3)))


def test_groups_through_fixed_channel_splits_are_left_out() -> None:
    """After a cut the split sizes in the forward would no longer add up; a slice that keeps every channel is fine."""
    assert not {"c1", "c2"} & {g.name for g in _cut_equals_masked(_Mixed(split=True), (3, 6, 6))}
    assert {"c1", "c2"} <= {g.name for g in _cut_equals_masked(_Mixed(split=False), (3, 6, 6))}
