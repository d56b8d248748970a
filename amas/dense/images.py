"""What the dense readers share: decoding an image or a label map into tensors with one-line errors, a header-only
scan for files that are not images, resizing, normalisation, and the (index, flip) sampler that draws train-time
flips from a seeded generator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from amas.errors import DataError

# torchvision's segmentation models expect images normalised by ImageNet's statistics
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (*_DECODE_ERRORS, Image.DecompressionBombError)


def read_image(path: Path) -> torch.Tensor:
    """An image file as float (3, H, W) in [0, 1], or one DataError naming the file that does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist; add it or remove its entry from the split") from None
    except _decode_errors() as e:
        raise DataError(f"image '{path}' cannot be decoded ({type(e).__name__}); remove or replace the file, then run "
                        "again") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def read_label_map(path: Path) -> torch.Tensor:
    """A palette or grayscale PNG of class indices as int64 (H, W), or one DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"label map '{path}' is a {mode} image; save class indices as a palette (P) or "
                                "grayscale (L) PNG, one class number per pixel, 255 = ignore")
            labels = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"label map '{path}' does not exist; add it (class indices, 255 = ignore) or remove the image "
                        "from the split") from None
    except _decode_errors() as e:
        raise DataError(f"label map '{path}' cannot be decoded ({type(e).__name__}); remove or replace the file, "
                        "then run again") from None
    return torch.from_numpy(labels.astype(np.int64))


def check_headers(paths: Sequence[Path]) -> None:
    """One DataError naming the first file that is missing or not an image (headers only, no pixels decoded, as
    amas.data.check_images does)."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path):
                pass
        except FileNotFoundError:
            raise DataError(f"'{path}' does not exist; add it or remove its entry from the split") from None
        except _decode_errors() as e:
            raise DataError(f"image '{path}' cannot be read ({type(e).__name__}); remove or replace the file, then "
                            "run again") from None


def check_label_values(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """One DataError when a label map holds a class outside 0..num_classes-1 other than 255 (ignore)."""
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        bad = int(valid.max()) if int(valid.max()) >= num_classes else int(valid.min())
        raise DataError(f"label map {where} holds class {bad}, but the model has {num_classes} classes "
                        f"(0..{num_classes - 1}, 255 = ignore); give the model at least {bad + 1} classes or relabel "
                        "the file")


def resize_image(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """A float (3, H, W) image resized to size × size (bilinear, antialiased); unchanged when size is None."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def resize_labels(labels: torch.Tensor, size: int | None) -> torch.Tensor:
    """An int64 (H, W) label map resized to size × size by nearest neighbour; unchanged when size is None."""
    if size is None or tuple(labels.shape) == (size, size):
        return labels
    return F.interpolate(labels[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


def normalize(image: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """(image - mean) / std per channel; the image unchanged when mean is None."""
    if mean is None:
        return image
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std if std is not None else (1.0,) * len(mean), dtype=image.dtype).view(-1, 1, 1)
    return (image - m) / s


def split_index(index: int | tuple[int, bool], flip: bool) -> tuple[int, bool]:
    """(item, flip it) from a plain index (flip drawn from torch's global RNG when the dataset's flip is on, as
    torchvision's RandomHorizontalFlip does) or from an (index, flip) pair of FlipSampler (its coin decides)."""
    if isinstance(index, tuple):
        i, f = index
        return int(i), bool(f)
    return int(index), flip and bool(torch.rand(()) < 0.5)


class FlipSampler(Sampler):
    """Yields (index, flip) pairs: a seeded shuffle per epoch and a coin per item, the same for any worker count."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, flip: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.flip = n, seed, shuffle, flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and flips to draw (the epoch also advances by itself after each pass)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        coins = torch.rand(self.n, generator=g) < 0.5 if self.flip else torch.zeros(self.n, dtype=torch.bool)
        return iter(zip(order.tolist(), coins.tolist(), strict=True))
