"""`amas prune`: the whole pipeline on tiny data, resuming a killed run, refusing changed settings, --redo."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import prune_overrides

from amas.config import load_config
from amas.errors import PipelineError, SelectionError
from amas.pipeline.runner import run_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def events(run):
    return [(e["stage"], e["event"]) for e in json.loads((run / "pipeline.json").read_text())["events"]]


def state_epochs(run):
    """Epochs each candidate's engine state has trained, by candidate name."""
    out = {}
    for p in sorted((run / "candidates").glob("cand*_state.pt")):
        out[p.name.split("_")[0]] = int(torch.load(p, weights_only=True)["epoch"])
    return out


class Boom(RuntimeError):
    pass


def test_killed_run_resumes_without_redoing_finished_stages(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, prune_overrides())

    def stop_after(stage):
        if stage == "search":
            raise Boom("killed after the search artefact was written")

    with pytest.raises(Boom):  # 1: teacher trained here, search done, then the process "dies"
        run_pipeline(cfg, run, latency_iters=2, hooks={"after_stage": stop_after})
    teacher_file, search_file = run / "teacher" / "model.pt", run / "search" / "search.pt"
    stamps = {p: p.stat().st_mtime_ns for p in (teacher_file, search_file)}
    assert not (run / "candidates" / "candidates.json").exists()

    seen = []

    def die_mid_candidates(stage, epoch, record):
        seen.append((stage, epoch))
        if len(seen) == 2:
            raise Boom("killed in the middle of the candidates stage")

    with pytest.raises(Boom):  # 2: dies after two candidate epochs (each saved by the engine)
        run_pipeline(cfg, run, latency_iters=2, hooks={"on_epoch_end": die_mid_candidates})
    assert sum(state_epochs(run).values()) == 2

    more = []
    run_pipeline(cfg, run, latency_iters=2, hooks={"on_epoch_end": lambda s, e, r: more.append((s, e))})  # 3: finishes
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # teacher and search were not redone
    cand_epochs = [x for x in seen + more if x[0].startswith("cand")]
    assert len(cand_epochs) == 5  # the 5-epoch candidate budget, spent once over the three runs
    assert sum(state_epochs(run).values()) == 5
    ev = events(run)
    assert ev.count(("teacher", "start")) == 1 and ev.count(("search", "start")) == 1
    assert ("candidates", "resume") in ev and ev.count(("candidates", "done")) == 1
    assert ev[-1] == ("pipeline", "complete")
    for name in ("pruned.pt", "pruned.pt2", "report.md", "report.json", "selection.json", "pareto.png"):
        assert (run / name).is_file(), name
    assert "candidates: done" in capsys.readouterr().out

    # changed settings are refused before anything is touched; --redo redoes that stage and the ones after it
    changed = load_config(None, prune_overrides(**{"finetune.train.epochs": "2"}))
    before = (run / "pruned.pt").stat().st_mtime_ns
    with pytest.raises(PipelineError, match="--redo final") as e:
        run_pipeline(changed, run, latency_iters=2)
    assert "\n" not in str(e.value) and (run / "pruned.pt").stat().st_mtime_ns == before
    run_pipeline(changed, run, latency_iters=2, redo="final")
    ev = events(run)
    assert ev.count(("candidates", "done")) == 1 and ev.count(("final", "done")) == 2
    assert json.loads((run / "report.json").read_text())["selection"]["finetune_epochs"] == 2


