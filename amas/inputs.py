"""The user's own inputs in memory: any iterable of (images, labels) batches and any trained classifier."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amas import distributed
from amas.data import DataBundle
from amas.datasets import DatasetInfo
from amas.errors import AmasError, DataError

__all__ = ["UserBatches", "UserDataInfo", "check_labels", "arch_name", "classes_of", "importable_name",
           "torchvision_record", "user_bundle"]


@dataclass(frozen=True)
class UserDataInfo(DatasetInfo):
    """DatasetInfo of the user's data: any (C, H, W), no normalisation known to amas (the batches are used as given)."""

    height: int = 0
    width: int = 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        return (self.in_channels, self.height, self.width)


class UserBatches:
    """An iterable of (images, labels) batches as the engine's Batches: on the device, every world_size-th batch per
    rank under torchrun (so each rank sees its own shard), checked to be (images, labels) of the stated shape."""

    def __init__(self, batches: Iterable, input_shape: tuple[int, int, int], device: torch.device | str,
                 name: str, num_classes: int = 0, task: Any = None) -> None:
        if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
            raise DataError(f"{name} is a {type(batches).__name__}; pass an iterable of (images, labels) batches, "
                            "e.g. a torch DataLoader")
        if isinstance(batches, Iterator):  # a generator or iterator: the second epoch would find it exhausted
            raise DataError(f"{name} is a one-shot {type(batches).__name__}; pass an iterable that can be read once "
                            "per epoch, e.g. a DataLoader or a list of (images, labels) batches")
        self.batches, self.input_shape, self.device, self.name = batches, tuple(input_shape), torch.device(device), name
        self.num_classes = int(num_classes)
        # a dense task (amas.tasks) checks its own targets: (N, H, W) label maps, lists of box dicts
        self.task = None if task is None or task.name == "classification" else task
        ctx = distributed.context()
        self.rank, self.world = ctx.rank, ctx.world_size
        first = self._check(next(iter(batches), None), 0)
        total = self._total()
        if total < self.world:
            raise DataError(f"{name} has {total} batch{'' if total == 1 else 'es'} for {self.world} processes; pass "
                            "at least one batch per process (a smaller batch size), or run fewer processes")
        self.num_samples = len(first[1]) * len(self)

    def _check(self, batch: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch is None:
            raise DataError(f"{self.name} yields no batches{_dropped(self.batches)}")
        if self.task is not None and isinstance(batch, (tuple, list)) and len(batch) == 2:
            return self._check_dense(_stacked(batch[0], self.name, i), batch[1], i)  # targets: the task checks them
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not all(isinstance(t, torch.Tensor)
                                                                             for t in batch):
            raise DataError(f"{self.name} batch {i} is a {type(batch).__name__}, not (images, labels) tensors; make "
                            "the iterable yield (images, labels) pairs")
        x, y = batch
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"{self.name} batch {i} has images of shape {tuple(x.shape)}, not (batch, "
                            f"{', '.join(map(str, self.input_shape))}); fix input_shape or the data")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
            raise DataError(f"{self.name} batch {i} has labels of shape {tuple(y.shape)} ({y.dtype}) for {len(x)} "
                            "images; labels must be one integer class index per image")
        if self.num_classes and (i == 0 or y.device.type == "cpu"):  # CUDA labels: the first batch (no sync per batch)
            check_labels(y, self.num_classes, f"{self.name} batch {i}")
        return x, y

    def _check_images(self, x: Any, i: int) -> None:
        # a detector resizes images itself (input_shape: the size after its transform): their channels are checked
        shape = tuple(x.shape[1:2] if self.task.name == "detection" else x.shape[1:]) \
            if isinstance(x, torch.Tensor) else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or shape != self.input_shape[:len(shape)]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{self.name} batch {i} has images of shape {got}, not (batch, "
                            f"{', '.join(map(str, self.input_shape))}); fix input_shape or the data")

    def _check_dense(self, x: Any, y: Any, i: int) -> tuple[Any, Any]:
        """A dense task's batch: images as given, targets checked by the task (classes within the model's)."""
        task, where = self.task, f"{self.name} batch {i}"
        self._check_images(x, i)
        if isinstance(y, torch.Tensor) and y.dim() == 3 and not y.is_floating_point() and y.dtype != torch.long:
            y = y.long()  # uint8 label maps read from PNGs
        if i == 0 or task.every_batch and _on_cpu(y):  # CUDA targets: the first batch (no sync per batch)
            task.check_targets(y, self.num_classes or None, where)
        if isinstance(y, torch.Tensor) and (len(y) != len(x) or (y.dim() == 3 and y.shape[1:] != x.shape[2:])):
            raise DataError(f"{where} has label maps of shape {tuple(y.shape)} for images of shape {tuple(x.shape)}; "
                            "give one (H, W) label map per image, of the image's size")
        if isinstance(y, (list, tuple)) and len(y) != len(x):
            raise DataError(f"{where} has {len(y)} targets for {len(x)} images; give one target per image")
        return x, y

    def _total(self) -> int:
        """The batches of one pass over the user's iterable, over all processes."""
        try:
            return len(self.batches)  # type: ignore[arg-type]
        except TypeError:
            return sum(1 for _ in self.batches)

    def __len__(self) -> int:
        n = self._total()
        return (n - self.rank + self.world - 1) // self.world if self.world > 1 else n

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the user's loader or its sampler (reshuffling per epoch), where they have one."""
        for obj in (self.batches, getattr(self.batches, "sampler", None), getattr(self.batches, "batch_sampler", None)):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                return

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self.batches):
            if i % self.world != self.rank:
                continue
            x, y = self._check(batch, i)
            if self.task is not None:
                yield x.to(self.device, torch.float32, non_blocking=True), _to_device(y, self.device)
                continue
            yield x.to(self.device, torch.float32, non_blocking=True), y.to(self.device, torch.long, non_blocking=True)


