"""Learning-rate schedules of the engine (onecycle, cosine, step, constant, with linear warm-up)."""

from __future__ import annotations

import math

import torch

from amas.config import TrainConfig

__all__ = ["make_scheduler"]


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule named by cfg.schedule."""
    total = max(1, total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total + 1, pct_start=0.25,
            cycle_momentum=False,
        )
    warm = int(cfg.warmup_epochs / max(cfg.epochs, 1) * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
