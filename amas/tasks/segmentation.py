"""Semantic segmentation: per-pixel CE (ignore 255, + 0.5·aux as torchvision trains), KD and a convolutional
discriminator on per-pixel logits standardized over the classes at each location, mean IoU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from amas.errors import DataError, SearchError
from amas.tasks.base import ConvDiscriminator, Metric, Task, full_precision

__all__ = ["IGNORE_INDEX", "MeanIoU", "SegmentationTask", "pixel_logits"]

IGNORE_INDEX = 255
AUX_WEIGHT = 0.5  # torchvision's segmentation reference weighs the auxiliary head's loss so


def pixel_logits(outputs: Any) -> torch.Tensor:
    """The (N, classes, H, W) logits of a segmenter's output: the tensor, or its dict's "out"."""
    return outputs["out"] if isinstance(outputs, dict) else outputs


def _per_location(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x (N, C, H, W) z-scored over C at each location: the class scores' shape there, not their scale."""
    x = full_precision(x)
    return (x - x.mean(1, keepdim=True)) / (x.var(1, keepdim=True, unbiased=False) + eps).sqrt()


class MeanIoU(Metric):
    """Mean IoU in % over the classes (torchmetrics MulticlassJaccardIndex, macro, label 255 ignored)."""

    def __init__(self, num_classes: int) -> None:
        from torchmetrics.classification import MulticlassJaccardIndex

        self.inner = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")

    def update(self, outputs: Any, targets: torch.Tensor) -> None:
        """Add one batch of logits (or a dict with "out") and (N, H, W) label maps."""
        logits = pixel_logits(outputs)
        self.inner.to(logits.device)
        self.inner.update(logits.argmax(1), targets)

    def compute(self) -> float:
        """Mean IoU over the batches so far, in %."""
        return 100.0 * float(self.inner.compute())


class SegmentationTask(Task):
    """A segmenter returning (N, classes, H, W) logits, or torchvision's dict with "out" (and "aux"); loss_fn(outputs,
    targets) replaces the per-pixel CE."""

    name = "segmentation"
    loss_term = "ce"
    metric_name = "miou"
    metric_label = "mIoU %"

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> None:
        self.loss_fn = loss_fn

    def num_classes(self, model: nn.Module, input_shape: tuple[int, int, int]) -> int:
        """The logits' channel count on two zero images; an error when the output is not per-pixel logits."""
        p = next(model.parameters(), None)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *input_shape, device=p.device if p is not None else None))
        finally:
            model.train(was_training)
        logits = pixel_logits(out) if isinstance(out, (dict, torch.Tensor)) else None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[0] != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
            raise SearchError(f"task=segmentation reads per-pixel logits (batch, classes, H, W) or a dict with "
                              f"'out', but the model returns {got} on a batch of 2; pass a segmenter, or another task")
        return int(logits.shape[1])

    def check_targets(self, targets: Any, num_classes: int | None, where: str) -> None:
        """(N, H, W) int64 label maps with classes below num_classes, or 255 (ignored)."""
        if not isinstance(targets, torch.Tensor) or targets.dim() != 3 or targets.dtype != torch.long:
            got = (f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor)
                   else type(targets).__name__)
            raise DataError(f"{where}: segmentation targets must be (N, H, W) int64 label maps, not {got}")
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or (num_classes is not None and int(valid.max()) >= num_classes)):
            bad = int(valid.max()) if int(valid.min()) >= 0 else int(valid.min())
            raise DataError(f"{where} has class {bad} in a label map, but the model has {num_classes} classes "
                            f"(0 to {int(num_classes or 0) - 1}, {IGNORE_INDEX} = ignore); fix the label maps")

    def student(self, model: nn.Module, images: Any, targets: Any) -> Any:
        """The student's outputs (a tensor, or a dict with "out" and maybe "aux")."""
        return model(images)

    def loss(self, student_out: Any, targets: Any, label_smoothing: float) -> torch.Tensor:
        """Per-pixel CE (+ 0.5·CE of "aux" where the model returns it), or loss_fn(outputs, targets)."""
        if self.loss_fn is not None:
            return self.loss_fn(student_out, targets)
        out = student_out
        loss = F.cross_entropy(full_precision(pixel_logits(out)), targets, ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
        if isinstance(out, dict) and out.get("aux") is not None:
            loss = loss + AUX_WEIGHT * F.cross_entropy(full_precision(out["aux"]), targets, ignore_index=IGNORE_INDEX,
                                                       label_smoothing=label_smoothing)
        return loss

    def teacher(self, frozen: Any, images: Any) -> Any:
        """The teacher's per-pixel logits."""
        return pixel_logits(frozen(images))

    def aligned(self, student_out: Any, teacher_out: Any, cfg: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-pixel logits, z-scored over the classes at each location with cfg.standardize (no cap: dense maps
        are z-scored whole)."""
        s, t = full_precision(pixel_logits(student_out)), full_precision(teacher_out)
        return [(_per_location(s), _per_location(t))] if cfg.standardize else [(s, t)]

    def kd(self, student_out: Any, teacher_out: Any, cfg: Any) -> torch.Tensor:
        """MSE per location (of the standardized logits with search.standardize), or KL(teacher ‖ student) at
        temperature T per pixel, T²-scaled and averaged over pixels."""
        s, t = full_precision(pixel_logits(student_out)), full_precision(teacher_out)
        if cfg.kd == "kl":
            tau = cfg.temperature
            kl = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="none", log_target=True)
            return kl.sum(1).mean() * tau**2
        if cfg.standardize:
            s, t = _per_location(s), _per_location(t)
        return F.mse_loss(s, t)

    def discriminator(self, teacher: nn.Module, input_shape: tuple[int, int, int], num_classes: int | None,
                      hidden: int) -> nn.Module:
        """A convolutional discriminator on the class maps: a real/fake logit per pixel."""
        return ConvDiscriminator(int(num_classes or 0), hidden)

    def primary(self, student_out: Any, loss: torch.Tensor) -> torch.Tensor:
        """The per-pixel logits."""
        return pixel_logits(student_out)

    def metric(self, num_classes: int | None) -> Metric:
        """Mean IoU."""
        return MeanIoU(int(num_classes or 0))

    def eval_loss(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel CE of the "out" logits summed over the labelled pixels (255 ignored), and their count."""
        logits = full_precision(pixel_logits(outputs))
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return ce, (targets != IGNORE_INDEX).sum()

    def correct(self, primary: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Labelled pixels whose arg-max class is right (pixel accuracy; 255 not counted), and their count."""
        valid = targets != IGNORE_INDEX
        return ((primary.detach().argmax(1) == targets) & valid).sum(), valid.sum()
