"""Training images/s of amas' three kinds of step, as the stages run them: fp32 eager, bf16, compiled, bf16 + compiled.

    python benchmarks/throughput.py [--models resnet20 resnet56 tv_resnet18] [--threads 1 2] [--rounds 3] [--steps 12]
    python benchmarks/throughput.py --device cuda        # one GPU (benchmarks/gpu_check.sh)

The steps are the engine's own (amas.engine.loop.Trainer.train_step with the stage's objective): the plain step of
teacher training (CE, SGD), the search step (the student with its mask hooks, the frozen teacher's forward, KD, the
discriminator's step and the proximal mask step) and the fine-tune step (KD + discriminator against the teacher, no
masks). ResNet-20 on 1x28x28 (Fashion-MNIST's shape), ResNet-56 on 3x32x32, torchvision resnet18 on 3x64x64, random
weights and pre-made random batches (the loader is loader_throughput.py's subject). Every trainer is built and warmed
up first (a compiled one compiles there, and its compile time is reported), then rounds time --steps steps of each
trainer in turn, so background load hits every configuration alike; the median round is reported. Prints a table and
writes JSON (and the ratios to fp32 eager, the comparison that survives a busy machine).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from amas.config import Config
from amas.engine.loop import Trainer
from amas.engine.stopping import StopRequest

MODES = {"fp32": ("off", "off"), "bf16": ("bf16", "off"), "compiled": ("off", "on"), "bf16+compiled": ("bf16", "on")}
STAGES = ("plain", "search", "finetune")


class _Fixed:
    """Pre-made batches as the engine's Batches."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass


def build_model(name: str) -> tuple[torch.nn.Module, tuple[int, int, int], int]:
    """The model, its input shape and batch size."""
    if name == "tv_resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10), (3, 64, 64), 64
    from amas.models import create_model

    if name == "resnet20":
        return create_model("resnet20", num_classes=10, in_channels=1), (1, 28, 28), 128
    return create_model(name, num_classes=10, in_channels=3), (3, 32, 32), 128


def make_trainer(stage: str, teacher: torch.nn.Module, shape: tuple, batches: _Fixed, amp: str, compile_: str,
                 run_dir: Path, device: torch.device) -> Trainer:
    """An engine Trainer whose train_step is the stage's step."""
    cfg = Config()
    overrides = {"amp": amp, "compile": compile_, "epochs": 1000, "progress": False, "probe_steps": 0,
                 "bn_recalibration": 0, "log_every": 10**9, "device": device.type}
    model = copy.deepcopy(teacher).requires_grad_(True)
    if stage == "plain":
        return Trainer(model, batches, dataclasses.replace(cfg.train, **overrides), run_dir, num_classes=10,
                       stage="plain", device=device)
    if stage == "finetune":
        from amas.search.alignment import AlignmentObjective

        fcfg = dataclasses.replace(cfg.finetune, train=dataclasses.replace(cfg.finetune.train, **overrides))
        obj = AlignmentObjective(teacher, fcfg, shape, 10, student=model, section="finetune")
        return Trainer(model, batches, fcfg.train, run_dir, num_classes=10, objective=obj, stage="finetune",
                       device=device)
    from amas.channels.cost import CostModel
    from amas.channels.groups import find_groups
    from amas.channels.masks import ChannelMasks
    from amas.search.objective import SearchObjective

    scfg = dataclasses.replace(cfg.search, train=dataclasses.replace(cfg.search.train, **overrides))
    groups = find_groups(model, shape)
    obj = SearchObjective(teacher, groups, ChannelMasks(groups, init=1.0), CostModel(model, groups, shape), scfg,
                          shape, 10, total_steps=10**6)
    return Trainer(model, batches, scfg.train, run_dir, num_classes=10, objective=obj, stage="search",
                   device=device)


def time_steps(trainer: Trainer, batches: list, steps: int) -> float:
    """Seconds for steps training steps."""
    stop = StopRequest()
    trainer.model.train()
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        trainer.train_step(x, y, stop)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(models: list[str], threads: list[int], modes: list[str], rounds: int, steps: int, work: Path,
        device: torch.device) -> list[dict]:
    """One row per (model, threads, stage, mode): median images/s over rounds and the first step's seconds."""
    rows = []
    for name in models:
        teacher, shape, batch = build_model(name)
        teacher.eval().to(device)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(batch, *shape, generator=g).to(device),
                    torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(4)]
        for t in threads if device.type == "cpu" else [0]:
            if t:
                torch.set_num_threads(t)
            trainers = {}
            for stage in STAGES:
                for mode in modes:
                    amp, comp = MODES[mode]
                    tr = make_trainer(stage, teacher, shape, _Fixed(batches), amp, comp,
                                      work / f"{name}_{stage}_{mode}", device)
                    first = time_steps(tr, batches, 1)  # the compile (or the first eager step)
                    time_steps(tr, batches, 2)
                    trainers[(stage, mode)] = (tr, first)
            times: dict = {k: [] for k in trainers}
            for _ in range(rounds):
                for k, (tr, _) in trainers.items():
                    times[k].append(time_steps(tr, batches, steps))
            for (stage, mode), (tr, first) in trainers.items():
                ips = batch * steps / statistics.median(times[(stage, mode)])
                rows.append({"model": name, "threads": t, "stage": stage, "mode": mode, "images_per_s": round(ips, 1),
                             "first_step_s": round(first, 2), "compile": tr.compiler.counts()})
                print(f"{name:12s} {t}T {stage:8s} {mode:14s} {ips:8.1f} img/s  first step {first:6.2f} s",
                      file=sys.stderr, flush=True)
    for r in rows:
        base = next(b for b in rows if (b["model"], b["threads"], b["stage"], b["mode"]) ==
                    (r["model"], r["threads"], r["stage"], "fp32"))
        plain = next(b for b in rows if (b["model"], b["threads"], b["stage"], b["mode"]) ==
                     (r["model"], r["threads"], "plain", r["mode"]))
        r["x_fp32"] = round(r["images_per_s"] / base["images_per_s"], 3)
        r["plain_over_this"] = round(plain["images_per_s"] / r["images_per_s"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "tv_resnet18"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (threads then do not apply: 0 in the table)")
    p.add_argument("--out", default="benchmarks/results/throughput.json")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as work:
        rows = run(a.models, a.threads, a.modes, a.rounds, a.steps, Path(work), device)
    print(f"\n| model | threads | stage | {' | '.join(a.modes)} | {' | '.join(m + ' x' for m in a.modes[1:])} | "
          "step / plain step |")
    print("|---" * (3 + 2 * len(a.modes)) + "|")
    for (m, t, s) in dict.fromkeys((r["model"], r["threads"], r["stage"]) for r in rows):
        sel = {r["mode"]: r for r in rows if (r["model"], r["threads"], r["stage"]) == (m, t, s)}
        ips = " | ".join(f"{sel[k]['images_per_s']:,.0f}" for k in a.modes)
        xs = " | ".join(f"{sel[k]['x_fp32']:.2f}" for k in a.modes[1:])
        ratio = " / ".join(f"{sel[k]['plain_over_this']:.2f}" for k in a.modes)
        print(f"| {m} | {t} | {s} | {ips} | {xs} | {ratio} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meta = {"machine": gpu or platform.processor() or platform.machine(), "torch": torch.__version__,
            "cpu_bf16": _cpu_flags(), "steps": a.steps, "rounds": a.rounds}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out}")
    return 0


def _cpu_flags() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return []
    return [f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")]


if __name__ == "__main__":
    raise SystemExit(main())
