"""What a stage trains for: the Objective (loss, parameter groups, extra steps) the one engine loop runs, and the
StepOutput it returns for each batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Objective", "StepOutput", "TaskObjective"]


@dataclass
class StepOutput:
    """What an objective returns for one batch: the loss to minimise, logits, and loss terms to log."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    """Plain supervised training: label cross-entropy on the model's logits. Stages subclass it."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Called once before training with the model already on its device."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Parameter groups for the engine's SGD optimiser."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def compute(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Forward one batch and return the loss."""
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits, {"ce": loss.detach()})

    def scaled_parameters(self) -> list[torch.Tensor]:
        """Tensors outside the model whose gradients the loss's backward fills (e.g. masks): fp16's loss scaling
        unscales them with the model's."""
        return []

    def after_step(self, model: nn.Module, lr: float, step: int) -> None:
        """Runs after each optimiser step (e.g. a proximal step on masks)."""

    def scalars(self) -> dict[str, float]:
        """Extra scalars to log at each logging step."""
        return {}

    def end_epoch(self, model: nn.Module, epoch: int, writer: Any) -> None:
        """Runs after each epoch's evaluation (e.g. histograms)."""

    def state_dict(self) -> dict:
        """State to checkpoint beside the model (extra modules, optimisers, controllers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""

    def compile_forwards(self, compiler: Any) -> None:
        """Compiling starts (train.compile): compile extra forwards (the teacher's) with compiler.wrap(module, what)
        (amas.engine.compiling.StepCompiler)."""

    def use_contiguous(self) -> None:
        """The model runs in the contiguous format (its forward cannot run channels_last): so do extra models."""


class TaskObjective(Objective):
    """Plain supervised training of a dense task (amas.tasks): the task's own loss on the model's outputs
    (segmentation: per-pixel cross-entropy, 255 ignored, plus torchvision's aux head); `amas train` of a teacher."""

    def __init__(self, task: Any, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        self.task = task

    def compute(self, model: nn.Module, images: torch.Tensor, labels: Any) -> StepOutput:
        """Forward one batch and return the task's loss."""
        out = self.task.student(model, images, labels)
        loss = self.task.loss(out, labels, self.label_smoothing)
        return StepOutput(loss, self.task.primary(out, loss), {self.task.loss_term: loss.detach()})
