"""amas.MaskSearch in a user's loop: the masks move, the cut is the plan, and its state round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_NET_SHAPE as SHAPE
from conftest import loaders, trained_teacher

import amas
from amas.channels.cost import count
from amas.channels.plan import kept_counts
from amas.errors import SearchError


def run_steps(search: amas.MaskSearch, opt: torch.optim.Optimizer, batches) -> None:
    search.student.train()
    for x, y in batches:
        loss = search.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(lr=opt.param_groups[0]["lr"])


def test_mask_search_state_round_trips_and_cut_is_the_plan() -> None:
    train, _, _ = loaders()
    teacher = trained_teacher(train)
    batches = list(train)
    torch.manual_seed(0)
    student = copy.deepcopy(teacher).requires_grad_(True)
    search = amas.MaskSearch(student, teacher, SHAPE, 0.5, total_steps=12, round_to=4, controller_every=2)
    assert not any(p is m for p in student.parameters() for m in search.masks.masks)  # masks outside the optimizer
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    run_steps(search, opt, batches)
    assert search.steps == len(batches)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in search.mask_values().values())

    # a second MaskSearch loaded from the first's state continues identically
    state = copy.deepcopy(search.state_dict())
    student2 = copy.deepcopy(student)
    torch.manual_seed(0)
    other = amas.MaskSearch(student2, teacher, SHAPE, 0.5, total_steps=12, round_to=4, controller_every=2)
    other.load_state_dict(state)
    assert other.steps == search.steps and other.objective.lam == search.objective.lam
    assert all(torch.equal(a, b) for a, b in zip(other.mask_values().values(), search.mask_values().values(),
                                                 strict=True))
    assert other.macs_reduction == search.macs_reduction
    for s, net in ((search, student), (other, student2)):
        run_steps(s, torch.optim.SGD(net.parameters(), lr=0.01), batches[:2])
    for a, b in zip(other.mask_values().values(), search.mask_values().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    other.close()

    keep = search.plan(0.5, 4)
    small = search.cut(0.5, round_to=4)
    assert count(small, SHAPE)[0] == search.cost.macs(kept_counts(keep)) <= 0.5 * search.cost.total_macs
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())
    search.close()


def test_hold_budget_stops_a_step_from_cutting_past_the_target() -> None:
    """A huge lambda zeroes most masks in one step; with hold_budget the strongest of them keep their values so the
    rounded cut stays at or under the target, and a channel dies only where the budget has room."""
    train, _, _ = loaders()
    teacher = trained_teacher(train)
    x, y = next(iter(train))
    got = {}
    for hold in (False, True):
        torch.manual_seed(0)
        student = copy.deepcopy(teacher).requires_grad_(True)
        search = amas.MaskSearch(student, teacher, SHAPE, 0.3, round_to=4, lam=500.0, lam_min=500.0,
                                 controller_every=1000, hold_budget=hold)
        with torch.no_grad():  # masks 1 down to 0.05 in every group: one step with lam 500 zeroes the weak ones
            for m in search.masks.masks:
                m.copy_(torch.linspace(1.0, 0.05, m.numel()))
        search.objective.updater.reset()
        search.loss(x, y).backward()
        search.step(lr=0.01)
        got[hold] = search.macs_reduction
        search.close()
    assert got[False] > 0.35  # the step alone would cut well past the target
    assert 0.25 <= got[True] <= 0.3


def test_min_keep_exempts_each_groups_strongest_share_from_the_penalty() -> None:
    """With lam 500 one mask step empties groups; search.min_keep=0.5 keeps every group's strongest half alive."""
    import math

    train, _, _ = loaders()
    teacher = trained_teacher(train)
    x, y = next(iter(train))
    least = {}
    for floor in (0.0, 0.5):
        torch.manual_seed(0)
        student = copy.deepcopy(teacher).requires_grad_(True)
        search = amas.MaskSearch(student, teacher, SHAPE, 0.9, lam=500.0, min_keep=floor)  # no controller step
        with torch.no_grad():
            for m in search.masks.masks:
                m.copy_(torch.linspace(1.0, 0.05, m.numel()))
        search.objective.updater.reset()
        search.loss(x, y).backward()
        search.step(lr=0.01)
        alive = {n: int((v > 0).sum()) for n, v in search.mask_values().items()}
        least[floor] = min(alive[n] / math.ceil(0.5 * v.numel()) for n, v in search.mask_values().items())
        if floor:
            for v in search.mask_values().values():  # the survivors are the strongest half, the rest shrank to 0
                k = math.ceil(0.5 * v.numel())
                assert bool((v[:k] > 0).all()) and bool((v[k:] == 0).all())
        search.close()
    assert least[0.0] < 1.0 <= least[0.5]


