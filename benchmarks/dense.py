"""Dense prediction on the generated scenes: a user's segmenter and detector, pruned by AMAS and by L1 at equal compute.

    python benchmarks/dense.py [--tasks segmentation detection] [--seeds 0] [--target 0.5] [--work runs/dense]
    python benchmarks/dense.py --speed          # re-time the finished runs (run it on an idle machine)

The scenes (benchmarks/scenes.py: Fashion-MNIST items on 96x96 canvases, VOC label maps and COCO JSON) are written
once; a teacher per task is trained by a plain user loop (torchvision model, AdamW, one-cycle, flips; no amas code)
and saved as a plain state_dict; then the README's tool (tools/prune_segmenter.py, tools/prune_detector.py) runs with
its defaults at --target, once as AMAS and once with --method l1 whose final fine-tune gets the search's epochs on top
(equal epochs). Mean IoU / box mAP@[.5:.95] of teacher and pruned models on the test split come from each run's
report.json; --speed times teacher and pruned networks (the detector's tensor part) at batch 1 and 8 on eager,
compiled and ONNX Runtime in alternating rounds. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import run_tool

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = 11  # background + the 10 Fashion-MNIST classes
SIZE = 96
ARCH = {"segmentation": "lraspp_mobilenet_v3_large", "detection": "fasterrcnn_mobilenet_v3_large_320_fpn"}
# the detector's own settings: its transform resizes the canvas to DETECTOR_KWARGS' size (--det-size; 96 keeps it,
# 320 is the builder's own, ~11x the compute); 64 sampled RoIs a training image (torchvision's 512 is sized for
# COCO's 800-px images) keep a CPU step affordable
DETECTOR_KWARGS = {"min_size": SIZE, "max_size": SIZE, "box_batch_size_per_image": 64}
SCENES = {"segmentation": (3000, 500, 500), "detection": (1500, 300, 300)}


def model_size(task: str) -> int:
    """The image size the task's network sees: the canvas for the segmenter, the detector's transform size."""
    return SIZE if task == "segmentation" else int(DETECTOR_KWARGS["min_size"])


def write_scenes(work: Path, task: str, counts: tuple[int, int, int], seed: int = 0) -> Path:
    """The scenes for a task (written once, then reused): work/scenes_<task>/{voc,coco}."""
    from amas.dense.scenes import make_scenes

    out = work / f"scenes_{task}"
    if not (out / "scenes.json").is_file():
        make_scenes(out, *counts, size=SIZE, seed=seed)
    return out


def build(task: str) -> torch.nn.Module:
    """The user's torchvision model, random init."""
    from torchvision.models import get_model

    kwargs = {} if task == "segmentation" else DETECTOR_KWARGS
    return get_model(ARCH[task], num_classes=CLASSES, weights=None, weights_backbone=None, **kwargs)


# ---------------------------------------------------------------- the user's own data code and training loop


