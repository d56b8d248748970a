"""A new user's journey across CNN families: their own teacher, their own ImageFolder, amas' tools with the defaults.

    python benchmarks/families.py [--sizes 32 64] [--models tv:resnet18 timm:efficientnet_b0 ...] [--target 0.5]

Fashion-MNIST is written out as a real ImageFolder (RGB PNGs at each --sizes, 150/30/30 images per class for
train/val/test by default), a teacher per model is trained by a plain user loop (torchvision transforms, SGD for
ResNets, AdamW for the others, a few epochs, no amas code) and saved as a plain state_dict; then the README's tool
(tools/prune_torchvision.py or tools/prune_timm.py) runs with its defaults at --target. Teacher vs pruned test
accuracy, MACs, speed-ups and wall time from each run's report.json; prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import run_tool

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tv:resnet18", "tv:mobilenet_v3_large", "tv:efficientnet_b0", "timm:mobilenetv3_large_100",
          "timm:efficientnet_b0", "timm:convnext_atto", "timm:regnety_002"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def write_folder(root: Path, size: int, per_class: tuple[int, int, int], seed: int = 0) -> Path:
    """Fashion-MNIST as train/val/test ImageFolders of RGB PNGs at size x size (written once, then reused)."""
    from PIL import Image

    from amas.config import DataConfig
    from amas.datasets import load_tensors

    done = root / ".complete"
    if done.is_file():
        return root
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = load_tensors(DataConfig(name="fashion_mnist"), train=True)
    x_te, y_te = load_tensors(DataConfig(name="fashion_mnist"), train=False)
    order_tr, order_te = torch.randperm(len(y_tr), generator=g), torch.randperm(len(y_te), generator=g)
    n_tr, n_val, n_te = per_class
    for split, (x, y, order, want) in {"train": (x_tr, y_tr, order_tr[: len(y_tr) // 2], n_tr),
                                       "val": (x_tr, y_tr, order_tr[len(y_tr) // 2:], n_val),
                                       "test": (x_te, y_te, order_te, n_te)}.items():
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            idx = order[y[order] == k][:want]
            for i, j in enumerate(idx.tolist()):
                img = Image.fromarray(x[j, 0].numpy()).convert("RGB").resize((size, size), Image.BILINEAR)
                img.save(d / f"{i}.png")
    done.write_text("ok\n")
    return root


def build(model: str, classes: int) -> nn.Module:
    """The user's model: torchvision or timm by name, random init, `classes` outputs."""
    lib, arch = model.split(":", 1)
    if lib == "tv":
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=classes)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=classes)


def user_loaders(folder: Path, size: int, batch: int) -> dict:
    """What a user writes: torchvision ImageFolder + DataLoader, padded random crops and flips for training,
    ImageNet normalisation."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    norm = T.Normalize(*IMAGENET)
    train_tf = T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    return {"train": DataLoader(ImageFolder(str(folder / "train"), train_tf), batch_size=batch, shuffle=True,
                                generator=torch.Generator().manual_seed(0)),
            "val": DataLoader(ImageFolder(str(folder / "val"), test_tf), batch_size=256),
            "test": DataLoader(ImageFolder(str(folder / "test"), test_tf), batch_size=256)}


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 (%) of model over loader."""
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * right / total


