"""Detection over a COCO JSON file and its image folder: boxes converted from COCO's [x, y, w, h] to
(x1, y1, x2, y2), labels the category ids as they stand (torchvision's convention: 0 is the background, categories
are numbered from 1), crowd annotations skipped (or kept and marked), and a collate for batches of targets."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from amas.dense.images import normalize, read_image, resize_image, split_index
from amas.errors import DataError

__all__ = ["CocoDetection", "check_box_labels", "check_detection_target", "detection_collate", "read_coco"]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"annotation file '{path}' is missing; write the split's COCO JSON (images, annotations, "
                        "categories) there")
    text = path.read_text()
    if not text.strip():
        raise DataError(f"annotation file '{path}' is empty; write the split's COCO JSON (images, annotations, "
                        "categories) there")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"annotation file '{path}' is not JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or "
                        "rewrite it") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file '{path}' is a JSON {type(data).__name__}, not a COCO object; write an object "
                        "with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list) or not data[key]:
            raise DataError(f"annotation file '{path}' has no {key}; a COCO detection file lists images, "
                            "annotations and categories, none of them empty")
    return data


def _box(ann: dict, path: Path) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] of one annotation as (x1, y1, x2, y2), or one DataError naming the annotation."""
    bbox = ann.get("bbox")
    what = f"annotation {ann.get('id', '?')} of '{path}'"
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)):
        raise DataError(f"{what} has bbox {bbox!r}; give four finite numbers [x, y, width, height] (COCO)")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DataError(f"{what} has a negative size (bbox {bbox}); COCO boxes are [x, y, width, height] with width "
                        "and height >= 0 — convert corner boxes (x1, y1, x2, y2) to that form")
    return x, y, x + w, y + h


def read_coco(path: str | Path) -> tuple[list[dict], dict[int, list[tuple[tuple[float, ...], int, bool]]],
                                         dict[int, str]]:
    """(images, {image id: [(x1y1x2y2 box, category id, crowd)]}, {category id: name}) of a COCO JSON file, checked:
    one DataError for an empty file, no images, an unknown image or category, a bbox that is not [x, y, w>=0, h>=0]."""
    path = Path(path).expanduser()
    data = _load_json(path)
    categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    images = data["images"]
    boxes: dict[int, list] = {int(im["id"]): [] for im in images}
    for ann in data["annotations"]:
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if image_id not in boxes:
            raise DataError(f"annotation {ann.get('id', '?')} of '{path}' refers to image {image_id}, which the file "
                            "does not list; add the image to 'images' or drop the annotation")
        if cat not in categories:
            raise DataError(f"annotation {ann.get('id', '?')} of '{path}' has category {cat}, which 'categories' does "
                            f"not list ({sorted(categories)}); add the category or fix the annotation")
        boxes[image_id].append((_box(ann, path), int(cat), bool(ann.get("iscrowd", 0))))
    return images, boxes, categories


def check_detection_target(target: dict, where: str = "a target") -> None:
    """One DataError unless target holds float boxes (N, 4) as x1 <= x2, y1 <= y2 and int64 labels (N,)."""
    boxes, labels = target.get("boxes"), target.get("labels")
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise DataError(f"{where} has boxes of shape {shape}; give 'boxes' as a float tensor (N, 4) of (x1, y1, x2, "
                        "y2), torch.zeros(0, 4) for an image without objects")
    if not boxes.is_floating_point() or not bool(torch.isfinite(boxes).all()):
        raise DataError(f"{where} has boxes of dtype {boxes.dtype} or non-finite values; give finite float boxes")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):
        raise DataError(f"{where} has box {boxes[bad][0].tolist()} with x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2) "
                        "— convert [x, y, w, h] boxes with x2 = x + w, y2 = y + h")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (len(boxes),):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DataError(f"{where} has labels {shape} for {len(boxes)} boxes; give 'labels' as an int64 tensor (N,), "
                        "one class per box")


