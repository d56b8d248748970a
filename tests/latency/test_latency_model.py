"""The latency table: interpolation, caching, prediction of whole plans, and planning to a latency budget.

Tables here come from an analytic cost (MACs plus a fixed cost per layer) passed as the measurement, so the
tests are exact and do not depend on how busy the machine is; nothing here asserts a measured speed-up.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Counted
from torch import nn

from amas.channels.blocks import removable_groups
from amas.channels.groups import find_groups
from amas.channels.plan import rounded_count
from amas.errors import PruneError
from amas.latency.model import build_table, validate, width_grid
from amas.latency.plan import plan_counts_latency, plan_keep_latency
from amas.latency.whole import fit_line, random_plans
from amas.models import create_model

SHAPE = (1, 8, 8)


def _setup(name: str = "resnet20", residual: bool = False):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=SHAPE[0]).eval()
    return model, find_groups(model, SHAPE, residual=residual)


def test_width_grid_is_small_and_holds_the_ends() -> None:
    assert width_grid(16) == [1, 8, 16]
    assert width_grid(64) == [1, 8, 16, 24, 32, 40, 48, 56, 64]
    g = width_grid(512)
    assert g[0] == 1 and g[-1] == 512 and len(g) <= 9 and all(w % 8 == 0 for w in g[1:])
    assert width_grid(1) == [1]


def test_widths_are_looked_up_at_the_next_channel_block() -> None:
    model, groups = _setup()
    name = "layer2.1.conv1"
    linear = build_table(model, groups, SHAPE, batch_size=2, measure=Counted(), progress=False, block=1)
    blocked = build_table(model, groups, SHAPE, batch_size=2, measure=Counted(), progress=False)
    cin = linear.layers[name].shape.in_full
    assert blocked.key["block"] == 8 and linear.key["block"] == 1
    for cout, up in ((9, 16), (13, 16), (16, 16), (17, 24), (30, 32)):
        assert blocked.layer_ms(name, cin, cout) == pytest.approx(linear.layer_ms(name, cin, up), rel=1e-12)
    assert blocked.layer_ms(name, cin, 1) == pytest.approx(linear.layer_ms(name, cin, 1), rel=1e-12)


def test_fit_line_is_least_squares_and_never_negative() -> None:
    assert fit_line([(1.0, 3.0), (0.5, 2.0), (0.25, 1.5)]) == pytest.approx((1.0, 2.0))
    assert fit_line([(1.0, 1.0), (0.5, 2.0), (0.25, 3.0)]) == pytest.approx((2.0, 0.0))  # falls: a constant
    a, b = fit_line([(1.0, 2.0), (0.5, 0.5), (0.25, 0.0)])
    assert a == 0.0 and b == pytest.approx((2.0 + 0.25) / (1.0 + 0.25 + 0.0625))  # through the origin


class ElementWise(Counted):
    """Counted plus 1e-4 ms per element of every conv/linear output (what activations and adds would cost)."""

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        elems = []
        hooks = [m.register_forward_hook(lambda m, i, o: elems.append(o.numel()))
                 for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            module(x)
        for h in hooks:
            h.remove()
        base = super().__call__(module, x)
        # the per-layer units get no element-wise cost: only whole models pay it
        return base + (1e-4 * sum(elems) if len(hooks) > 1 else 0.0)


def test_the_cost_outside_the_layers_scales_with_the_output_elements() -> None:
    model, groups = _setup("resnet20", residual=True)
    measure = ElementWise()
    table = build_table(model, groups, SHAPE, batch_size=2, measure=measure, progress=False, block=1)
    a, b = table.other
    assert a == pytest.approx(0.0, abs=1e-9) and b > 0
    report = validate(table, model, groups, random_plans(groups, 4, seed=1), rounds=1, measure=measure)
    assert report["max_error"] < 1e-6  # a constant overhead would be off by the element-wise part
    constant = table.predict({}) - table.layers_ms({})
    plan = report["plans"][0]
    assert abs(table.layers_ms(plan["kept"]) + constant - plan["measured_ms"]) > 1e-3


def test_interpolation_is_exact_for_a_bilinear_cost_and_zero_width_costs_nothing() -> None:
    model, groups = _setup()
    table = build_table(model, groups, SHAPE, batch_size=2, measure=Counted(), progress=False, block=1)
    name = "layer2.1.conv1"  # out channels in group layer2.1.conv1 (grid 1, 8, ..., 32), input whole
    shape = table.layers[name].shape
    assert table.measured[shape.signature()]["out"] != [shape.out_full]
    for cout in (3, 13, 29):  # off the grid: conv MACs are linear in cout, so interpolation is exact
        conv = nn.Sequential(nn.Conv2d(shape.in_full, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        want = Counted()(conv, torch.zeros(2, shape.in_full, *shape.spatial))
        assert table.layer_ms(name, shape.in_full, cout) == pytest.approx(want, rel=1e-9)
    assert table.layer_ms(name, shape.in_full, 0) == 0.0
    assert table.predict({}) == pytest.approx(table.dense_ms)


def test_prediction_matches_whole_pruned_models_for_random_plans() -> None:
    model, groups = _setup("resnet20", residual=True)
    measure = Counted()
    table = build_table(model, groups, SHAPE, batch_size=2, measure=measure, progress=False, block=1)
    report = validate(table, model, groups, random_plans(groups, 4, seed=1), rounds=1, measure=measure)
    assert len(report["plans"]) == 4
    assert report["max_error"] < 1e-6  # the analytic cost is additive over layers: prediction is exact
    assert all(r["predicted_ms"] < table.dense_ms for r in report["plans"])


def test_table_is_cached_by_its_settings_and_a_damaged_file_is_rebuilt(tmp_path) -> None:
    model, groups = _setup()
    first = Counted()
    t1 = build_table(model, groups, SHAPE, batch_size=2, measure=first, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and first.calls > 0
    assert json.loads(files[0].read_text())["key"] == t1.key
    again = Counted()
    t2 = build_table(model, groups, SHAPE, batch_size=2, measure=again, cache_dir=tmp_path, progress=False)
    assert again.calls == 0 and t2.predict({groups[0].name: 5}) == t1.predict({groups[0].name: 5})
    other = Counted()
    build_table(model, groups, SHAPE, batch_size=4, measure=other, cache_dir=tmp_path, progress=False)
    assert other.calls > 0 and len(list(tmp_path.iterdir())) == 2  # another batch size: another table
    files[0].write_text('{"key": ')  # a crash mid-write elsewhere, or a hand edit
    fresh = Counted()
    build_table(model, groups, SHAPE, batch_size=2, measure=fresh, cache_dir=tmp_path, progress=False)
    assert fresh.calls == first.calls and json.loads(files[0].read_text())["key"] == t1.key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_latency_budget_is_met_within_one_rounding_step(round_to: int) -> None:
    model, groups = _setup("resnet20", residual=True)
    table = build_table(model, groups, SHAPE, batch_size=2, measure=Counted(), progress=False)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(g.size, generator=gen) for g in groups}
    budget = 0.5 * table.predict({})
    plan, _ = plan_counts_latency(scores, table, 0.5, round_to=round_to, fast_rounding=False)
    assert table.predict(plan) <= budget
    # one rounding step more in some group would break the budget: the plan is as close as the ranking allows
    sizes = table.sizes
    over = [table.predict({**plan, n: rounded_count(k + 1, sizes[n], round_to, 1)}) > budget
            for n, k in plan.items() if k < sizes[n]]
    assert any(over)
    keep = plan_keep_latency(scores, table, 0.5, round_to=round_to)
    assert table.predict({n: int(v.numel()) for n, v in keep.items()}) <= budget
    for n, v in keep.items():  # each group keeps its highest-scoring channels
        if 0 < v.numel() < sizes[n]:
            assert scores[n][v].min() >= scores[n][[i for i in range(sizes[n]) if i not in set(v.tolist())]].max()


def test_block_removal_lets_the_plan_go_below_the_width_floor() -> None:
    model, groups = _setup("resnet20")
    table = build_table(model, groups, SHAPE, batch_size=2, measure=Counted(), progress=False)
    scores = {g.name: torch.rand(g.size) for g in groups}
    with pytest.raises(PruneError, match="out of reach"):
        plan_counts_latency(scores, table, 0.1, round_to=8)
    blocks = removable_groups(model, groups)
    plan, _ = plan_counts_latency(scores, table, 0.1, round_to=8, blocks=blocks)
    assert table.predict(plan) <= 0.1 * table.predict({})
    assert any(k == 0 for k in plan.values())


def test_latency_table_command_writes_the_cached_table_and_reports_it(tmp_path, capsys) -> None:
    from amas.cli import main

    cfg = tmp_path / "lt.yaml"
    cfg.write_text("data: {name: synthetic}\nmodel: {name: resnet20}\n")
    cache = tmp_path / "tables"
    argv = ["latency-table", "--config", str(cfg), "--batch", "1", f"prune.latency_tables={cache}"]
    assert main(argv) == 0
    files = list(cache.iterdir())
    assert len(files) == 1
    key = json.loads(files[0].read_text())["key"]
    assert key["batch_size"] == 1 and key["runtime"] == "eager" and key["torch"] == torch.__version__
    assert str(files[0]) in capsys.readouterr().out
    mtime = files[0].stat().st_mtime_ns
    assert main(argv) == 0 and files[0].stat().st_mtime_ns == mtime  # the second call reads the cache
    from amas.config import load_config
    from amas.latency.table import shared_table

    conf = load_config(str(cfg), ["prune.latency_batch=1", f"prune.latency_tables={cache}"])
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()  # synthetic data: 4 classes, 1x16x16
    groups = find_groups(model, (1, 16, 16), residual=conf.prune.residual_channels)
    shared_table(model, groups, (1, 16, 16), conf.prune)  # what amas prune plans with
    assert list(cache.iterdir()) == files and files[0].stat().st_mtime_ns == mtime  # the command's table, reused
    assert main([*argv, "prune.latency_runtime=tpu"]) == 1
    assert "latency_runtime" in capsys.readouterr().err


class GroupedNet(nn.Module):
    """A stem, a grouped conv (4 conv groups, not depthwise) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32),
                                     nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.stem(x)))


def test_grouped_convs_are_timed_with_their_groups_at_multiples_of_them() -> None:
    torch.manual_seed(0)
    model = GroupedNet().eval()
    groups = find_groups(model, SHAPE)
    assert {g.conv_groups for g in groups} == {4}
    seen: list[tuple[int, int, int]] = []

    class Recorded(Counted):
        def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
            conv = module[0] if isinstance(module, nn.Sequential) else None
            if conv is not None and conv.kernel_size == (3, 3) and conv.out_channels % 4 == 0 and conv.groups > 1:
                seen.append((conv.in_channels, conv.out_channels, conv.groups))
            return super().__call__(module, x)

    measure = Recorded()
    table = build_table(model, groups, SHAPE, batch_size=2, measure=measure, progress=False, block=1)
    assert seen and all(g == 4 and cin % 4 == 0 and cout % 4 == 0 for cin, cout, g in seen)
    report = validate(table, model, groups, random_plans(groups, 4, seed=0), rounds=1, measure=measure)
    assert report["max_error"] < 1e-6  # timed as groups=1 the grouped layer would cost 4x its MACs
