"""Semantic segmentation through the whole pipeline from the Python API: amas.prune(task="segmentation") on a tiny
LRASPP and generated scenes (search, candidates, selection by mean IoU, final fine-tune, export, report)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import amas
from amas.errors import DataError

K = 11  # the scenes' classes: background and the ten Fashion-MNIST classes
SIZE = 32
SHAPE = (3, SIZE, SIZE)


def tiny(**extra) -> dict:
    """Seconds-long stages: 1 search epoch, one candidate level, 1 halving epoch, 1 final epoch, on the CPU, no
    latency tables, small discriminators."""
    out: dict = {}
    for s in ("search", "finetune"):
        out.update({f"{s}.train.epochs": 1, f"{s}.train.progress": False, f"{s}.train.log_every": 2,
                    f"{s}.train.device": "cpu", f"{s}.train.lr": 0.002, f"{s}.d_hidden": 8})
    out.update({"select.levels": [0.5], "select.budget_epochs": 1, "prune.report_runtimes": [],
                "quant.report_runtimes": []})
    out.update(extra)
    return out


def lraspp(num_classes: int = K) -> torch.nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes).eval()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """(train, val, test) DataLoaders of generated scenes (VOC layout): 2 train batches of 3, 1 val, 1 test."""
    from amas.dense.loaders import segmentation_loaders
    from amas.dense.scenes import make_scenes

    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, train=6, val=3, test=3, size=SIZE, seed=0)
    train, val = segmentation_loaders(root / "voc", batch_size=3, num_classes=K)
    _, test = segmentation_loaders(root / "voc", batch_size=3, num_classes=K, splits=("train", "test"))
    return train, val, test


def test_prune_a_segmenter_end_to_end(scenes, tmp_path) -> None:
    train, val, test = scenes
    teacher = lraspp()
    before = copy.deepcopy(teacher.state_dict())
    run = tmp_path / "run"
    result = amas.prune(teacher, train, val, SHAPE, 0.5, overrides=tiny(), out_dir=run, test=test, latency_iters=1,
                        task="segmentation")
    rep = result.report
    # the report names its metric: mean IoU in %, for the pruned model and the teacher
    assert rep["metric"] == "miou" and "val_acc" not in rep and "test_acc" not in rep
    assert 0 <= rep["val_miou"] <= 100 and 0 <= rep["test_miou"] <= 100
    assert 0 <= rep["teacher"]["val_miou"] <= 100 and 0 <= rep["teacher"]["test_miou"] <= 100
    assert rep["latency_b1_ms"] > 0 and rep["teacher"]["latency_b1_ms"] > 0
    full = json.loads((run / "report.json").read_text())
    assert full["metric"] == "miou" and full["pruned"]["test_acc"] == pytest.approx(rep["test_miou"])
    assert "mean IoU" in (run / "report.md").read_text()
    # the selection read mean IoU (the candidates' val_acc is the metric the engine reported)
    cands = json.loads((run / "candidates" / "candidates.json").read_text())
    assert cands["teacher"]["val_acc"] == pytest.approx(rep["teacher"]["val_miou"], abs=1e-3)

    # smaller in MACs, the teacher's output shapes, and the teacher left as it was
    macs, _ = amas.count(teacher, SHAPE)
    assert rep["macs"] < macs and 0.5 <= rep["macs_reduction"] < 0.75
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = result.model(x), teacher(x)
    assert isinstance(got, dict) and got["out"].shape == want["out"].shape == (2, K, SIZE, SIZE)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training

    # pruned.pt reloads (rebuilt from its stored shapes) and pruned.pt2 runs, both with the returned model's outputs
    model, obj = amas.load_pruned(run / "pruned.pt")
    pt2 = torch.export.load(str(run / "pruned.pt2")).module()
    with torch.no_grad():
        assert (model(x)["out"] - got["out"]).abs().max().item() <= 1e-5
        assert (pt2(x)["out"] - got["out"]).abs().max().item() <= 1e-4
    assert obj["metadata"]["num_classes"] == K
    # torchvision's LRASPP is recorded by its builder, so pruned.pt rebuilds in any process (not only this one)
    assert obj["model"]["name"] == "tv:lraspp_mobilenet_v3_large"
    assert obj["model"]["kwargs"] == {"weights_backbone": None}


def test_label_maps_with_classes_the_model_lacks_stop_before_any_stage(scenes, tmp_path) -> None:
    x = torch.randn(2, *SHAPE)
    y = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    y[0, 3, 4] = K  # one pixel of class 11 for an 11-class model
    run = tmp_path / "run"
    with pytest.raises(DataError) as e:
        amas.prune(lraspp(), [(x, y)], [(x, y.clamp(max=K - 1))], SHAPE, 0.5, overrides=tiny(), out_dir=run,
                   task="segmentation")
    msg = str(e.value)
    assert "\n" not in msg and "train batch 0 has class 11" in msg and "11 classes" in msg
    assert not run.exists()
    # a classifier's labels given to a segmenter, and a model that is not a segmenter: one line each
    with pytest.raises(DataError, match="segmentation targets must be"):
        amas.prune(lraspp(), [(x, torch.zeros(2, dtype=torch.long))], [(x, y)], SHAPE, 0.5, out_dir=run,
                   task="segmentation")
    with pytest.raises(amas.AmasError, match="task=segmentation reads per-pixel logits"):
        amas.prune(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                   [(x, y)], [(x, y)], SHAPE, 0.5, out_dir=run, task="segmentation")
    with pytest.raises(amas.AmasError, match="method taylor cannot prune a segmentation model"):
        amas.prune(lraspp(), [(x, y.clamp(max=K - 1))], [(x, y.clamp(max=K - 1))], SHAPE, 0.5, overrides=tiny(),
                   out_dir=run, task="segmentation", method="taylor")
    with pytest.raises(amas.AmasError, match="task=detection needs a torchvision detector"):  # a segmenter
        amas.prune(lraspp(), [(x, y)], [(x, y)], SHAPE, 0.5, out_dir=run, task="detection")
    assert not run.exists()
