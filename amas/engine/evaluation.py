"""Evaluation of a classifier on batches (top-1 and cross-entropy), in float32 unless told otherwise."""

from __future__ import annotations

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
) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of model over batches (contiguous: each batch made contiguous).

    dtype: autocast the forwards to it (None: float32, the way an exported model runs; every accuracy amas reports).
    """
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
