"""`amas prune`: teacher → search → candidates → selection → final fine-tune → export, in one run directory.

Each stage writes its artefact atomically; a stage is finished when its artefacts exist, and a run started
again with the same command skips finished stages and continues at the first unfinished one (a half-done
stage continues from the engine's saved training state). ``pipeline.json`` is the stage log: per stage its
status, a fingerprint of the settings it depends on (chained through the stages before it), wall time and
summary, plus a list of events (start, done, skip, redo). A stage whose recorded fingerprint differs from the
current settings is never reused silently: the run stops with one line suggesting ``--redo STAGE`` or
another ``--out``.

Run directory::

    config.yaml          resolved config
    pipeline.json        stage log
    teacher/             model.pt, metrics.json, train_state.pt, tb/  (only when no --teacher is given)
    search/              search.pt (student + masks), search_metrics.json, search_state.pt, tb/  (method amas)
    candidates/          cut.json, candN_cut.pt (as cut), candN.pt (fine-tuned), candN_state.pt, tb/, candidates.json
    selection.json       Pareto front, policy, winner;  pareto.png;  tb/select/ (figure + hparams table)
    final/               final.pt (winner after the final fine-tune), final_state.pt, tb/
    pruned.pt            the shipped model (amas.load_pruned), pruned.pt2 (torch.export), report.md, report.json
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.config import Config, atomic_write_text, save_config, to_dict
from amas.engine import Stopped
from amas.errors import AmasError

__all__ = ["PipelineError", "STAGES", "run_pipeline", "stage_fingerprints"]

STAGES = ("teacher", "search", "candidates", "select", "final", "export")
_VOLATILE = {"device", "progress", "log_every", "root", "download", "num_workers"}


class PipelineError(AmasError):
    """A pipeline run that cannot continue as asked (other settings in the run directory, unknown method)."""


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _scrub(d: Any) -> Any:
    """Drop settings that do not change results (device, progress bars, paths to the data) from a config dict."""
    if isinstance(d, dict):
        return {k: _scrub(v) for k, v in d.items() if k not in _VOLATILE}
    return d


def stage_fingerprints(cfg: Config, method: str = "amas", teacher: str | None = None) -> dict[str, str]:
    """A short hash per stage of the settings it depends on, chained through the stages before it."""
    d = _scrub(to_dict(cfg))
    if teacher:
        p = Path(teacher)
        st = p.stat() if p.is_file() else None
        root: dict = {
            "teacher": str(p.resolve()),
            "size": st.st_size if st else None,
            "mtime_ns": st.st_mtime_ns if st else None,
        }
    else:
        root = {"model": d["model"], "train": d["train"]}
    sel = d["select"]
    # what the candidates stage depends on: the policy's own settings decide which candidates train and their ranking
    own = ("min_reduction", "max_macs") if sel["policy"] == "budget" else ("tolerance", "indicator")
    cand_select = {k: sel[k] for k in ("levels", "budget_epochs", "policy", *own)}
    residual = d["prune"].pop("residual_channels", False)  # only when set, so runs from before it keep their hashes
    if residual:
        d["prune"]["residual_channels"] = True
    cand_finetune = copy.deepcopy(d["finetune"])
    final_epochs = cand_finetune["train"].pop("epochs")  # only the final fine-tune uses finetune.train.epochs
    parts = {
        "teacher": {**root, "data": d["data"], "seed": d["seed"]},
        "search": ({"search": d["search"], **({"residual_channels": True} if residual else {})} if method == "amas"
                   else {"method": method}),
        "candidates": {"method": method, "prune": d["prune"], "select": cand_select, "finetune": cand_finetune,
                       "criteria": d.get("criteria") if method != "amas" else None},
        "select": {"select": sel},
        "final": {"finetune_epochs": final_epochs},
        "export": {},
    }
    out, prev = {}, ""
    for stage in STAGES:
        prev = hashlib.sha256((prev + json.dumps(parts[stage], sort_keys=True)).encode()).hexdigest()[:16]
        out[stage] = prev
    return out


class _Log:
    """pipeline.json: stage records and events, rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {"stages": {}, "events": []}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise PipelineError(
                    f"'{path}' is damaged; delete it to rebuild the stage log from the artefacts"
                ) from None

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def set(self, name: str, record: dict | None) -> None:
        if record is None:
            self.data["stages"].pop(name, None)
        else:
            self.data["stages"][name] = record
        self.save()

    def event(self, stage: str, event: str, **extra: Any) -> None:
        self.data["events"].append({"time": _now(), "stage": stage, "event": event, **extra})
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2))


