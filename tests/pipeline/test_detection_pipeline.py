"""Object detection through the whole pipeline from the Python API: amas.prune(task="detection") on a tiny Faster
R-CNN (MobileNetV3 FPN, 64x64 images, random init) and random scenes (search, candidates, selection by box mAP, final
fine-tune, export of pruned.pt and of the tensor part as pruned.pt2, report); bad targets stop before any stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_dense_pipeline import tiny
from torch.utils._pytree import tree_leaves

import amas
from amas.channels.dense import tensor_part
from amas.errors import DataError

K = 3  # background and two classes
SIZE = 64
SHAPE = (3, SIZE, SIZE)  # the image size after the detector's transform (min_size = max_size = 64)


def detector() -> torch.nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    return fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=K, min_size=SIZE,
                                                 max_size=SIZE).eval()


def scenes(batches: int, gen: torch.Generator) -> list:
    """Batches of 4 random images with 1-2 random boxes each."""
    out = []
    for _ in range(batches):
        targets = []
        for _ in range(4):
            n = int(torch.randint(1, 3, (1,), generator=gen))
            xy, wh = torch.rand(n, 2, generator=gen) * 40, torch.rand(n, 2, generator=gen) * 20 + 4
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, K, (n,), generator=gen)})
        out.append((torch.rand(4, *SHAPE, generator=gen), targets))
    return out


def test_prune_a_detector_end_to_end(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    train, val = scenes(2, gen), scenes(1, gen)
    teacher = detector()
    before = copy.deepcopy(teacher.state_dict())
    run = tmp_path / "run"
    # the search without its step-size probe (the fine-tunes' probe covers a detector's BatchNorm recalibration)
    result = amas.prune(teacher, train, val, SHAPE, 0.5, overrides=tiny(**{"search.train.probe_steps": 0}),
                        out_dir=run, latency_iters=1,
                        task="detection")
    rep = result.report
    assert rep["metric"] == "map" and 0 <= rep["val_map"] <= 100 and 0 <= rep["teacher"]["val_map"] <= 100
    full = json.loads((run / "report.json").read_text())
    assert full["metric"] == "map" and any("NMS" in n for n in full["notes"])
    assert "box mAP" in (run / "report.md").read_text()
    # smaller in MACs (the tensor part: backbone and heads), and the pruned detector still returns detections
    macs, _ = amas.count(tensor_part(teacher), SHAPE)
    assert rep["teacher"]["macs"] == macs and rep["macs"] < 0.75 * macs
    x = val[0][0]
    with torch.no_grad():
        got = result.model(x)
    assert len(got) == 4 and all(set(d) == {"boxes", "scores", "labels"} for d in got)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()) and not teacher.training
    # pruned.pt rebuilds the torchvision detector by its builder and sizes, with the same detections
    model, obj = amas.load_pruned(run / "pruned.pt")
    assert obj["model"]["name"] == "tv:fasterrcnn_mobilenet_v3_large_320_fpn"
    assert obj["model"]["kwargs"] == {"weights_backbone": None, "min_size": SIZE, "max_size": SIZE}
    with torch.no_grad():
        again = model(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for a, b in zip(got, again, strict=True) for k in a)
    # pruned.pt2: the tensor part (no transform, no NMS) with the eager tensor part's outputs
    pt2 = torch.export.load(str(run / "pruned.pt2")).module()
    images = model.transform(list(x[:2]))[0].tensors
    with torch.no_grad():
        want, have = tensor_part(model)(images), pt2(images)
    pairs = list(zip(tree_leaves(want), tree_leaves(have), strict=True))
    assert pairs and all((a - b).abs().max() <= 1e-4 for a, b in pairs)


@pytest.mark.parametrize("bad, why", [
    ({"boxes": torch.zeros(1, 5), "labels": torch.ones(1, dtype=torch.long)}, "boxes must be a float (N, 4)"),
    ({"boxes": torch.tensor([[10.0, 2.0, 5.0, 8.0]]), "labels": torch.ones(1, dtype=torch.long)}, "x2 < x1"),
    ({"boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0]]), "labels": torch.tensor([K])}, f"label {K}"),
])
def test_bad_detection_targets_stop_before_any_stage(bad, why, tmp_path) -> None:
    good = scenes(1, torch.Generator().manual_seed(1))
    x, targets = good[0]
    run = tmp_path / "run"
    with pytest.raises(DataError) as e:
        amas.prune(detector(), [(x, [bad, *targets[1:]])], good, SHAPE, 0.5, overrides=tiny(), out_dir=run,
                   task="detection")
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not run.exists()
