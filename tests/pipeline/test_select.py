"""Selection: Pareto front, budget and tolerance policies, successive halving, the fine-tuning objective."""

import copy
import math

import pytest
import torch

from amas.config import FinetuneConfig, load_config
from amas.errors import SelectionError
from amas.pipeline.halving import halving_schedule, successive_halving
from amas.pipeline.select import budget_bound, choose, halving_score, pareto_front
from amas.search.alignment import AlignmentObjective


def row(i, macs, acc, params=None, channels=None):
    return {
        "id": i,
        "name": f"cand{i}",
        "level": 0.5,
        "macs": macs,
        "params": params if params is not None else macs // 10,
        "channels": channels if channels is not None else macs // 100,
        "val_acc": acc,
        "macs_reduction": 0.0,
    }


TEACHER_MACS = 1000


# ---------------------------------------------------------------- Pareto front


def test_pareto_front_keeps_only_non_dominated_rows_sorted_by_cost():
    rows = [row(0, 700, 92.0), row(1, 500, 91.5), row(2, 600, 91.0), row(3, 300, 89.0), row(4, 500, 90.0),
            row(5, 800, 92.0)]
    # 2 is beaten by 1 (cheaper and better), 4 by 1 (same cost, worse), 5 by 0 (dearer, same acc)
    assert pareto_front(rows) == [3, 1, 0]


def test_pareto_front_keeps_exact_duplicates_and_follows_the_indicator():
    rows = [row(0, 500, 91.0, channels=50), row(1, 500, 91.0, channels=40), row(2, 400, 90.0, channels=60)]
    assert pareto_front(rows, "macs") == [2, 0, 1]  # 0 and 1 tie on both indicators: neither dominates
    assert pareto_front(rows, "channels") == [1]  # fewest channels and the best accuracy


# ---------------------------------------------------------------- budget policy


def test_budget_picks_the_most_accurate_candidate_within_the_bound():
    rows = [row(0, 700, 93.0), row(1, 500, 92.0), row(2, 400, 92.5), row(3, 300, 90.0)]
    assert choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=500)["id"] == 2
    assert choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=399)["id"] == 3
    assert choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=10_000)["id"] == 0


def test_budget_ties_go_to_fewer_macs_then_fewer_params_then_lower_id():
    rows = [row(0, 500, 92.0), row(1, 450, 92.0), row(2, 450, 92.0, params=10), row(3, 450, 92.0, params=10)]
    assert choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=500)["id"] == 2
    assert choose(list(reversed(rows)), "budget", teacher_macs=TEACHER_MACS, bound=500)["id"] == 2  # order-free


def test_budget_with_no_feasible_candidate_is_one_line_naming_the_best_trade_off():
    rows = [row(0, 700, 93.0), row(1, 600, 91.0), row(2, 600, 92.0)]
    with pytest.raises(SelectionError) as e:
        choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=500)
    msg = str(e.value)
    assert "\n" not in msg and "cand2" in msg and "-40.0% MACs" in msg and "select.min_reduction" in msg


def test_budget_bound_from_reduction_or_absolute_macs():
    cfg = load_config(None, ["select.min_reduction=0.7"]).select
    assert budget_bound(cfg, 1000) == 300
    cfg = load_config(None, ["select.min_reduction=0.7", "select.max_macs=450"]).select
    assert budget_bound(cfg, 1000) == 450


# ---------------------------------------------------------------- tolerance policy


def test_tolerance_picks_the_cheapest_candidate_within_tolerance():
    rows = [row(0, 700, 93.0), row(1, 500, 92.6), row(2, 400, 92.4), row(3, 300, 91.0)]
    assert choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.5)["id"] == 1
    assert choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.4)["id"] == 2  # >= is feasible
    assert choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=80.0)["id"] == 3


def test_tolerance_ties_go_to_higher_acc_then_fewer_macs_then_lower_id():
    rows = [row(0, 500, 92.6), row(1, 500, 92.9), row(2, 500, 92.9), row(3, 700, 95.0)]
    assert choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.5)["id"] == 1
    by_channels = [row(0, 500, 92.6, channels=10), row(1, 400, 92.9, channels=30)]
    assert choose(by_channels, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.5, indicator="channels")["id"] == 0
    assert choose(by_channels, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.5, indicator="macs")["id"] == 1


def test_tolerance_with_no_feasible_candidate_names_the_most_accurate_and_the_knob():
    rows = [row(0, 700, 92.0), row(1, 500, 91.5)]
    with pytest.raises(SelectionError) as e:
        choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=92.5, tolerance=0.5)
    msg = str(e.value)
    assert "\n" not in msg and "cand0" in msg and "select.tolerance" in msg and "1.00" in msg