def test_prune_cli_end_to_end_then_rerun_skips_everything(teacher_path, tmp_path):
    run = tmp_path / "cli"
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("model:\n  name: resnet20\n")
    cmd = [sys.executable, "-m", "amas.cli", "prune", "--config", str(cfg_file), "--teacher", str(teacher_path),
           "--out", str(run), "--latency-iters", "2", *prune_overrides()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    for stage in ("teacher", "search", "candidates", "select", "final", "export"):
        assert f"{stage}: done" in p.stdout
    assert "tensorboard --logdir" in p.stdout

    sel = json.loads((run / "selection.json").read_text())
    cand = json.loads((run / "candidates" / "candidates.json").read_text())
    report = json.loads((run / "report.json").read_text())
    winner = sel["winner_row"]
    assert sel["split"] == "validation" and winner["macs"] <= sel["bound_macs"] and sel["on_front"]
    assert cand["halving"]["spent"] == 5 == sum(state_epochs(run).values())
    assert report["pruned"]["macs"] == winner["macs"] < report["teacher"]["macs"]
    assert 0 <= report["pruned"]["test_acc"] <= 100 and report["teacher"]["latency_b64_ms"] > 0
    md = (run / "report.md").read_text()
    assert "| test accuracy % |" in md and "| MACs |" in md and "latency" in md
    assert (run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tb" / "select").iterdir())

    from amas.files.pruned import load_pruned

    model, obj = load_pruned(run / "pruned.pt")
    x = torch.randn(3, 1, 16, 16)
    program = torch.export.load(str(run / "pruned.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(model(x), program(x), atol=1e-5)
    assert obj["metadata"]["test_acc"] == report["pruned"]["test_acc"]

    # amas export of the run's searched student writes the same report schema (the one export stage)
    from amas.cli import main

    assert main(["export", "--checkpoint", str(run / "search" / "search.pt"), "--target-flops", "0.5",
                 "--out", str(tmp_path / "export"), "--latency-iters", "2", "train.device=cpu"]) == 0
    exported = json.loads((tmp_path / "export" / "report.json").read_text())
    assert set(exported) == set(report) and exported["command"] == "export" and report["command"] == "prune"
    for block in ("teacher", "pruned", "cut", "files"):
        assert set(report[block]) >= set(exported[block]), block
    assert exported["selection"] is None and exported["teacher"]["macs"] == report["teacher"]["macs"]
    assert exported["pruned"]["test_acc"] == exported["test_acc"] is not None

    stamps = {f: (run / f).stat().st_mtime_ns for f in ("pruned.pt", "selection.json", "candidates/candidates.json")}
    assert main(cmd[3:]) == 0  # the same command again, through the entry point's main() in this process
    assert {f: (run / f).stat().st_mtime_ns for f in stamps} == stamps
    assert events(run)[-7:-1] == [(s, "skip") for s in ("teacher", "search", "candidates", "select", "final", "export")]


def test_budget_nothing_can_meet_fails_before_training(teacher_path, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, prune_overrides(**{"select.levels": "[0.1,0.2]", "select.min_reduction": "0.6"}))
    with pytest.raises(SelectionError) as e:
        run_pipeline(cfg, run, teacher=str(teacher_path), latency_iters=2)
    msg = str(e.value)
    assert "\n" not in msg and "cand1" in msg and "select.levels" in msg
    assert not list((run / "candidates").glob("*_state.pt"))  # no budget spent


def test_unknown_method_and_missing_teacher_are_one_line_errors(tmp_path, capsys):
    from amas.cli import main

    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("model:\n  name: resnet20\n")
    assert main(["prune", "--config", str(cfg_file), "--out", str(tmp_path / "r"), "--method", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--method" in err
    assert (
        main(["prune", "--config", str(cfg_file), "--out", str(tmp_path / "r"), "--teacher", str(tmp_path / "no.pt")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no.pt" in err


def test_criterion_method_skips_search(teacher_path, tmp_path):
    criteria = pytest.importorskip("amas.criteria")
    if not hasattr(criteria, "plan_for_method") or "l1" not in getattr(criteria, "METHODS", ()):
        pytest.skip("amas.criteria has no l1 planner yet")
    run = tmp_path / "l1"
    cfg = load_config(None, prune_overrides())
    run_pipeline(cfg, run, teacher=str(teacher_path), method="l1", latency_iters=2)
    assert not (run / "search").exists() and (run / "pruned.pt").is_file()
    log = json.loads((run / "pipeline.json").read_text())
    assert log["stages"]["search"]["status"] == "skipped"
    assert json.loads((run / "candidates" / "candidates.json").read_text())["method"] == "l1"
