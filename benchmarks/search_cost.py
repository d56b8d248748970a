"""Cost of one AMAS search step against one plain training step of the same student (same batch, one run).

    python benchmarks/search_cost.py [--batch 128] [--rounds 20] [--threads N] [--device cpu]

Both steps run exactly what the engine runs per batch (objective.compute, zero_grad, backward, SGD step,
objective.after_step, scheduler step): the plain step with the engine's default Objective (label CE) on the
dense student, the search step with SearchObjective (teacher forward, discriminator step, KD + adversarial
losses, mask hooks, proximal/FISTA mask update, budget controller). Steps are timed in alternation so a
background load on the machine hits both alike; medians are reported. Writes benchmarks/results/search_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amas.channels.cost import CostModel  # noqa: E402
from amas.channels.groups import find_groups  # noqa: E402
from amas.channels.masks import ChannelMasks  # noqa: E402
from amas.config import load_config  # noqa: E402
from amas.data import TensorBatches  # noqa: E402
from amas.datasets import INFOS  # noqa: E402
from amas.engine.loop import Objective, Trainer  # noqa: E402
from amas.models import create_model  # noqa: E402
from amas.search.objective import SearchObjective  # noqa: E402


def one_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    """What Trainer._train_epoch does for one batch."""
    out = trainer.objective.compute(trainer.model, x, y)
    trainer.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    trainer.optimizer.step()
    trainer.objective.after_step(trainer.model, trainer.optimizer.param_groups[0]["lr"], trainer.global_step)
    trainer.scheduler.step()
    trainer.global_step += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print a table, write the JSON; returns the result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20, help="timed (plain, search) pairs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search_cost.json"))
    ap.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="search config overrides (search.kd=kl, ...)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = INFOS["fashion_mnist"]
    cfg = load_config(
        None,
        [
            "data.name=fashion_mnist",
            f"search.train.device={args.device}",
            "search.train.progress=false",
            "search.target_reduction=0.5",
            "search.controller_every=1",
            *args.overrides,
        ],
    )
    tcfg = cfg.search.train
    torch.manual_seed(0)
    teacher = create_model(args.model, num_classes=info.num_classes, in_channels=info.in_channels).to(device).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, *info.input_shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (args.batch,), generator=g)
    batches = TensorBatches(images, labels, info, args.batch, train=True, augment=False, device=device,
                            channels_last=tcfg.channels_last)
    x, y = next(iter(batches))

    with tempfile.TemporaryDirectory() as tmp:
        plain = Trainer(copy.deepcopy(teacher).requires_grad_(True), batches, tcfg, Path(tmp) / "plain",
                        num_classes=info.num_classes, objective=Objective(), stage="plain", device=device)
        student = copy.deepcopy(teacher).requires_grad_(True)
        groups = find_groups(student, info.input_shape)
        obj = SearchObjective(teacher, groups, ChannelMasks(groups), CostModel(student, groups, info.input_shape),
                              cfg.search, info.input_shape, info.num_classes)
        searching = Trainer(student, batches, tcfg, Path(tmp) / "search", num_classes=info.num_classes, objective=obj,
                            stage="search", device=device)
        plain.model.train()
        searching.model.train()
        times: dict[str, list[float]] = {"plain": [], "search": [], "teacher_forward": []}
        for r in range(args.warmup + args.rounds):
            order = [("plain", plain), ("search", searching)]
            if r % 2:
                order.reverse()  # alternate which one runs first
            for name, tr in order:
                _sync(device)
                t0 = time.perf_counter()
                one_step(tr, x, y)
                _sync(device)
                if r >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                obj.teacher_fwd(x)  # what the search step runs for the teacher
            _sync(device)
            if r >= args.warmup:
                times["teacher_forward"].append(time.perf_counter() - t0)
        obj.close()

    med = {k: 1000.0 * statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "input": [args.batch, *info.input_shape],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "plain_step_ms": round(med["plain"], 2),
        "search_step_ms": round(med["search"], 2),
        "teacher_forward_ms": round(med["teacher_forward"], 2),
        "ratio": round(med["search"] / med["plain"], 3),
        "plain_step_ms_all": [round(1000 * t, 2) for t in times["plain"]],
        "search_step_ms_all": [round(1000 * t, 2) for t in times["search"]],
        "channel_groups": len(groups),
        "search_options": {
            k: getattr(cfg.search, k) for k in ("kd", "d_input", "d_steps", "fista", "target_reduction")
        },
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    print(f"search step vs plain step: {args.model}, batch {args.batch}x{'x'.join(map(str, info.input_shape))}, "
          f"{device}, {result['threads']} threads, median of {args.rounds} alternated rounds")
    rows = [("plain step (CE, dense student)", result["plain_step_ms"]),
            ("search step (teacher+D+KD+adv+masks)", result["search_step_ms"]),
            ("  of which teacher forward", result["teacher_forward_ms"])]
    for k, v in rows:
        print(f"  {k:<40} {v:9.2f} ms")
    print(f"  {'ratio search/plain':<40} {result['ratio']:9.3f}  (must be <= 1.5)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
