"""Classification: CE on (batch, classes) logits, KD and an MLP discriminator on the logits, top-1 accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from amas.tasks.base import Metric, Task, full_precision, kd_loss, standardized

__all__ = ["ClassificationTask", "Discriminator", "TopOneAccuracy"]


class Discriminator(nn.Module):
    """MLP with LeakyReLU non-linearities; one raw logit per sample (use with BCE-with-logits, no sigmoid)."""

    def __init__(self, in_features: int, hidden: int = 128, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit that x comes from the teacher, shape [N]."""
        return self.net(full_precision(x).flatten(1)).squeeze(1)


class TopOneAccuracy(Metric):
    """Top-1 accuracy in % of (batch, classes) logits against integer labels."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of logits and labels."""
        self.correct += int((outputs.argmax(1) == targets).sum())
        self.total += int(targets.numel())

    def compute(self) -> float:
        """Top-1 accuracy over the batches so far, in %."""
        return 100.0 * self.correct / max(self.total, 1)


class ClassificationTask(Task):
    """The classifier's task as amas has always trained it: CE (label smoothing), KD and the discriminator on logits."""

    name = "classification"
    fold_teacher = True
    features = True
    loss_term = "ce"
    every_batch = False
    metric_name = "acc"
    metric_label = "acc %"

    def num_classes(self, model: nn.Module, input_shape: tuple[int, int, int]) -> int:
        """The class count of a classifier: its output on two zero images must be (2, classes)."""
        from amas.inputs import classes_of

        return classes_of(model, input_shape)

    def check_targets(self, targets: Any, num_classes: int | None, where: str) -> None:
        """Integer labels within 0..num_classes-1."""
        from amas.inputs import check_labels

        check_labels(targets, int(num_classes or 0), where)

    def student(self, model: nn.Module, images: Any, targets: Any) -> Any:
        """The student's logits."""
        return model(images)

    def loss(self, student_out: Any, targets: Any, label_smoothing: float) -> torch.Tensor:
        """Cross-entropy on the logits."""
        return F.cross_entropy(full_precision(student_out), targets, label_smoothing=label_smoothing)

    def aligned(self, student_out: Any, teacher_out: Any, cfg: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The logits, standardized per sample with cfg.standardize (to at most cfg.standardize_cap)."""
        if cfg.standardize:
            cap = cfg.standardize_cap
            return [(standardized(student_out, cap=cap), standardized(teacher_out, cap=cap))]
        return [(student_out, teacher_out)]

    def kd(self, student_out: Any, teacher_out: Any, cfg: Any) -> torch.Tensor:
        """MSE or KL between logits (amas.tasks.base.kd_loss)."""
        return kd_loss(full_precision(student_out), teacher_out, cfg.kd, cfg.temperature, cfg.standardize,
                       cfg.standardize_cap)

    def discriminator(self, teacher: nn.Module, input_shape: tuple[int, int, int], num_classes: int | None,
                      hidden: int) -> nn.Module:
        """An MLP on the class logits."""
        return Discriminator(int(num_classes or 0), hidden)

    def primary(self, student_out: Any, loss: torch.Tensor) -> torch.Tensor:
        """The logits."""
        return student_out

    def metric(self, num_classes: int | None) -> Metric:
        """Top-1 accuracy."""
        return TopOneAccuracy()

    def eval_loss(self, outputs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the images."""
        return F.cross_entropy(full_precision(outputs), targets, reduction="sum"), torch.tensor(targets.numel())

    def correct(self, primary: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 hits."""
        return (primary.detach().argmax(1) == targets).sum(), torch.tensor(targets.numel())
