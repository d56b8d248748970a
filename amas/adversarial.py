"""AMAS search: discriminator, adversarial and distillation losses, proximal (FISTA) mask updates, budget controller.

The frozen teacher (eval mode, no gradients) guides a student that starts as its copy and carries one soft
mask vector per channel group. The engine's SGD trains the student's weights; the masks are updated here,
after each engine step, by a proximal gradient step on the non-negative, cost-weighted L1 penalty
(soft-threshold by mask_lr·lam·cost, clamp at 0), optionally with FISTA extrapolation (Beck & Teboulle 2009)
and gradient-based adaptive restart (O'Donoghue & Candès 2015). A small MLP discriminator, trained inside
the objective with its own optimiser, tells teacher outputs from student outputs; the student is pushed to
fool it. An optional budget controller adapts lam so the effective MACs reduction settles at a target.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from amas import distributed
from amas.config import Config, SearchConfig, atomic_write_text
from amas.engine import Objective, StepOutput, TrainingError
from amas.errors import AmasError

GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


class SearchError(AmasError):
    """A search that cannot start: mismatched teacher and data, unusable options."""


# ---------------------------------------------------------------- losses and the discriminator


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
        return self.net(x.float().flatten(1)).squeeze(1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse", temperature: float = 4.0) -> torch.Tensor:
    """Distillation loss: MSE between logits (GAL), or T²-scaled KL(teacher ‖ student) at temperature T."""
    s, t = student.float(), teacher.float()
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


# ---------------------------------------------------------------- proximal mask update


def _prox(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    from amas.masks import prox_nonneg_l1

    return prox_nonneg_l1(x, threshold)


class ProximalMaskUpdate:
    """Proximal gradient step on mask vectors (x ← max(y − lr·∇ − lr·thr, 0)), optionally FISTA-accelerated.

    Without FISTA the parameters hold the iterate x. With FISTA they hold the extrapolated point
    y = x_k + (t_{k−1} − 1)/t_k · (x_k − x_{k−1}) (clamped at 0) where the next gradient is taken, and x is kept
    here: read masks through `values()`. With restart, momentum resets whenever the step and the momentum
    disagree ((y − x_new)·(x_new − x_old) > 0), which keeps FISTA stable under stochastic gradients.
    """

    def __init__(self, params: list[nn.Parameter], fista: bool = True, restart: bool = True) -> None:
        self.params = list(params)
        self.fista, self.restart = fista, restart
        self.x = [p.detach().clone() for p in self.params]
        self.t = 1.0
        self.restarts = 0

    def reset(self) -> None:
        """Take x from the parameters and drop the momentum (after the parameters moved device or were loaded)."""
        self.x = [p.detach().clone() for p in self.params]
        self.t = 1.0

    @torch.no_grad()
    def drop_momentum(self) -> None:
        """Drop the momentum now: the parameters go back to the iterate x."""
        if self.fista and self.t > 1.0:
            for p, x in zip(self.params, self.x, strict=True):
                p.copy_(x)
            self.t = 1.0
            self.restarts += 1

    @torch.no_grad()
    def step(self, lr: float, thresholds: list[float | torch.Tensor]) -> None:
        """One step with step size lr; thresholds[i] is the L1 weight of params[i] (the prox cuts lr·thresholds[i])."""
        new = []
        for p, thr in zip(self.params, thresholds, strict=True):
            y = p.detach()
            g = p.grad
            z = y if g is None else y - lr * g.to(y.dtype)
            new.append(_prox(z, lr * thr))
            p.grad = None
        beta = 0.0
        if self.fista:
            if self.restart:
                agree = sum(
                    float(((p.detach() - xn) * (xn - xo)).sum())
                    for p, xn, xo in zip(self.params, new, self.x, strict=True)
                )
                if agree > 0:
                    self.t = 1.0
                    self.restarts += 1
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * self.t * self.t)) / 2.0
            beta = (self.t - 1.0) / t_next
            self.t = t_next
        for p, xn, xo in zip(self.params, new, self.x, strict=True):
            p.copy_((xn + beta * (xn - xo)).clamp_(min=0) if beta > 0 else xn)
        self.x = new

    def values(self) -> list[torch.Tensor]:
        """The current mask iterates x (non-negative)."""
        return self.x

    def state_dict(self) -> dict:
        """Iterates, momentum scalar and restart count."""
        return {"x": [x.clone() for x in self.x], "t": self.t, "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.x = [x.to(p.device, p.dtype).clone() for x, p in zip(state["x"], self.params, strict=True)]
        self.t, self.restarts = float(state["t"]), int(state["restarts"])


# ---------------------------------------------------------------- budget controller


class BudgetController:
    """PI controller on log(lambda): lambda rises while the MACs reduction is below target, falls when above.

    log λ = I + kp·e with I ← clamp(I + ki·e) and e = target − reduction; both λ and I stay in [lam_min, lam_max]
    (anti-windup), so a long wait before the first channel dies cannot inflate λ without bound. Above the target
    (e < 0) both gains are multiplied by `overshoot`: a channel, once dead, rarely comes back, so overshoot
    must be stopped fast while undershoot can be corrected at leisure.
    """

    def __init__(self, lam: float, target: float, ki: float = 2.0, kp: float = 8.0, lam_min: float = 1e-4,
                 lam_max: float = 1e3, overshoot: float = 4.0) -> None:
        if not lam_min <= lam_max:
            raise SearchError(f"search.lam_min={lam_min} exceeds search.lam_max={lam_max}; swap or widen them")
        self.target, self.ki, self.kp, self.overshoot = target, ki, kp, overshoot
        self.lo, self.hi = math.log(lam_min), math.log(lam_max)
        self.integral = min(max(math.log(max(lam, lam_min)), self.lo), self.hi)
        self.lam = math.exp(self.integral)
        self.error = target
        self.updates = 0

    def update(self, reduction: float, target: float | None = None) -> float:
        """Feed the measured MACs reduction (0..1), optionally against a moving target, and return the new lambda."""
        e = (self.target if target is None else target) - reduction
        self.error = e
        gain = 1.0 if e >= 0 else self.overshoot
        self.integral = min(max(self.integral + gain * self.ki * e, self.lo), self.hi)
        self.lam = math.exp(min(max(self.integral + gain * self.kp * e, self.lo), self.hi))
        self.updates += 1
        return self.lam

    def state_dict(self) -> dict:
        """Integral state, current lambda and last error."""
        return {"integral": self.integral, "lam": self.lam, "error": self.error, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.integral, self.lam = float(state["integral"]), float(state["lam"])
        self.error, self.updates = float(state["error"]), int(state["updates"])


# ---------------------------------------------------------------- the search objective


def last_global_pool(model: nn.Module) -> nn.Module | None:
    """The last pooling module (adaptive/average pool) in registration order, whose input holds the final features."""
    found = None
    for m in model.modules():
        if isinstance(m, GLOBAL_POOLS):
            found = m
    return found


class _FeatureTap:
    """Forward pre-hook on a pooling module: keeps its input globally averaged to [N, C]."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        self.value = x.mean(dim=(2, 3)) if x.dim() == 4 else x.flatten(1)

    def take(self) -> torch.Tensor:
        v, self.value = self.value, None
        if v is None:
            raise SearchError(
                "the pooling layer tapped for search.d_input=features did not run; use search.d_input=logits"
            )
        return v

    def remove(self) -> None:
        self.handle.remove()