def _table(rows: list[tuple[str, Any]], title: str) -> None:
    from amas.cli import print_table

    print_table(rows, title=title)
    sys.stdout.flush()


class _Run:
    """Shared lazily-built state of one pipeline run: paths, device, data, teacher."""

    def __init__(self, cfg: Config, run_dir: Path, teacher: str | None, method: str, latency_iters: int,
                 hooks: dict[str, Callable]) -> None:
        self.cfg, self.dir, self.teacher_arg, self.method = cfg, run_dir, teacher, method
        self.latency_iters, self.hooks = latency_iters, hooks
        self._data = None
        self._teacher: tuple[nn.Module, dict] | None = None
        from amas.engine import resolve_device

        self.device = resolve_device(cfg.finetune.train.device)

    # ---------------------------------------------------------------- paths

    @property
    def teacher_path(self) -> Path:
        return Path(self.teacher_arg) if self.teacher_arg else self.dir / "teacher" / "model.pt"

    def artefacts(self, stage: str) -> list[Path]:
        d = self.dir
        return {
            "teacher": [self.teacher_path],
            "search": [d / "search" / "search.pt"],
            "candidates": [d / "candidates" / "candidates.json"],
            "select": [d / "pareto.png", d / "selection.json"],
            "final": [d / "final" / "final.pt"],
            "export": [d / "pruned.pt", d / "pruned.pt2", d / "report.md", d / "report.json"],
        }[stage]

    def owned(self, stage: str) -> list[Path]:
        """Every file or folder a stage writes (what --redo removes)."""
        d = self.dir
        return {
            "teacher": [] if self.teacher_arg else [d / "teacher"],
            "search": [d / "search"],
            "candidates": [d / "candidates"],
            "select": [d / "pareto.png", d / "selection.json", d / "tb" / "select"],
            "final": [d / "final"],
            "export": [d / "pruned.pt", d / "pruned.pt2", d / "report.md", d / "report.json"],
        }[stage]

    # ---------------------------------------------------------------- shared inputs

    @property
    def data(self) -> Any:
        if self._data is None:
            from amas.data import build_data

            t = self.cfg.finetune.train
            self._data = build_data(
                self.cfg.data,
                t.batch_size,
                t.eval_batch_size,
                device=self.device,
                seed=self.cfg.seed,
                channels_last=t.channels_last,
            )
            if self._data.val is None:
                raise PipelineError("selection needs a held-out validation split; set data.val_size > 0")
        return self._data

    @property
    def teacher(self) -> tuple[nn.Module, dict]:
        if self._teacher is None:
            from amas.adversarial import check_teacher_matches
            from amas.checkpoint import load_model
            from amas.data import dataset_info

            model, obj = load_model(self.teacher_path, self.device)
            check_teacher_matches(obj["model"], dataset_info(self.cfg.data), self.teacher_path, self.cfg.data.name)
            self._teacher = (model.eval().requires_grad_(False), obj)
        return self._teacher

    def epoch_hook(self) -> Callable | None:
        return self.hooks.get("on_epoch_end")

    # ---------------------------------------------------------------- stages

    def run_teacher(self) -> list[tuple[str, Any]]:
        if self.teacher_arg:
            _, obj = self.teacher
            m = obj.get("metrics", {})
            return [("teacher", str(self.teacher_path)), ("model", obj["model"]["name"]),
                    ("val acc %", m.get("val_acc", float("nan"))), ("test acc %", m.get("test_acc", float("nan")))]
        from amas.stages import train_dense

        r = train_dense(self.cfg, self.dir / "teacher", resume=True)
        return [("teacher", str(self.teacher_path)), ("model", self.cfg.model.name),
                ("val acc %", r.get("val_acc", float("nan"))), ("test acc %", r["test_acc"]),
                ("MACs", f"{r['macs'] / 1e6:.2f}M"), ("params", f"{r['params'] / 1e6:.3f}M"), ("epochs", r["epochs"])]

    def run_search(self) -> list[tuple[str, Any]]:
        from amas.adversarial import search

        hook = self.epoch_hook()
        r = search(self.cfg, self.dir / "search", self.teacher_path, resume=True,
                   on_epoch_end=(lambda e, rec: hook("search", e, rec)) if hook else None)
        return [
            ("student val acc %", r.get("val_acc", float("nan"))),
            ("teacher val acc %", r.get("teacher_val_acc", float("nan"))),
            ("effective MACs", f"{r['effective_macs'] / 1e6:.2f}M of {r['total_macs'] / 1e6:.2f}M"),
            ("MACs reduction %", 100.0 * r["macs_reduction"]),
            ("kept channels", f"{r['kept_channels']} of {r['total_channels']}"),
            ("epochs", r["epochs"]),
        ]

    def _planner(self) -> tuple[nn.Module, dict | None, Callable]:
        """(model to cut from, masks to fold, planner(level, model, groups, cost) -> kept indices)."""
        from amas.prune import plan_keep

        pc = self.cfg.prune
        if self.method == "amas":
            from amas.checkpoint import load_masked

            student, masks, _ = load_masked(self.dir / "search" / "search.pt", self.device)

            def plan_masks(level: float, model: nn.Module, groups: list, cost: Any) -> dict:
                names = {g.name for g in groups}
                unknown = [n for n in masks if n not in names]
                if unknown:
                    raise PipelineError(
                        f"the searched masks name group {unknown[0]!r}, which the student does not have; "
                        "redo the search with --redo search"
                    )
                scores = {n: torch.as_tensor(m).abs() for n, m in masks.items()}
                return plan_keep(scores, cost, level, min_channels=pc.min_channels, round_to=pc.round_to)

            return student, masks, plan_masks
        from amas.criteria import plan_for_method, prepare_model

        teacher, _ = self.teacher
        data = self.data

        def plan_criterion(level: float, model: nn.Module, groups: list, cost: Any) -> dict:
            # in place and once (e.g. bn_scale's sparsity training): the candidates are cut from the prepared model
            prepare_model(self.method, model, groups, data.train, self.cfg, num_classes=data.info.num_classes)
            return plan_for_method(
                self.method,
                copy.deepcopy(model),
                groups,
                cost,
                level,
                train=data.train,
                val=data.val,
                cfg=self.cfg,
                prune_cfg=pc,
                num_classes=data.info.num_classes,
                seed=self.cfg.seed,
            )

        # a trainable copy: Torch-Pruning traces the channel groups through autograd
        return copy.deepcopy(teacher).requires_grad_(True), None, plan_criterion

    def run_candidates(self) -> list[tuple[str, Any]]:
        from amas.select import run_candidates

        teacher, obj = self.teacher
        source, masks, planner = self._planner()
        hook = self.epoch_hook()
        r = run_candidates(self.cfg, self.dir / "candidates", teacher=teacher, record=obj["model"], source=source,
                           planner=planner, masks=masks, data=self.data, device=self.device, method=self.method,
                           on_epoch_end=hook)
        rows = [(f"{c['name']} (level {c['level']:.2f})",
                 f"-{100 * c['macs_reduction']:.1f}% MACs, {c['channels']}/{c['total_channels']} ch, "
                 f"val {c['val_acc']:.2f}% after {c['epochs']} ep, {c['status']}") for c in r["rows"]]
        rows += [(f"skipped level {s['level']:.2f}", s["reason"]) for s in r["skipped"]]
        rows += [("teacher val acc %", r["teacher"]["val_acc"]),
                 ("budget spent", f"{r['halving']['spent']} of {r['halving']['budget']} candidate-epochs")]
        return rows

    def run_select(self) -> list[tuple[str, Any]]:
        from amas.select import select_candidates

        cand = json.loads((self.dir / "candidates" / "candidates.json").read_text())
        r = select_candidates(cand, self.cfg.select, self.dir)
        w = r["winner_row"]
        names = {c["id"]: c["name"] for c in r["candidates"]}
        return [("policy", r["policy"]), ("rule", r["rule"]), ("Pareto front", ", ".join(names[i] for i in r["front"])),
                ("selected", f"{w['name']} (level {w['level']:.2f})"),
                ("val acc %", w["val_acc"]), ("MACs", f"{w['macs'] / 1e6:.3f}M (-{100 * w['macs_reduction']:.1f}%)"),
                ("figure", str(self.dir / "pareto.png"))]

    def run_final(self) -> list[tuple[str, Any]]:
        from amas.export import load_pruned, save_pruned
        from amas.select import finetune_trainer

        sel = json.loads((self.dir / "selection.json").read_text())
        name = sel["winner_name"]
        cdir = self.dir / "candidates"
        src = cdir / f"{name}.pt" if (cdir / f"{name}.pt").is_file() else cdir / f"{name}_cut.pt"
        model, obj = load_pruned(src, self.device)
        teacher, _ = self.teacher
        epochs = self.cfg.finetune.train.epochs
        out = self.dir / "final"
        out.mkdir(parents=True, exist_ok=True)
        val_acc = sel["winner_row"]["val_acc"]
        if epochs > 0:
            trainer = finetune_trainer(
                model,
                teacher,
                self.cfg.finetune,
                epochs,
                self.data,
                out,
                "final",
                self.device,
                on_epoch_end=(lambda e, rec: self.epoch_hook()("final", e, rec)) if self.epoch_hook() else None,
            )
            try:
                history = trainer.fit(resume=True)
            finally:
                trainer.objective.close()
            model = trainer.model
            val_acc = float(history[-1]["val_acc"])
        meta = dict(obj["metadata"], val_acc=val_acc, selected=name, finetune_epochs=epochs)
        save_pruned(out / "final.pt", model, obj["recipe"], meta)
        return [("selected", name), ("fine-tune epochs", epochs), ("val acc before %", sel["winner_row"]["val_acc"]),
                ("val acc after %", val_acc), ("checkpoint", str(out / "final.pt"))]

    def run_export(self) -> list[tuple[str, Any]]:
        from amas.engine import evaluate
        from amas.export import build_report, export_pt2, load_pruned, save_pruned

        model, obj = load_pruned(self.dir / "final" / "final.pt", self.device)
        teacher, tobj = self.teacher
        data = self.data
        info = data.info
        shape = info.input_shape
        # the test split, evaluated once, here, for both models
        test_pruned = evaluate(model, data.test, info.num_classes, self.device)["acc"]
        test_teacher = evaluate(teacher, data.test, info.num_classes, self.device)["acc"]
        sel = json.loads((self.dir / "selection.json").read_text())
        cand = json.loads((self.dir / "candidates" / "candidates.json").read_text())
        meta = dict(obj["metadata"], test_acc=round(test_pruned, 3), teacher_test_acc=round(test_teacher, 3),
                    method=self.method, policy=sel["policy"], selection_rule=sel["rule"])
        save_pruned(self.dir / "pruned.pt", model, obj["recipe"], meta)
        pt2 = export_pt2(model.cpu(), shape, self.dir / "pruned.pt2")
        rp = build_report(model.cpu(), shape, meta, latency_iters=self.latency_iters, device="cpu")
        rt = build_report(teacher.cpu(), shape, {}, latency_iters=self.latency_iters, device="cpu")
        report = _comparison(self, meta, rp, rt, test_teacher, test_pruned, sel, cand, pt2)
        _write_report(report, self.dir)
        return [
            ("teacher test acc %", round(test_teacher, 3)),
            ("pruned test acc %", round(test_pruned, 3)),
            (
                "MACs",
                f"{rp['macs'] / 1e6:.3f}M of {rt['macs'] / 1e6:.3f}M (-{100 * (1 - rp['macs'] / rt['macs']):.1f}%)",
            ),
            ("params", f"{rp['params'] / 1e6:.4f}M of {rt['params'] / 1e6:.4f}M"),
            ("latency b64 ms", f"{rp['latency_b64_ms']:.3g} vs {rt['latency_b64_ms']:.3g} (teacher)"),
            ("files", f"{self.dir / 'pruned.pt'}, {self.dir / 'pruned.pt2'}"),
            ("report", str(self.dir / "report.md")),
        ]


