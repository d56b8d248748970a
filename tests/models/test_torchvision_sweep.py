"""Torchvision classifiers as a new user would try them: channel groups, random masks, removal equals masking, .pt2.

Small inputs (32x32; inception_v3 needs 75x75), one image. Torch-Pruning 1.6 cannot trace shufflenet's channel
shuffle: the error names the layer and the prune.ignore list that gets the model through (its blocks kept whole).
"""

from __future__ import annotations

import pytest
import torch
from conftest import masked_and_cut, random_masks, randomize_norms, reloaded

from amas.channels.cost import CostModel, count
from amas.channels.groups import find_groups
from amas.channels.plan import kept_counts
from amas.files.export import export_pt2
from amas.models import create_model

# one model per topology (wide_resnet50_2 is resnet50 wider; efficientnet_b0 has b1's blocks, fewer of them)
MODELS = ["resnet50", "resnext50_32x4d", "regnet_y_400mf", "mobilenet_v3_large",
          "convnext_tiny", "squeezenet1_1", "inception_v3", "shufflenet_v2_x0_5",
          "resnet34", "mobilenet_v3_small", "regnet_x_400mf", "mnasnet0_5", "vgg11_bn", "efficientnet_b0"]
# what the one-line error of an untraceable model tells the user to keep whole
IGNORE = {"shufflenet_v2_x0_5": ["stage2", "stage3", "stage4"]}
# groups through grouped convs at least (resnext50_32x4d: both inner groups of its 16 blocks)
GROUPED = {"resnext50_32x4d": 32, "regnet_x_400mf": 44, "regnet_y_400mf": 32}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_removal_equals_masking_and_exports(name: str, tmp_path) -> None:
    size = 75 if name == "inception_v3" else 32
    shape = (3, size, size)
    gen = torch.Generator().manual_seed(0)
    model = create_model("tv:" + name, num_classes=10, in_channels=3).eval()
    randomize_norms(model, gen)
    with torch.no_grad():  # ConvNeXt's per-block layer scale starts at 1e-6: the blocks would not show
        for m in model.modules():
            if isinstance(getattr(m, "layer_scale", None), torch.nn.Parameter):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=gen) + 0.5)
    groups = find_groups(model, shape, ignore=IGNORE.get(name, ()))
    assert groups
    if name in GROUPED:  # grouped convs prune too: one position from every conv group
        assert sum(g.conv_groups > 1 for g in groups) >= GROUPED[name]
    cost = CostModel(model, groups, shape)
    masks, keep = random_masks(groups, gen)
    masks = {k: v.float() for k, v in masks.items()}
    x = torch.randn(1, *shape, generator=gen)
    plain, masked, out, pruned = masked_and_cut(model, groups, masks, keep, x)
    assert count(pruned, shape)[0] == cost.macs(kept_counts(keep))  # the planner's MACs are the pruned model's
    assert (plain - masked).abs().max().item() > 1e-3  # the masks change the outputs: the check means something
    assert (masked - out).abs().max().item() <= 1e-4 * max(1.0, masked.abs().max().item())
    with torch.no_grad():  # pruned.pt round trip: rebuilt from torchvision and the stored layer widths, no tracing
        again = reloaded(pruned.eval(), "tv:" + name, 10, shape, keep, tmp_path / "p.pt")(x)
    assert (again - out).abs().max().item() <= 1e-6 * max(1.0, out.abs().max().item())
    export_pt2(pruned, shape, tmp_path / "m.pt2")
    with torch.no_grad():
        got = torch.export.load(tmp_path / "m.pt2").module()(x)
    assert (got - out).abs().max().item() <= 1e-4 * max(1.0, out.abs().max().item())


def test_an_untraceable_model_names_the_layer_in_one_line() -> None:
    from amas.errors import MaskError

    model = create_model("tv:shufflenet_v2_x0_5", num_classes=10, in_channels=3).eval()
    with pytest.raises(MaskError, match=r"cannot trace layer 'stage\d\.\d' \(InvertedResidual\) of ShuffleNetV2") as e:
        find_groups(model, (3, 32, 32))
    assert "\n" not in str(e.value) and "prune.ignore: [stage2, stage3, stage4]" in str(e.value)
    with pytest.raises(MaskError, match="prune.ignore names 'stage9', which ShuffleNetV2 has no module of"):
        find_groups(model, (3, 32, 32), ignore=["stage9"])


def test_ignored_layers_stay_whole() -> None:
    """An ignored block keeps its channels, and so do the layers feeding and reading it; the others stay prunable."""
    model = create_model("tv:resnet18", num_classes=10, in_channels=3).eval()
    every = {g.name for g in find_groups(model, (3, 32, 32))}
    kept = {g.name for g in find_groups(model, (3, 32, 32), ignore=["layer2.1"])}
    assert "layer2.1.conv1" in every and "layer2.0.conv1" in every
    assert "layer2.1.conv1" not in kept  # inside the ignored block
    assert "layer2.0.conv1" in kept and "layer3.0.conv1" in kept  # elsewhere, untouched
    assert not any(n.startswith("layer2.1.") for n in kept)


def test_prune_ignore_enters_the_fingerprints_only_when_set() -> None:
    from amas.config import load_config
    from amas.pipeline.runner import stage_fingerprints

    base = stage_fingerprints(load_config(None, []))
    assert stage_fingerprints(load_config(None, ["prune.ignore=[]"])) == base  # runs from before the key resume
    ignored = stage_fingerprints(load_config(None, ["prune.ignore=[layer2.1]"]))
    assert ignored["search"] != base["search"] and ignored["candidates"] != base["candidates"]
