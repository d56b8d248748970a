"""timm models: norm+act layers masked where the cut folds, removal equals masking, 'timm:<name>' in recipes.

timm's BatchNormAct2d runs its activation inside the BN module, so amas masks the activation's input (the BN's
affine output), where the cut folds the mask. Small inputs (16x16 or 32x32), one or two images, few classes.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import masked_and_cut, random_cut, randomize_norms, reloaded, tiny_overrides
from torch import nn

from amas.channels.cost import CostModel, count
from amas.channels.groups import find_groups
from amas.channels.masks import mask_site
from amas.channels.plan import kept_counts
from amas.errors import AmasError, MaskError
from amas.files.export import export_pt2
from amas.models import create_model

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, GroupNormAct, convert_sync_batchnorm  # noqa: E402
from timm.layers.norm_act import FrozenBatchNormAct2d  # noqa: E402


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """a equals b up to float32 rounding, relative to the larger output."""
    return (a - b).abs().max().item() <= rel * max(1.0, a.abs().max().item())


class NormActNet(nn.Module):
    """conv → norm+act → depthwise conv → norm+act → conv → BN without activation → classifier (EfficientNet-like)."""

    def __init__(self, act: type[nn.Module] = nn.SiLU, drop: type[nn.Module] | None = None,
                 norm: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = (norm or BatchNormAct2d)(16, act_layer=act, drop_layer=drop)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = BatchNormAct2d(16, act_layer=act, drop_layer=drop)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.bn3 = BatchNormAct2d(24, apply_act=False)
        self.head = nn.Conv2d(24, 32, 1, bias=False)
        self.bn4 = BatchNormAct2d(32, act_layer=act)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        x = self.bn3(self.pw(self.bn2(self.dw(self.bn1(self.stem(x))))))
        return self.fc(self.bn4(self.head(x)).mean((2, 3)))


def _net(act: type[nn.Module], drop: type[nn.Module] | None = None) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = NormActNet(act, drop).eval()
    randomize_norms(net, gen)
    with torch.no_grad():  # biases that push many pre-activations into the curved part of SiLU / hard-swish
        for m in net.modules():
            if isinstance(m, BatchNormAct2d):
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return net


@pytest.mark.parametrize("act,drop", [(nn.SiLU, None), (nn.Hardswish, None), (nn.SiLU, nn.Dropout)],
                         ids=["silu", "hardswish", "silu-dropout"])
def test_batchnorm_act_removal_equals_masking(act, drop) -> None:
    """Masks at the activation's input: no channel dropped and masks in [0.5, 1], then a real partial cut."""
    net = _net(act, drop)
    groups = find_groups(net, (3, 16, 16))
    assert [g.name for g in groups] == ["stem", "pw", "head"]
    # the BNs carry the masks (once per channel), never the convs before them
    assert [g.producers for g in groups] == [["bn1", "bn2"], ["bn3"], ["bn4"]]
    assert mask_site(net.bn1) is net.bn1.drop  # the input of drop (an Identity without one), then act
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    soft = {g.name: torch.rand(g.size, generator=gen) * 0.5 + 0.5 for g in groups}
    every = {g.name: torch.arange(g.size) for g in groups}
    plain, masked, cut, _ = masked_and_cut(net, groups, soft, every, x)
    assert not close(plain, masked, 1e-3)  # the masks matter
    assert close(masked, cut)
    masks, keep = random_cut(groups, gen)
    _, masked, cut, pruned = masked_and_cut(net, groups, masks, keep, x)
    assert pruned.bn1.num_features < 16 and close(masked, cut)
    if drop is None:  # the search trains with batch statistics: the mask sits before the activation there too
        net.train()
        _, masked, cut, _ = masked_and_cut(net, groups, masks, keep, x)
        assert close(masked, cut)


def test_sync_batchnorm_act_masks_before_its_activation() -> None:
    net = convert_sync_batchnorm(_net(nn.Hardswish)).eval()
    assert type(net.bn1).__name__ == "SyncBatchNormAct"
    groups = find_groups(net, (3, 16, 16))
    assert [g.producers for g in groups] == [["bn1", "bn2"], ["bn3"], ["bn4"]]
    masks, keep = random_cut(groups, torch.Generator().manual_seed(1))
    _, masked, cut, _ = masked_and_cut(net, groups, masks, keep, torch.randn(2, 3, 16, 16))
    assert close(masked, cut)


