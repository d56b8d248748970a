"""The dataset files as whole uint8 tensors: Fashion-MNIST's idx files (the system package or a download), the
torchvision datasets (CIFAR-10/100, SVHN) and a synthetic set; and what every reader hands the engine (DatasetInfo,
the Batches protocol, DataBundle), shared by amas.data and amas.dense.batches."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from amas.config import DataConfig
from amas.errors import DataError

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT = os.path.expanduser("~/.cache/amas/data")

__all__ = ["DEFAULT_ROOT", "FASHION_MNIST_SYSTEM_DIR", "INFOS", "Batches", "DataBundle", "DatasetInfo", "batch_count",
           "load_tensors"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an exported checkpoint need to know about the data."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one normalised input image."""
        return (self.in_channels, self.image_size, self.image_size)


class Batches(Protocol):
    """What the engine iterates: normalised float images and int64 labels on the device."""

    num_samples: int

    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def batch_count(n: int, global_batch: int, world_size: int, drop_last: bool) -> int:
    """Batches per epoch of n images; drop_last drops a partial last batch, but never the only one (a whole epoch)
    unless it cannot give every process an image."""
    if not drop_last:
        return -(-n // global_batch)
    if n >= global_batch:
        return n // global_batch
    return 1 if n >= world_size else 0


@dataclass
class DataBundle:
    """Train, validation and test batches plus the dataset's description."""

    train: Batches
    val: Batches | None
    test: Batches
    info: DatasetInfo


INFOS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "synthetic": DatasetInfo("synthetic", 4, 1, 16, (0.5,), (0.25,)),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an IDX file of unsigned bytes; delete it and fetch the dataset again")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated ({data.size} of {int(np.prod(dims))} bytes); fetch the dataset again")
    return data.reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _fashion_mnist(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if train else "t10k"
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", Path(FASHION_MNIST_SYSTEM_DIR)]
    img, lbl = _find_idx(dirs, f"{prefix}-images-idx3-ubyte"), _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if (img is None or lbl is None) and download:
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(str(root), train=train, download=True)
        except Exception:
            pass
        img, lbl = _find_idx(dirs, f"{prefix}-images-idx3-ubyte"), _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img is None or lbl is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(
            f"Fashion-MNIST not found (looked in {looked}); install it with "
            "'apt-get install dataset-fashion-mnist' or set data.root to a folder with the IDX files"
        )
    x = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
    y = torch.from_numpy(_read_idx(lbl).astype(np.int64))
    return x, y


def _torchvision_tensors(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    try:
        if name == "svhn":
            ds = torchvision.datasets.SVHN(str(root), split="train" if train else "test", download=download)
            return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(str(root), train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError
        raise DataError(
            f"{name} not found under '{root}' and could not be downloaded ({type(e).__name__}); "
            f"set data.root to a folder holding torchvision's {name} files"
        ) from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def _synthetic(train: bool, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A small learnable 4-class problem for tests: class k is a bright quadrant k."""
    info = INFOS["synthetic"]
    n = 512 if train else 256
    g = torch.Generator().manual_seed(seed + (0 if train else 1))
    y = torch.randint(0, info.num_classes, (n,), generator=g)
    s = info.image_size
    x = torch.randint(0, 96, (n, 1, s, s), generator=g, dtype=torch.int64)
    h = s // 2
    for k in range(info.num_classes):
        r, c = divmod(k, 2)
        idx = y == k
        x[idx, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 120
    return x.clamp(0, 255).to(torch.uint8), y


def load_tensors(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole train or test split as (uint8 N×C×H×W, int64 N) on the CPU."""
    root = Path(cfg.root or DEFAULT_ROOT).expanduser()
    if cfg.name == "fashion_mnist":
        return _fashion_mnist(root, train, cfg.download)
    if cfg.name in ("cifar10", "cifar100", "svhn"):
        return _torchvision_tensors(cfg.name, root, train, cfg.download)
    if cfg.name == "synthetic":
        return _synthetic(train)
    raise DataError(f"dataset '{cfg.name}' has no tensor loader")
