"""Selection by latency on hand-made candidate rows: the front, the tolerance policy, the latency budget, the plot."""

import json

import pytest

from amas.config import SelectConfig
from amas.errors import SelectionError
from amas.pipeline.select import choose, latency_bound, pareto_front, select_candidates


def row(i, macs, lat, acc):
    return {"id": i, "name": f"cand{i}", "level": 0.5, "macs": macs, "params": macs // 10, "channels": macs // 100,
            "val_acc": acc, "macs_reduction": 0.0, "latency_ms": lat, "epochs": 1, "status": "survivor"}


# fewer MACs does not mean faster: cand1 has the fewest MACs but ragged widths make it the slowest
ROWS = [row(0, 500, 1.0, 92.0), row(1, 400, 1.6, 92.5), row(2, 450, 0.8, 91.0), row(3, 600, 1.2, 93.0)]
TEACHER = {"val_acc": 93.2, "macs": 1000, "params": 100, "channels": 10, "latency_ms": 2.0}


def test_latency_front_differs_from_the_macs_front():
    assert pareto_front(ROWS, "macs") == [1, 3]
    assert pareto_front(ROWS, "latency") == [2, 0, 3]  # cand1 is slower and less accurate than cand3


def test_tolerance_by_latency_picks_the_fastest_within_tolerance():
    assert choose(ROWS, "tolerance", teacher_macs=1000, min_acc=91.5, indicator="latency")["id"] == 0
    assert choose(ROWS, "tolerance", teacher_macs=1000, min_acc=91.5, indicator="macs")["id"] == 1


def test_latency_budget_picks_the_most_accurate_fast_enough_and_fails_in_one_line():
    cfg = SelectConfig(max_latency=0.6)
    bound = latency_bound(cfg, TEACHER)
    assert bound == pytest.approx(1.2)
    assert choose(ROWS, "budget", teacher_macs=1000, bound=500, latency_bound=bound)["id"] == 3
    with pytest.raises(SelectionError, match="no candidate fits the latency budget.*cand2") as e:
        choose(ROWS, "budget", teacher_macs=1000, bound=500, latency_bound=0.5)
    assert "\n" not in str(e.value)
    assert latency_bound(SelectConfig(), TEACHER) is None


def test_a_row_without_latency_is_one_clear_line():
    rows = [dict(r) for r in ROWS]
    del rows[2]["latency_ms"]
    with pytest.raises(SelectionError, match="cand2 has no latency_ms"):
        pareto_front(rows, "latency")


def test_select_candidates_by_latency_writes_the_front_and_the_plot(tmp_path):
    cfg = SelectConfig(indicator="latency", policy="budget", max_latency=0.6)
    result = select_candidates({"rows": ROWS, "teacher": TEACHER}, cfg, tmp_path)
    assert result["winner"] == 3 and result["front"] == [2, 0, 3]
    assert result["bound_latency_ms"] == pytest.approx(1.2) and "latency" in result["rule"]
    assert json.loads((tmp_path / "selection.json").read_text())["winner"] == 3
    assert (tmp_path / "pareto.png").stat().st_size > 0
