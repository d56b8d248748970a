"""A VOC-layout segmentation folder as the engine's Batches (config data.name=voc): the description the stages read,
the up-front checks (files, classes the model lacks) and seeded, rank-sharded batches of (images, label maps)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from amas.datasets import DataBundle, DatasetInfo, batch_count
from amas.dense.images import IMAGENET_MEAN, IMAGENET_STD
from amas.dense.voc import VOCSegmentation, segmentation_collate
from amas.errors import DataError

if TYPE_CHECKING:
    from amas.config import Config, DataConfig

__all__ = ["SegmentationBatches", "check_task_data", "voc_bundle", "voc_info", "voc_splits"]


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


def check_task_data(cfg: Config, user_data: bool = False) -> None:
    """One line, before any stage runs or writes, for data the task cannot train on: a dense task on a dataset of
    class labels, label maps for a classifier, and on a VOC folder a file that is not an image or a label map with a
    class the model lacks (every label map is read once)."""
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
    if task == "detection":
        raise DataError("task=detection trains in amas.MaskSearch (your own loop) so far; amas train and amas prune "
                        "take task=classification or task=segmentation")
    if name != "voc":
        return
    for ds in {id(d): d for d in voc_splits(cfg.data).values()}.values():  # test may be val
        check_files(ds)
        check_labels(ds, cfg.data.num_classes)


class SegmentationBatches:
    """One split of a VOC folder as the engine's Batches: (images (B, 3, S, S) normalised, label maps int64 (B, S, S))
    on the device; train batches shuffled and flipped from (seed, epoch), the flips drawn for the global batch before
    it is sharded (the same images get the same flips on any rank count); each rank reads its every world_size-th
    image of each global batch."""

    def __init__(self, dataset: VOCSegmentation, batch_size: int, *, train: bool, flip: bool, seed: int,
                 device: torch.device | str, channels_last: bool = False, num_workers: int = 0, subset: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self._order(),  # type: ignore[arg-type]
                            collate_fn=segmentation_collate, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def voc_bundle(cfg: DataConfig, batch_size: int, eval_batch_size: int, **common: Any) -> DataBundle:
    """The train / val / test batches of a data.name=voc folder (common: device, seed, channels_last, rank,
    world_size); data.train_subset and data.test_subset keep the first images of those splits."""
    splits = voc_splits(cfg)
    extra = dict(common, num_workers=cfg.num_workers)
    train = SegmentationBatches(splits["train"], batch_size, train=True, flip=cfg.augment and cfg.flip,
                                subset=cfg.train_subset, **extra)
    val = SegmentationBatches(splits["val"], eval_batch_size, train=False, flip=False, **extra)
    test = SegmentationBatches(splits["test"], eval_batch_size, train=False, flip=False, subset=cfg.test_subset,
                               **extra)
    return DataBundle(train, val, test, voc_info(cfg))