def test_policy_winner_is_on_the_front():
    torch.manual_seed(0)
    for _ in range(50):
        rows = [row(i, int(m), round(float(a), 1)) for i, (m, a) in
                enumerate(zip(torch.randint(100, 1000, (6,)), 85 + 10 * torch.rand(6), strict=True))]
        front = pareto_front(rows)
        assert choose(rows, "budget", teacher_macs=TEACHER_MACS, bound=2000)["id"] in front
        assert choose(rows, "tolerance", teacher_macs=TEACHER_MACS, min_acc=0.0)["id"] in front


# ---------------------------------------------------------------- successive halving


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 9])
def test_halving_schedule_spends_exactly_the_budget(n):
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / 2))
    need = sum(counts[:-1])
    for budget in range(max(1, need), need + 40):
        sched = halving_schedule(n, budget)
        assert [c for c, _ in sched] == counts
        assert sum(c * e for c, e in sched) == budget
        assert all(e >= 1 for _, e in sched[:-1]) and sched[-1][1] >= 0


def test_halving_schedule_shares_rounds_and_rejects_too_small_budgets():
    assert halving_schedule(4, 24) == [(4, 2), (2, 4), (1, 8)]  # 8 candidate-epochs per round
    assert halving_schedule(1, 7) == [(1, 7)]
    with pytest.raises(SelectionError, match="at least 10"):
        halving_schedule(5, 9)


def test_successive_halving_spends_the_budget_and_keeps_the_best():
    quality = {0: 80.0, 1: 90.0, 2: 85.0, 3: 70.0, 4: 88.0}
    trained = {i: 0 for i in quality}
    calls = []

    def train(cid, until):
        assert until > trained[cid]  # always continues, never repeats an epoch
        calls.append((cid, until - trained[cid]))
        trained[cid] = until
        return quality[cid] + until * 0.1  # more training helps a little, never enough to overturn quality

    rows = {i: row(i, 500, 0.0) for i in quality}
    score = lambda c, acc: halving_score(dict(rows[c], val_acc=acc), "budget")  # noqa: E731
    out = successive_halving(list(quality), 23, train, score)
    assert sum(e for _, e in calls) == 23 == out["spent"] == sum(trained.values())
    assert out["survivor"] == 1 and trained[1] == max(trained.values()) == out["horizon"]
    assert [r["alive"] for r in out["rounds"]] == [[0, 1, 2, 3, 4], [1, 4, 2], [1, 4], [1]]
    assert out["rounds"][0]["dropped"] == [0, 3]


def test_tolerance_halving_score_prefers_cheap_candidates_that_meet_the_threshold():
    a, b, c = row(0, 800, 93.0), row(1, 400, 92.6), row(2, 300, 90.0)
    key = lambda r: halving_score(r, "tolerance", min_acc=92.5)  # noqa: E731
    assert sorted([a, b, c], key=key, reverse=True) == [b, a, c]


# ---------------------------------------------------------------- fine-tuning objective and config


def test_fine_tuning_uses_the_alignment_objective_on_every_weight():
    from amas.channels.cut import prune_model
    from amas.channels.groups import find_groups
    from amas.models import create_model

    teacher = create_model("resnet20", num_classes=4, in_channels=1).eval()
    before = copy.deepcopy(teacher.state_dict())
    groups = find_groups(teacher, (1, 16, 16))
    keep = {g.name: torch.arange(g.size // 2) for g in groups}
    student = prune_model(teacher, groups, keep, input_shape=(1, 16, 16)).train()
    obj = AlignmentObjective(teacher, FinetuneConfig(), (1, 16, 16), 4, student=student, section="finetune")
    obj.setup(student, torch.device("cpu"))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    out = obj.compute(student, x, y)
    out.loss.backward()
    assert set(out.terms) >= {"ce", "kd", "adv", "d_loss"} and "sparsity" not in out.terms  # no mask penalty
    assert all(bool(torch.isfinite(v).all()) for v in out.terms.values())
    assert obj.scalars() == {} and not hasattr(obj, "masks")
    params = {id(p) for g in obj.param_groups(student) for p in g["params"]}
    assert params == {id(p) for p in student.parameters()}
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_nested_train_sections_keep_their_own_defaults_when_overridden():
    cfg = load_config(None, ["finetune.train.epochs=7", "search.train.epochs=2"])
    assert (cfg.finetune.train.epochs, cfg.finetune.train.lr, cfg.finetune.train.schedule) == (7, 0.02, "cosine")
    assert (cfg.search.train.epochs, cfg.search.train.lr, cfg.search.train.schedule) == (2, 0.01, "cosine")
