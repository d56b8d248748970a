"""A dense task's search step against a plain training step: torchvision LRASPP-MobileNetV3 at 96x96, batch 32.

    python benchmarks/dense_step.py [--threads 1] [--batch 32] [--size 96] [--steps 3]

Times `amas.MaskSearch(..., task="segmentation")` (student forward/backward, the teacher's forward, distillation,
the per-location discriminator, the mask step) and a plain AdamW cross-entropy step on the same model and batch,
alternating, median of --steps each after one warm-up; prints a table and writes benchmarks/results/dense_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Time both steps and report their ratio."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    import amas

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense_step.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11).eval()
    student, plain = copy.deepcopy(teacher).train(), copy.deepcopy(teacher).train()
    search = amas.MaskSearch(student, teacher, (3, a.size, a.size), target_reduction=0.5, task="segmentation")
    opt_s, opt_p = (torch.optim.AdamW(m.parameters(), 1e-4) for m in (student, plain))
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 11, (a.batch, a.size, a.size))

    def search_step() -> None:
        opt_s.zero_grad()
        search.loss(x, y).backward()
        opt_s.step()
        search.step()

    def plain_step() -> None:
        opt_p.zero_grad()
        F.cross_entropy(plain(x)["out"], y).backward()
        opt_p.step()

    times: dict[str, list[float]] = {"search": [], "plain": []}
    for i in range(a.steps + 1):
        for name, fn in (("search", search_step), ("plain", plain_step)):
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"threads": a.threads, "batch": a.batch, "size": a.size, "search_s": round(med["search"], 3),
              "plain_s": round(med["plain"], 3), "ratio": round(med["search"] / med["plain"], 2)}
    print("| step | s (median) |\n|---|---|\n"
          f"| search | {result['search_s']} |\n| plain | {result['plain_s']} |\n| ratio | {result['ratio']}x |")
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
