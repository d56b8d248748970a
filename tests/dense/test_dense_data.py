"""The dense data layer: generated scenes (amas.dense.scenes, benchmarks/scenes.py) read back as VOC segmentation and
COCO detection, boxes against the pastes and the label maps, flips, loaders, and one DataError line per bad input."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amas.dense.coco import CocoDetection, check_detection_target, detection_collate
from amas.dense.loaders import check_labels, detection_loaders, segmentation_loaders
from amas.dense.scenes import make_scenes, render_scene
from amas.dense.voc import VOCSegmentation
from amas.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SIZE = 48


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    make_scenes(out, train=6, val=2, test=2, size=SIZE, seed=0)
    return out


@pytest.fixture
def copy(scenes, tmp_path) -> Path:
    """A copy of the scenes that a test may break."""
    shutil.copytree(scenes, tmp_path / "s")
    return tmp_path / "s"


def _tight(mask: torch.Tensor) -> list[int]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and ";" in msg, msg  # the cause; the fix
    return msg


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_render_scene_boxes_are_the_pastes_and_the_ring_is_ignore() -> None:
    square = np.full((1, 28, 28), 200, dtype=np.uint8)
    scene = render_scene(square, np.array([4]), np.random.default_rng(0), SIZE, (10, 20))
    (obj,) = scene.objects
    x, y, s = obj["paste"]
    assert obj["label"] == 5 and obj["box"] == [x, y, x + s, y + s] and obj["area"] == s * s
    assert (scene.labels[y:y + s, x:x + s] == 5).all()
    # 255 exactly on the 4-neighbour ring outside the square (the sides the canvas does not cut off)
    inside = np.zeros(scene.labels.shape, dtype=bool)
    inside[y:y + s, x:x + s] = True
    padded = np.pad(inside, 1)
    ring = ~inside & (padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])
    assert ((scene.labels == 255) == ring).all() and (scene.labels[~inside & ~ring] == 0).all()
    assert set(np.unique(scene.labels)) == {0, 5, 255}


def test_both_formats_read_back_and_agree(scenes) -> None:
    seg = VOCSegmentation(scenes / "voc", "train", mean=None, num_classes=11)
    det = CocoDetection(scenes / "coco" / "annotations" / "instances_train.json", scenes / "coco" / "images",
                        num_classes=11)
    ann = json.loads((scenes / "coco" / "annotations" / "instances_train.json").read_text())
    assert len(seg) == len(det) == 6 and ann["categories"][0] == {"id": 1, "name": "T-shirt/top",
                                                                   "supercategory": "fashion"}
    for i in range(len(seg)):
        image, target = seg[i]
        png = torch.from_numpy(np.asarray(Image.open(seg.image_paths[i]).convert("RGB")).copy())
        assert image.shape == (3, SIZE, SIZE) and torch.equal((image * 255).round().byte(), png.permute(2, 0, 1))
        assert target.dtype == torch.int64 and target.shape == (SIZE, SIZE)
        x, t = det[i]
        assert torch.equal(x, image) and t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert 1 <= len(t["labels"]) <= 4
        # the label map holds the background, the ring and exactly the classes of the boxes
        assert set(target.unique().tolist()) == {0, 255} | set(t["labels"].tolist())
        for box, label in zip(t["boxes"].long().tolist(), t["labels"].tolist(), strict=True):
            x1, y1, x2, y2 = box
            inside = torch.zeros_like(target, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            # the object's visible pixels (its class, or the ring where a later object covers it) fill its box
            assert _tight(inside & ((target == label) | (target == 255))) == box
        objs = [a for a in ann["annotations"] if a["image_id"] == det.image_ids[i]]
        for a, box in zip(objs, t["boxes"].tolist(), strict=True):
            assert box == [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
    assert check_labels(seg, 11)[0] == 0 and set(check_labels(det, 11)) <= set(range(1, 11))


def test_splits_use_disjoint_items_and_the_cli_writes_the_same_files(scenes, tmp_path, monkeypatch) -> None:
    items = {s: {a["item"] for a in json.loads((scenes / "coco" / "annotations" / f"instances_{s}.json").read_text())
                 ["annotations"]} for s in ("train", "val")}
    assert items["train"] and items["val"] and not items["train"] & items["val"]
    monkeypatch.setattr(sys, "argv", ["scenes.py", "--out", str(tmp_path / "cli"), "--train", "6", "--val", "2",
                                      "--test", "2", "--size", str(SIZE), "--seed", "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "benchmarks" / "scenes.py"), run_name="__main__")
    assert e.value.code == 0
    mine = sorted(p.relative_to(scenes) for p in scenes.rglob("*") if p.is_file())
    assert mine == sorted(p.relative_to(tmp_path / "cli") for p in (tmp_path / "cli").rglob("*") if p.is_file())
    for rel in mine:
        assert (scenes / rel).read_bytes() == (tmp_path / "cli" / rel).read_bytes(), rel


def test_flip_keeps_boxes_on_the_label_map(scenes) -> None:
    seg = VOCSegmentation(scenes / "voc", "train", mean=None)
    det = CocoDetection(scenes / "coco" / "annotations" / "instances_train.json", scenes / "coco" / "images")
    for i in range(len(seg)):
        (image, target), (fimage, ftarget) = seg[i], seg[(i, True)]
        assert torch.equal(fimage, image.flip(-1)) and torch.equal(ftarget, target.flip(-1))
        t, (dimage, ft) = det[i][1], det[(i, True)]
        assert torch.equal(dimage, fimage)
        b = t["boxes"]
        assert torch.equal(ft["boxes"], torch.stack([SIZE - b[:, 2], b[:, 1], SIZE - b[:, 0], b[:, 3]], 1))
        for box, label in zip(ft["boxes"].long().tolist(), ft["labels"].tolist(), strict=True):
            inside = torch.zeros_like(ftarget, dtype=torch.bool)
            inside[box[1]:box[3], box[0]:box[2]] = True
            assert _tight(inside & ((ftarget == label) | (ftarget == 255))) == box


def test_loaders_batch_resize_and_replay_under_a_seed(scenes) -> None:
    tr, va = segmentation_loaders(scenes / "voc", image_size=32, batch_size=4, seed=1)
    x, y = next(iter(tr))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32) and abs(float(x.mean())) < 2.5
    assert len(va.dataset) == 2 and next(iter(va))[0].shape == (2, 3, 32, 32)
    tr, va = detection_loaders(scenes / "coco", image_size=32, batch_size=3, seed=1)
    x, targets = next(iter(tr))
    assert x.shape == (3, 3, 32, 32) and len(targets) == 3 and all(t["boxes"].max() <= 32 for t in targets)
    again = detection_loaders(scenes / "coco", image_size=32, batch_size=3, seed=1)[0]
    tr.sampler.set_epoch(0)
    epoch0 = [[t["boxes"] for t in ts] for _, ts in tr]
    assert all(torch.equal(a, b) for p, q in zip(epoch0, ([t["boxes"] for t in ts] for _, ts in again), strict=True)
               for a, b in zip(p, q, strict=True))
    full = CocoDetection(scenes / "coco" / "annotations" / "instances_train.json", scenes / "coco" / "images")
    i = tr.dataset.image_ids.index(full.image_ids[0])
    torch.testing.assert_close(tr.dataset[(i, False)][1]["boxes"], full[0][1]["boxes"] * 32 / SIZE)
    imgs, ts = detection_collate([(torch.zeros(3, 8, 8), full[0][1]), (torch.zeros(3, 9, 9), full[1][1])])
    assert isinstance(imgs, list) and len(ts) == 2


def test_bad_boxes_are_one_line() -> None:
    good = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 6.0]]), "labels": torch.tensor([3])}
    check_detection_target(good)
    check_detection_target({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    for bad, words in [({"boxes": torch.zeros(2, 5), "labels": torch.ones(2, dtype=torch.int64)}, "(N, 4)"),
                       ({"boxes": torch.tensor([[5.0, 2.0, 1.0, 6.0]]), "labels": torch.tensor([3])}, "x2 < x1"),
                       ({"boxes": good["boxes"], "labels": torch.tensor([1, 2])}, "labels")]:
        with pytest.raises(DataError) as e:
            detection_collate([(torch.zeros(3, 8, 8), good), (torch.zeros(3, 8, 8), bad)])
        assert words in _one_line(e)


@pytest.mark.parametrize("breakage, words", [
    (lambda a: a["annotations"][0].update(bbox=[4, 4, -3, 5]), "negative size"),
    (lambda a: a["annotations"][0].update(bbox=[4, 4, 5]), "four finite numbers"),
    (lambda a: a["annotations"][0].update(category_id=42), "category 42"),
    (lambda a: a.update(images=[]), "has no images"),
    (lambda a: a.update(annotations=[dict(x, iscrowd=1) for x in a["annotations"]]), "no (non-crowd) objects"),
])
def test_bad_coco_files_are_one_line(copy, breakage, words) -> None:
    path = copy / "coco" / "annotations" / "instances_val.json"
    ann = json.loads(path.read_text())
    breakage(ann)
    path.write_text(json.dumps(ann))
    before = _files(copy)
    with pytest.raises(DataError) as e:
        detection_loaders(copy / "coco")
    assert words in _one_line(e) and _files(copy) == before


def test_empty_or_missing_files_are_one_line(copy) -> None:
    before = _files(copy)
    (copy / "coco" / "annotations" / "instances_val.json").write_text("")
    with pytest.raises(DataError) as e:
        detection_loaders(copy / "coco")
    assert "is empty" in _one_line(e)
    (copy / "coco" / "annotations" / "instances_val.json").unlink()
    with pytest.raises(DataError) as e:
        detection_loaders(copy / "coco")
    assert "instances_val.json' is missing" in _one_line(e)
    (copy / "voc" / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataError) as e:
        segmentation_loaders(copy / "voc")
    assert "val.txt' is missing" in _one_line(e)
    (copy / "voc" / "ImageSets" / "Segmentation" / "train.txt").write_text("\n")
    with pytest.raises(DataError) as e:
        VOCSegmentation(copy / "voc", "train")
    assert "lists no images" in _one_line(e)
    with pytest.raises(DataError) as e:
        make_scenes(copy / "new", train=0, val=0, test=0)
    assert "no images" in _one_line(e) and not (copy / "new").exists()
    assert set(_files(copy)) == set(before) - {"coco/annotations/instances_val.json",
                                               "voc/ImageSets/Segmentation/val.txt"}


def test_classes_the_model_lacks_are_one_line(scenes) -> None:
    seg = VOCSegmentation(scenes / "voc", "train", num_classes=3)
    top = max(check_labels(VOCSegmentation(scenes / "voc", "train"), 11))
    with pytest.raises(DataError) as e:
        check_labels(seg, 3)
    assert "but the model has 3 classes" in _one_line(e)
    bad = next(i for i in range(len(seg)) if int(seg.labels(i).masked_fill(seg.labels(i) == 255, 0).max()) >= 3)
    with pytest.raises(DataError) as e:  # lazily, item by item
        seg[bad]
    assert "the model has 3 classes" in _one_line(e) and top >= 3
    det = CocoDetection(scenes / "coco" / "annotations" / "instances_train.json", scenes / "coco" / "images",
                        num_classes=2)
    with pytest.raises(DataError) as e:
        check_labels(det, 2)
    assert "renumber the categories from 1" in _one_line(e)


def test_files_that_do_not_decode_are_one_line(copy) -> None:
    seg = VOCSegmentation(copy / "voc", "train")
    seg.image_paths[2].write_bytes(b"not a png at all")
    with pytest.raises(DataError) as e:
        seg[2]
    assert "cannot be decoded" in _one_line(e)
    with pytest.raises(DataError) as e:
        segmentation_loaders(copy / "voc")
    assert "cannot be read" in _one_line(e)
    Image.new("RGB", (SIZE, SIZE)).save(seg.label_paths[3])
    with pytest.raises(DataError) as e:
        seg[3]
    assert "is a RGB image" in _one_line(e)
    coco = copy / "coco"
    (coco / "images" / "train_000001.png").unlink()  # a hard link of the VOC image: replace, not overwrite
    (coco / "images" / "train_000001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as e:
        detection_loaders(coco)
    assert "train_000001.png' cannot be read" in _one_line(e)
