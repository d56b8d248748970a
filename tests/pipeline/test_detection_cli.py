"""Object detection from the command line: tools/prune_detector.py (`amas prune` with task=detection and
data.name=coco) on generated scenes in COCO JSON and a tiny Faster R-CNN state_dict; an annotation with x2 < x1 stops
before any stage; the COCO folder as Batches of (images, target dicts)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_leaves
from torchvision.ops.misc import FrozenBatchNorm2d

import amas
from amas.channels.dense import tensor_part
from amas.models.torchvision_models import freeze_backbone_norms

ROOT = Path(__file__).resolve().parents[2]
K, SIZE = 11, 64  # the scenes' classes (background and ten Fashion-MNIST classes), canvas size
ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, Path]:
    """(COCO folder of 4/2/2 generated scenes, plain state_dict of a random 11-class Faster R-CNN)."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    from amas.dense.scenes import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, train=4, val=2, test=2, size=SIZE, seed=0, objects=(1, 2))
    torch.manual_seed(0)
    weights = root / "frcnn.pth"
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=K)
    torch.save(model.state_dict(), weights)
    torch.save(freeze_backbone_norms(model).state_dict(), root / "frcnn_frozen.pth")  # no BN step counters
    return root / "coco", weights


def tool(coco: Path, weights: Path, out: Path, *extra: str) -> int:
    """tools/prune_detector.py in this process (no interpreter start-up), with seconds-long stages."""
    tiny = {"data.num_workers": 0, "select.levels": "[0.5]", "select.budget_epochs": 1, "prune.report_runtimes": "[]",
            "quant.report_runtimes": "[]", "search.train.probe_steps": 0, "search.min_steps": 0}
    for s in ("search", "finetune"):
        tiny.update({f"{s}.d_hidden": 8})
        tiny.update({f"{s}.train.{k}": v for k, v in {"epochs": 1, "batch_size": 2, "eval_batch_size": 2, "lr": 0.002,
                                                       "progress": "false", "log_every": 2, "device": "cpu"}.items()})
    main = runpy.run_path(str(ROOT / "tools" / "prune_detector.py"))["main"]
    return main(["--arch", ARCH, "--weights", str(weights), "--data", str(coco), "--num-classes", str(K),
                 "--image-size", str(SIZE), "--target", "0.5", "--out", str(out), "--latency-iters", "1",
                 *[f"{k}={v}" for k, v in tiny.items()], *extra])


def test_prune_detector_tool_end_to_end(scenes, tmp_path) -> None:
    coco, weights = scenes
    run = tmp_path / "run"
    assert tool(coco, weights, run) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["metric"] == "map" and report["model"] == f"tv:{ARCH}"
    assert report["macs_reduction"] >= 0.4 and 0 <= report["test_acc"] <= 100
    stages = json.loads((run / "pipeline.json").read_text())["stages"]  # summaries name the task's metric
    assert all(any(k == "val box mAP %" for k, _ in stages[s]["summary"]) for s in ("teacher", "select")), stages
    model, obj = amas.load_pruned(run / "pruned.pt")
    assert obj["model"]["kwargs"]["min_size"] == SIZE and obj["metadata"]["num_classes"] == K
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 3, SIZE, SIZE))
    assert len(out) == 2 and all(set(d) == {"boxes", "scores", "labels"} and d["boxes"].shape[-1] == 4 for d in out)
    # pruned.pt2: the tensor part (no transform, no NMS: the report says so) with the eager tensor part's outputs
    assert any("NMS" in n for n in report["notes"]) and "box mAP" in (run / "report.md").read_text()
    pt2 = torch.export.load(str(run / "pruned.pt2")).module()
    images = model.transform([torch.rand(3, SIZE, SIZE) for _ in range(2)])[0].tensors
    with torch.no_grad():
        want, have = tensor_part(model)(images), pt2(images)
    pairs = list(zip(tree_leaves(want), tree_leaves(have), strict=True))
    assert pairs and all((a - b).abs().max() <= 1e-4 for a, b in pairs)
    # a later process redoes the fine-tune from the saved candidates (as a resumed run does): no search stage in it
    assert tool(coco, weights, run, "--redo", "final") == 0
    again = json.loads((run / "report.json").read_text())
    assert again["metric"] == "map" and again["macs"] == report["macs"]