def test_min_keep_uniform_floors_follow_the_target() -> None:
    """The uniform share reaches the target (one more channel each would not); the exempt floors shrink with it."""
    import math

    from amas.channels.cost import CostModel
    from amas.channels.groups import find_groups
    from amas.config import SearchConfig
    from amas.models import create_model
    from amas.search.objective import exempt_counts

    model = create_model("resnet20", num_classes=10, in_channels=1)
    groups = find_groups(model, (1, 28, 28))
    cost = CostModel(model, groups, (1, 28, 28))
    floors = {}
    for target in (0.5, 0.7, 0.8):
        r = cost.uniform_share(target)
        kept = {g.name: max(1, math.ceil(r * g.size)) for g in groups}
        assert cost.macs(kept) <= (1 - target) * cost.total_macs
        wider = {g.name: min(g.size, kept[g.name] + 1) for g in groups}
        assert cost.macs(wider) > (1 - target) * cost.total_macs
        cfg = SearchConfig(target_reduction=target, min_keep_uniform=0.8)
        floors[target] = exempt_counts(groups, cost, cfg)
        assert floors[target] == [math.floor(0.8 * r * g.size) for g in groups]
        rounded = exempt_counts(groups, cost, cfg, round_to=4)
        assert all(k % 4 == 0 and k - 4 < f <= k for k, f in zip(rounded, floors[target], strict=True))
    assert floors[0.5] > floors[0.7] > floors[0.8] and min(floors[0.8]) >= 1
    # at -70% the rounded floors are a quarter of every group (4 / 8 / 16 of 16 / 32 / 64)
    r70 = exempt_counts(groups, cost, SearchConfig(target_reduction=0.7, min_keep_uniform=0.8), round_to=4)
    assert r70 == [g.size // 4 for g in groups]
    # no target, no uniform floor; min_keep still holds
    assert exempt_counts(groups, cost, SearchConfig(min_keep_uniform=0.8)) == [0] * len(groups)
    assert exempt_counts(groups, cost, SearchConfig(min_keep=0.25)) == [math.ceil(g.size / 4) for g in groups]


def test_eval_mode_runs_the_masks_the_cut_folds() -> None:
    """With FISTA the training forward runs an extrapolated point; evaluation and the cut both use the iterate."""
    train, _, _ = loaders()
    teacher = trained_teacher(train)
    batches = list(train)
    student = copy.deepcopy(teacher).requires_grad_(True)
    search = amas.MaskSearch(student, teacher, SHAPE, 0.3, total_steps=40, round_to=1, fista=True,
                             fista_restart=False, mask_lr=0.05)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    run_steps(search, opt, batches[:4])
    updater = search.objective.updater
    assert updater.t > 1.0  # live momentum: the parameters hold the extrapolated point, not the iterate
    assert any(not torch.equal(p, x) for p, x in zip(search.masks.masks, updater.values(), strict=True))
    x = batches[0][0]
    student.eval()
    with torch.no_grad():
        masked = student(x)
    for p, v in zip(search.masks.masks, search.mask_values().values(), strict=True):
        assert torch.equal(p.detach(), v)
    small = search.cut(0.0, round_to=1)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, atol=1e-4, rtol=1e-4)
    search.close()


def teacher_state(model: torch.nn.Module) -> list:
    """What a search must leave as it was on the caller's teacher: modes, requires_grad flags, strides, devices."""
    return ([m.training for m in model.modules()]
            + [(p.requires_grad, p.stride(), p.device) for p in model.parameters()]
            + [(b.stride(), b.device) for b in model.buffers()])


@pytest.mark.parametrize("fast", [True, False])
def test_a_search_leaves_the_teacher_as_it_was_and_a_second_search_equals_the_first(fast: bool) -> None:
    """The caller's teacher keeps its mode, flags and memory format (search.train.channels_last, the default), so a
    student deep-copied from it after a first search is trainable: a second search finds the same groups and gives
    the same loss on the same batch. fast: the teacher's forwards run a folded copy, or (False) the teacher's own."""
    train, _, _ = loaders()
    teacher = trained_teacher(train).train()  # a teacher in training mode, as a user's may be
    before = teacher_state(teacher)
    x, y = next(iter(train))
    got = []
    for _ in range(2):
        torch.manual_seed(0)
        student = copy.deepcopy(teacher)
        search = amas.MaskSearch(student, teacher, SHAPE, 0.5, round_to=4, fast_teacher=fast)
        assert teacher_state(teacher) == before
        got.append(([(g.name, g.size) for g in search.groups], search.loss(x, y).item()))
        search.close()
        assert teacher_state(teacher) == before
    assert got[0][0] and got[1] == got[0]


def test_a_frozen_student_stops_with_one_line() -> None:
    train, _, _ = loaders()
    teacher = trained_teacher(train)
    for student in (copy.deepcopy(teacher).requires_grad_(False), teacher):
        with pytest.raises(SearchError, match=r"requires_grad_\(True\)") as e:
            amas.MaskSearch(student, teacher, SHAPE, 0.5)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("target", [0, 0.0, 1.0])
def test_a_target_that_removes_nothing_or_everything_stops_with_one_line(target: float) -> None:
    from amas.errors import ConfigError

    train, _, _ = loaders()
    teacher = trained_teacher(train)
    with pytest.raises(ConfigError, match="target_reduction=") as e:
        amas.MaskSearch(copy.deepcopy(teacher), teacher, SHAPE, target)
    assert "\n" not in str(e.value)


def test_labels_past_the_class_count_stop_with_one_line() -> None:
    train, _, _ = loaders()
    teacher = trained_teacher(train)
    x, y = next(iter(train))
    search = amas.MaskSearch(copy.deepcopy(teacher), teacher, SHAPE, 0.5)
    with pytest.raises(amas.AmasError, match="has label 4, but the model has 4 classes") as e:
        search.loss(x, torch.full_like(y, 4))
    assert "\n" not in str(e.value)
    search.close()
