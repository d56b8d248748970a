"""Datasets, held-out validation split, and on-device batched loading with augmentation (the dataset files are read
by amas.datasets)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from amas.config import DataConfig
from amas.datasets import INFOS, DatasetInfo, load_tensors
from amas.datasets import Batches as Batches  # re-exported: defined beside DatasetInfo for amas.dense.batches too
from amas.datasets import DataBundle as DataBundle
from amas.datasets import batch_count as batch_count
from amas.errors import DataError

# ---------------------------------------------------------------- on-device loader


class TensorBatches:
    """Mini-batches from a uint8 tensor held on the device, augmented there in batch."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        augment: bool = True,
        pad: int = 4,
        flip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.pad, self.flip = pad, flip
        self.seed = seed
        self.epoch = 0
        self.channels_last = channels_last
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        shape = (1, info.in_channels, 1, 1)
        self.mean = torch.tensor(info.mean, device=self.device).view(shape) * 255.0
        self.inv_std = 1.0 / (torch.tensor(info.std, device=self.device).view(shape) * 255.0)
        self.num_samples = int(images.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation to draw."""
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return batch_count(self.num_samples, self._global_batch(), self.world_size, self.drop_last)

    def _generator(self) -> torch.Generator:
        # one stream per (seed, epoch): resuming at an epoch boundary replays the same batches
        return torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)

    def draw_augmentation(self, n: int, g: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Crop offsets (2×n) and flip flags (n) for a batch of n images, drawn from g on the CPU."""
        off = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g) if self.pad > 0 else None
        flip = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return off, flip

    def apply_augmentation(self, x: torch.Tensor, off: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
        """Pad-and-crop by off and mirror where flip, for a whole uint8 batch at once."""
        n, c, h, w = x.shape
        if off is not None:
            p = self.pad
            off = off.to(x.device)
            xp = F.pad(x, (p, p, p, p))
            rows = (off[0].view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (off[1].view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            bidx = torch.arange(n, device=x.device).view(n, 1, 1, 1)
            cidx = torch.arange(c, device=x.device).view(1, c, 1, 1)
            x = xp[bidx, cidx, rows, cols]
        if flip is not None:
            x = torch.where(flip.to(x.device).view(n, 1, 1, 1), x.flip(3), x)
        return x

    def augment_batch(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random pad-and-crop and horizontal flip of a uint8 batch, drawn from g."""
        return self.apply_augmentation(x, *self.draw_augmentation(x.shape[0], g))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch to normalised floats of the default dtype (float32 unless a caller set another)."""
        dtype = torch.get_default_dtype()
        x = (x.to(dtype) - self.mean.to(dtype)) * self.inv_std.to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self._generator()
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        gb = self._global_batch()
        for b in range(len(self)):
            idx = order[b * gb : (b + 1) * gb]
            # draw for the whole global batch, then shard: the same images get the same crops on any rank count
            off, flip = self.draw_augmentation(idx.numel(), g) if self.augment else (None, None)
            if self.world_size > 1:
                idx = idx[self.rank :: self.world_size]
                off = off[:, self.rank :: self.world_size] if off is not None else None
                flip = flip[self.rank :: self.world_size] if flip is not None else None
            idx = idx.to(self.device)
            x = self.images.index_select(0, idx)
            if self.augment:
                x = self.apply_augmentation(x, off, flip)
            yield self.normalize(x), self.labels.index_select(0, idx)


class FolderBatches:
    """ImageFolder data through torchvision transforms and a DataLoader (too large to hold in memory)."""

    def __init__(
        self,
        root: Path,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        cfg: DataConfig,
        device: torch.device | str,
        seed: int,
        channels_last: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        norm = T.Normalize(info.mean, info.std)
        lo, hi = (list(cfg.crop_scale) + [0.0, 0.0])[:2]
        if len(cfg.crop_scale) != 2 or not 0 < lo <= hi <= 1:
            raise DataError(f"data.crop_scale={list(cfg.crop_scale)} is not a range of the image's area; pass two "
                            "fractions lo <= hi in (0, 1], e.g. [0.35, 1.0]")
        if train and cfg.augment:
            tf = T.Compose([T.RandomResizedCrop(info.image_size, scale=tuple(cfg.crop_scale)), T.RandomHorizontalFlip(),
                            T.ToTensor(), norm])
        else:
            tf = T.Compose([T.Resize(int(info.image_size * 8 / 7)), T.CenterCrop(info.image_size), T.ToTensor(), norm])
        self.dataset = ImageFolder(str(root), transform=tf)
        self.batch_size, self.train, self.seed, self.epoch = batch_size, train, seed, 0
        self.device, self.channels_last = torch.device(device), channels_last
        self.num_workers = cfg.num_workers
        self.rank, self.world_size = rank, world_size
        self.indices: list[int] = list(range(len(self.dataset)))
        self.num_samples = len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle to draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return batch_count(self.num_samples, self.batch_size * self.world_size, self.world_size, self.train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, Subset

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = [
            self.indices[i]
            for i in (torch.randperm(self.num_samples, generator=g).tolist() if self.train else range(self.num_samples))
        ]
        gb = self.batch_size * self.world_size
        order = order[: len(self) * gb]
        if self.world_size > 1:
            order = [i for b in range(len(self)) for i in order[b * gb : (b + 1) * gb][self.rank :: self.world_size]]
        loader = DataLoader(Subset(self.dataset, order), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split of n training images."""
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images out of {n}; lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _class_folders(split_dir: Path) -> list[str]:
    """The class folders of an ImageFolder split, as torchvision finds them (every directory, sorted)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _holds_an_image(folder: Path) -> bool:
    """Whether torchvision's ImageFolder finds at least one image in folder (any depth, its extensions)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_image_folder(cfg: DataConfig) -> list[str]:
    """The class names of an ImageFolder tree, or one DataError naming the folder that cannot work (missing, no
    class folders, a class folder without images, val/ or test/ with other classes than train/)."""
    if not cfg.root:
        raise DataError("data.name=imagefolder needs data.root, the folder holding train/ and val/")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageFolder root '{root}' does not exist; set data.root to the folder holding train/ and "
                        "val/")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"ImageFolder root '{root}' has no train/ folder; set data.root to the folder that holds "
                        "train/ and val/ with one folder per class")
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"'{train_dir}' has no class folders; put each class's training images in a folder of its own "
                        "there")
    val_dir = root / "val"
    if not val_dir.is_dir():
        raise DataError(f"ImageFolder data needs '{val_dir}' (held-out images per class); create it next to train/")
    splits = [train_dir, val_dir] + ([root / "test"] if (root / "test").is_dir() else [])
    for split in splits[1:]:
        # ImageFolder numbers classes by their sorted folder names in each split: other folders mean other labels
        other = _class_folders(split)
        if other != classes:
            missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)}, which train/ lacks"
            raise DataError(f"'{split}' {what}; give it the same class folders as '{train_dir}'")
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for split in splits:
        for name in classes:
            if not _holds_an_image(split / name):
                raise DataError(f"class folder '{split / name}' holds no images ({', '.join(IMG_EXTENSIONS)}); add "
                                f"images of class '{name}' to it, or remove that class folder from every split")
    return classes


def check_images(cfg: DataConfig) -> None:
    """One DataError naming the first file of an ImageFolder tree (its class folders) that is not a readable image.

    Header only, to stay cheap on big folders: ``Image.open`` reads the first bytes of each file and decodes no
    pixels (measured about 30 µs a file on a warm cache for 224x224 JPEGs, some 40 s for ImageNet's 1.3M files), so an
    empty, non-image or mangled-header file stops the run before any stage; a file cut short after a valid header
    still fails later, in the loader.
    """
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(cfg.root).expanduser()
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        for name in _class_folders(root / split):
            for folder, _, files in os.walk(root / split / name, followlinks=True):
                for f in sorted(files):
                    if not f.lower().endswith(IMG_EXTENSIONS):
                        continue
                    path = Path(folder) / f
                    try:
                        with Image.open(path):
                            pass
                    except (OSError, SyntaxError, ValueError) as e:
                        raise DataError(f"image '{path}' cannot be read ({type(e).__name__}); remove or replace the "
                                        "file, then run again") from None


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes, channels, size and normalisation of the configured dataset (an ImageFolder tree is checked)."""
    if cfg.name == "imagefolder":
        classes = check_image_folder(cfg)
        return DatasetInfo("imagefolder", len(classes), 3, cfg.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if cfg.name in ("voc", "coco"):  # a segmentation or detection folder (amas.dense.batches)
        from amas.dense.batches import coco_info, voc_info

        return voc_info(cfg) if cfg.name == "voc" else coco_info(cfg)
    return INFOS[cfg.name]


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, *, device: torch.device | str = "cpu",
               seed: int = 0, channels_last: bool = False, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Load the configured dataset and wrap its train / held-out validation / test splits as batches."""
    common = dict(device=device, channels_last=channels_last, rank=rank, world_size=world_size)
    if cfg.name in ("voc", "coco"):
        from amas.dense.batches import coco_bundle, voc_bundle

        bundle = voc_bundle if cfg.name == "voc" else coco_bundle
        return bundle(cfg, batch_size, eval_batch_size, seed=seed, **common)
    info = dataset_info(cfg)
    if cfg.name == "imagefolder":
        root = Path(cfg.root).expanduser()
        val_dir = root / "val"
        tr = FolderBatches(root / "train", info, batch_size, train=True, cfg=cfg, seed=seed, **common)
        va = FolderBatches(val_dir, info, eval_batch_size, train=False, cfg=cfg, seed=seed, **common)
        te_dir = root / "test" if (root / "test").is_dir() else val_dir
        te = FolderBatches(te_dir, info, eval_batch_size, train=False, cfg=cfg, seed=seed, **common)
        return DataBundle(tr, va, te, info)

    x, y = load_tensors(cfg, train=True)
    xt, yt = load_tensors(cfg, train=False)
    val = None
    if cfg.val_size > 0:
        tr_idx, va_idx = split_indices(len(y), cfg.val_size, cfg.split_seed)
        val = TensorBatches(x[va_idx], y[va_idx], info, eval_batch_size, train=False, **common)
        x, y = x[tr_idx], y[tr_idx]
    if cfg.train_subset:
        x, y = x[: cfg.train_subset], y[: cfg.train_subset]
    if cfg.test_subset:
        xt, yt = xt[: cfg.test_subset], yt[: cfg.test_subset]
    train = TensorBatches(x, y, info, batch_size, train=True, augment=cfg.augment, pad=cfg.pad, flip=cfg.flip,
                          seed=seed, **common)
    test = TensorBatches(xt, yt, info, eval_batch_size, train=False, **common)
    return DataBundle(train, val, test, info)