def _comparison(run: _Run, meta: dict, rp: dict, rt: dict, test_teacher: float, test_pruned: float, sel: dict,
                cand: dict, pt2: dict) -> dict:
    """report.json: teacher vs pruned (test acc, MACs, params, latency), the selection and the stage wall times."""
    w = sel["winner_row"]
    stages = _Log(run.dir / "pipeline.json").data["stages"]
    return {
        "model": meta.get("model"),
        "dataset": meta.get("dataset"),
        "method": run.method,
        "input_shape": rp["input_shape"],
        "teacher": {
            "test_acc": round(test_teacher, 3),
            "val_acc": round(float(cand["teacher"]["val_acc"]), 3),
            "macs": rt["macs"],
            "params": rt["params"],
            "latency_b1_ms": rt["latency_b1_ms"],
            "latency_b64_ms": rt["latency_b64_ms"],
            "checkpoint": str(run.teacher_path),
        },
        "pruned": {
            "test_acc": round(test_pruned, 3),
            "val_acc": round(float(meta.get("val_acc", float("nan"))), 3),
            "macs": rp["macs"],
            "params": rp["params"],
            "latency_b1_ms": rp["latency_b1_ms"],
            "latency_b64_ms": rp["latency_b64_ms"],
            "checkpoint": str(run.dir / "pruned.pt"),
        },
        "test_acc_change": round(test_pruned - test_teacher, 3),
        "macs_reduction": round(1.0 - rp["macs"] / rt["macs"], 4),
        "params_reduction": round(1.0 - rp["params"] / rt["params"], 4),
        "speedup_b1": round(rt["latency_b1_ms"] / rp["latency_b1_ms"], 3),
        "speedup_b64": round(rt["latency_b64_ms"] / rp["latency_b64_ms"], 3),
        "latency_device": rp["latency_device"],
        "selection": {
            "policy": sel["policy"],
            "rule": sel["rule"],
            "selected": w["name"],
            "level": w["level"],
            "front": sel["front"],
            "candidates": len(sel["candidates"]),
            "budget_epochs": cand["halving"]["budget"],
            "finetune_epochs": meta.get("finetune_epochs"),
        },
        "files": {
            "pruned.pt": str(run.dir / "pruned.pt"),
            "pruned.pt2": str(run.dir / "pruned.pt2"),
            "pt2_dynamic_batch": pt2.get("dynamic_batch"),
            "selection": str(run.dir / "selection.json"),
            "pareto": str(run.dir / "pareto.png"),
        },
        "stage_wall_s": {k: v.get("wall_s") for k, v in stages.items() if v.get("wall_s") is not None},
    }