def _image(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def voc_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (ImageNet-normalised) and label maps of a VOC-layout split, in memory."""
    from PIL import Image

    names = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in IMAGENET)
    x = torch.stack([(_image(root / "JPEGImages" / f"{n}.png") - mean) / std for n in names])
    y = torch.stack([torch.from_numpy(np.array(Image.open(root / "SegmentationClass" / f"{n}.png"), dtype=np.int64))
                     for n in names])
    return x, y


def coco_split(root: Path, split: str) -> tuple[list[torch.Tensor], list[dict]]:
    """All images ([0, 1]) and targets (xyxy boxes, labels) of a COCO JSON split, in memory."""
    ann = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
    by_image: dict[int, list] = {im["id"]: [] for im in ann["images"]}
    for a in ann["annotations"]:
        by_image[a["image_id"]].append(a)
    images, targets = [], []
    for im in ann["images"]:
        images.append(_image(root / "images" / im["file_name"]))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in by_image[im["id"]]]
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor([a["category_id"] for a in by_image[im["id"]]], dtype=torch.int64)})
    return images, targets


def miou(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean IoU (%) over the classes present in prediction or truth, 255 ignored."""
    conf = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            p, t = model(x[i:i + 64])["out"].argmax(1).flatten(), y[i:i + 64].flatten()
            keep = t != 255
            conf += torch.bincount(t[keep] * CLASSES + p[keep], minlength=CLASSES ** 2).view(CLASSES, CLASSES)
    inter, union = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag()
    return float(100 * (inter[union > 0] / union[union > 0]).mean())


def box_map(model: torch.nn.Module, images: list, targets: list) -> float:
    """Box mAP@[.5:.95] (%) with torchmetrics."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox")
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), 32):
            metric.update(model(images[i:i + 32]), targets[i:i + 32])
    return float(100 * metric.compute()["map"])


def train_teacher(task: str, scenes: Path, epochs: int, path: Path, seed: int = 0) -> dict:
    """A plain user loop (AdamW, one-cycle, horizontal flips); saves a state_dict, returns val/test metric."""
    torch.manual_seed(seed)
    net = build(task)
    seg = task == "segmentation"
    if seg:
        data = {s: voc_split(scenes / "voc", s) for s in ("train", "val", "test")}
        n, batch = len(data["train"][0]), 32
    else:
        data = {s: coco_split(scenes / "coco", s) for s in ("train", "val", "test")}
        n, batch = len(data["train"][0]), 16
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3 if seg else 1e-3, weight_decay=1e-4)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(n, generator=g)
        for i in range(n // batch):
            idx = order[i * batch:(i + 1) * batch]
            flip = torch.rand(len(idx), generator=g) < 0.5
            if seg:
                x, y = data["train"][0][idx].clone(), data["train"][1][idx].clone()
                x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
                loss = F.cross_entropy(net(x)["out"], y, ignore_index=255)
            else:
                imgs, tgts = [], []
                for j, f in zip(idx.tolist(), flip.tolist(), strict=True):
                    im, t = data["train"][0][j], dict(data["train"][1][j])
                    if f:
                        im, b = im.flip(-1), t["boxes"].clone()
                        b[:, [0, 2]] = SIZE - t["boxes"][:, [2, 0]]
                        t["boxes"] = b
                    imgs.append(im)
                    tgts.append(t)
                loss = sum(net(imgs, tgts).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    wall = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    score = (lambda s: miou(net, *data[s])) if seg else (lambda s: box_map(net, *data[s]))
    return {"arch": ARCH[task], "epochs": epochs, "train_s": round(wall, 1), "val": score("val"),
            "test": score("test")}


# ---------------------------------------------------------------- the README's tools


def prune(task: str, weights: Path, scenes: Path, target: float, out: Path, method: str, extra: list[str]) -> dict:
    """The task's tool with its defaults (and --method); report.json's numbers, wall time, or the one-line error."""
    seg = task == "segmentation"
    tool = ROOT / "tools" / ("prune_segmenter.py" if seg else "prune_detector.py")
    cmd = [sys.executable, str(tool), "--arch", ARCH[task], "--weights", str(weights),
           "--data", str(scenes / ("voc" if seg else "coco")), "--num-classes", str(CLASSES),
           "--image-size", str(model_size(task)), "--target", str(target), "--out", str(out)]
    if not seg:
        cmd += [f"model.kwargs.box_batch_size_per_image={DETECTOR_KWARGS['box_batch_size_per_image']}"]
    cmd += extra
    if method != "amas":
        cmd += ["--method", method, f"finetune.train.epochs={_equal_epochs(cmd)}"]
    wall, error = run_tool(cmd)
    if error:
        return {"error": error, "wall_s": wall}
    rep = json.loads((out / "report.json").read_text())
    return {"test": rep["pruned"]["test_acc"], "teacher_test": rep["teacher"]["test_acc"],
            "macs_reduction": rep["macs_reduction"], "wall_s": wall,
            "stage_wall_s": rep.get("stage_wall_s", {}), "command": " ".join(cmd[1:])}


def _equal_epochs(cmd: list[str]) -> int:
    """The final fine-tune's epochs plus the search's under the tool's recipe: a baseline's equal-epoch budget."""
    from amas.config import load_config

    config = ROOT / "configs" / "quickstart.yaml"
    keys = [c for c in cmd if "=" in c and c.split("=", 1)[0] in ("search.train.epochs", "finetune.train.epochs")]
    cfg = load_config(str(config), keys)
    return cfg.search.train.epochs + cfg.finetune.train.epochs


# ---------------------------------------------------------------- speed


def speed(task: str, weights: Path, run: Path, rounds: int = 5) -> dict:
    """Teacher vs pruned network at batch 1 and 8 on eager, compiled and ONNX Runtime: ms and speed-ups."""
    import amas
    from amas.channels.dense import tensor_part
    from amas.latency.table import runtime_latency

    teacher = build(task)
    teacher.load_state_dict(torch.load(weights, weights_only=True))
    pruned, _ = amas.load_pruned(run / "pruned.pt")
    models = {"teacher": tensor_part(teacher.eval()), "pruned": tensor_part(pruned.eval())}
    size = model_size(task)
    r = runtime_latency(models, (3, size, size), batches=(1, 8), runtimes=["eager", "compiled", "onnx"],
                        rounds=rounds)
    out = {"busy": r["busy"], "warnings": r["warnings"]}
    for rt in r["runtimes"]:
        t, p = r["ms"]["teacher"][rt], r["ms"]["pruned"][rt]
        out[rt] = {f"{b}_ms": [round(t[b], 3), round(p[b], 3)] for b in ("b1", "b8")}
        out[rt].update({f"speedup_{b}": round(t[b] / p[b], 3) for b in ("b1", "b8")})
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the scenes, train the teachers, run the tools; print the table and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["segmentation", "detection"], choices=list(ARCH))
    p.add_argument("--methods", nargs="+", default=["amas", "l1"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the pruning runs (one teacher)")
    p.add_argument("--teacher-epochs", type=int, nargs=2, default=[12, 10], metavar=("SEG", "DET"))
    p.add_argument("--seg-scenes", type=int, nargs=3, default=list(SCENES["segmentation"]),
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--det-scenes", type=int, nargs=3, default=list(SCENES["detection"]),
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--det-size", type=int, default=SIZE,
                   help="the detector's min_size=max_size (96: the canvas; 320: the builder's own, ~11x the compute)")
    p.add_argument("--work", default="runs/dense", help="scenes, teachers and runs go here")
    p.add_argument("--out", default="benchmarks/results/dense.json")
    p.add_argument("--speed", action="store_true", help="time the finished runs of --out and stop")
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    a, extra = p.parse_known_args(argv)
    DETECTOR_KWARGS.update(min_size=a.det_size, max_size=a.det_size)
    work, out = Path(a.work), Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if a.table:
        print(table(results))
        return 0
    for task in a.tasks:
        r = results.setdefault(task, {"runs": {}})
        weights = work / "teachers" / f"{task}.pth"
        if a.speed:
            for key, run in r["runs"].items():
                if "error" not in run:
                    run["speed"] = speed(task, weights, work / "runs" / f"{task}_{key}")
                    print(json.dumps({task: {key: run["speed"]}}), flush=True)
            _write(out, results)
            continue
        scenes = write_scenes(work, task, tuple(a.seg_scenes if task == "segmentation" else a.det_scenes))
        if r.get("teacher") is None or not weights.is_file():
            r["teacher"] = train_teacher(task, scenes, a.teacher_epochs[task == "detection"], weights)
            print(json.dumps({task: {"teacher": r["teacher"]}}), flush=True)
            _write(out, results)
        for seed in a.seeds:
            for method in a.methods:
                key = f"{method}_s{seed}"
                r["runs"][key] = prune(task, weights, scenes, a.target, work / "runs" / f"{task}_{key}", method,
                                       [f"seed={seed}", *extra])
                print(json.dumps({task: {key: r["runs"][key]}}), flush=True)
                _write(out, results)
    print(table(results))
    return 0


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def table(results: dict) -> str:
    """Markdown table: teacher vs pruned test metric per method and seed, MACs, speed-ups, wall time."""
    rows = ["| task (metric) | method, seed | teacher test | pruned test | Δ | MACs | speed-up b1 / b8: eager · "
            "compiled · ONNX | wall s |", "|---|---|---|---|---|---|---|---|"]
    for task, r in results.items():
        metric = "mIoU %" if task == "segmentation" else "box mAP %"
        for key, q in r.get("runs", {}).items():
            if "error" in q:
                rows.append(f"| {task} ({metric}) | {key} | | ❌ {q['error'][:80]} | | | | {q['wall_s']:.0f} |")
                continue
            sp = q.get("speed", {})
            cells = " · ".join(f"{sp[rt]['speedup_b1']:.2f}× / {sp[rt]['speedup_b8']:.2f}×" if rt in sp else "–"
                               for rt in ("eager", "compiled", "onnx"))
            rows.append(f"| {task} ({metric}) | {key} | {q['teacher_test']:.2f} | {q['test']:.2f} | "
                        f"{q['test'] - q['teacher_test']:+.2f} | −{100 * q['macs_reduction']:.1f}% | {cells} | "
                        f"{q['wall_s']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
