"""amas prune with prune.cost=latency and selection by latency: plans meet the predicted-latency levels, every
candidate and the teacher carry a measured latency, the fastest within tolerance wins. No speed-up is asserted."""

import json

from conftest import Counted, prune_overrides

from amas.channels.groups import find_groups
from amas.config import load_config
from amas.latency.model import build_table
from amas.models import create_model
from amas.pipeline.runner import run_pipeline


def analytic_table(cache, batch: int = 1):
    """Put an analytic table (MACs + per-layer cost) for the synthetic ResNet-20 into the cache, where the
    pipeline finds it under its own settings: planning is then independent of how busy the machine is."""
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    groups = find_groups(model, (1, 16, 16))
    return build_table(model, groups, (1, 16, 16), batch_size=batch, model_name="CifarResNet", cache_dir=cache,
                       measure=Counted(), progress=False), model, groups


def test_latency_planned_pipeline_selects_by_latency(teacher_path, tmp_path):
    tables = tmp_path / "tables"
    analytic_table(tables)
    cfg = load_config(None, prune_overrides(**{
        "prune.cost": "latency", "prune.latency_batch": "1", "prune.latency_tables": str(tables),
        "select.indicator": "latency", "select.policy": "tolerance", "select.tolerance": "100",
        "select.latency_batch": "1", "prune.report_runtimes": "[eager,onnx]", "prune.block_removal": "true",
        "select.levels": "[0.2,0.85]", "select.budget_epochs": "2"}))
    run = tmp_path / "run"
    run_pipeline(cfg, run, teacher=str(teacher_path), method="l1", latency_iters=2)
    assert len(list(tables.iterdir())) == 1  # the cached table served every level
    table = json.loads(next(tables.iterdir()).read_text())
    assert table["key"]["batch_size"] == 1 and table["key"]["runtime"] == "eager"

    cand = json.loads((run / "candidates" / "candidates.json").read_text())
    deep = max(cand["rows"], key=lambda r: r["level"])
    assert any(k == 0 for k in deep["kept"].values())  # 85% of the latency cannot go without removing blocks
    from amas.files.pruned import load_pruned

    cut, obj = load_pruned(run / "candidates" / f"{deep['name']}_cut.pt")
    assert obj["recipe"]["removed_blocks"]
    assert cand["teacher"]["latency_ms"] > 0 and all(r["latency_ms"] > 0 for r in cand["rows"])
    sel = json.loads((run / "selection.json").read_text())
    assert sel["indicator"] == "latency" and "latency" in sel["rule"]
    # any accuracy is within a 100-point tolerance: the fastest measured candidate wins
    assert sel["winner"] == min(sel["candidates"], key=lambda r: (r["latency_ms"], -r["val_acc"]))["id"]
    assert (run / "pruned.pt").is_file() and (run / "pareto.png").is_file()
    report = json.loads((run / "report.json").read_text())["runtimes"]
    from amas.latency.runtimes import available_runtimes

    assert set(report["by_runtime"]) == {"eager", "onnx"} & set(available_runtimes())
    assert all(r["speedup_b1"] > 0 and r["speedup_b64"] > 0 for r in report["by_runtime"].values())
    md = (run / "report.md").read_text()
    assert "Latency by runtime" in md and ("**Warning**: " in md) == report["busy"]


def test_latency_planned_cuts_meet_their_levels(tmp_path):
    from amas.config import CriteriaConfig, PruneConfig
    from amas.criteria import channel_scores
    from amas.latency.plan import plan_by_latency

    table, model, groups = analytic_table(tmp_path)
    cfg = PruneConfig(cost="latency", latency_batch=1, latency_tables=str(tmp_path), round_to=1)
    scores = channel_scores("l1", model, groups, None, CriteriaConfig())
    for level in (0.3, 0.6):  # the fraction of the dense latency to keep
        keep = plan_by_latency(scores, model, groups, (1, 16, 16), cfg, level)
        assert table.predict({n: int(v.numel()) for n, v in keep.items()}) <= level * table.predict({})
    assert len(list(tmp_path.iterdir())) == 1  # read from the cache, nothing measured


def test_latency_settings_enter_the_fingerprints_only_when_used():
    from amas.pipeline.runner import stage_fingerprints

    base = stage_fingerprints(load_config(None, []))
    unused = stage_fingerprints(load_config(None, ["prune.latency_batch=64", "select.latency_runtime=onnx"]))
    assert unused == base  # no effect on the run, no effect on its hashes (runs from before the keys resume)
    used = stage_fingerprints(load_config(None, ["prune.cost=latency"]))
    assert used["search"] == base["search"] and used["candidates"] != base["candidates"]
    timed = stage_fingerprints(load_config(None, ["select.indicator=latency", "select.policy=tolerance"]))
    tol = stage_fingerprints(load_config(None, ["select.policy=tolerance"]))
    assert timed["candidates"] != tol["candidates"]


def test_search_penalty_can_weight_channels_by_predicted_latency(tmp_path):
    import pytest

    from amas.channels.cost import CostModel
    from amas.channels.masks import ChannelMasks
    from amas.config import SearchConfig
    from amas.pipeline.search import _penalty_costs
    from amas.search.objective import SearchObjective

    table, model, groups = analytic_table(tmp_path)
    cfg = load_config(None, [f"prune.latency_tables={tmp_path}", "search.penalty_cost=latency"])
    costs = _penalty_costs(cfg, model, groups, (1, 16, 16))
    dense = table.predict({})
    assert costs == pytest.approx({n: c / dense for n, c in table.channel_costs().items()})
    assert _penalty_costs(load_config(None, []), model, groups, (1, 16, 16)) is None  # default: MACs
    obj = SearchObjective(model, groups, ChannelMasks(groups), CostModel(model, groups, (1, 16, 16)), SearchConfig(),
                          (1, 16, 16), 4, penalty_costs=costs)
    assert float(obj.penalty()) == pytest.approx(sum(costs[g.name] * g.size for g in groups), rel=1e-6)
    obj.close()