def _inplace_relus(gm: torch.fx.GraphModule) -> None:
    """Make ReLU modules in-place where, at every call site, their input feeds nothing else."""
    ok: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.ReLU, nn.ReLU6)):
            src = node.args[0] if node.args else None
            single = isinstance(src, torch.fx.Node) and len(src.users) == 1 and src.op != "placeholder"
            ok[node.target] = ok.get(node.target, True) and single
    for target, safe in ok.items():
        if safe:
            gm.get_submodule(target).inplace = True


def fast_inference_copy(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """A frozen eval-mode copy of model for no-grad forwards: conv+BN folded (torch.fx) and in-place ReLUs.

    The copy is checked against model on a random batch; when tracing fails or the outputs differ, model
    itself is returned. The original's weights and buffers are never touched.
    """
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model.eval()
    try:
        fast = fuse(copy.deepcopy(model))
        _inplace_relus(fast)
        p = next(model.parameters())
        x = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        with torch.no_grad():
            ref, out = model(x), fast(x)
        if (
            not isinstance(out, torch.Tensor)
            or out.shape != ref.shape
            or not torch.allclose(out, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()) + 1e-5)
        ):
            return model
    except Exception:  # any model torch.fx cannot trace or fuse: use it as it is
        return model
    finally:
        model.train(was_training)
    return fast.eval().requires_grad_(False)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