@pytest.mark.parametrize("norm", ["frozen_bn_act", "frozen_bn", "group_norm_act"])
def test_frozen_bns_prune_as_batchnorms_and_group_norm_act_is_left_out(norm: str) -> None:
    """A frozen BN (timm's norm+act, torchvision's) takes the mask and the cut as a BatchNorm does (its buffers
    sliced); GroupNormAct keeps its channels; the other groups still prune, removal equal to masking."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    make = {"frozen_bn_act": lambda c, act_layer, drop_layer: FrozenBatchNormAct2d(c, act_layer=act_layer),
            "frozen_bn": lambda c, act_layer, drop_layer: nn.Sequential(FrozenBatchNorm2d(c), act_layer()),
            "group_norm_act": lambda c, act_layer, drop_layer: GroupNormAct(c, 4, act_layer=act_layer)}[norm]
    net = NormActNet(nn.SiLU, norm=make).eval()
    gen = torch.Generator().manual_seed(0)
    randomize_norms(net, gen)
    with torch.no_grad():
        for name, t in net.bn1.named_buffers():
            if name.rpartition(".")[2] in ("weight", "bias"):  # the frozen BNs' affine lives in buffers
                t.copy_(torch.randn(t.shape, generator=gen))
    groups = find_groups(net, (3, 16, 16))
    frozen = norm != "group_norm_act"
    assert [g.name for g in groups] == (["stem"] if frozen else []) + ["pw", "head"]  # the stem's runs through bn1
    if frozen:
        site = "bn1" if norm == "frozen_bn_act" else "bn1.0"
        assert groups[0].producers == [site, "bn2"]  # after the frozen BN, never on the conv before it
    masks, keep = random_cut(groups, gen)
    _, masked, cut, pruned = masked_and_cut(net, groups, masks, keep, torch.randn(2, 3, 16, 16, generator=gen))
    assert close(masked, cut)
    if frozen:
        bn1 = pruned.get_submodule(site)
        assert type(bn1) is type(net.get_submodule(site)) and bn1.weight.shape == bn1.running_var.shape == (
            len(keep["stem"]),)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_timm_models_with_batchnorm_act_cut_as_searched(name: str) -> None:
    """No channel dropped and masks in [0.5, 1]: the cut is the masked student (it was 4-8% off)."""
    gen = torch.Generator().manual_seed(0)
    model = create_model("timm:" + name, num_classes=5, in_channels=3).eval()
    randomize_norms(model, gen)
    groups = find_groups(model, (3, 32, 32))
    soft = {g.name: torch.rand(g.size, generator=gen) * 0.5 + 0.5 for g in groups}
    every = {g.name: torch.arange(g.size) for g in groups}
    plain, masked, cut, _ = masked_and_cut(model, groups, soft, every, torch.randn(2, 3, 32, 32, generator=gen))
    assert not close(plain, masked, 1e-3)
    assert close(masked, cut)


# small timm CNNs of many families (BN+act layers, SE, grouped and mixed convs, aggregation, one-shot NAS)
SWEEP = ["resnet10t", "efficientnet_b0", "mobilenetv3_small_050", "mobilenetv3_large_100", "ghostnet_050",
         "regnetx_002", "regnety_002", "lcnet_050", "mixnet_s", "tinynet_e", "dla46_c", "tf_efficientnetv2_b0",
         "semnasnet_050", "ese_vovnet19b_dw", "gernet_s"]
# torch.export takes seconds a model: five families
EXPORTED = {"lcnet_050", "tinynet_e", "regnetx_002", "mixnet_s", "mobilenetv3_small_050"}


@pytest.mark.parametrize("name", SWEEP)
def test_timm_removal_equals_masking_and_exports(name: str, tmp_path) -> None:
    shape = (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    model = create_model("timm:" + name, num_classes=5, in_channels=3).eval()
    randomize_norms(model, gen)
    groups = find_groups(model, shape)
    assert len(groups) >= 5
    cost = CostModel(model, groups, shape)
    masks, keep = random_cut(groups, gen)
    x = torch.randn(1, *shape, generator=gen)
    plain, masked, out, pruned = masked_and_cut(model, groups, masks, keep, x)
    assert not close(plain, masked, 1e-3)  # the masks change the outputs: the check means something
    assert close(masked, out, 1e-4)
    assert count(pruned, shape)[0] == cost.macs(kept_counts(keep))  # the planner's MACs are the pruned model's
    with torch.no_grad():  # pruned.pt round trip: rebuilt from timm and the stored layer widths, no tracing
        again = reloaded(pruned.eval(), "timm:" + name, 5, shape, keep, tmp_path / "p.pt")(x)
    assert close(again, out, 1e-6)
    if name in EXPORTED:
        export_pt2(pruned, shape, tmp_path / "m.pt2")
        with torch.no_grad():
            got = torch.export.load(tmp_path / "m.pt2").module()(x)
        assert close(got, out, 1e-4)


def test_a_timm_model_trains_from_a_config(tmp_path) -> None:
    """model.name: timm:<name> builds through the registry for the data's classes and channels, and trains."""
    from amas.channels.cut import make_recipe, model_from_recipe
    from amas.config import load_config
    from amas.pipeline.teacher import train_dense

    cfg = load_config(None, tiny_overrides(**{"model.name": "timm:resnet10t", "train.epochs": "1",
                                              "train.device": "cpu"}))
    result = train_dense(cfg, tmp_path)
    assert result["epochs"] == 1
    model = create_model(cfg.model.name, num_classes=4, in_channels=1)
    assert model.conv1[0].in_channels == 1 and model.fc.out_features == 4  # synthetic data: 1 channel, 4 classes
    groups = find_groups(model, (1, 16, 16))
    keep = {g.name: list(range(g.size // 2)) for g in groups}
    recipe = make_recipe({"name": "timm:resnet10t", "num_classes": 4, "in_channels": 1}, (1, 16, 16), keep)
    rebuilt = model_from_recipe(recipe)
    assert rebuilt(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_timm_names_and_errors_are_one_line(monkeypatch) -> None:
    with pytest.raises(AmasError, match=r"unknown timm model 'timm:resnet1t' \(did you mean .*'timm:resnet10t'"):
        create_model("timm:resnet1t")
    with pytest.raises(AmasError, match="may not set pretrained"):
        create_model("timm:resnet10t", pretrained=True)
    with pytest.raises(AmasError, match="rejected its options") as e:
        create_model("timm:resnet10t", no_such_option=1)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(AmasError, match=r"need timm, which is not installed; pip install amas\[timm\]") as e:
        create_model("timm:resnet10t")
    assert "\n" not in str(e.value)


def test_a_csp_net_names_every_stage_to_keep_whole_at_once() -> None:
    """cs3darknet_s: Torch-Pruning fails at a split-and-concat stage (a TypeError inside it); the one line lists every
    stage it fails at, and with those ignored the rest cuts as masked."""
    model = create_model("timm:cs3darknet_s", num_classes=5, in_channels=3).eval()
    with pytest.raises(MaskError) as e:
        find_groups(model, (3, 32, 32))
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("prune.ignore: [stages.3, stages.0]")
    groups = find_groups(model, (3, 32, 32), ignore=["stages.3", "stages.0"])
    gen = torch.Generator().manual_seed(0)
    masks, keep = random_cut(groups, gen)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    _, masked, out, _ = masked_and_cut(model, groups, masks, keep, x)
    assert close(masked, out, 1e-4)


@pytest.mark.parametrize("name", ["nf_resnet26", "skresnet18"])
def test_normalizer_free_and_selective_kernel_nets_cut_exactly_at_half_the_macs(name: str, tmp_path) -> None:
    """nf_resnet26: no BN, weight-standardised convs (each filter's statistics span its input channels, so the cut
    bakes them into plain convs first; it found no group before); skresnet18: selective-kernel blocks, pruned as
    units (their paths are stacked and re-weighted by an attention Torch-Pruning cannot trace; 0.7% of the MACs were
    prunable before). Planned to -50% MACs from random scores, removal equals masking, pruned.pt round trip."""
    from amas.channels.bake import BakedConv
    from amas.channels.plan import plan_keep

    shape = (3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    model = create_model("timm:" + name, num_classes=5, in_channels=3).eval()
    randomize_norms(model, gen)
    groups = find_groups(model, shape)
    assert len(groups) >= 8
    if name == "skresnet18":  # masks after every path's norm, the attention's convs listed with the paths'
        g = groups[0]
        assert g.producers == [f"{g.name}.paths.0.bn", f"{g.name}.paths.1.bn"] and g.out_layers[
            f"{g.name}.attn.fc_select"] == 2 and f"{g.name}.attn.fc_reduce" in g.in_layers
    cost = CostModel(model, groups, shape)
    keep = plan_keep({g.name: torch.rand(g.size, generator=gen) for g in groups}, cost, 0.5)
    masks = {g.name: (torch.rand(g.size, generator=gen) * 0.7 + 0.3) * torch.isin(torch.arange(g.size), keep[g.name])
             for g in groups}
    x = torch.randn(2, *shape, generator=gen)
    plain, masked, out, pruned = masked_and_cut(model, groups, masks, keep, x)
    assert not close(plain, masked, 1e-3) and close(masked, out, 1e-4)
    macs = count(pruned, shape)[0]
    assert macs == cost.macs(kept_counts(keep)) and abs(1 - macs / count(model, shape)[0] - 0.5) < 0.02
    baked = [n for n, m in pruned.named_modules() if isinstance(m, BakedConv)]
    assert len(baked) == sum(type(m).__name__ == "ScaledStdConv2d" for m in model.modules())
    with torch.no_grad():
        again = reloaded(pruned.eval(), "timm:" + name, 5, shape, keep, tmp_path / "p.pt")(x)
    assert close(again, out, 1e-6)
