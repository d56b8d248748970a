"""Semantic segmentation over a VOC-layout folder: ``JPEGImages/<name>.jpg|png`` RGB images,
``SegmentationClass/<name>.png`` label maps of class indices (palette or grayscale, 0 = background, 255 = ignore) and
``ImageSets/Segmentation/<split>.txt`` listing the names of a split, one per line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from amas.dense.images import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_label_values,
    normalize,
    read_image,
    read_label_map,
    resize_image,
    resize_labels,
    split_index,
)
from amas.errors import DataError

__all__ = ["IGNORE_INDEX", "VOCSegmentation", "read_split_names", "segmentation_collate"]


def read_split_names(root: Path, split: str) -> list[str]:
    """The image names listed in root/ImageSets/Segmentation/<split>.txt, or one DataError."""
    path = Path(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not Path(root).is_dir():
        raise DataError(f"segmentation folder '{root}' does not exist; pass the folder holding JPEGImages/, "
                        "SegmentationClass/ and ImageSets/Segmentation/")
    if not path.is_file():
        raise DataError(f"split file '{path}' is missing; list the image names of the {split} split there, one per "
                        "line (VOC layout)")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"split file '{path}' lists no images; write the image names of the {split} split there, "
                        "one per line")
    return names


def _image_path(folder: Path, name: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise DataError(f"image '{name}' of the split has no file in '{folder}' ({', '.join(IMAGE_SUFFIXES)}); add it or "
                    "remove the name from the split file")


class VOCSegmentation(Dataset):
    """(image float (3, H, W) normalised, target int64 (H, W)) pairs of one split of a VOC-layout folder.

    ``num_classes`` (background included) turns on a check of every item read: a class ≥ num_classes other than 255
    is one DataError naming the file (``amas.dense.loaders.check_labels`` scans a whole split up front).
    ``image_size`` resizes images (bilinear) and label maps (nearest) to a square; ``flip`` mirrors image and label
    map together with probability 1/2. ``mean``/``std`` default to ImageNet's, as torchvision's segmenters expect;
    ``mean=None`` keeps [0, 1] floats.
    """

    def __init__(self, root: str | Path, split: str = "train", *, num_classes: int | None = None,
                 image_size: int | None = None, flip: bool = False, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.names = read_split_names(self.root, split)
        images, labels = self.root / "JPEGImages", self.root / "SegmentationClass"
        for folder in (images, labels):
            if not folder.is_dir():
                raise DataError(f"segmentation folder '{self.root}' has no {folder.name}/; put the images in "
                                "JPEGImages/ and the PNG label maps in SegmentationClass/ (VOC layout)")
        self.image_paths = [_image_path(images, n) for n in self.names]
        self.label_paths = [labels / f"{n}.png" for n in self.names]
        missing = next((p for p in self.label_paths if not p.is_file()), None)
        if missing is not None:
            raise DataError(f"label map '{missing}' is missing; add a PNG of class indices for every image of the "
                            f"{split} split (255 = ignore)")
        self.num_classes, self.image_size, self.flip = num_classes, image_size, flip
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.names)

    def labels(self, index: int) -> torch.Tensor:
        """The label map of item index as stored (no resize, no flip, no class check)."""
        return read_label_map(self.label_paths[index])

    def __getitem__(self, index: int | tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        i, flip = split_index(index, self.flip)
        image, target = read_image(self.image_paths[i]), self.labels(i)
        if tuple(image.shape[-2:]) != tuple(target.shape):
            raise DataError(f"label map '{self.label_paths[i]}' is {tuple(target.shape)} but its image is "
                            f"{tuple(image.shape[-2:])} (H, W); give each label map its image's size")
        if self.num_classes is not None:
            check_label_values(target, self.num_classes, f"'{self.label_paths[i]}'")
        image, target = resize_image(image, self.image_size), resize_labels(target, self.image_size)
        if flip:
            image, target = image.flip(-1), target.flip(-1)
        return normalize(image, self.mean, self.std), target


def segmentation_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and targets (B, H, W) stacked, or one DataError when the items differ in size."""
    sizes = {tuple(x.shape) for x, _ in batch}
    if len(sizes) > 1:
        raise DataError(f"segmentation images of different sizes in one batch ({', '.join(map(str, sorted(sizes)))}); "
                        "pass image_size to resize them to one square size")
    return torch.stack([x for x, _ in batch]), torch.stack([y for _, y in batch])
