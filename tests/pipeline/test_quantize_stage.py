"""The quantize stage of `amas prune` (quant.mode ptq): pruned_int8.pt2 from training batches, int8 accuracies in the
report, skipped on a rerun, redone by --redo quantize, and not run at all by default (quant.mode none)."""

import json

import pytest
from conftest import prune_overrides

from amas.config import load_config
from amas.errors import ConfigError, PipelineError
from amas.pipeline.runner import run_pipeline


def config(**quant: str):
    """The seconds-long pipeline with one candidate level (the quantize stage is what is tested here)."""
    return load_config(None, prune_overrides(**{"select.levels": "[0.5]", "select.budget_epochs": "1",
                                                "prune.report_runtimes": "[]", **quant}))


def events(run):
    return [(e["stage"], e["event"]) for e in json.loads((run / "pipeline.json").read_text())["events"]]


def test_quantize_stage_off_by_default_then_ptq_skip_and_redo(teacher_path, tmp_path, capsys):
    run = tmp_path / "run"
    run_pipeline(config(), run, teacher=str(teacher_path), latency_iters=2)
    assert not list(run.glob("pruned_int8*"))
    assert "quantize" not in json.loads((run / "pipeline.json").read_text())["stages"]
    assert "int8" not in json.loads((run / "report.json").read_text())
    assert not any(stage == "quantize" for stage, _ in events(run))

    # turning quantization on reuses every earlier stage and runs only the quantize stage
    cfg = config(**{"quant.mode": "ptq", "quant.calib_batches": "2", "quant.report_runtimes": "[onnx]"})
    before = (run / "pruned.pt").stat().st_mtime_ns
    capsys.readouterr()
    run_pipeline(cfg, run, teacher=str(teacher_path), latency_iters=2)
    assert "quantize: done" in capsys.readouterr().out
    ev = events(run)
    assert ev[-9:] == [*[(s, "skip") for s in ("teacher", "search", "candidates", "select", "final", "export")],
                       ("quantize", "start"), ("quantize", "done"), ("pipeline", "complete")]
    assert (run / "pruned.pt").stat().st_mtime_ns == before
    pt2 = run / "pruned_int8.pt2"
    assert pt2.is_file() and not (run / "pruned_int8.partial.pt2").exists() and not (run / "pruned_int8.onnx").exists()

    import torch.ao.quantization.fx._decomposed  # noqa: F401 -- registers the int8 quantize/dequantize ops

    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.export.load(str(pt2)).module()(x).shape == torch.export.load(str(run / "pruned.pt2")).module()(
            x).shape == (5, 4)
    report = json.loads((run / "report.json").read_text())
    q = report["int8"]
    assert 0 <= q["val_acc"] <= 100 and 0 <= q["test_acc"] <= 100 and q["calib_batches"] == 2
    assert q["pt2_bytes"] == pt2.stat().st_size and q["onnx_bytes"] is None
    assert report["files"]["pruned_int8.pt2"] == str(pt2)
    assert "pruned_int8.pt2" in (run / "report.md").read_text()
    if "onnx" in q["runtimes"]["by_runtime"]:  # with the onnx extra: float teacher, float and int8 pruned timed
        r = q["runtimes"]["by_runtime"]["onnx"]
        for b in ("b1", "b64"):
            assert r[f"teacher_{b}_ms"] > 0 and r[f"pruned_int8_{b}_ms"] > 0
            assert r[f"pruned_int8_speedup_{b}"] == pytest.approx(r[f"teacher_{b}_ms"] / r[f"pruned_int8_{b}_ms"],
                                                                    rel=1e-2)
        assert "| onnx | 64 |" in (run / "report.md").read_text()

    # amas eval shows the int8 file's test accuracy beside the float model's: the number the report holds
    from amas.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "pruned.pt"), "--int8", str(pt2), "--latency-iters", "1"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["int8_test_acc"] == pytest.approx(q["test_acc"], abs=1e-3)
    assert shown["int8_pt2_bytes"] == q["pt2_bytes"]
    assert main(["eval", "--checkpoint", str(run / "pruned.pt"), "--int8", str(run / "nope.pt2")]) == 1
    assert "--int8" in capsys.readouterr().err

    # a rerun skips every stage; other quant settings are refused; --redo quantize redoes only it (here as QAT)
    stamp = pt2.stat().st_mtime_ns
    run_pipeline(cfg, run, teacher=str(teacher_path), latency_iters=2)
    assert events(run)[-8:-1] == [(s, "skip") for s in ("teacher", "search", "candidates", "select", "final",
                                                         "export", "quantize")]
    assert pt2.stat().st_mtime_ns == stamp
    qat = config(**{"quant.mode": "qat", "quant.onnx": "true", "quant.report_runtimes": "[]"})
    with pytest.raises(PipelineError, match="--redo quantize"):
        run_pipeline(qat, run, teacher=str(teacher_path), latency_iters=2)
    run_pipeline(qat, run, teacher=str(teacher_path), latency_iters=2, redo="quantize")
    ev = events(run)
    assert ev.count(("quantize", "done")) == 2 and ev.count(("export", "done")) == 1
    report = json.loads((run / "report.json").read_text())
    q = report["int8"]
    assert q["mode"] == "qat" and q["qat_epochs"] == 1 and q["calib_batches"] == 0
    assert 0 <= q["qat_fake_quant_val_acc"] <= 100 and 0 <= q["test_acc"] <= 100
    # the QAT state is kept for --resume; ONNX int8 is a PTQ-only file, and the report says so
    assert (run / "quantize" / "quantize_state.pt").is_file() and not (run / "pruned_int8.onnx").exists()
    assert any("quant.mode ptq only" in n for n in report["notes"])
    assert "quantization-aware, 1 epochs" in (run / "report.md").read_text()
    with torch.no_grad():
        assert torch.export.load(str(pt2)).module()(x).shape == (5, 4)


def test_quant_mode_must_be_none_ptq_or_qat():
    with pytest.raises(ConfigError, match="quant.mode"):
        load_config(None, ["quant.mode=int4"])
