"""Train and validation DataLoaders over a dense-prediction folder (VOC layout for segmentation, COCO JSON for
detection), and the up-front scans of a split: files that are not images, classes the model does not have."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from amas.dense.coco import CocoDetection, check_box_labels, detection_collate
from amas.dense.images import FlipSampler, check_headers, check_label_values
from amas.dense.voc import VOCSegmentation, segmentation_collate
from amas.errors import DataError

__all__ = ["check_files", "check_labels", "detection_loaders", "segmentation_loaders"]


def check_labels(dataset: VOCSegmentation | CocoDetection, num_classes: int) -> list[int]:
    """The classes a split uses, sorted (255 left out), or one DataError naming the first item with a class the
    model of num_classes classes (background included) does not have."""
    found: set[int] = set()
    for i in range(len(dataset)):
        if isinstance(dataset, VOCSegmentation):
            labels = dataset.labels(i)
            check_label_values(labels, num_classes, f"'{dataset.label_paths[i]}'")
            found |= set(labels.unique().tolist()) - {255}
        elif isinstance(dataset, CocoDetection):
            labels = dataset.target(i)["labels"]
            check_box_labels(labels, num_classes, f"image {dataset.image_ids[i]} of '{dataset.annotation_file}'")
            found |= set(labels.tolist())
        else:
            raise DataError(f"check_labels reads a VOCSegmentation or a CocoDetection, not {type(dataset).__name__}; "
                            "pass one of those")
    return sorted(found)


def check_files(dataset: VOCSegmentation | CocoDetection) -> None:
    """One DataError naming the first image (or label map) of a split that is not a readable image (headers only)."""
    check_headers(list(dataset.image_paths) + list(getattr(dataset, "label_paths", [])))


def _loaders(train: torch.utils.data.Dataset, val: torch.utils.data.Dataset, batch_size: int, seed: int,
             num_workers: int, flip: bool, collate: Callable) -> tuple[DataLoader, DataLoader]:
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} holds no images; pass a batch size of at least 1")
    for ds in (train, val):
        check_files(ds)
    sampler = FlipSampler(len(train), seed=seed, shuffle=True, flip=flip)
    common = dict(batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    return DataLoader(train, sampler=sampler, **common), DataLoader(val, shuffle=False, **common)


def segmentation_loaders(root: str | Path, image_size: int | None = None, batch_size: int = 8, seed: int = 0, *,
                         num_classes: int | None = None, num_workers: int = 0, flip: bool = True,
                         splits: tuple[str, str] = ("train", "val")) -> tuple[DataLoader, DataLoader]:
    """(train, val) DataLoaders of (images (B, 3, H, W) normalised, targets int64 (B, H, W)) from a VOC-layout folder;
    train shuffled and flipped from seed (set_epoch on ``loader.sampler`` to replay an epoch), files checked first."""
    train = VOCSegmentation(root, splits[0], num_classes=num_classes, image_size=image_size)
    val = VOCSegmentation(root, splits[1], num_classes=num_classes, image_size=image_size)
    return _loaders(train, val, batch_size, seed, num_workers, flip, segmentation_collate)


def detection_loaders(root: str | Path, image_size: int | None = None, batch_size: int = 8, seed: int = 0, *,
                      num_classes: int | None = None, num_workers: int = 0, flip: bool = True,
                      splits: tuple[str, str] = ("train", "val"),
                      image_dir: str | Path | None = None) -> tuple[DataLoader, DataLoader]:
    """(train, val) DataLoaders of (images, list of {"boxes", "labels"}) from root/annotations/instances_<split>.json
    and root/images (or image_dir); train shuffled and flipped from seed, files checked first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"detection folder '{root}' does not exist; pass the folder holding annotations/ and images/")
    images = Path(image_dir).expanduser() if image_dir is not None else root / "images"
    train, val = (CocoDetection(root / "annotations" / f"instances_{s}.json", images, num_classes=num_classes,
                                image_size=image_size) for s in splits)
    return _loaders(train, val, batch_size, seed, num_workers, flip, detection_collate)
