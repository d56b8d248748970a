"""Alignment with a frozen teacher, shared by the mask search and fine-tuning: CE + KD + adversarial.

The teacher, run as a frozen inference copy (amas.engine.frozen.FrozenTeacher: BatchNorm folded, eval mode, no
gradients; the caller's module is never modified; a pipeline run shares one copy across its stages), guides a
student. A small MLP discriminator, trained inside the objective with its own optimiser, tells teacher outputs
(logits, or the pooled features before the classifier) from student outputs; the student is pushed to fool it
while matching the teacher's logits (KD) and the labels (CE). ``AlignmentObjective`` is that loss on the one
engine; the search objective (amas.search.objective) adds masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from amas import distributed
from amas.config import AlignmentConfig
from amas.engine.frozen import FrozenTeacher, fast_inference_copy
from amas.engine.loop import Objective, StepOutput
from amas.engine.precision import no_autocast
from amas.errors import SearchError
from amas.tasks import Task, make_task
from amas.tasks.base import full_precision, kd_loss, real_fake_bce, standardized
from amas.tasks.classification import Discriminator

__all__ = ["AlignmentObjective", "Discriminator", "discriminator_loss", "fast_inference_copy", "full_precision",
           "kd_loss", "last_global_pool", "real_fake_bce", "standardized"]

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


def discriminator_loss(
    d: nn.Module, teacher_out: torch.Tensor, student_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE(D(teacher), real) + BCE(D(student), fake) with the student detached; also returns both raw outputs."""
    d_t, d_s = d(teacher_out.detach()), d(student_out.detach())
    return real_fake_bce(d_t, True) + real_fake_bce(d_s, False), d_t.detach(), d_s.detach()


def last_global_pool(model: nn.Module) -> nn.Module | None:
    """The last pooling module (adaptive/average pool) in registration order, whose input holds the final features."""
    found = None
    for m in model.modules():
        if isinstance(m, GLOBAL_POOLS):
            found = m
    return found


