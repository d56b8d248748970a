"""Block removal equals masking: a residual block whose inner channels are all masked to zero becomes its shortcut."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_norms

from amas.channels.blocks import RemovedBlock, effective_counts, prune_with_blocks, removable_groups
from amas.channels.cost import CostModel, count
from amas.channels.groups import find_groups
from amas.channels.masks import ChannelMasks
from amas.models import create_model

CASES = [("resnet20", (3, 8, 8), False), ("resnet56", (1, 8, 8), True), ("tv:resnet18", (3, 32, 32), False),
         ("tv:resnet50", (3, 32, 32), False)]


@pytest.mark.parametrize("name,shape,residual", CASES, ids=[c[0] + ("+residual" if c[2] else "") for c in CASES])
def test_block_removal_equals_masking(name: str, shape: tuple[int, int, int], residual: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    randomize_norms(model, gen)
    groups = find_groups(model, shape, residual=residual)
    blocks = removable_groups(model, groups)
    assert blocks, "no removable block found"
    names = list(blocks)
    drop = {names[0], names[len(names) // 2], names[-1]}  # first, middle and last block (stride and identity)
    masks, keep = {}, {}
    for g in groups:
        m = torch.rand(g.size, generator=gen) * 0.7 + 0.3
        if g.name in drop:
            m.zero_()
        elif g.size > 2:
            m[-1] = 0.0
        masks[g.name] = m
        keep[g.name] = torch.nonzero(m).flatten()
    x = torch.randn(2, *shape, generator=gen)
    cm = ChannelMasks(groups)
    cm.load_values(masks)
    cm.attach(model)
    with torch.no_grad():
        ref = model(x)
    cm.detach()
    pruned = prune_with_blocks(model, groups, keep, masks=masks, input_shape=shape).eval()
    removed = [n for n, m in pruned.named_modules() if isinstance(m, RemovedBlock)]
    assert sorted(removed) == sorted({blocks[n] for n in drop})
    with torch.no_grad():
        out = pruned(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    # the removed block's convs are gone: MACs equal the cost model's count with those groups at zero
    cost = CostModel(model, groups, shape)
    kept = {n: (0 if n in drop else int(v.numel())) for n, v in keep.items()}
    assert count(pruned, shape)[0] == cost.macs(effective_counts(kept, blocks))


def test_a_group_outside_a_block_cannot_keep_nothing() -> None:
    from amas.errors import PruneError

    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    groups = find_groups(model, (1, 8, 8), residual=True)
    assert "conv1" not in removable_groups(model, groups)  # a stage group spans many blocks
    keep = {"conv1": torch.tensor([], dtype=torch.long)}
    with pytest.raises(PruneError, match="not the inner group of a residual block"):
        prune_with_blocks(model, groups, keep, input_shape=(1, 8, 8))


@pytest.mark.parametrize("name,shape", [("resnet20", (1, 8, 8)), ("tv:resnet18", (3, 32, 32))])
def test_a_model_with_removed_blocks_saves_and_loads_without_tracing(name, shape, tmp_path) -> None:
    from amas.channels.cut import make_recipe
    from amas.files.pruned import load_pruned, save_pruned

    model = create_model(name, num_classes=10, in_channels=shape[0]).eval()
    randomize_norms(model, torch.Generator().manual_seed(5))
    groups = find_groups(model, shape)
    blocks = removable_groups(model, groups)
    gone = list(blocks)[1]
    keep = {g.name: (torch.tensor([], dtype=torch.long) if g.name == gone else torch.arange(g.size // 2 or 1))
            for g in groups}
    pruned = prune_with_blocks(model, groups, keep, input_shape=shape).eval()
    record = {"name": name, "num_classes": 10, "in_channels": shape[0]}
    save_pruned(tmp_path / "p.pt", pruned, make_recipe(record, shape, keep), {"data": {"name": "synthetic"}})
    loaded, obj = load_pruned(tmp_path / "p.pt")
    assert obj["recipe"]["removed_blocks"] == [blocks[gone]]
    assert isinstance(loaded.get_submodule(blocks[gone]), RemovedBlock)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
