"""The AMAS mask search inside the user's own training loop (amas.MaskSearch): loss, mask step, cut."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from amas.config import SearchConfig, from_dict, to_dict

__all__ = ["MaskSearch"]


class MaskSearch:
    """Soft channel masks on the student, trained in the user's loop against a frozen teacher, then cut.

    ::

        search = amas.MaskSearch(student, teacher, input_shape=(3, 32, 32), target_reduction=0.5,
                                 total_steps=epochs * len(loader))
        opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)   # the masks are not in it
        for images, labels in loader:
            loss = search.loss(images, labels)   # CE + mu·KD + adversarial; the discriminator steps inside
            opt.zero_grad(); loss.backward(); opt.step()
            search.step(lr=opt.param_groups[0]["lr"])   # proximal (FISTA) mask step, budget controller
        small = search.cut(0.5, round_to=8)         # the physically pruned nn.Module, mask values folded in
        amas.save_pruned(small, "small.pt", input_shape=(3, 32, 32))   # amas.load_pruned rebuilds it

    student: a trainable copy of the teacher (same architecture); the masks are forward hooks on it, outside its
    parameters, so the user's optimizer never sees them. teacher: the trained classifier, never modified (its forwards
    run a private frozen copy, so students deep-copied from it later are trainable). ignore: module names kept
    whole (as prune.ignore, for layers Torch-Pruning cannot trace). options: any
    ``search.*`` config key (mu, kd, adv_weight, d_input, lam, mask_lr, fista, controller_*; see
    configs/REFERENCE.md); ``lr`` there is the base learning rate that ``step(lr)`` scales the mask step by.

    task: "classification" (CE, KD and an MLP discriminator on logits), "segmentation" (per-pixel CE ignoring 255,
    + 0.5·aux; KD and a convolutional discriminator on per-pixel logits; targets (N, H, W) int64) or "detection"
    (a torchvision detector's train-mode losses summed, or ``loss_fn(outputs, targets)``; KD and convolutional
    discriminators on the outputs of the ``align`` modules, default ["backbone"]; targets a list of dicts with
    boxes (x1, y1, x2, y2) and labels). A detector's groups, costs and masks are on its tensor part
    (amas.channels.dense.DetectorTensors): input_shape is the shape of an image after the detector's own transform
    (its min_size/max_size), and the student runs in train mode. amas.tasks has each task's metric.

    Autocast: call ``search.loss`` inside ``torch.autocast(...)`` as any forward (the discriminator computes in
    float32 under CUDA and CPU autocast). With a GradScaler, ``scaler.scale(loss).backward(); scaler.step(opt)``, then
    ``search.step(lr, grad_scale=scaler.get_scale())`` before ``scaler.update()``: the masks are not in the optimizer,
    so their gradients are unscaled there (and the mask step skipped, as the scaler skips, when they overflowed).
    DDP: build MaskSearch on the plain student, then wrap it, and pass the wrapper: ``search.loss(x, y,
    model=ddp_student)``; every rank calls ``step`` (the mask gradients and the discriminator are averaged across
    ranks, so every rank keeps the same masks).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, int, int],
                 target_reduction: float = 0.5, *, total_steps: int = 0, round_to: int = 8, min_channels: int = 1,
                 residual_channels: bool = False, ignore: Sequence[str] = (), lr: float | None = None,
                 task: str | Any = "classification", loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                 align: Sequence[str] | None = None, **options: Any) -> None:
        from amas.channels.dense import tensor_part
        from amas.channels.masks import remove_mask_hooks
        from amas.config_check import check_target
        from amas.errors import SearchError
        from amas.search.setup import build_search
        from amas.tasks import make_task

        target_reduction = check_target(target_reduction)
        if student is teacher or not any(p.requires_grad for p in student.parameters()):
            # Torch-Pruning traces the channel groups through autograd: a frozen student has none
            why = "is the teacher itself" if student is teacher else "has no parameter that requires grad"
            raise SearchError(f"the student {why}, so no channel group can be traced; pass a trainable copy: "
                              "copy.deepcopy(teacher).requires_grad_(True)")
        known = {f.name for f in fields(SearchConfig)}
        bad = [k for k in options if k not in known]
        if bad:
            from amas.errors import ConfigError

            raise ConfigError(f"MaskSearch has no option {bad[0]!r}; use a search.* key of configs/REFERENCE.md")
        data = to_dict(SearchConfig())
        data.update(options, target_reduction=float(target_reduction))
        if lr is not None:
            data["train"]["lr"] = float(lr)
        self.cfg: SearchConfig = from_dict(data, SearchConfig)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.student, self.teacher = student, teacher  # the teacher is never modified (its forwards run a copy)
        self.round_to, self.min_channels = int(round_to), int(min_channels)
        self.task = make_task(task, loss_fn=loss_fn, align=align)
        self.num_classes = self.task.num_classes(teacher, self.input_shape)
        self.task.check_model(student)
        # a student deep-copied from one under another search still runs that search's mask hooks (they point at its
        # masks): drop them, this search's masks are the only ones
        remove_mask_hooks(student)
        self.net = tensor_part(student)  # a torchvision detector's backbone and heads (on transformed images)
        parts = build_search(self.net, teacher, self.cfg, self.input_shape, self.num_classes, total_steps=total_steps,
                             round_to=self.round_to, min_channels=self.min_channels, residual=residual_channels,
                             ignore=ignore, task=self.task, what=f"the student ({type(student).__name__})")
        self.groups, self.cost, self.masks, self.objective = parts.groups, parts.cost, parts.masks, parts.objective
        p = next(student.parameters())
        self.objective.setup(student, p.device)
        self.steps = 0
        self.last_terms: dict[str, torch.Tensor] = {}
        self._labels_checked = False

    def loss(self, images: Any, labels: Any, model: nn.Module | None = None) -> torch.Tensor:
        """The student's forward on images and its loss: task loss + mu·KD + adversarial + lam·mask penalty."""
        if not self._labels_checked or self.task.every_batch:  # a bad target fails deep in the loss
            self.task.check_targets(labels, self.num_classes, "the first batch" if not self._labels_checked else
                                    f"batch {self.steps + 1}")
            self._labels_checked = True
        out = self.objective.compute(self.student if model is None else model, images, labels)
        self.last_terms = out.terms
        return out.loss

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        """The proximal (FISTA) mask step and the budget controller; call after the optimizer's step.

        lr: the student's current learning rate (the mask step follows its schedule); None: the base lr.
        grad_scale: the GradScaler's scale the loss was multiplied by (the mask gradients are divided by it).
        """
        if grad_scale != 1.0:
            grads = [p.grad for p in self.masks.masks if p.grad is not None]
            for g in grads:
                g.div_(grad_scale)
            if not all(bool(torch.isfinite(g).all()) for g in grads):
                for p in self.masks.masks:
                    p.grad = None
                return
        self.objective.after_step(self.student, self.cfg.train.lr if lr is None else float(lr), self.steps)
        self.steps += 1

    @property
    def macs_reduction(self) -> float:
        """The effective MACs reduction of the current masks (kept counts rounded as the cut rounds them)."""
        return self.objective.reduction()

    def mask_values(self) -> dict[str, torch.Tensor]:
        """The current mask values by channel group (the iterates: what the student runs in eval mode, and cuts)."""
        return self.objective.mask_values()

    def plan(self, target_reduction: float | None = None, round_to: int | None = None) -> dict[str, torch.Tensor]:
        """Kept channel indices per group for a cut at target_reduction (default: the search's target)."""
        from amas.channels.plan import plan_keep

        target = self.cfg.target_reduction if target_reduction is None else float(target_reduction)
        scores = {n: v.abs() for n, v in self.mask_values().items()}
        return plan_keep(scores, self.cost, target, self.min_channels, self.round_to if round_to is None else round_to)

    def cut(self, target_reduction: float | None = None, round_to: int = 8) -> nn.Module:
        """The physically pruned student at target_reduction (kept counts rounded), mask values folded, no hooks (a
        torchvision detector: the cut detector, which runs its own forward)."""
        from amas.channels.cut import prune_model
        from amas.channels.dense import DetectorTensors
        from amas.inputs import arch_name
        from amas.models.factory import arch_of, tag_arch

        keep = self.plan(target_reduction, round_to)
        self.objective.updater.drop_momentum(count=False)  # the student now runs the masks the cut folds
        was_training = self.student.training
        try:
            small = prune_model(self.net, self.groups, keep, masks=self.mask_values(),
                                input_shape=self.input_shape).eval()
        finally:
            self.student.train(was_training)
        if isinstance(small, DetectorTensors):
            return small.model.eval()
        # so that amas.save_pruned(small, path) can name the architecture
        if self.task.name == "classification" and arch_of(small) is None:
            tag_arch(small, {"name": arch_name(self.teacher, self.input_shape, self.num_classes),
                             "num_classes": self.num_classes, "in_channels": self.input_shape[0]})
        return small

    def state_dict(self) -> dict:
        """Masks, mask-update and controller state, discriminator and its optimiser, the step count."""
        return {**self.objective.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (on a MaskSearch built the same way)."""
        self.objective.load_state_dict(state)
        self.steps = int(state.get("steps", 0))
        self.objective.steps_done = self.steps

    def close(self) -> None:
        """Remove the mask hooks from the student (it runs unmasked again)."""
        self.objective.close()
