"""What a task supplies to the alignment (amas.search.alignment): the student's forward and task loss, the tensors
distillation and the discriminator read, the discriminator, target checks and the selection metric.

Also the numerics every task shares (moved here from amas.search.alignment, which re-exports them): float32 losses,
standardized logits, the logit KD loss and the real/fake BCE, and the convolutional discriminator of dense tasks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from amas.errors import SearchError

__all__ = ["ConvDiscriminator", "Metric", "Task", "full_precision", "kd_loss", "real_fake_bce", "standardized"]


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """t as float32, or as is when it is float64 (losses never run in bf16/fp16, nor lose a float64 run's precision)."""
    return t if t.dtype == torch.float64 else t.float()


def standardized(logits: torch.Tensor, eps: float = 1e-6, cap: float = 0.0) -> torch.Tensor:
    """Each row centred over its last dimension and scaled to unit standard deviation (cap 0: the logits' shape, not
    scale), or, with cap > 0, scaled down to a standard deviation of cap where it spreads wider and left otherwise."""
    x = full_precision(logits)
    x = x - x.mean(dim=-1, keepdim=True)
    std = (x.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    if cap > 0:
        return x * (cap / std).clamp(max=1.0)
    return x / std


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", temperature: float = 4.0,
            standardize: bool = False, cap: float = 0.0) -> torch.Tensor:
    """Distillation loss: MSE between logits (GAL), or T²-scaled KL(teacher ‖ student) at temperature T.

    standardize: for MSE, both sides standardized per sample first (`standardized` with cap), so the loss and its
    gradient stop growing with the logit scale past cap (cap 0: z-scored, as Sun et al., CVPR 2024 do for KL); KL's
    gradient is bounded by T per logit already."""
    s, t = full_precision(student), full_precision(teacher)
    if standardize and kind == "mse":
        s, t = standardized(s, cap=cap), standardized(t, cap=cap)
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "kl":
        return F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1), reduction="batchmean",
                        log_target=True) * temperature**2
    raise SearchError(f"unknown distillation loss '{kind}'; use search.kd=mse or search.kd=kl")


def real_fake_bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """BCE-with-logits of discriminator outputs against the label real (1) or fake (0)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class ConvDiscriminator(nn.Module):
    """A real/fake logit per location of a (N, C, H, W) map, average-pooled to at most MAX_SIDE locations a side:
    3x3 conv, then two 1x1 convs, LeakyReLU between.

    One 3x3 conv sees each location's neighbourhood; the 1x1 convs keep the cost per location small. The pooling keeps
    the discriminator's cost independent of the image size: at full resolution it cost ~29k MACs a pixel at 128
    channels, about 4x a LRASPP-MobileNetV3 at 96x96, and made a segmentation search step 10x a plain one."""

    MAX_SIDE = 24

    def __init__(self, in_channels: int, hidden: int = 128, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden, hidden, 1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits that each (pooled) location comes from the teacher, shape (N, H', W'), H', W' <= MAX_SIDE."""
        x = full_precision(x)
        k = -(-max(x.shape[-2:]) // self.MAX_SIDE)  # ceil: the pooling window
        if k > 1:
            x = F.avg_pool2d(x, k, ceil_mode=True)
        return self.net(x).squeeze(1)


class Metric:
    """Accumulates a task's selection metric over batches: update(outputs, targets), then compute() in %."""

    def update(self, outputs: Any, targets: Any) -> None:
        """Add one batch of (eval-mode) model outputs and their targets."""
        raise NotImplementedError

    def compute(self) -> float:
        """The metric over every batch so far, in %."""
        raise NotImplementedError


class Task:
    """How a task trains, aligns and scores a student; amas.search.alignment.AlignmentObjective delegates to it.

    name: the task's name; fold_teacher: whether the teacher's frozen copy may be conv+BN-folded by torch.fx (only the
    model's outputs are read); channels_last: whether the copy may run channels_last; features: whether
    d_input=features and feature_kd (a pooled feature map before a classifier) apply; loss_term: the name of the
    task loss among the logged terms.
    """

    name = "task"
    fold_teacher = False
    channels_last = True
    features = False
    loss_term = "task_loss"
    every_batch = True  # check targets on every batch (classification: on the first only, as before)
    metric_name = "metric"  # the selection metric's short name in reports (val_<name>, test_<name>)
    metric_label = "metric %"  # and as a summary row or report.md says it

    def num_classes(self, model: nn.Module, input_shape: tuple[int, int, int]) -> int | None:
        """The model's class count, read from it (None where it cannot be read); an AmasError when the task cannot
        read the model's outputs."""
        raise NotImplementedError

    def check_model(self, student: nn.Module) -> None:
        """Errors for a student the task cannot use (e.g. an align name it lacks)."""

    def check_targets(self, targets: Any, num_classes: int | None, where: str) -> None:
        """One DataError line for targets the loss cannot use."""

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Attach what the task reads to the student and the teacher's frozen copy (feature hooks)."""

    def close(self) -> None:
        """Remove what bind attached."""

    def teacher(self, frozen: Any, images: Any) -> Any:
        """The teacher's outputs the alignment reads (no gradients)."""
        return frozen(images)

    def student(self, model: nn.Module, images: Any, targets: Any) -> Any:
        """The student's outputs on images (targets: for a model whose train-mode forward computes its losses)."""
        raise NotImplementedError

    def loss(self, student_out: Any, targets: Any, label_smoothing: float) -> torch.Tensor:
        """The student's task loss (computed after the discriminator's step: the gradients then add up in the order
        they always did, which keeps classification bit-for-bit as before tasks existed)."""
        raise NotImplementedError

    def aligned(self, student_out: Any, teacher_out: Any, cfg: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, teacher) tensor pairs the discriminator judges (cfg: the alignment config: standardize...)."""
        raise NotImplementedError

    def kd(self, student_out: Any, teacher_out: Any, cfg: Any) -> torch.Tensor:
        """The distillation loss (cfg: the alignment config: kd, temperature, standardize)."""
        raise NotImplementedError

    def discriminator(self, teacher: nn.Module, input_shape: tuple[int, int, int], num_classes: int | None,
                      hidden: int) -> nn.Module:
        """The discriminator for the aligned tensors."""
        raise NotImplementedError

    def primary(self, student_out: Any, loss: torch.Tensor) -> torch.Tensor:
        """The tensor a StepOutput carries as its logits."""
        return loss.detach()

    def metric(self, num_classes: int | None) -> Metric:
        """A fresh accumulator of the task's selection metric."""
        raise NotImplementedError

    def eval_loss(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(summed task loss, how many terms it sums) of a batch of eval-mode outputs (evaluation reports their mean),
        or None where eval-mode outputs hold no loss (detections)."""
        return None

    def correct(self, primary: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(correct predictions, predictions) of one training batch for the train accuracy the engine logs, from the
        StepOutput's primary tensor; None where the task has no such count."""
        return None
