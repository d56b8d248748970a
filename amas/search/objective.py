"""AMAS mask search: soft channel masks on the student, proximal (FISTA) mask updates, the budget controller.

The search objective is the alignment objective (amas.search.alignment: CE + KD + adversarial against the frozen
teacher) plus a non-negative, cost-weighted L1 penalty on one soft mask vector per channel group. The engine's SGD
trains the student's weights; the masks are updated here, after each engine step, by a proximal gradient step on the
penalty (amas.search.proximal: soft-threshold by mask_lr·lam·cost, clamp at 0), optionally with FISTA extrapolation
(Beck & Teboulle 2009) and gradient-based adaptive restart (O'Donoghue & Candès 2015). An optional budget controller
adapts lam so the effective MACs reduction settles at a target.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from amas import distributed
from amas.config import SearchConfig
from amas.engine.loop import StepOutput
from amas.errors import SearchError, TrainingError
from amas.search.alignment import AlignmentObjective
from amas.search.proximal import ProximalMaskUpdate, group_rms

__all__ = ["BudgetController", "ProximalMaskUpdate", "SearchObjective"]


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


def exempt_counts(groups: list, cost: Any, cfg: SearchConfig, round_to: int = 1) -> list[int]:
    """Channels per group exempt from the penalty: min_keep of its size, or min_keep_uniform of a uniform cut's.

    The uniform floor is rounded up to the planner's multiple (prune.round_to), so the rounded cut keeps no channel
    the penalty has shrunk just to fill a multiple."""
    share = cost.uniform_share(cfg.target_reduction) if cfg.min_keep_uniform > 0 and cfg.target_reduction > 0 else 0.0
    out = []
    for g in groups:
        k = math.floor(cfg.min_keep_uniform * share * g.size)
        k = round_to * math.ceil(k / round_to) if k > 0 and round_to > 1 else k
        out.append(min(g.size, max(math.ceil(cfg.min_keep * g.size), k)))
    return out


def _powered(costs: list[float], sizes: list[int], power: float) -> list[float]:
    """costs**power, rescaled so that Σ size·cost (the penalty of all masks at 1) is unchanged."""
    if power == 1.0 or not costs:
        return costs
    raised = [c ** power if c > 0 else 0.0 for c in costs]
    before = sum(s * c for s, c in zip(sizes, costs, strict=True))
    after = sum(s * c for s, c in zip(sizes, raised, strict=True))
    return [c * before / after for c in raised] if after > 0 else costs


class SearchObjective(AlignmentObjective):
    """The search stage's loss: the alignment loss + lam·Σ cost·|m|, with the proximal mask step and the controller."""

    def __init__(self, teacher: nn.Module, groups: list, masks: Any, cost: Any, cfg: SearchConfig,
                 input_shape: tuple[int, int, int], num_classes: int | None, total_steps: int = 0, round_to: int = 1,
                 min_channels: int = 1, penalty_costs: dict[str, float] | None = None, task: Any = None) -> None:
        super().__init__(teacher, cfg, input_shape, num_classes, section="search", task=task)
        self.cfg: SearchConfig = cfg
        # how the planner rounds kept counts (prune.round_to, prune.min_channels): with cfg.count_rounded the
        # controller steers the MACs of the rounded cut, not of the raw mask count
        self.round_to, self.min_channels = int(round_to), int(min_channels)
        self.masks = masks
        self.cost = cost
        self.names = [g.name for g in groups]
        total = float(cost.total_macs)
        if total <= 0:
            raise SearchError("the model has no MACs to prune; check the model and input shape")
        ccost = cost.channel_costs()
        # MACs saved per channel as a fraction of the whole model: lam is scale-free (Σ over all masks at 1 ≈ O(1))
        self.costs = [float(ccost[n]) / total for n in self.names]
        if penalty_costs is not None:  # e.g. ms saved per channel over the model's ms (search.penalty_cost latency)
            self.costs = [float(penalty_costs[n]) for n in self.names]
        self.costs = _powered(self.costs, [g.size for g in groups], float(cfg.penalty_power))
        self.floors = exempt_counts(groups, cost, cfg, self.round_to)
        self.lam = float(cfg.lam)
        self.total_steps = int(total_steps)
        self.steps_done = 0
        self.controller = None
        if cfg.target_reduction > 0:
            self.controller = BudgetController(cfg.lam, cfg.target_reduction, cfg.controller_ki, cfg.controller_kp,
                                               cfg.lam_min, cfg.lam_max, cfg.controller_overshoot)
            self.lam = self.controller.lam
        self.updater = ProximalMaskUpdate(list(masks.masks), fista=cfg.fista, restart=cfg.fista_restart,
                                          max_step=cfg.mask_max_step)
        self.user_cfg = cfg
        # decided on the first mask step (`_decide_sensitivity`): None until then
        self.sensitive: bool | None = None
        self._eval_hook: torch.utils.hooks.RemovableHandle | None = None

    # ------------------------------------------------------------ engine hooks

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Attach the masks to the student, then the alignment's setup (teacher, discriminator)."""
        self.masks.to(device)
        self.updater.params = list(self.masks.masks)
        self.updater.reset()
        self.masks.attach(model)
        self._eval_hook = model.register_forward_pre_hook(self._iterate_in_eval())
        super().setup(model, device)

    def _iterate_in_eval(self) -> Any:
        """A forward pre-hook: in eval mode, the masks go back to the iterate x, so what is evaluated is what is cut."""
        updater = self.updater

        def hook(module: nn.Module, inputs: Any) -> None:
            """Drop FISTA's momentum before an eval-mode forward."""
            if not module.training:
                updater.drop_momentum(count=False)

        hook._amas_mask_hook = True  # type: ignore[attr-defined]  # copies of the student drop it (remove_mask_hooks)
        return hook

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The student's weights only: masks are updated by the proximal step, not by the engine's SGD."""
        mask_ids = {id(p) for p in self.masks.parameters()}
        return [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in mask_ids]}]

    def penalty(self) -> torch.Tensor:
        """Σ_g cost_g·Σ_i |m_gi| over the mask iterates (cost as a fraction of the model's MACs)."""
        vals = self.updater.values()
        return sum(c * v.abs().sum() for c, v in zip(self.costs, vals, strict=True)) if vals else torch.zeros(())

    def compute(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """The alignment loss plus lam times the mask penalty (a constant here: the proximal step handles it)."""
        out = super().compute(model, images, labels)
        with torch.no_grad():
            pen = self.penalty().to(out.loss.device)
        out.terms["sparsity"] = pen
        return StepOutput(out.loss + self.lam * pen, out.logits, out.terms)

    def scaled_parameters(self) -> list[torch.Tensor]:
        """The masks (fp16's loss scaling unscales their gradients with the student's)."""
        return list(self.masks.masks)

    def after_step(self, model: nn.Module, lr: float, step: int) -> None:
        """Proximal (FISTA) step on the masks (step size on the student's schedule), then a controller update."""
        distributed.average_gradients(list(self.masks.masks))  # masks live outside DDP: keep the ranks' masks equal
        if self.sensitive is None:
            self._decide_sensitivity()
        mask_lr = self.cfg.mask_lr * (lr / self.cfg.train.lr if self.cfg.mask_lr_schedule else 1.0)
        before = [v.clone() for v in self.updater.values()] if self._holds() else None
        self.updater.step(mask_lr, self._thresholds())
        if before is not None:
            self.hold_budget(before)
        self.steps_done = step + 1
        if self.controller is not None and (step + 1) % self.cfg.controller_every == 0:
            self.lam = self.controller.update(self.reduction(), self.target_at(step + 1))
            if self.controller.error < 0:  # past the set point: stop the masks' momentum too
                self.updater.drop_momentum()

    def _decide_sensitivity(self) -> None:
        """On the first mask step: is the model's output far more sensitive to some mask groups than to the rest?"""
        grads = [p.grad for p in self.masks.masks if p.grad is not None]
        ratio = 0.0
        if grads:
            rms = group_rms(grads)
            ratio = float(rms.max() / rms.median().clamp(min=1e-12))
        self._set_sensitive(ratio > self.user_cfg.mask_outlier_ratio, ratio)

    def _set_sensitive(self, sensitive: bool, ratio: float | None = None) -> None:
        """Sensitive: z-scored logits and every group's moves limited; otherwise logits capped at standardize_cap and
        only outlying groups limited. The caller's config is never changed."""
        self.sensitive = bool(sensitive)
        cfg = self.user_cfg
        self.cfg = replace(cfg, standardize_cap=0.0) if self.sensitive else cfg
        self.updater.outlier_ratio = 0.0 if self.sensitive else float(cfg.mask_outlier_ratio)
        if ratio is not None and distributed.context().is_main:
            how = ("z-scored logits, every group's mask moves limited to search.mask_max_step" if self.sensitive else
                   "logits capped at search.standardize_cap, only outlying groups' mask moves limited")
            print(f"search: the largest mask-gradient group is {ratio:.1f}x the median one "
                  f"({'over' if self.sensitive else 'within'} search.mask_outlier_ratio {cfg.mask_outlier_ratio:g}): "
                  f"{how}", file=sys.stderr, flush=True)

    def _thresholds(self) -> list[float | torch.Tensor]:
        """The L1 weight of each group's masks: lam·cost, but 0 on each group's strongest self.floors[g] channels."""
        weights: list[float | torch.Tensor] = [self.lam * c for c in self.costs]
        if not any(self.floors):
            return weights
        out: list[float | torch.Tensor] = []
        for p, w, k in zip(self.updater.params, weights, self.floors, strict=True):
            t = torch.full_like(p.detach(), float(w))
            if k:
                t[torch.topk(p.detach(), k).indices] = 0.0
            out.append(t)
        return out

    def _holds(self) -> bool:
        return self.cfg.hold_budget and self.controller is not None

    @torch.no_grad()
    def hold_budget(self, before: list[torch.Tensor]) -> int:
        """Give channels this step zeroed their values back, strongest first, while the cut is past the target.

        The effective reduction (counted as the cut rounds it) then never exceeds search.target_reduction because of
        a mask step: a channel dies only where the budget has room for it. Returns how many channels were held.
        """
        target, thr = self.cfg.target_reduction, self.cfg.mask_threshold
        if self.reduction() <= target:
            return 0
        now = self.updater.values()
        died = [(float(b[i]), gi, int(i)) for gi, (b, x) in enumerate(zip(before, now, strict=True))
                for i in torch.nonzero((b > thr) & (x <= thr)).flatten().tolist()]
        held = 0
        for value, gi, i in sorted(died, key=lambda d: (-d[0], d[1], d[2])):
            if self.reduction() <= target:
                break
            now[gi][i] = value
            self.updater.params[gi][i] = value
            held += 1
        return held

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
            from amas.channels.plan import rounded_count

            sizes = self.cost.groups
            kept = {n: rounded_count(k, sizes[n].size, self.round_to, self.min_channels, k == 0, sizes[n].conv_groups)
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
        if self.updater.max_step > 0:
            out["mask_moves_clipped"] = float(self.updater.clipped)
        if self.sensitive is not None:
            out["mask_sensitive"] = float(self.sensitive)
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
            **super().state_dict(),
            "lam": self.lam,
            "controller": self.controller.state_dict() if self.controller is not None else {},
            "sensitive": self.sensitive,
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
        super().load_state_dict(state)
        self.lam = float(state["lam"])
        if state.get("sensitive") is not None:
            self._set_sensitive(state["sensitive"])
        if self.controller is not None and state["controller"]:
            self.controller.load_state_dict(state["controller"])

    def close(self) -> None:
        """Remove the mask hooks from the student and the feature hooks."""
        self.masks.detach()
        if self._eval_hook is not None:
            self._eval_hook.remove()
            self._eval_hook = None
        super().close()
