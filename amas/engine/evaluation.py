"""Evaluation of a model on batches: a classifier's top-1 and cross-entropy, or a task's metric and loss
(amas.tasks: mean IoU for segmentation, box mAP for detection), in float32 unless told otherwise."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from amas import distributed
from amas.data import Batches
from amas.engine.precision import autocast

__all__ = ["evaluate"]


def evaluate(
    model: nn.Module, batches: Batches, num_classes: int, device: torch.device,
    dtype: torch.dtype | None = None,
    contiguous: bool = False,
    task: Any = None,
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of model over batches (contiguous: each batch made contiguous).

    dtype: autocast the forwards to it (None: float32, the way an exported model runs; every accuracy amas reports).
    task: an amas.tasks.Task other than classification: "acc" is then the task's selection metric (its
    ``metric_name``: mean IoU, box mAP; in %) and "loss" its eval-mode loss (NaN where it has none).
    """
    if task is not None and task.name != "classification":
        return _evaluate_task(model, batches, num_classes, device, dtype, contiguous, task)
    from torchmetrics.classification import MulticlassAccuracy  # seconds to import: only where something is evaluated

    was_training = model.training
    model.eval()
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    with torch.inference_mode(), autocast(device, dtype):
        for x, y in batches:
            logits = model(x.contiguous() if contiguous else x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            metric.update(logits, y)
            n += y.numel()
    model.train(was_training)
    totals = distributed.all_reduce_sum(
        torch.stack([loss_sum, torch.tensor(float(n), device=device, dtype=torch.float64)])
    )
    if float(totals[1]) == 0:
        return {"acc": float("nan"), "loss": float("nan")}
    return {"acc": 100.0 * float(metric.compute()), "loss": float(totals[0] / totals[1])}


def _evaluate_task(model: nn.Module, batches: Batches, num_classes: int | None, device: torch.device,
                   dtype: torch.dtype | None, contiguous: bool, task: Any) -> dict[str, float]:
    """The task's metric (%) and mean eval-mode loss over batches (torchmetrics reduces its states over the ranks in
    compute, as for the top-1 above)."""
    was_training = model.training
    model.eval()
    metric = task.metric(num_classes)
    totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, loss terms, batches
    with torch.inference_mode(), autocast(device, dtype):
        for x, y in batches:
            out = model(x.contiguous() if contiguous and isinstance(x, torch.Tensor) else x)
            metric.update(out, y)
            loss = task.eval_loss(out, y)
            if loss is not None:
                totals[0] += loss[0].double()
                totals[1] += loss[1]
            totals[2] += 1
    model.train(was_training)
    totals = distributed.all_reduce_sum(totals)
    if float(totals[2]) == 0:
        return {"acc": float("nan"), "loss": float("nan")}
    loss = float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")
    return {"acc": metric.compute(), "loss": loss}
