"""Semantic segmentation from the command line: tools/prune_segmenter.py (`amas prune` with task=segmentation and
data.name=voc) on generated scenes in VOC layout and a tiny LRASPP state_dict; label maps with classes the model
lacks stop before any stage; the VOC folder as rank-sharded Batches."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import amas

ROOT = Path(__file__).resolve().parents[2]
K, SIZE = 11, 32  # the scenes' classes (background and ten Fashion-MNIST classes), canvas size


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, Path]:
    """(VOC folder of 6/3/3 generated scenes, plain state_dict of a random 11-class LRASPP)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from amas.dense.scenes import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, train=6, val=3, test=3, size=SIZE, seed=0)
    torch.manual_seed(0)
    weights = root / "lraspp.pth"
    torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K).state_dict(), weights)
    return root / "voc", weights


def tool(voc: Path, weights: Path, out: Path, *extra: str) -> int:
    """tools/prune_segmenter.py in this process (no interpreter start-up), with seconds-long stages."""
    tiny = {"data.num_workers": 0, "select.levels": "[0.5]", "select.budget_epochs": 1, "prune.report_runtimes": "[]",
            "quant.report_runtimes": "[]", "search.min_steps": 0}
    for s in ("search", "finetune"):
        tiny.update({f"{s}.d_hidden": 8})
        tiny.update({f"{s}.train.{k}": v for k, v in {"epochs": 1, "batch_size": 3, "eval_batch_size": 3, "lr": 0.002,
                                                       "progress": "false", "log_every": 2, "device": "cpu"}.items()})
    main = runpy.run_path(str(ROOT / "tools" / "prune_segmenter.py"))["main"]
    return main(["--arch", "lraspp_mobilenet_v3_large", "--weights", str(weights), "--data", str(voc),
                 "--num-classes", str(K), "--image-size", str(SIZE), "--target", "0.5", "--out", str(out),
                 "--latency-iters", "1", *[f"{k}={v}" for k, v in tiny.items()], *extra])


def test_prune_segmenter_tool_end_to_end(scenes, tmp_path, capsys) -> None:
    voc, weights = scenes
    run = tmp_path / "run"
    assert tool(voc, weights, run) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["metric"] == "miou" and report["model"] == "tv:lraspp_mobilenet_v3_large"
    assert report["macs_reduction"] >= 0.5 and 0 <= report["test_acc"] <= 100
    assert report["speedup_b8"] > 0 and report["pruned"]["latency_b8_ms"] > 0  # a dense model's batch 8 too
    assert "latency batch 8 (ms)" in (run / "report.md").read_text()
    model, obj = amas.load_pruned(run / "pruned.pt")
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out["out"].shape == (2, K, SIZE, SIZE) and obj["metadata"]["num_classes"] == K
    assert (run / "pruned.pt2").is_file()
    # `amas eval` of the pruned segmenter: its recorded task's metric on the test split, as the report gave it
    from amas.cli import main

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "pruned.pt"), "--latency-iters", "1", f"data.root={voc}",
                 "data.num_workers=0", "train.device=cpu", "train.eval_batch_size=3"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["metric"] == "miou" and got["test_acc"] == pytest.approx(report["test_acc"], abs=1e-3)
    # int8 PTQ of the pruned segmenter, scored by mean IoU (only the quantize stage runs: its settings changed)
    pytest.importorskip("torchao")
    assert tool(voc, weights, run, "quant.mode=ptq", "quant.calib_batches=1") == 0
    int8 = json.loads((run / "report.json").read_text())["int8"]
    assert int8["quantized_layers"] > 20 and 0 <= int8["test_acc"] <= 100 and (run / "pruned_int8.pt2").is_file()
    assert abs(int8["test_acc"] - report["test_acc"]) < 25  # the int8 program segments, not only runs


def test_a_label_map_with_a_class_the_model_lacks_stops_before_any_stage(scenes, tmp_path, capsys) -> None:
    from PIL import Image

    voc, weights = scenes
    bad = tmp_path / "voc"
    shutil.copytree(voc, bad)
    name = (bad / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[1]
    path = bad / "SegmentationClass" / f"{name}.png"
    labels = np.array(Image.open(path))
    labels[3, 4] = K  # one pixel of class 11 for an 11-class model
    Image.fromarray(labels).save(path)
    run = tmp_path / "run"
    assert tool(bad, weights, run) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{name}.png' holds class 11" in err and "11 classes" in err, err
    assert not run.exists()


def test_task_and_data_that_do_not_fit_stop_in_one_line(scenes, tmp_path, capsys) -> None:
    from amas.cli import main

    voc, _ = scenes
    config = str(ROOT / "configs" / "quickstart.yaml")
    cases = [(["task=segmentation", "data.name=fashion_mnist"], "task=segmentation reads label maps"),
             (["data.name=voc", f"data.root={voc}", f"data.num_classes={K}"], "set task=segmentation"),
             (["task=segmentation", "data.name=voc", f"data.root={voc}"], "needs data.num_classes")]
    for overrides, want in cases:
        assert main(["prune", "--config", config, "--out", str(tmp_path / "run"), *overrides]) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and want in err, err
    assert not (tmp_path / "run").exists()


def test_voc_batches_shard_by_rank_with_the_same_flips(scenes) -> None:
    from amas.config import DataConfig
    from amas.dense.batches import voc_bundle

    voc, _ = scenes
    cfg = DataConfig(name="voc", root=str(voc), num_classes=K, image_size=16, num_workers=0)
    one = voc_bundle(cfg, 4, 4, seed=3, device="cpu").train
    ranks = [voc_bundle(cfg, 2, 4, seed=3, device="cpu", rank=r, world_size=2).train for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 1 and one.num_samples == 6  # drop_last: 4 of 6 images
    (x, y), = list(one)
    (x0, y0), (x1, y1) = (next(iter(b)) for b in ranks)
    assert x.shape == (4, 3, 16, 16) and y.shape == (4, 16, 16) and y.dtype == torch.long
    # the two ranks hold the global batch's images 0, 2 and 1, 3 with the same flips as one process
    assert torch.equal(torch.stack([x0[0], x1[0], x0[1], x1[1]]), x) and torch.equal(torch.stack([y0[0], y1[0]]), y[:2])
    one.set_epoch(1)
    assert not torch.equal(next(iter(one))[0], x)  # another epoch, another shuffle
