"""pruned.pt / pruned.pt2 / ONNX export, fresh-process loading, bad files, and the export/eval CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import amas
from amas.channels.cost import CostModel
from amas.channels.cut import make_recipe, prune_model
from amas.channels.groups import find_groups
from amas.channels.plan import plan_keep
from amas.cli import main
from amas.datasets import INFOS
from amas.errors import CheckpointError
from amas.files.checkpoint import model_record, save_masked
from amas.files.export import export_onnx, export_pt2, onnx_available
from amas.files.pruned import load_pruned, save_pruned
from amas.models import create_model

SHAPE = (1, 16, 16)  # the synthetic dataset: 4 classes, 1x16x16
REPO = Path(__file__).resolve().parents[2]



def _record():
    return model_record("resnet20", 4, 1, INFOS["synthetic"])


@pytest.fixture(scope="module", params=[False, True], ids=["inner", "residual"])
def pruned_file(request, tmp_path_factory):
    """A pruned ResNet-20 (random weights, 50% MACs; block-inner or also residual channels) as pruned.pt and .pt2."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    groups = find_groups(model, SHAPE, residual=request.param)
    masks = {g.name: torch.rand(g.size) for g in groups}
    keep = plan_keep(masks, CostModel(model, groups, SHAPE), 0.5, round_to=8)
    pruned = prune_model(model, groups, keep, masks=masks)
    d = tmp_path_factory.mktemp("export")
    meta = {"data": INFOS["synthetic"], "test_acc": 50.0, "dataset": "synthetic", "input_shape": SHAPE}
    save_pruned(d / "pruned.pt", pruned, make_recipe(_record(), SHAPE, keep), meta)
    info = export_pt2(pruned, SHAPE, d / "pruned.pt2")
    return d, pruned, info


def test_load_pruned_in_process(pruned_file) -> None:
    d, pruned, _ = pruned_file
    model, obj = amas.load_pruned(d / "pruned.pt")
    assert obj["amas_format"] == "pruned" and obj["metadata"]["test_acc"] == 50.0
    assert obj["metadata"]["input_shape"] == list(SHAPE) and obj["metadata"]["data"]["mean"] == [0.5]
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))


def test_fresh_process_loads_pt_and_pt2(pruned_file, tmp_path) -> None:
    d, pruned, info = pruned_file
    assert info["dynamic_batch"]
    x = torch.randn(5, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, os, sys
        class BlockAmas(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "amas" or name.startswith("amas."):
                    raise ImportError("amas is blocked in this process")
        sys.meta_path.insert(0, BlockAmas())
        sys.path = [p for p in sys.path if os.path.realpath(p or ".") != {str(REPO)!r}]
        import torch
        torch.set_num_threads({torch.get_num_threads()})
        x = torch.load({str(tmp_path / "x.pt")!r})
        # 1) pruned.pt2 without amas
        ep = torch.export.load({str(d / "pruned.pt2")!r})
        y2 = ep.module()(x)
        try:
            import amas
        except ImportError:
            pass
        else:
            raise SystemExit("amas was importable")
        assert not any(m == "amas" or m.startswith("amas.") for m in sys.modules)
        # 2) pruned.pt through amas (unblocked now)
        sys.meta_path.pop(0)
        sys.path.insert(0, {str(REPO)!r})
        import amas
        model, _ = amas.load_pruned({str(d / "pruned.pt")!r})
        with torch.no_grad():
            y1 = model(x)
        torch.save({{"pt": y1, "pt2": y2.detach()}}, {str(tmp_path / "y.pt")!r})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # -I: isolated mode, neither the current directory nor PYTHONPATH is on sys.path
    subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, check=True, timeout=240)
    ys = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        ref = pruned(x)
    assert torch.equal(ys["pt"], ref)
    torch.testing.assert_close(ys["pt2"], ref, atol=1e-6, rtol=0)


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed (pip install 'amas[onnx]')")
def test_onnx_matches_pytorch(pruned_file, tmp_path) -> None:
    _, pruned, _ = pruned_file
    info = export_onnx(pruned, SHAPE, tmp_path / "m.onnx")
    assert info["max_abs_diff"] <= 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0


def _bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    not_amas = tmp / "not_amas.pt"
    torch.save({"weights": torch.ones(2)}, not_amas)
    text = tmp / "text.pt"
    text.write_text("hello")
    newer = tmp / "newer.pt"
    obj = torch.load(good, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, newer)
    truncated = tmp / "truncated.pt"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return {
        "not_amas": (not_amas, "is not an amas checkpoint"),
        "text": (text, "is not an amas checkpoint"),
        "newer": (newer, "newer than this amas reads"),
        "truncated": (truncated, "is truncated or corrupt"),
    }


def test_bad_files_give_one_line(pruned_file, tmp_path, capsys) -> None:
    d, _, _ = pruned_file
    for case, (path, message) in _bad_files(tmp_path, d / "pruned.pt").items():
        with pytest.raises(CheckpointError) as e:
            load_pruned(path)
        assert message in str(e.value) and "\n" not in str(e.value), case
        for argv in (["eval", "--checkpoint", str(path)], ["export", "--checkpoint", str(path), "--no-eval"]):
            assert main(argv) == 1, (case, argv)
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1 and "Traceback" not in err, (case, argv, err)


def test_export_cli_end_to_end(tmp_path, capsys) -> None:
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    groups = find_groups(model, SHAPE)
    masks = {g.name: torch.rand(g.size) * (torch.rand(g.size) > 0.3) for g in groups}
    save_masked(tmp_path / "search.pt", model, _record(), masks, metrics={"val_acc": 40.0})
    out = tmp_path / "export"
    argv = ["export", "--checkpoint", str(tmp_path / "search.pt"), "--target-reduction", "0.5", "--round-to", "8",
            "--out", str(out), "--latency-iters", "2", "--onnx"]
    assert main(argv) == 0
    assert "export: done" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "synthetic" and 0.0 <= report["test_acc"] <= 100.0
    assert 0.5 <= report["macs_reduction"] < 0.6 and report["latency_b64_ms"] > 0
    assert (out / "report.md").read_text().startswith("# amas export: resnet20")
    expected = {"pruned.pt", "pruned.pt2", "report.json", "report.md"} | (
        {"pruned.onnx"} if onnx_available() else set()
    )
    assert {p.name for p in out.iterdir()} == expected  # nothing else (no temp or external-data files)
    # the exported checkpoint evaluates with the same table as a dense one
    assert main(["eval", "--checkpoint", str(out / "pruned.pt"), "--latency-iters", "2", "data.val_size=64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_acc"] == round(report["test_acc"], 3) and result["macs_M"] == round(report["macs"] / 1e6, 3)
    # a dense model needs a criterion
    from amas.files.checkpoint import save_model

    save_model(tmp_path / "model.pt", model, _record())
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--no-eval"]) == 1
    assert "--criterion l1" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--criterion", "l1", "--no-eval",
                 "--target-flops", "0.3", "--latency-iters", "2"]) == 0