class SearchObjective(Objective):
    """The search stage's loss: CE + mu·KD + adversarial + lam·Σ cost·|m|, discriminator and mask steps inside."""

    def __init__(self, teacher: nn.Module, groups: list, masks: Any, cost: Any, cfg: SearchConfig,
                 input_shape: tuple[int, int, int], num_classes: int, total_steps: int = 0, round_to: int = 1,
                 min_channels: int = 1) -> None:
        super().__init__(cfg.train.label_smoothing)
        # how the planner rounds kept counts (prune.round_to, prune.min_channels): with cfg.count_rounded the
        # controller steers the MACs of the rounded cut, not of the raw mask count
        self.round_to, self.min_channels = int(round_to), int(min_channels)
        self.cfg = cfg
        self.teacher = teacher
        teacher.eval().requires_grad_(False)
        # what runs the teacher's forwards: the teacher, or its conv+BN-folded copy (same outputs to float rounding)
        self.teacher_fwd = fast_inference_copy(teacher, input_shape) if cfg.fast_teacher else teacher
        self.masks = masks
        self.cost = cost
        self.names = [g.name for g in groups]
        total = float(cost.total_macs)
        if total <= 0:
            raise SearchError("the model has no MACs to prune; check the model and input shape")
        ccost = cost.channel_costs()
        # MACs saved per channel as a fraction of the whole model: lam is scale-free (Σ over all masks at 1 ≈ O(1))
        self.costs = [float(ccost[n]) / total for n in self.names]
        self.lam = float(cfg.lam)
        self.total_steps = int(total_steps)
        self.steps_done = 0
        self.controller = None
        if cfg.target_reduction > 0:
            self.controller = BudgetController(cfg.lam, cfg.target_reduction, cfg.controller_ki, cfg.controller_kp,
                                               cfg.lam_min, cfg.lam_max, cfg.controller_overshoot)
            self.lam = self.controller.lam
        self.updater = ProximalMaskUpdate(list(masks.masks), fista=cfg.fista, restart=cfg.fista_restart)
        if cfg.d_input == "features":
            pool = last_global_pool(teacher)
            if pool is None:
                raise SearchError("search.d_input=features needs a pooling layer before the classifier; "
                                  "this model has none, use search.d_input=logits")
            d_in = self._feature_width(teacher, pool, input_shape)
        else:
            d_in = num_classes
        self.discriminator = Discriminator(d_in, cfg.d_hidden)
        self.d_opt: torch.optim.Optimizer | None = None
        self._taps: list[_FeatureTap] = []
        self.device = torch.device("cpu")

    @staticmethod
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

    # ------------------------------------------------------------ engine hooks

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Freeze the teacher on the device, attach the masks to the student, build the discriminator optimiser."""
        self.device = device
        for t in {id(self.teacher): self.teacher, id(self.teacher_fwd): self.teacher_fwd}.values():
            t.eval().requires_grad_(False)
            t.to(device)
            if self.cfg.train.channels_last:
                t.to(memory_format=torch.channels_last)
        self.masks.to(device)
        self.updater.params = list(self.masks.masks)
        self.updater.reset()
        self.masks.attach(model)
        self.discriminator.to(device)
        distributed.broadcast_module(self.discriminator)  # one discriminator across ranks (torchrun)
        if self.cfg.d_optimizer == "adam":
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.d_lr, betas=(0.5, 0.999),
                                          weight_decay=self.cfg.d_weight_decay)
        else:
            self.d_opt = torch.optim.SGD(self.discriminator.parameters(), lr=self.cfg.d_lr, momentum=0.9,
                                         weight_decay=self.cfg.d_weight_decay)
        if self.cfg.d_input == "features":
            self._taps = [_FeatureTap(last_global_pool(self.teacher_fwd)), _FeatureTap(last_global_pool(model))]

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The student's weights only: masks are updated by the proximal step, not by the engine's SGD."""
        mask_ids = {id(p) for p in self.masks.parameters()}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in mask_ids]}]

    def penalty(self) -> torch.Tensor:
        """Σ_g cost_g·Σ_i |m_gi| over the mask iterates (cost as a fraction of the model's MACs)."""
        vals = self.updater.values()
        return sum(c * v.abs().sum() for c, v in zip(self.costs, vals, strict=True)) if vals else torch.zeros(())

    def compute(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Teacher forward (no grad), discriminator step(s), then the student's loss."""
        cfg = self.cfg
        with torch.no_grad():
            t_logits = self.teacher_fwd(images)
        s_logits = model(images)
        if self._taps:
            t_out, s_out = self._taps[0].take(), self._taps[1].take()
        else:
            t_out, s_out = t_logits, s_logits
        assert self.d_opt is not None, "setup() must run before compute()"
        d = self.discriminator
        with _no_autocast(self.device):
            t_out_f, s_out_f = t_out.float(), s_out.float()
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
        s32 = s_logits.float()
        ce = F.cross_entropy(s32, labels, label_smoothing=self.label_smoothing)
        kd = kd_loss(s32, t_logits, cfg.kd, cfg.temperature)
        with torch.no_grad():
            pen = self.penalty().to(s32.device)
        loss = cfg.ce_weight * ce + cfg.mu * kd + cfg.adv_weight * adv + self.lam * pen  # penalty: a constant here
        terms = {
            "ce": ce.detach(), "kd": kd.detach(), "adv": adv.detach(), "sparsity": pen,
            "d_loss": d_loss.detach(), "d_teacher": torch.sigmoid(d_t).mean(), "d_student": torch.sigmoid(d_s).mean(),
        }
        return StepOutput(loss, s_logits, terms)

    def after_step(self, model: nn.Module, lr: float, step: int) -> None:
        """Proximal (FISTA) step on the masks (step size on the student's schedule), then a controller update."""
        distributed.average_gradients(list(self.masks.masks))  # masks live outside DDP: keep the ranks' masks equal
        mask_lr = self.cfg.mask_lr * (lr / self.cfg.train.lr if self.cfg.mask_lr_schedule else 1.0)
        self.updater.step(mask_lr, [self.lam * c for c in self.costs])
        self.steps_done = step + 1
        if self.controller is not None and (step + 1) % self.cfg.controller_every == 0:
            self.lam = self.controller.update(self.reduction(), self.target_at(step + 1))
            if self.controller.error < 0:  # past the set point: stop the masks' momentum too
                self.updater.drop_momentum()

    def target_at(self, step: int) -> float:
        """The controller's set point after step steps: r·(1 − (1 − step/ramp)³) over target_ramp of the search, then r.

        The cubic schedule of gradual pruning (Zhu & Gupta 2017): fast while redundant channels are plenty, flat at
        the end so the masks arrive at the target slowly instead of overshooting it.
        """
        ramp = self.cfg.target_ramp * self.total_steps
        if ramp <= 0:
            return self.cfg.target_reduction
        return self.cfg.target_reduction * (1.0 - (1.0 - min(1.0, step / ramp)) ** 3)

    # ------------------------------------------------------------ measurements

    def kept(self) -> dict[str, int]:
        """Channels per group whose mask is above search.mask_threshold."""
        thr = self.cfg.mask_threshold
        return {n: int((v > thr).sum()) for n, v in zip(self.names, self.updater.values(), strict=True)}

    def effective_macs(self) -> int:
        """MACs of the student with every channel at or below the threshold removed (counts rounded as the cut's)."""
        kept = self.kept()
        if self.cfg.count_rounded:
            from amas.prune import rounded_count

            sizes = self.cost.groups
            kept = {n: rounded_count(k, sizes[n].size, self.round_to, self.min_channels, dead=k == 0)
                    for n, k in kept.items()}
        return int(self.cost.macs(kept))

    def reduction(self) -> float:
        """Effective MACs reduction, 0..1."""
        return 1.0 - self.effective_macs() / float(self.cost.total_macs)

    def mask_values(self) -> dict[str, torch.Tensor]:
        """Mask iterates by group name (what search.pt stores)."""
        return {n: v.detach().clone() for n, v in zip(self.names, self.updater.values(), strict=True)}

    def zero_fractions(self) -> dict[str, float]:
        """Fraction of masks at or below the threshold, per group."""
        thr = self.cfg.mask_threshold
        return {n: float((v <= thr).float().mean()) for n, v in zip(self.names, self.updater.values(), strict=True)}

    def scalars(self) -> dict[str, float]:
        """lambda, effective MACs ratio, zero-mask fractions per group."""
        red = self.reduction()
        out = {"lambda": self.lam, "macs_ratio": 1.0 - red, "macs_reduction": red}
        if self.controller is not None:
            out["macs_reduction_target"] = self.target_at(self.steps_done)
        if self.updater.fista:
            out["fista_restarts"] = float(self.updater.restarts)
        out.update({f"zero_frac/{n}": f for n, f in self.zero_fractions().items()})
        return out

    def end_epoch(self, model: nn.Module, epoch: int, writer: Any) -> None:
        """Mask histograms per group and overall, and the epoch's effective MACs."""
        vals = self.updater.values()
        for n, v in zip(self.names, vals, strict=True):
            writer.add_histogram(f"search_masks/{n}", v.detach().float().cpu(), epoch + 1)
        if vals:
            writer.add_histogram("search_masks/all", torch.cat([v.detach().float().cpu() for v in vals]), epoch + 1)
        writer.add_scalar("search/epoch_macs_ratio", 1.0 - self.reduction(), epoch + 1)
        writer.add_scalar("search/epoch_lambda", self.lam, epoch + 1)

    def state_dict(self) -> dict:
        """Masks, mask-update state, discriminator and its optimiser, lambda and controller state."""
        return {
            "names": list(self.names),
            "masks": [p.detach().clone() for p in self.masks.masks],
            "updater": self.updater.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "d_opt": self.d_opt.state_dict() if self.d_opt is not None else {},
            "lam": self.lam,
            "controller": self.controller.state_dict() if self.controller is not None else {},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        if list(state.get("names", [])) != list(self.names):
            raise TrainingError("the saved search state has other channel groups than this model; "
                                "start a new run directory or drop --resume")
        with torch.no_grad():
            for p, v in zip(self.masks.masks, state["masks"], strict=True):
                p.copy_(v)
        self.updater.load_state_dict(state["updater"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.d_opt is not None and state["d_opt"]:
            self.d_opt.load_state_dict(state["d_opt"])
        self.lam = float(state["lam"])
        if self.controller is not None and state["controller"]:
            self.controller.load_state_dict(state["controller"])

    def close(self) -> None:
        """Remove the mask and feature hooks from the student (the teacher's taps too)."""
        self.masks.detach()
        for t in self._taps:
            t.remove()
        self._taps = []


# ---------------------------------------------------------------- the stage runner


def check_teacher_matches(record: dict, info: Any, teacher_path: str | Path, data_name: str) -> None:
    """The teacher must have been trained on the configured dataset (classes, channels, image size)."""
    rd = record.get("data", {})
    same = (
        rd.get("name", data_name) == data_name
        and int(record["num_classes"]) == info.num_classes
        and int(record["in_channels"]) == info.in_channels
        and int(rd.get("image_size", info.image_size)) == info.image_size
    )
    if not same:
        raise SearchError(
            f"teacher '{teacher_path}' was trained on {rd.get('name', '?')} ({record['num_classes']} classes, "
            f"{record['in_channels']} channels), but the config's data is {data_name} ({info.num_classes} classes, "
            f"{info.in_channels} channels); set data.name={rd.get('name', '?')} or pass a teacher trained on "
            f"{data_name}"
        )


def search(cfg: Config, run_dir: str | Path, teacher_path: str | Path, resume: bool = False,
           on_epoch_end: Any = None) -> dict[str, Any]:
    """Search channel masks for a copy of the teacher; writes search.pt (student + masks) and search_state.pt."""
    from amas.checkpoint import load_model, save_masked
    from amas.data import dataset_info
    from amas.engine import Trainer, evaluate, resolve_device
    from amas.masks import ChannelMasks, CostModel, find_groups
    from amas.stages import prepare_run_dir, seed_everything, stage_data

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    tcfg = cfg.search.train
    device = distributed.device_for(distributed.context(), resolve_device(tcfg.device))
    teacher, tobj = load_model(teacher_path, device)
    record = tobj["model"]
    info = dataset_info(cfg.data)
    check_teacher_matches(record, info, teacher_path, cfg.data.name)
    if (run_dir / "search_state.pt").exists() and not resume:
        prepare_run_dir(run_dir, cfg, resume, "search_state.pt")  # refuses before any work
    seed_everything(cfg.seed)
    data = stage_data(cfg, tcfg, device)
    prepare_run_dir(run_dir, cfg, resume, "search_state.pt")
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    groups = find_groups(student, info.input_shape, residual=cfg.prune.residual_channels)
    if not groups:
        raise SearchError(f"model '{record['name']}' has no prunable channel groups; choose another model")
    cost = CostModel(student, groups, info.input_shape)
    masks = ChannelMasks(groups, init=1.0)
    objective = SearchObjective(teacher, groups, masks, cost, cfg.search, info.input_shape, info.num_classes,
                                total_steps=tcfg.epochs * len(data.train), round_to=cfg.prune.round_to,
                                min_channels=cfg.prune.min_channels)
    trainer = Trainer(student, data.train, tcfg, run_dir, num_classes=info.num_classes, val=data.val,
                      objective=objective, stage="search", device=device, on_epoch_end=on_epoch_end)
    try:
        history = trainer.fit(resume=resume)
    except BaseException:
        objective.close()
        raise
    # evaluate the student with the final iterates x (FISTA leaves the extrapolated point in the parameters)
    values = objective.mask_values()
    masks.load_values(values)
    result: dict[str, Any] = {}
    if data.val is not None:
        result["val_acc"] = evaluate(trainer.model, data.val, info.num_classes, device, tcfg.amp)["acc"]
        result["teacher_val_acc"] = evaluate(teacher, data.val, info.num_classes, device, tcfg.amp)["acc"]
    objective.close()
    eff = objective.effective_macs()
    kept = objective.kept()
    result.update({
        "total_macs": int(cost.total_macs),
        "effective_macs": eff,
        "macs_ratio": eff / float(cost.total_macs),
        "macs_reduction": 1.0 - eff / float(cost.total_macs),
        "target_reduction": cfg.search.target_reduction,
        "lambda": objective.lam,
        "kept_channels": sum(kept.values()),
        "total_channels": sum(g.size for g in groups),
        "kept": kept,
        "epochs": tcfg.epochs,
        "wall_s": time.perf_counter() - t0,
    })
    if distributed.context().is_main:
        save_masked(run_dir / "search.pt", trainer.model, record, values, metrics=result)
        atomic_write_text(run_dir / "search_metrics.json", json.dumps({"result": result, "history": history}, indent=2))
    distributed.barrier()
    return result


__all__ = [
    "BudgetController", "Discriminator", "ProximalMaskUpdate", "SearchError", "SearchObjective", "discriminator_loss",
    "kd_loss", "real_fake_bce", "search",
]