def _write_report(report: dict, out: Path) -> None:
    """report.md (teacher vs pruned, selection, files) and report.json, each atomically; JSON last (the marker)."""
    t, p = report["teacher"], report["pruned"]

    def row(name: str, a: Any, b: Any, change: str) -> str:
        return f"| {name} | {a} | {b} | {change} |"

    lines = [
        f"# amas prune: {report['model']} on {report['dataset']} ({report['method']})",
        "",
        "| | teacher | pruned | change |",
        "|---|---|---|---|",
        row(
            "test accuracy %",
            f"{t['test_acc']:.2f}",
            f"{p['test_acc']:.2f}",
            f"{report['test_acc_change']:+.2f} points",
        ),
        row(
            "validation accuracy %",
            f"{t['val_acc']:.2f}",
            f"{p['val_acc']:.2f}",
            f"{p['val_acc'] - t['val_acc']:+.2f} points",
        ),
        row("MACs", f"{t['macs'] / 1e6:.3f}M", f"{p['macs'] / 1e6:.3f}M", f"-{100 * report['macs_reduction']:.1f}%"),
        row(
            "params",
            f"{t['params'] / 1e6:.4f}M",
            f"{p['params'] / 1e6:.4f}M",
            f"-{100 * report['params_reduction']:.1f}%",
        ),
        row(
            "latency batch 1 (ms)",
            f"{t['latency_b1_ms']:.3f}",
            f"{p['latency_b1_ms']:.3f}",
            f"{report['speedup_b1']:.2f}x faster",
        ),
        row(
            "latency batch 64 (ms)",
            f"{t['latency_b64_ms']:.3f}",
            f"{p['latency_b64_ms']:.3f}",
            f"{report['speedup_b64']:.2f}x faster",
        ),
        "",
        f"Latency measured on {report['latency_device']}. Test accuracy is evaluated once, after selection; "
        "the selection used the held-out validation split only.",
        "",
        "## Selection",
        "",
        f"- policy: {report['selection']['policy']} ({report['selection']['rule']})",
        f"- selected: {report['selection']['selected']} (cut at level {report['selection']['level']:.2f}) out of "
        f"{report['selection']['candidates']} candidates, {report['selection']['budget_epochs']} "
        f"candidate-epochs by successive "
        f"halving, then {report['selection']['finetune_epochs']} final fine-tuning epochs",
        "- candidates, Pareto front and the figure: `selection.json`, `pareto.png`",
        "",
        "## Files",
        "",
        f"- `pruned.pt`: `amas.load_pruned('{report['files']['pruned.pt']}')` (weights_only)",
        f"- `pruned.pt2`: `torch.export.load('{report['files']['pruned.pt2']}').module()` (no amas needed)",
        "",
        "## Stage wall times (s)",
        "",
    ]
    lines += [f"- {k}: {v:.1f}" for k, v in report["stage_wall_s"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")


def _check_method(method: str) -> None:
    if method == "amas":
        return
    try:
        from amas.criteria import METHODS
    except ImportError:
        raise PipelineError(
            f"--method {method} needs amas.criteria, which this installation lacks; use --method amas"
        ) from None
    if method not in METHODS:
        raise PipelineError(f"unknown --method '{method}'; choose amas or one of {', '.join(sorted(METHODS))}")


def run_pipeline(cfg: Config, run_dir: str | Path, *, teacher: str | None = None, method: str = "amas",
                 redo: str | None = None, latency_iters: int = 20, hooks: dict[str, Callable] | None = None) -> dict:
    """Run (or continue) the whole pruning pipeline in run_dir; returns the stage log.

    hooks: optional {"after_stage": f(stage), "on_epoch_end": f(stage, epoch, record)} (used by tests).
    """
    _check_method(method)
    if redo is not None and redo not in STAGES:
        raise PipelineError(f"--redo {redo} is not a stage; choose one of {', '.join(STAGES)}")
    if teacher is not None and not Path(teacher).is_file():
        raise PipelineError(
            f"teacher checkpoint '{teacher}' does not exist; pass a model.pt from `amas train` or drop --teacher"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, run_dir, teacher, method, latency_iters, dict(hooks or {}))
    log = _Log(run_dir / "pipeline.json")
    fps = stage_fingerprints(cfg, method, teacher)
    if redo is not None:
        for stage in STAGES[STAGES.index(redo):]:
            for path in run.owned(stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            log.set(stage, None)
        log.event(redo, "redo")
    for stage in STAGES:  # refuse before touching anything when the directory holds another run's stages
        rec = log.stage(stage)
        if rec is not None and rec.get("fingerprint") != fps[stage]:
            raise PipelineError(
                f"run directory '{run_dir}' holds stage '{stage}' made with other settings; repeat the original "
                f"command, "
                f"pass --redo {stage} to redo it and the stages after it, or choose another --out"
            )
    save_config(cfg, run_dir / "config.yaml")
    t_all = time.perf_counter()
    for stage in STAGES:
        fp = fps[stage]
        if stage == "search" and method != "amas":
            if log.stage(stage) is None:
                log.set(
                    stage, {"status": "skipped", "fingerprint": fp, "reason": f"method {method} plans on the teacher"}
                )
            continue
        rec = log.stage(stage)
        given = stage == "teacher" and teacher is not None and rec is None  # record a given teacher once
        if not given and all(p.exists() for p in run.artefacts(stage)):
            if rec is None or rec.get("status") != "done":
                rec = {**(rec or {}), "status": "done", "fingerprint": fp, "finished": _now()}
                log.set(stage, rec)
            log.event(stage, "skip")
            _table([("status", "done earlier, not redone"), *[(k, v) for k, v in rec.get("summary", [])]],
                   title=f"{stage}: done (artefact {run.artefacts(stage)[-1]})")
            continue
        resumed = rec is not None and rec.get("status") == "running"
        log.set(stage, {"status": "running", "fingerprint": fp, "started": _now()})
        log.event(stage, "resume" if resumed else "start")
        t0 = time.perf_counter()
        try:
            summary = getattr(run, f"run_{stage}")()
        except Stopped as e:
            log.event(stage, "stopped")
            raise Stopped(f"stopped by a signal during stage '{stage}' with its training state saved in '{run_dir}'; "
                          "run the same command again to continue", e.signum) from None
        wall = round(time.perf_counter() - t0, 2)
        log.set(stage, {"status": "done", "fingerprint": fp, "finished": _now(), "wall_s": wall,
                        "summary": [[k, v if isinstance(v, (int, float, str)) else str(v)] for k, v in summary]})
        log.event(stage, "done", wall_s=wall)
        _table([*summary, ("wall time s", wall)], title=f"{stage}: done")
        after = run.hooks.get("after_stage")
        if after is not None:
            after(stage)
    log.event("pipeline", "complete", wall_s=round(time.perf_counter() - t_all, 2))
    return log.data