class _FeatureTap:
    """Forward pre-hook on a pooling module: keeps its input (the final feature map)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise SearchError("the pooling layer tapped for d_input=features or feature_kd did not run; "
                              "use d_input=logits and feature_kd=0")
        return v

    def remove(self) -> None:
        self.handle.remove()


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """A feature map globally averaged to [N, C] (already flat features as they are)."""
    return x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)


class AlignmentObjective(Objective):
    """CE + mu·KD + adversarial against a frozen teacher, the discriminator and its optimiser inside.

    cfg is the search or finetune section (an AlignmentConfig with its own train section); student, when given,
    is checked to give pooled features as wide as the teacher's (d_input=features on a pruned model). teacher may be
    a FrozenTeacher shared with other stages; a module gets a private one (conv+BN folded with cfg.fast_teacher).
    task (amas.tasks; default classification) supplies the student's forward and task loss, what KD and the
    discriminator read, and the discriminator: the "ce" term is its loss, weighted by cfg.ce_weight.
    """

    def __init__(self, teacher: nn.Module, cfg: Any, input_shape: tuple[int, int, int], num_classes: int | None, *,
                 student: nn.Module | None = None, section: str = "search", task: Task | str | None = None) -> None:
        super().__init__(cfg.train.label_smoothing)
        self.cfg: AlignmentConfig = cfg
        self.task = make_task(task or "classification")
        # the caller's teacher is never modified: its forwards run the frozen copy (teacher_fwd is its module)
        self.frozen = (teacher if isinstance(teacher, FrozenTeacher)
                       else FrozenTeacher(teacher, input_shape, fold=cfg.fast_teacher and self.task.fold_teacher))
        self.teacher_fwd = self.frozen.module
        self._tapped = cfg.d_input == "features" or cfg.feature_kd > 0
        if self._tapped and not self.task.features:
            raise SearchError(f"{section}.d_input=features and {section}.feature_kd read a classifier's pooled "
                              f"features; task={self.task.name} aligns its own tensors: use {section}.d_input=logits "
                              f"and {section}.feature_kd=0")
        if self._tapped:
            what = f"{section}.d_input=features" if cfg.d_input == "features" else f"{section}.feature_kd"
            fix = f"use {section}.d_input=logits and {section}.feature_kd=0"
            pool = last_global_pool(self.teacher_fwd)
            if pool is None:
                raise SearchError(f"{what} needs a pooling layer before the classifier; this model has none, {fix}")
            width = _feature_width(self.teacher_fwd, pool, input_shape)
            student_pool = last_global_pool(student) if student is not None else None
            s_width = _feature_width(student, student_pool, input_shape) if student_pool is not None else width
            if s_width != width:
                raise SearchError(f"{what} needs the pruned model's pooled features as wide as the teacher's "
                                  f"({s_width} vs {width}); {fix}")
        if cfg.d_input == "features":
            self.discriminator = Discriminator(width, cfg.d_hidden)
        else:
            self.discriminator = self.task.discriminator(self.teacher_fwd, input_shape, num_classes, cfg.d_hidden)
        self.d_opt: torch.optim.Optimizer | None = None
        self._taps: list[_FeatureTap] = []
        self.device = torch.device("cpu")
        self.input_shape = tuple(int(s) for s in input_shape)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Move the teacher's frozen copy to the device, build the discriminator (the same on every rank) and its
        optimiser."""
        self.device = device
        self.frozen.prepare(device, self.cfg.train.channels_last and self.task.channels_last)
        self.discriminator.to(device)
        distributed.broadcast_module(self.discriminator)  # one discriminator across ranks (torchrun)
        if self.cfg.d_optimizer == "adam":
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.d_lr, betas=(0.5, 0.999),
                                          weight_decay=self.cfg.d_weight_decay)
        else:
            self.d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=self.cfg.d_lr, momentum=0.9,
                                         weight_decay=self.cfg.d_weight_decay)
        if self._tapped:
            self._taps = [_FeatureTap(last_global_pool(self.teacher_fwd)), _FeatureTap(last_global_pool(model))]
        self.task.bind(getattr(model, "module", model), self.teacher_fwd)

    def use_contiguous(self) -> None:
        """Run the teacher's copy in the contiguous format, on contiguous images."""
        self.frozen.use_contiguous()

    def compile_forwards(self, compiler: Any) -> None:
        """Compile the teacher copy's forward with the student's (train.compile)."""
        self.frozen.compile(compiler)

    def compute(self, model: nn.Module, images: Any, labels: Any) -> StepOutput:
        """Teacher forward (no grad), discriminator step(s), then the student's alignment loss."""
        cfg, task = self.cfg, self.task
        t_raw = task.teacher(self.frozen, images)
        s_raw = task.student(model, images, labels)
        t_map = s_map = None
        if self._taps:
            t_map, s_map = self._taps[0].take(), self._taps[1].take()
        if cfg.d_input == "features":
            assert t_map is not None and s_map is not None
            s_out, t_out = _pooled(s_map), _pooled(t_map)
            pairs = [(standardized(s_out), standardized(t_out)) if cfg.standardize else (s_out, t_out)]
        else:
            pairs = task.aligned(s_raw, t_raw, cfg)
        assert self.d_opt is not None, "setup() must run before compute()"
        d = self.discriminator
        with no_autocast(self.device):  # the discriminator's maths in float32
            pairs = [(full_precision(s), full_precision(t)) for s, t in pairs]
            d_loss = d_t = d_s = None
            for _ in range(cfg.d_steps):
                self.d_opt.zero_grad(set_to_none=True)
                d_loss, d_t, d_s = _judged(d, pairs)
                d_loss.backward()
                distributed.average_gradients(list(d.parameters()))
                self.d_opt.step()
            self.d_opt.zero_grad(set_to_none=True)
            d.requires_grad_(False)
            try:
                fakes = [d(s) for s, _ in pairs]
                if d_t is None:
                    reals = [d(t.detach()).detach() for _, t in pairs]
                    d_loss = _mean([real_fake_bce(r, True) + real_fake_bce(f.detach(), False)
                                    for r, f in zip(reals, fakes, strict=True)])
                    d_t, d_s = _joined(reals), _joined([f.detach() for f in fakes])
            finally:
                d.requires_grad_(True)
            adv = _mean([real_fake_bce(f, True) for f in fakes])
        task_loss = task.loss(s_raw, labels, self.label_smoothing)
        kd = task.kd(s_raw, t_raw, cfg)
        loss = cfg.ce_weight * task_loss + cfg.mu * kd + cfg.adv_weight * adv
        terms = {
            task.loss_term: task_loss.detach(), "kd": kd.detach(), "adv": adv.detach(),
            "d_loss": d_loss.detach(), "d_teacher": torch.sigmoid(d_t).mean(), "d_student": torch.sigmoid(d_s).mean(),
        }
        if cfg.feature_kd > 0:
            assert t_map is not None and s_map is not None
            feat = F.mse_loss(full_precision(s_map), full_precision(t_map))
            loss = loss + cfg.feature_kd * feat
            terms["feature_kd"] = feat.detach()
        return StepOutput(loss, task.primary(s_raw, task_loss), terms)

    def state_dict(self) -> dict:
        """The discriminator and its optimiser."""
        return {"discriminator": self.discriminator.state_dict(),
                "d_opt": self.d_opt.state_dict() if self.d_opt is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.discriminator.load_state_dict(state["discriminator"])
        if self.d_opt is not None and state["d_opt"]:
            self.d_opt.load_state_dict(state["d_opt"])

    def close(self) -> None:
        """Remove the feature hooks (the teacher's taps too, and the task's)."""
        for t in self._taps:
            t.remove()
        self._taps = []
        self.task.close()


def _mean(losses: list[torch.Tensor]) -> torch.Tensor:
    """The mean of losses (one loss as it is)."""
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def _joined(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator outputs of several tensors as one flat tensor (one output as it is)."""
    return outputs[0] if len(outputs) == 1 else torch.cat([o.flatten() for o in outputs])


def _judged(d: nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """discriminator_loss over (student, teacher) pairs: the mean loss, the raw outputs joined."""
    if len(pairs) == 1:
        return discriminator_loss(d, pairs[0][1], pairs[0][0])
    got = [discriminator_loss(d, t, s) for s, t in pairs]
    return _mean([g[0] for g in got]), _joined([g[1] for g in got]), _joined([g[2] for g in got])


def _feature_width(model: nn.Module, pool: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Channels entering pool, read from one eval-mode forward of a zero image."""
    tap = _FeatureTap(pool)
    p = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
        return int(tap.take().shape[1])
    finally:
        tap.remove()
        model.train(was_training)
