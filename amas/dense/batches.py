"""Dense-prediction folders as the engine's Batches: a VOC-layout segmentation folder (config data.name=voc) and a
COCO JSON detection folder (data.name=coco): the description the stages read, the up-front checks (files, boxes,
classes the model lacks) and seeded, rank-sharded batches of (images, label maps) or (images, target dicts)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from amas.datasets import DataBundle, DatasetInfo, batch_count
from amas.dense.coco import CocoDetection, detection_collate
from amas.dense.images import IMAGENET_MEAN, IMAGENET_STD
from amas.dense.voc import VOCSegmentation, segmentation_collate
from amas.errors import DataError

if TYPE_CHECKING:
    from amas.config import Config, DataConfig

__all__ = ["DenseBatches", "SegmentationBatches", "check_task_data", "coco_bundle", "coco_info", "coco_splits",
           "voc_bundle", "voc_info", "voc_splits"]

SPLITS = ("train", "val", "test")


def voc_info(cfg: DataConfig) -> DatasetInfo:
    """The description of a data.name=voc folder (3 channels, data.image_size squares, ImageNet's normalisation, as
    torchvision's segmenters expect), or one DataError for a setting it needs."""
    if not cfg.root:
        raise DataError("data.name=voc needs data.root, the folder holding JPEGImages/, SegmentationClass/ and "
                        "ImageSets/Segmentation/")
    if cfg.num_classes < 1:
        raise DataError("data.name=voc needs data.num_classes, the segmenter's classes (background included), e.g. "
                        "data.num_classes=21 for Pascal VOC")
    return DatasetInfo("voc", cfg.num_classes, 3, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)


def voc_splits(cfg: DataConfig) -> dict[str, VOCSegmentation]:
    """The train, val and test splits of the folder (test: val's images when there is no test.txt)."""
    voc_info(cfg)
    root = Path(cfg.root).expanduser()
    has_test = (root / "ImageSets" / "Segmentation" / "test.txt").is_file()
    read = {name: VOCSegmentation(root, name, num_classes=cfg.num_classes, image_size=cfg.image_size)
            for name in ("train", "val", *(("test",) if has_test else ()))}
    return {**read, "test": read["test" if has_test else "val"]}


def coco_info(cfg: DataConfig) -> DatasetInfo:
    """The description of a data.name=coco folder (3 channels, data.image_size squares, images left in [0, 1]: a
    torchvision detector normalises inside its forward), or one DataError for a setting it needs."""
    if not cfg.root:
        raise DataError("data.name=coco needs data.root, the folder holding annotations/instances_train.json, "
                        "instances_val.json (and instances_test.json) and images/")
    if cfg.num_classes < 2:
        raise DataError("data.name=coco needs data.num_classes, the detector's classes with the background (category "
                        "ids run 1..num_classes-1), e.g. data.num_classes=91 for COCO")
    return DatasetInfo("coco", cfg.num_classes, 3, cfg.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def coco_splits(cfg: DataConfig) -> dict[str, CocoDetection]:
    """The train, val and test splits of root/annotations/instances_<split>.json over root/images (test: val's
    when there is no instances_test.json); every file is read and checked (empty, boxes not [x, y, w>=0, h>=0])."""
    coco_info(cfg)
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"detection folder '{root}' does not exist; pass the folder holding annotations/ and images/")
    ann = root / "annotations"
    has_test = (ann / "instances_test.json").is_file()
    read = {name: CocoDetection(ann / f"instances_{name}.json", root / "images", num_classes=cfg.num_classes,
                                image_size=cfg.image_size)
            for name in SPLITS if name != "test" or has_test}
    return {**read, "test": read["test" if has_test else "val"]}


def check_task_data(cfg: Config, user_data: bool = False) -> None:
    """One line, before any stage runs or writes, for data the task cannot train on: a dense task on a dataset of
    class labels, label maps for a classifier, and on a VOC folder a file that is not an image or a label map with a
    class the model lacks (every label map is read once); on a COCO folder an empty or unreadable annotation file, a
    box that is not [x, y, w>=0, h>=0] (x2 < x1), a category id >= data.num_classes, a missing image."""
    from amas.dense.loaders import check_files, check_labels

    task, name = cfg.task, cfg.data.name
    if user_data:
        return
    if task == "classification" and name == "voc":
        raise DataError("data.name=voc holds per-pixel label maps; set task=segmentation (and model.name to a "
                        "segmenter, e.g. tv:lraspp_mobilenet_v3_large)")
    if task == "segmentation" and name != "voc":
        raise DataError(f"task=segmentation reads label maps: set data.name=voc with data.root (a VOC-layout folder) "
                        f"and data.num_classes, or run amas.prune(teacher, train, val, input_shape, "
                        f"task='segmentation') with your own batches ({name} holds class labels)")
    if task == "classification" and name == "coco":
        raise DataError("data.name=coco holds boxes; set task=detection (and model.name to a detector, e.g. "
                        "tv:fasterrcnn_mobilenet_v3_large_320_fpn)")
    if task == "detection" and name != "coco":
        raise DataError(f"task=detection reads boxes: set data.name=coco with data.root (a COCO JSON folder) and "
                        f"data.num_classes, or run amas.prune(teacher, train, val, input_shape, task='detection') "
                        f"with your own batches ({name} holds {'label maps' if name == 'voc' else 'class labels'})")
    if name not in ("voc", "coco"):
        return
    splits = voc_splits(cfg.data) if name == "voc" else coco_splits(cfg.data)
    for ds in {id(d): d for d in splits.values()}.values():  # test may be val
        check_files(ds)
        check_labels(ds, cfg.data.num_classes)


class DenseBatches:
    """One split of a VOC or COCO folder as the engine's Batches: (images (B, 3, S, S), label maps int64 (B, S, S) or
    a list of {"boxes", "labels"} dicts) on the device; train batches shuffled and flipped from (seed, epoch), the
    flips drawn for the global batch before it is sharded (the same images get the same flips on any rank count); each
    rank reads its every world_size-th image of each global batch."""

    def __init__(self, dataset: VOCSegmentation | CocoDetection, batch_size: int, *, train: bool, flip: bool,
                 seed: int, device: torch.device | str, channels_last: bool = False, num_workers: int = 0,
                 subset: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.dataset, self.batch_size, self.train, self.flip = dataset, batch_size, train, flip and train
        self.seed, self.epoch, self.device, self.channels_last = seed, 0, torch.device(device), channels_last
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.num_samples = min(len(dataset), subset) if subset else len(dataset)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and flips to draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return batch_count(self.num_samples, self.batch_size * self.world_size, self.world_size, self.train)

    def _order(self) -> list[tuple[int, bool]]:
        """This rank's (index, flip) pairs of the epoch, batch after batch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.num_samples
        order = torch.randperm(n, generator=g).tolist() if self.train else list(range(n))
        coins = (torch.rand(n, generator=g) < 0.5).tolist() if self.flip else [False] * n
        pairs, gb = list(zip(order, coins, strict=True)), self.batch_size * self.world_size
        return [p for b in range(len(self)) for p in pairs[b * gb:(b + 1) * gb][self.rank::self.world_size]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        from torch.utils.data import DataLoader

        boxes = isinstance(self.dataset, CocoDetection)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self._order(),  # type: ignore[arg-type]
                            collate_fn=detection_collate if boxes else segmentation_collate,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if boxes:
                yield x, [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in y]
            else:
                yield x, y.to(self.device, non_blocking=True)


SegmentationBatches = DenseBatches  # the name of the VOC-only version


def voc_bundle(cfg: DataConfig, batch_size: int, eval_batch_size: int, **common: Any) -> DataBundle:
    """The train / val / test batches of a data.name=voc folder (common: device, seed, channels_last, rank,
    world_size); data.train_subset and data.test_subset keep the first images of those splits."""
    return _bundle(voc_splits(cfg), voc_info(cfg), cfg, batch_size, eval_batch_size, **common)


def coco_bundle(cfg: DataConfig, batch_size: int, eval_batch_size: int, **common: Any) -> DataBundle:
    """The train / val / test batches of a data.name=coco folder (images (B, 3, S, S) in [0, 1], boxes scaled to
    S and flipped with the images), as voc_bundle."""
    return _bundle(coco_splits(cfg), coco_info(cfg), cfg, batch_size, eval_batch_size, **common)


def _bundle(splits: dict, info: DatasetInfo, cfg: DataConfig, batch_size: int, eval_batch_size: int,
            **common: Any) -> DataBundle:
    extra = dict(common, num_workers=cfg.num_workers)
    train = DenseBatches(splits["train"], batch_size, train=True, flip=cfg.augment and cfg.flip,
                         subset=cfg.train_subset, **extra)
    val = DenseBatches(splits["val"], eval_batch_size, train=False, flip=False, **extra)
    test = DenseBatches(splits["test"], eval_batch_size, train=False, flip=False, subset=cfg.test_subset, **extra)
    return DataBundle(train, val, test, info)