def train_teacher(model: str, folder: Path, size: int, epochs: int, path: Path) -> dict:
    """A plain user loop (SGD for ResNets, AdamW otherwise, cosine); saves a state_dict, returns val/test acc."""
    torch.manual_seed(0)
    net = build(model, len(CLASSES))
    loaders = user_loaders(folder, size, 64)
    sgd = "resnet" in model
    opt = (torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if sgd
           else torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05))
    steps = epochs * len(loaders["train"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for x, y in loaders["train"]:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    wall = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    with torch.no_grad():
        net.eval()
        x = next(iter(loaders["val"]))[0]
        logit_abs = float(net(x).abs().max())
    return {"optimizer": "SGD" if sgd else "AdamW", "val_acc": accuracy(net, loaders["val"]),
            "test_acc": accuracy(net, loaders["test"]), "train_s": round(wall, 1), "max_abs_logit": logit_abs}


def prune(model: str, weights: Path, folder: Path, size: int, target: float, out: Path, extra: list[str]) -> dict:
    """The README's tool with its defaults; report.json's numbers, wall time, or the tool's one-line error."""
    lib, arch = model.split(":", 1)
    tool = ROOT / "tools" / ("prune_torchvision.py" if lib == "tv" else "prune_timm.py")
    cmd = [sys.executable, str(tool), "--arch", arch, "--weights", str(weights), "--data", str(folder),
           "--image-size", str(size), "--target", str(target), "--out", str(out), *extra]
    wall, error = run_tool(cmd)
    if error:
        return {"error": error, "wall_s": wall}
    rep = json.loads((out / "report.json").read_text())
    return {"test_acc": rep["pruned"]["test_acc"], "teacher_test_acc": rep["teacher"]["test_acc"],
            "macs_reduction": rep["macs_reduction"], "speedup_b1": rep["speedup_b1"],
            "speedup_b64": rep["speedup_b64"], "wall_s": wall, "search_val_acc": _search_val_acc(out)}


def _search_val_acc(out: Path) -> list[float]:
    """The student's validation accuracy after each search epoch, then the teacher's (search_metrics.json)."""
    f = out / "search" / "search_metrics.json"
    if not f.is_file():
        return []
    m = json.loads(f.read_text())
    return [round(h["val_acc"], 2) for h in m["history"] if "val_acc" in h] + [round(m["result"]["teacher_val_acc"], 2)]


def main(argv: list[str] | None = None) -> int:
    """Write the folders, train the teachers, run the tools; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--models", nargs="+", default=MODELS, help="tv:<torchvision name> or timm:<timm name>")
    p.add_argument("--per-class", type=int, nargs=3, default=[150, 30, 30], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--work", default="runs/families", help="folders, teachers and runs go here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/families.json")
    p.add_argument("--table", action="store_true", help="print the table of --out (search accuracies re-read from "
                                                          "the run folders) and stop")
    a, extra = p.parse_known_args(argv)
    extra += [m for m in a.models if "=" in m]  # key=value overrides written after --models land in its list
    a.models = [m for m in a.models if "=" not in m]
    if a.table:
        results = json.loads(Path(a.out).read_text())
        for key, r in results.items():
            model, size = key.rsplit("@", 1)
            run = Path(a.work) / "runs" / f"{model.replace(':', '_')}_{size}"
            if "error" not in r["pruned"]:
                r["pruned"]["search_val_acc"] = _search_val_acc(run)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
        print(table(results))
        return 0
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    results = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    for size in a.sizes:
        folder = write_folder(work / f"fmnist_{size}", size, tuple(a.per_class))
        for model in a.models:
            key = f"{model}@{size}"
            safe = model.replace(":", "_")
            weights = work / "teachers" / f"{safe}_{size}.pth"
            teacher = results.get(key, {}).get("teacher")
            if teacher is None or not weights.is_file():
                teacher = train_teacher(model, folder, size, a.teacher_epochs, weights)
            run = prune(model, weights, folder, size, a.target, work / "runs" / f"{safe}_{size}", extra)
            results[key] = {"teacher": teacher, "pruned": run, "extra": extra}
            print(json.dumps({key: results[key]}), flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def _by_epoch(accs: list[float]) -> str:
    """'70.0, 72.0, 71.3 (74.0)': the search's epochs, the teacher's in brackets; past 4 epochs the first, the lowest
    (its epoch) and the last: '70.0 · low 35.0 @3 · 75.7 (65.7)'."""
    if not accs:
        return "–"
    epochs, teacher = accs[:-1], accs[-1]
    if len(epochs) <= 4:
        return f"{', '.join(f'{v:.1f}' for v in epochs)} ({teacher:.1f})"
    low = min(range(len(epochs)), key=epochs.__getitem__)
    return f"{epochs[0]:.1f} · low {epochs[low]:.1f} @{low + 1} · {epochs[-1]:.1f} ({teacher:.1f})"


def table(results: dict) -> str:
    """Markdown table: teacher vs pruned test accuracy, MACs reduction, speed-ups, wall time."""
    rows = ["| model @ px | teacher opt | teacher test % | pruned test % | Δ | MACs | speed-up b1 / b64 "
            "| search val % by epoch (teacher) | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        t, q = r["teacher"], r["pruned"]
        if "error" in q:
            rows.append(f"| {key} | {t['optimizer']} | {t['test_acc']:.1f} | ❌ {q['error'][:80]} | | | | | "
                        f"{q['wall_s']:.0f} |")
            continue
        rows.append(f"| {key} | {t['optimizer']} | {q['teacher_test_acc']:.1f} | {q['test_acc']:.1f} | "
                    f"{q['test_acc'] - q['teacher_test_acc']:+.1f} | −{100 * q['macs_reduction']:.1f}% | "
                    f"{q['speedup_b1']:.2f}× / {q['speedup_b64']:.2f}× | "
                    f"{_by_epoch(q.get('search_val_acc', []))} | "
                    f"{q['wall_s']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
