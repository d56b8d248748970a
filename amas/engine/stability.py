"""Step sizes that hold on any model: a check of the first steps of a stage and a back-off on loss spikes.

A recipe's learning rate suits the models it was tuned on. SGD at 0.01 on an AdamW-trained MobileNetV3 or
EfficientNet leaves the training loss calm while the eval-mode accuracy falls to chance within a few steps (the
BatchNorm statistics cannot follow), and a mask step that suits a ResNet empties such a model's layers. Both are
caught here from what the model does, not from its name: the probe trains the first steps of a stage, evaluates,
and when the validation accuracy fell, restores everything and retries at a quarter of the step size; the guard
restores the last good state and halves the step size when the loss jumps or stops being finite.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import deque
from typing import Any

import torch
import torch.nn as nn

from amas.errors import TrainingError

__all__ = ["Backoff", "SpikeGuard", "probe_step_size", "recalibrate_batchnorm", "scale_lr", "snapshot"]

# the probe's step-size factor per failed try: a quarter, so a model that needs 1/100 of the recipe's rate
# finds it in four tries of probe_steps each
PROBE_FACTOR = 0.25
# a loss above this many times the median of the recent losses is a spike
SPIKE_RATIO = 10.0
SPIKE_WINDOW = 20
# validation batches the probe evaluates before and after its steps
PROBE_EVAL_BATCHES = 4


def scale_lr(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> None:
    """Multiply the optimiser's learning rates and the schedule's base rates by factor (the schedule's shape stays)."""
    for g in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in g:
                g[key] *= factor
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [b * factor for b in scheduler.base_lrs]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics as the plain average over forwards of images (train mode).

    The running averages of a model whose weights or masks moved fast in the last steps lag behind them, and its
    eval-mode accuracy reads far below what the weights hold (timm efficientnet_b0 after 24 search steps: 23% with
    the running statistics, 57% re-estimated on 10 batches): the probe judges the weights, not the lag."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not images:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    forward = _tensor_forward(model)
    try:
        for x in images:
            forward(x)
    finally:
        for m, mom in zip(norms, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)


def _tensor_forward(model: nn.Module) -> Any:
    """model's forward on a batch of images; a torchvision detector (which takes targets in train mode): its
    transform, then its backbone and heads (amas.channels.dense.DetectorTensors), whose BatchNorms these are."""
    from amas.channels.dense import is_detector, tensor_part

    plain = getattr(model, "module", model)  # a DDP wrapper's model
    if not is_detector(plain):
        return model
    net = tensor_part(plain)
    return lambda x: net(plain.transform(list(x))[0].tensors)


def first_batches(batches: Any, n: int) -> list:
    """The first n batches of an epoch's iteration (fewer when the epoch is shorter)."""
    return list(itertools.islice(iter(batches), n))


class SpikeGuard:
    """Watches the per-step loss: a non-finite loss, or one SPIKE_RATIO times the recent median, is a spike."""

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def is_spike(self, loss: float) -> bool:
        """Whether loss is a spike; a calm loss joins the window."""
        if not math.isfinite(loss):
            return True
        if len(self.recent) >= SPIKE_WINDOW // 2:
            median = sorted(self.recent)[len(self.recent) // 2]
            if loss > SPIKE_RATIO * max(median, 1e-3):
                return True
        self.recent.append(loss)
        return False

    def reset(self) -> None:
        """Forget the window (after a restore the losses start again)."""
        self.recent.clear()


def snapshot(state: dict) -> dict:
    """An in-memory deep copy of a trainer's state_dict (tensors cloned)."""
    return copy.deepcopy(state)


class Backoff(Exception):
    """Raised inside an epoch when the loss spiked: the trainer restores its last good state and halves the rate."""

    def __init__(self, value: float, step: int) -> None:
        super().__init__(f"loss spike {value} at step {step}")
        self.value, self.step = value, step


def probe_step_size(trainer: Any, stop: Any) -> None:
    """Before a stage's first step: train train.probe_steps steps, and while the eval-mode validation accuracy
    falls by more than train.probe_tolerance points, restore everything and retry at a quarter of the step size
    (at most train.max_backoffs times; one line each). A run whose first try passes is the run without the probe."""
    cfg = trainer.cfg
    if cfg.probe_steps <= 0 or trainer.val_batches is None:
        return
    trainer.train_batches.set_epoch(0)
    batches = first_batches(trainer.train_batches, cfg.probe_steps)
    val = first_batches(trainer.val_batches, PROBE_EVAL_BATCHES)
    start = snapshot(trainer.state_dict())
    before = trainer.accuracy_on(val, batches)
    factor = 1.0
    for attempt in range(cfg.max_backoffs + 1):
        trainer.model.train()
        try:
            for x, y in batches:
                trainer.train_step(x, y, stop)
            after = trainer.accuracy_on(val, batches)
        except TrainingError:
            after = float("nan")
        trainer.restore(start)
        if factor != 1.0:
            scale_lr(trainer.optimizer, trainer.scheduler, factor)
            trainer.lr_scale = factor
        if after >= before - cfg.probe_tolerance:
            return
        if attempt == cfg.max_backoffs:
            trainer.say(f"validation accuracy still falls from {before:.1f}% to {after:.1f}% in the first "
                        f"{len(batches)} steps at x{factor:.3g} of train.lr; continuing there (lower train.lr, or "
                        "train.max_backoffs for more tries)")
            return
        factor *= PROBE_FACTOR
        trainer.back_off(PROBE_FACTOR, f"validation accuracy fell from {before:.1f}% to {after:.1f}% in the first "
                                       f"{len(batches)} steps")
