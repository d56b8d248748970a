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

__all__ = ["AlignmentObjective", "Discriminator", "discriminator_loss", "fast_inference_copy",
           "kd_loss", "last_global_pool", "real_fake_bce", "standardized"]

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)



def full_precision(t: torch.Tensor) -> torch.Tensor:
    """t as float32, or as is when it is float64 (losses never run in bf16/fp16, nor lose a float64 run's precision)."""
    return t if t.dtype == torch.float64 else t.float()

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


def standardized(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row z-scored over its last dimension (zero mean, unit standard deviation): the logits' shape, not scale."""
    x = full_precision(logits)
    mean = x.mean(dim=-1, keepdim=True)
    return (x - mean) / (x.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", temperature: float = 4.0,
            standardize: bool = False) -> torch.Tensor:
    """Distillation loss: MSE between logits (GAL), or T²-scaled KL(teacher ‖ student) at temperature T.

    standardize: for MSE, both sides z-scored per sample first (as Sun et al., CVPR 2024 do for KL), so the loss and
    its gradient do not grow with the teacher's logit scale; KL's gradient is bounded by T per logit already."""
    s, t = full_precision(student), full_precision(teacher)
    if standardize and kind == "mse":
        s, t = standardized(s), standardized(t)
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
    """

    def __init__(self, teacher: nn.Module, cfg: Any, input_shape: tuple[int, int, int], num_classes: int, *,
                 student: nn.Module | None = None, section: str = "search") -> None:
        super().__init__(cfg.train.label_smoothing)
        self.cfg: AlignmentConfig = cfg
        # the caller's teacher is never modified: its forwards run the frozen copy (teacher_fwd is its module)
        self.frozen = (teacher if isinstance(teacher, FrozenTeacher)
                       else FrozenTeacher(teacher, input_shape, fold=cfg.fast_teacher))
        self.teacher_fwd = self.frozen.module
        self._tapped = cfg.d_input == "features" or cfg.feature_kd > 0
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
        d_in = width if cfg.d_input == "features" else num_classes
        self.discriminator = Discriminator(d_in, cfg.d_hidden)
        self.d_opt: torch.optim.Optimizer | None = None
        self._taps: list[_FeatureTap] = []
        self.device = torch.device("cpu")
        self.input_shape = tuple(int(s) for s in input_shape)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Move the teacher's frozen copy to the device, build the discriminator (the same on every rank) and its
        optimiser."""
        self.device = device
        self.frozen.prepare(device, self.cfg.train.channels_last)
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

    def use_contiguous(self) -> None:
        """Run the teacher's copy in the contiguous format, on contiguous images."""
        self.frozen.use_contiguous()

    def compile_forwards(self, compiler: Any) -> None:
        """Compile the teacher copy's forward with the student's (train.compile)."""
        self.frozen.compile(compiler)

    def compute(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Teacher forward (no grad), discriminator step(s), then the student's alignment loss."""
        cfg = self.cfg
        t_logits = self.frozen(images)
        s_logits = model(images)
        t_map = s_map = None
        if self._taps:
            t_map, s_map = self._taps[0].take(), self._taps[1].take()
        if cfg.d_input == "features":
            assert t_map is not None and s_map is not None
            t_out, s_out = _pooled(t_map), _pooled(s_map)
        else:
            t_out, s_out = t_logits, s_logits
        if cfg.standardize:
            t_out, s_out = standardized(t_out), standardized(s_out)
        assert self.d_opt is not None, "setup() must run before compute()"
        d = self.discriminator
        with no_autocast(self.device):  # the discriminator's maths in float32
            t_out_f, s_out_f = full_precision(t_out), full_precision(s_out)
            d_loss = d_t = d_s = None
            for _ in range(cfg.d_steps):
                self.d_opt.zero_grad(set_to_none=True)
                d_loss, d_t, d_s = discriminator_loss(d, t_out_f, s_out_f)
                d_loss.backward()
                distributed.average_gradients(list(d.parameters()))
                self.d_opt.step()
            self.d_opt.zero_grad(set_to_none=True)
            d.requires_grad_(False)
            try:
                d_fake = d(s_out_f)
                if d_t is None:
                    d_t = d(t_out_f.detach()).detach()
                    d_loss = real_fake_bce(d_t, True) + real_fake_bce(d_fake.detach(), False)
                    d_s = d_fake.detach()
            finally:
                d.requires_grad_(True)
            adv = real_fake_bce(d_fake, True)
        s32 = full_precision(s_logits)
        ce = F.cross_entropy(s32, labels, label_smoothing=self.label_smoothing)
        kd = kd_loss(s32, t_logits, cfg.kd, cfg.temperature, cfg.standardize)
        loss = cfg.ce_weight * ce + cfg.mu * kd + cfg.adv_weight * adv
        terms = {
            "ce": ce.detach(), "kd": kd.detach(), "adv": adv.detach(),
            "d_loss": d_loss.detach(), "d_teacher": torch.sigmoid(d_t).mean(), "d_student": torch.sigmoid(d_s).mean(),
        }
        if cfg.feature_kd > 0:
            assert t_map is not None and s_map is not None
            feat = F.mse_loss(full_precision(s_map), full_precision(t_map))
            loss = loss + cfg.feature_kd * feat
            terms["feature_kd"] = feat.detach()
        return StepOutput(loss, s_logits, terms)

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
        """Remove the feature hooks (the teacher's taps too)."""
        for t in self._taps:
            t.remove()
        self._taps = []


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