class CocoDetection(Dataset):
    """(image float (3, H, W), {"boxes": float (N, 4) x1y1x2y2, "labels": int64 (N,)}) of a COCO JSON file.

    Labels are the category ids (0 is the background of torchvision's detectors: number categories from 1);
    ``num_classes`` (background included) checks each item read: a label outside 1..num_classes-1 is one DataError.
    Boxes of zero width or height are dropped and boxes are clipped to the image (as torchvision's COCO reference
    does); crowd annotations are skipped, or kept with ``keep_crowd`` and marked in an ``iscrowd`` int64 (N,) entry.
    Images stay in [0, 1] by default (torchvision's detectors normalise inside); ``image_size`` resizes to a square
    and scales the boxes; ``flip`` mirrors image and boxes together with probability 1/2.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, num_classes: int | None = None,
                 image_size: int | None = None, flip: bool = False, keep_crowd: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.annotation_file = Path(annotations).expanduser()
        self.image_dir = Path(images).expanduser()
        infos, boxes, self.categories = read_coco(self.annotation_file)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder '{self.image_dir}' does not exist; pass the folder that the file names of "
                            f"'{self.annotation_file}' are relative to")
        self.image_ids = [int(im["id"]) for im in infos]
        self.image_paths = [self.image_dir / str(im["file_name"]) for im in infos]
        missing = next((p for p in self.image_paths if not p.is_file()), None)
        if missing is not None:
            raise DataError(f"image '{missing}' listed in '{self.annotation_file}' does not exist; add it or remove it "
                            "from the file")
        self.objects = [[o for o in boxes[i] if keep_crowd or not o[2]] for i in self.image_ids]
        if not any(self.objects):
            raise DataError(f"annotation file '{self.annotation_file}' holds no (non-crowd) objects; a detector cannot "
                            "learn or be measured on it — annotate the images or pick another split")
        self.num_classes, self.image_size, self.flip, self.keep_crowd = num_classes, image_size, flip, keep_crowd
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.image_paths)

    def target(self, index: int) -> dict[str, torch.Tensor]:
        """The boxes (x1y1x2y2, as in the file, zero-size ones dropped) and labels of item index; no resize or flip."""
        objs = self.objects[index]
        boxes = torch.tensor([o[0] for o in objs], dtype=torch.float32).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out = {"boxes": boxes[keep], "labels": torch.tensor([o[1] for o in objs], dtype=torch.int64)[keep]}
        if self.keep_crowd:
            out["iscrowd"] = torch.tensor([int(o[2]) for o in objs], dtype=torch.int64)[keep]
        return out

    def __getitem__(self, index: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i, flip = split_index(index, self.flip)
        image, target = read_image(self.image_paths[i]), self.target(i)
        if self.num_classes is not None:
            check_box_labels(target["labels"], self.num_classes, f"image {self.image_ids[i]} of "
                             f"'{self.annotation_file}'")
        h, w = image.shape[-2:]
        boxes = target["boxes"]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        if self.image_size is not None:
            image = resize_image(image, self.image_size)
            boxes *= torch.tensor([self.image_size / w, self.image_size / h] * 2)
            w = self.image_size
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        target["boxes"] = boxes
        return normalize(image, self.mean, self.std), target


def check_box_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """One DataError when a detection label is outside 1..num_classes-1 (0 is the background)."""
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise DataError(f"{where} has label {bad}, but a detector of {num_classes} classes reads 1..{num_classes - 1} "
                        f"(0 = background); give the model at least {max(bad + 1, 2)} classes or renumber the "
                        "categories from 1")


def detection_collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor | list[torch.Tensor], list[dict]]:
    """Images stacked (B, 3, H, W) when of one size, else a list; targets a list of dicts, each checked."""
    images = [x for x, _ in batch]
    targets = [t for _, t in batch]
    for k, t in enumerate(targets):
        check_detection_target(t, f"target {k} of the batch")
    same = len({tuple(x.shape) for x in images}) == 1
    return (torch.stack(images) if same else images), targets