def test_old_pruned_file_without_layer_shapes_still_loads(pruned_file, tmp_path) -> None:
    d, pruned, _ = pruned_file
    obj = torch.load(d / "pruned.pt", weights_only=True)
    assert obj["recipe"]["layers"]  # new files store the pruned layers' widths
    del obj["recipe"]["layers"]  # as written before they did: rebuilt by pruning the base model again
    torch.save(obj, tmp_path / "old.pt")
    model, _ = load_pruned(tmp_path / "old.pt")
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(model(x), pruned(x))


def test_fresh_process_loads_pruned_resnet56_without_tracing(tmp_path) -> None:
    """load_pruned rebuilds from the stored widths: no Torch-Pruning, training or data stack, and fast."""
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10, in_channels=3).eval()
    groups = find_groups(model, shape, residual=True)
    masks = {g.name: torch.rand(g.size) for g in groups}
    keep = plan_keep(masks, CostModel(model, groups, shape), 0.5, round_to=8)
    pruned = prune_model(model, groups, keep, masks=masks).eval()
    record = model_record("resnet56", 10, 3, INFOS["cifar10"])
    save_pruned(tmp_path / "pruned.pt", pruned, make_recipe(record, shape, keep), {"data": INFOS["cifar10"]})
    x = torch.randn(2, *shape)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        import amas
        model, _ = amas.load_pruned({str(tmp_path / "pruned.pt")!r})
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            y = model(torch.load({str(tmp_path / "x.pt")!r}))
        loaded = [m for m in ("torch_pruning", "amas.engine.loop", "amas.data", "amas.channels.plan",
                              "amas.channels.masks") if m in sys.modules]
        torch.save({{"y": y, "seconds": seconds, "loaded": loaded}}, {str(tmp_path / "out.pt")!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, check=True, timeout=240)
    out = torch.load(tmp_path / "out.pt")
    assert out["loaded"] == []
    with torch.no_grad():
        assert torch.equal(out["y"], pruned(x))
    assert out["seconds"] < 0.5, out["seconds"]


def test_export_criterion_l1_cuts_what_prune_method_l1_cuts(tmp_path) -> None:
    from amas.channels.plan import kept_counts
    from amas.config import CriteriaConfig, PruneConfig
    from amas.criteria import plan_for_method
    from amas.files.checkpoint import save_model
    from amas.pipeline.runner import run_export

    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=4, in_channels=1).eval()
    save_model(tmp_path / "model.pt", model, _record())
    report = run_export(tmp_path / "model.pt", tmp_path / "out", 0.5, criterion="l1", latency_iters=1)
    exported = torch.load(tmp_path / "out" / "pruned.pt", weights_only=True)["recipe"]["kept"]
    groups = find_groups(model, SHAPE)
    keep = plan_for_method("l1", model, groups, CostModel(model, groups, SHAPE), 0.5, train=None, val=None,
                           cfg=CriteriaConfig(), prune_cfg=PruneConfig(round_to=1), num_classes=4)
    assert exported == kept_counts(keep) and report["macs_reduction"] >= 0.5


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_an_input_shape_the_model_does_not_take_is_named(tmp_path, fmt: str) -> None:
    """Three channels for a one-channel model: the mismatch, not 'torch.export cannot trace this model'."""
    from amas.errors import ExportError

    if fmt == "onnx" and not onnx_available():
        pytest.skip("the onnx extra is not installed")
    model = create_model("resnet20", num_classes=4, in_channels=1).train()
    with pytest.raises(ExportError, match=r"takes 1 input channels, but input_shape \(3, 16, 16\) has 3") as e:
        amas.export(model, tmp_path / f"m.{fmt}", (3, 16, 16), format=fmt)
    assert "\n" not in str(e.value) and model.training and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="fails on inputs of shape") as e:  # channels fit, the head does not
        amas.export(model, tmp_path / f"m.{fmt}", (1, 16), format=fmt)
    assert "\n" not in str(e.value)
