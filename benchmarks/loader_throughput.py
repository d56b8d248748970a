"""Training images/s with the amas on-device loader vs the same model fed pre-made tensors.

    python benchmarks/loader_throughput.py [--models resnet20 resnet56] [--steps 30] [--batch 128]

Prints a table and writes benchmarks/results/loader_throughput.json. Both feeds run the same
forward/backward/SGD step; blocks alternate so background load hits both alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from amas.config import DataConfig
from amas.data import build_data
from amas.models import create_model


def _step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(name: str, steps: int, batch: int, blocks: int, device: torch.device, channels_last: bool) -> dict:
    """Images/s of one model's training step under both feeds."""
    data = build_data(
        DataConfig(name="fashion_mnist", val_size=0), batch, batch, device=device, channels_last=channels_last
    )
    info = data.info
    model = create_model(name, num_classes=info.num_classes, in_channels=info.in_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _step_fn(model, opt)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    premade = [(torch.randn(batch, *info.input_shape, device=device).contiguous(memory_format=fmt),
                torch.randint(0, info.num_classes, (batch,), device=device)) for _ in range(4)]
    loader_iter = itertools.chain.from_iterable(data.train for _ in itertools.count())
    premade_iter = itertools.cycle(premade)
    for _ in range(3):  # warm-up both paths
        step(*next(loader_iter))
        step(*next(premade_iter))
    times = {"loader": 0.0, "premade": 0.0}
    for _ in range(blocks):
        for feed, it in (("loader", loader_iter), ("premade", premade_iter)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(*next(it))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[feed] += time.perf_counter() - t0
    n = blocks * steps * batch
    ips = {k: n / v for k, v in times.items()}
    return {"model": name, "batch": batch, "loader_img_s": ips["loader"], "premade_img_s": ips["premade"],
            "ratio": ips["loader"] / ips["premade"]}


def main() -> None:
    """Run the benchmark and print/write its table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet56"])
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per feed")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/loader_throughput.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = [measure(m, args.steps, args.batch, args.blocks, device, not args.no_channels_last) for m in args.models]
    print(f"{'model':<10} {'loader img/s':>13} {'pre-made img/s':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['model']:<10} {r['loader_img_s']:>13.1f} {r['premade_img_s']:>15.1f} {r['ratio']:>7.3f}")
    meta = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "channels_last": not args.no_channels_last}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