def _stacked(images: Any, name: str, i: int) -> Any:
    """A batch's images as one (N, C, H, W) tensor: a list of (C, H, W) images of one size stacked."""
    if isinstance(images, (list, tuple)) and images and all(isinstance(t, torch.Tensor) and t.dim() == 3
                                                            for t in images):
        if len({tuple(t.shape) for t in images}) > 1:
            raise DataError(f"{name} batch {i} has images of sizes {sorted({tuple(t.shape) for t in images})}; give "
                            "the images of a batch one size (resize them, as the detector's transform would)")
        return torch.stack(list(images))
    return images


def _on_cpu(targets: Any) -> bool:
    """Whether the target tensors of a batch are on the CPU (checking them costs no device sync)."""
    from torch.utils._pytree import tree_leaves

    return all(t.device.type == "cpu" for t in tree_leaves(targets) if isinstance(t, torch.Tensor))


def _to_device(targets: Any, device: torch.device) -> Any:
    """Targets (a tensor, or lists of dicts of tensors) on the device."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, targets)


def _dropped(batches: Any) -> str:
    """Why a DataLoader yields no batch (drop_last with fewer samples than its batch size) and the fix, or the fix."""
    size, dataset = getattr(batches, "batch_size", None), getattr(batches, "dataset", None)
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if getattr(batches, "drop_last", False) and isinstance(size, int) and n is not None and n < size:
        return (f": its drop_last drops the only batch ({n} samples, batch_size {size}); pass drop_last=False or a "
                f"batch_size of at most {n}")
    return "; pass a non-empty iterable of (images, labels)"


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """One DataError when integer labels fall outside 0..num_classes-1 (the loss would raise a raw IndexError)."""
    if labels.is_floating_point() or labels.numel() == 0:
        return  # class probabilities, or nothing to check
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{where} has label {hi if hi >= num_classes else lo}, but the model has {num_classes} classes "
                        f"(labels 0 to {num_classes - 1}); fix the labels, or pass a model with as many outputs as "
                        "there are classes")


def classes_of(teacher: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """The class count of a classifier: its output on two zero images must be (2, classes)."""
    p = next(teacher.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, *input_shape, device=device))
    except Exception as exc:
        raise AmasError(f"the teacher fails on inputs of shape (2, {', '.join(map(str, input_shape))}) "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "fix input_shape") from None
    finally:
        teacher.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise AmasError(f"the teacher's output on a batch of 2 is {got}, not (batch, classes) logits; pass a "
                        "classifier, or wrap the model so forward returns the logits tensor")
    return int(out.shape[1])


def user_bundle(train: Iterable, val: Iterable, test: Iterable | None, info: UserDataInfo,
                device: torch.device | str, task: Any = None) -> DataBundle:
    """The user's train/val/test batches as the DataBundle the stages read (test may be None); task: an amas.tasks
    Task whose targets they hold (None: class labels)."""
    shape, k = info.input_shape, info.num_classes
    test_batches = None if test is None else UserBatches(test, shape, device, "test", k, task)
    return DataBundle(train=UserBatches(train, shape, device, "train", k, task),
                      val=UserBatches(val, shape, device, "val", k, task), test=test_batches,
                      info=info)  # type: ignore[arg-type]


def importable_name(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int,
                    kwargs: dict | None = None) -> str | None:
    """'package.module:Class' of model when that class, imported and built with kwargs, is model again, else None.

    "Again" means: the same state_dict keys and shapes, and the same outputs once given model's weights; a class
    defined in __main__ or inside a function, or one the kwargs do not rebuild, gives None.
    """
    import importlib

    from amas.models.factory import create_imported

    cls = type(model)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    try:
        obj: Any = importlib.import_module(cls.__module__)
        for part in cls.__qualname__.split("."):
            obj = getattr(obj, part)
        if obj is not cls:
            return None
        fresh = create_imported(name, num_classes, input_shape[0], dict(kwargs or {}))
        state = model.state_dict()
        mine = fresh.state_dict()
        if list(mine) != list(state) or any(mine[k].shape != v.shape for k, v in state.items()):
            return None
        fresh.load_state_dict(state)
        same = _same_outputs(fresh, model, input_shape)
    except Exception:  # the class does not import or build here: only this process can rebuild it
        return None
    return name if same else None


def torchvision_record(model: nn.Module, input_shape: tuple[int, int, int],
                       num_classes: int) -> tuple[str, dict] | None:
    """('tv:<name>', kwargs) of the torchvision segmentation or detection builder building model again (its class,
    state_dict shapes and outputs, as importable_name checks), so pruned.pt rebuilds it in any process; None for
    other models."""
    module = type(model).__module__
    if not module.startswith(("torchvision.models.segmentation", "torchvision.models.detection")):
        return None
    from amas.models.factory import create_model
    from amas.models.registry import TV_PREFIX
    from amas.models.torchvision_models import detector_builds, segmenter_builds

    state = model.state_dict()
    builds = detector_builds(model) if module.startswith("torchvision.models.detection") else segmenter_builds(model)
    for name, kwargs in builds:
        try:
            fresh = create_model(TV_PREFIX + name, num_classes, input_shape[0], **kwargs)
            mine = fresh.state_dict()
            if list(mine) != list(state) or any(mine[k].shape != v.shape for k, v in state.items()):
                continue
            fresh.load_state_dict(state)
            if _same_outputs(fresh, model, input_shape):
                return TV_PREFIX + name, {"weights_backbone": None, **kwargs}
        except Exception:  # a builder that does not take these options: not this one
            continue
    return None


def arch_name(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int,
              kwargs: dict | None = None) -> str:
    """The name create_model rebuilds model's architecture by: 'package.module:Class' where that class, built with
    kwargs, is model again (see importable_name), else a 'memory:' name that rebuilds it in this process only."""
    from amas.models.registry import register_memory_model

    return importable_name(model, input_shape, num_classes, kwargs) or register_memory_model(model)


def _same_outputs(fresh: nn.Module, model: nn.Module, input_shape: tuple[int, int, int]) -> bool:
    """Whether two models give the same outputs (eval mode) on two random images; model's mode is restored."""
    from torch.utils._pytree import tree_leaves

    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    fresh.to(device).eval()
    was_training = model.training
    model.eval()
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            a, b = tree_leaves(fresh(x)), tree_leaves(model(x))  # a tensor, or a dict of them (segmenters)
            return len(a) == len(b) and all(isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor)
                                            and u.shape == v.shape and torch.allclose(u, v, rtol=1e-4, atol=1e-5)
                                            for u, v in zip(a, b, strict=True))
    finally:
        model.train(was_training)
