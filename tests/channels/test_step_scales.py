"""Fine-tuning a searched cut at the search's step sizes: mask values recovered from the cut, BN grads scaled."""

import torch

from amas.channels.cut import prune_model
from amas.channels.groups import find_groups
from amas.channels.step_scales import folded_mask_scales, scale_folded_grads
from amas.models import create_model

SHAPE = (1, 8, 8)


def _cut():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_channels=1)
    groups = find_groups(model, SHAPE)
    g = next(g for g in groups if g.name == "layer2.0.conv1")
    masks = {g.name: torch.linspace(0.1, 1.6, g.size)}
    keep = {g.name: torch.arange(0, g.size, 2)}  # every other channel: masks 0.1, 0.2, ...
    folded = prune_model(model, groups, keep, masks=masks)
    plain = prune_model(model, groups, keep)
    return folded, plain, masks[g.name][keep[g.name]]


def test_the_folded_masks_are_recovered_per_kept_channel():
    folded, plain, kept_masks = _cut()
    scales = folded_mask_scales(folded, plain)
    assert list(scales) == ["layer2.0.bn1"]
    assert torch.allclose(scales["layer2.0.bn1"], kept_masks, atol=1e-6)


def test_bn_gradients_are_scaled_by_the_square_of_the_mask_capped_at_one():
    folded, plain, kept_masks = _cut()
    scales = folded_mask_scales(folded, plain)
    x = torch.randn(4, *SHAPE)
    folded.train()
    folded(x).sum().backward()
    want_w = folded.layer2[0].bn1.weight.grad * (kept_masks ** 2).clamp(max=1.0)
    want_b = folded.layer2[0].bn1.bias.grad * (kept_masks ** 2).clamp(max=1.0)
    other = folded.layer3[0].bn1.weight.grad.clone()
    folded.zero_grad()
    handles = scale_folded_grads(folded, scales)
    assert len(handles) == 2
    folded(x).sum().backward()
    assert torch.allclose(folded.layer2[0].bn1.weight.grad, want_w, atol=1e-6)
    assert torch.allclose(folded.layer2[0].bn1.bias.grad, want_b, atol=1e-6)
    assert torch.allclose(folded.layer3[0].bn1.weight.grad, other, atol=1e-6)  # unmasked layers untouched
    for h in handles:
        h.remove()