def test_a_baseline_criterion_prunes_a_detector_fine_tuned_from_a_pretrained_backbone(scenes, tmp_path,
                                                                                       capsys) -> None:
    # weights of a detector torchvision built on a pretrained backbone (FrozenBatchNorm2d there): built so, with a
    # line, its backbone pruned; no search stage: the candidates and the final fine-tune resolve the aligned maps
    coco, _ = scenes
    run = tmp_path / "run"
    assert tool(coco, coco.parent / "frcnn_frozen.pth", run, "--method", "l1") == 0
    assert "frozen backbone" in capsys.readouterr().err
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "l1" and report["metric"] == "map" and report["macs_reduction"] >= 0.4
    assert not (run / "search").exists()
    model, obj = amas.load_pruned(run / "pruned.pt")
    assert obj["model"]["kwargs"]["frozen_backbone"] is True
    frozen = [n for n, m in model.named_modules() if type(m) is FrozenBatchNorm2d]
    assert len(frozen) > 40 and all(n.startswith("backbone.body.") for n in frozen)
    kept = json.loads((run / "candidates" / "cut.json").read_text())["rows"][0]["kept"]
    assert sum(n.startswith("backbone.body.") for n in kept) >= 25  # its groups (they were left out, whole)


def test_amas_train_and_eval_a_detection_teacher(scenes, tmp_path, capsys) -> None:
    # plain training binds no aligned maps (it stopped with an IndexError); eval reads the COCO task from the record
    from amas.cli import main

    coco, _ = scenes
    (tmp_path / "r.yaml").write_text("seed: 0\n")
    common = [f"data.root={coco}", "data.num_workers=0", "train.device=cpu", "train.eval_batch_size=2"]
    assert main(["train", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "task=detection",
                 "data.name=coco", f"data.num_classes={K}", f"data.image_size={SIZE}", f"model.name=tv:{ARCH}",
                 f"model.kwargs.min_size={SIZE}", f"model.kwargs.max_size={SIZE}", "train.epochs=1",
                 "train.batch_size=2", "train.progress=false", *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "model.pt"), "--latency-iters", "1", *common]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["metric"] == "map" and 0 <= got["test_acc"] <= 100 and got["macs_M"] > 0


def test_int8_of_a_detector_is_refused_in_one_line(scenes, tmp_path, capsys) -> None:
    coco, weights = scenes
    assert tool(coco, weights, tmp_path / "run", "quant.mode=ptq") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "quant.mode=ptq cannot quantize a detection model" in err and "NMS" in err, err
    assert not (tmp_path / "run").exists()


def test_a_box_with_x2_left_of_x1_stops_before_any_stage(scenes, tmp_path, capsys) -> None:
    coco, weights = scenes
    bad = tmp_path / "coco"
    shutil.copytree(coco, bad)
    path = bad / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    x, y, w, h = data["annotations"][0]["bbox"]
    data["annotations"][0]["bbox"] = [x + w, y, -w, h]  # (x1, y1, x2, y2) = (x + w, y, x, y + h)
    path.write_text(json.dumps(data))
    run = tmp_path / "run"
    assert tool(bad, weights, run) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "negative size" in err, err
    assert not run.exists()


def test_task_and_data_that_do_not_fit_stop_in_one_line(scenes, tmp_path, capsys) -> None:
    from amas.cli import main

    coco, _ = scenes
    config = str(ROOT / "configs" / "quickstart.yaml")
    empty = tmp_path / "empty"
    shutil.copytree(coco, empty)
    (empty / "annotations" / "instances_train.json").write_text("")
    cases = [(["task=detection", "data.name=fashion_mnist"], "task=detection reads boxes"),
             (["data.name=coco", f"data.root={coco}", f"data.num_classes={K}"], "set task=detection"),
             (["task=detection", "data.name=coco", f"data.root={coco}"], "needs data.num_classes"),
             (["task=detection", "data.name=coco", f"data.root={coco}", "data.num_classes=3"], "has label"),
             (["task=detection", "data.name=coco", f"data.root={empty}", f"data.num_classes={K}"], "is empty")]
    for overrides, want in cases:
        assert main(["prune", "--config", config, "--out", str(tmp_path / "run"), *overrides]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and want in err, err
    assert not (tmp_path / "run").exists()


def test_coco_batches_give_images_and_target_dicts(scenes) -> None:
    from amas.config import DataConfig
    from amas.dense.batches import coco_bundle

    coco, _ = scenes
    cfg = DataConfig(name="coco", root=str(coco), num_classes=K, image_size=32, num_workers=0)
    data = coco_bundle(cfg, 2, 2, seed=3, device="cpu")
    assert len(data.train) == 2 and data.info.input_shape == (3, 32, 32)
    x, targets = next(iter(data.train))
    assert x.shape == (2, 3, 32, 32) and len(targets) == 2
    for t in targets:
        assert t["boxes"].shape[-1] == 4 and t["labels"].dtype == torch.int64
        assert bool((t["boxes"] >= 0).all() and (t["boxes"] <= 32).all() and (t["labels"] >= 1).all())
    ranks = [coco_bundle(cfg, 1, 2, seed=3, device="cpu", rank=r, world_size=2).train for r in (0, 1)]
    (x0, t0), (x1, t1) = (next(iter(b)) for b in ranks)
    assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(t1[0]["boxes"], targets[1]["boxes"])
