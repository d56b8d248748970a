"""How far apart the mask groups' gradients lie on a search's first step: what `search.mask_outlier_ratio` reads.

    python benchmarks/mask_spread.py [--work runs/families] [--size 32] [--batches 5] [--models tv:resnet18 ...]

For each families.py teacher (its ImageFolder and state_dict under --work) and the repository's Fashion-MNIST
ResNet-20, an `amas.MaskSearch` at -50% takes the loss of a training batch and backpropagates it; per mask group the
RMS of the gradient, then the largest group's over the median group's. Over --batches batches: each batch's ratio
(the search decides on the first one). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from families import MODELS, build, user_loaders

import amas

ROOT = Path(__file__).resolve().parents[1]


def ratios(student: torch.nn.Module, teacher: torch.nn.Module, shape: tuple[int, int, int], batches: list) -> dict:
    """Per batch: the largest group's gradient RMS over the median group's, and which group that is."""
    out = {"ratio": [], "largest": []}
    for x, y in batches:
        search = amas.MaskSearch(copy.deepcopy(student), teacher, shape, 0.5)
        search.loss(x, y).backward()
        groups = [(n, p.grad) for n, p in zip(search.objective.names, search.objective.masks.masks, strict=True)
                  if p.grad is not None]
        rms = [float(g.float().pow(2).mean().sqrt()) for _, g in groups]
        top = max(range(len(rms)), key=rms.__getitem__)
        out["ratio"].append(rms[top] / max(statistics.median(rms), 1e-12))
        out["largest"].append(groups[top][0])
        search.close()
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every model; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/families")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--out", default="benchmarks/results/mask_spread.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    loaders = user_loaders(Path(a.work) / f"fmnist_{a.size}", a.size, 128)
    batches = [b for _, b in zip(range(a.batches), loaders["train"], strict=False)]
    for model in a.models:
        net = build(model, 10)
        net.load_state_dict(torch.load(Path(a.work) / "teachers" / f"{model.replace(':', '_')}_{a.size}.pth",
                                       weights_only=True))
        results[f"{model}@{a.size}"] = ratios(net, net.eval(), (3, a.size, a.size), batches)
    from amas.config import DataConfig
    from amas.datasets import load_tensors
    from amas.files.checkpoint import load_model

    resnet, _ = load_model(ROOT / "benchmarks" / "teachers" / "fmnist_resnet20.pt")
    x, y = load_tensors(DataConfig(name="fashion_mnist"), train=True)
    order = torch.randperm(len(y))[: 128 * a.batches]
    x = (x[order].float() / 255.0 - 0.2860) / 0.3530
    results["resnet20 (Fashion-MNIST)"] = ratios(resnet, resnet.eval(), (1, 28, 28),
                                                 list(zip(x.split(128), y[order].split(128), strict=True)))
    print("| model | largest / median group RMS, first batch | over the batches | largest group |")
    print("|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['ratio'][0]:.1f}× | {min(r['ratio']):.1f}–{max(r['ratio']):.1f}× | {r['largest'][0]} |")
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
