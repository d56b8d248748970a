"""The mask step of the search: a proximal gradient step on the non-negative, weighted L1 penalty of the masks,
optionally FISTA-accelerated with adaptive restart, inside a per-step trust region for the groups whose gradients
stand far above the others'."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["ProximalMaskUpdate", "group_rms"]


def group_rms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The root-mean-square of each tensor, stacked (float32, on the tensors' device: no host sync)."""
    return torch.stack([t.float().pow(2).mean().sqrt() for t in tensors])


def _prox(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    from amas.channels.masks import prox_nonneg_l1

    return prox_nonneg_l1(x, threshold)


class ProximalMaskUpdate:
    """Proximal gradient step on mask vectors (x ← max(y − lr·∇ − lr·thr, 0)), optionally FISTA-accelerated.

    Without FISTA the parameters hold the iterate x. With FISTA they hold the extrapolated point
    y = x_k + (t_{k−1} − 1)/t_k · (x_k − x_{k−1}) (clamped at 0) where the next gradient is taken, and x is kept
    here: read masks through `values()`. With restart, momentum resets whenever the step and the momentum
    disagree ((y − x_new)·(x_new − x_old) > 0), which keeps FISTA stable under stochastic gradients.
    """

    def __init__(self, params: list[nn.Parameter], fista: bool = True, restart: bool = True,
                 max_step: float = 0.0, outlier_ratio: float = 0.0) -> None:
        self.params = list(params)
        self.fista, self.restart = fista, restart
        # > 0: no mask's gradient move exceeds max_step in one step (a trust region); with outlier_ratio > 0 only in
        # the groups whose RMS move is over outlier_ratio times the median group's (a MobileNetV3 stem: 60x)
        self.max_step = float(max_step)
        self.outlier_ratio = float(outlier_ratio)
        self.x = [p.detach().clone() for p in self.params]
        self.t = 1.0
        self.restarts = 0
        self._clipped: int | torch.Tensor = 0  # mask moves the trust region shortened (on the masks' device)

    def reset(self) -> None:
        """Take x from the parameters and drop the momentum (after the parameters moved device or were loaded)."""
        self.x = [p.detach().clone() for p in self.params]
        self.t = 1.0

    @torch.no_grad()
    def drop_momentum(self, count: bool = True) -> None:
        """Drop the momentum now: the parameters go back to the iterate x (count: as a restart in the statistics)."""
        if self.fista and self.t > 1.0:
            for p, x in zip(self.params, self.x, strict=True):
                p.copy_(x)
            self.t = 1.0
            self.restarts += int(count)

    @torch.no_grad()
    def step(self, lr: float, thresholds: list[float | torch.Tensor]) -> None:
        """One step with step size lr; thresholds[i] is the L1 weight of params[i] (the prox cuts lr·thresholds[i])."""
        moves = [None if p.grad is None else lr * p.grad.to(p.dtype) for p in self.params]
        limited = self._limited(moves)
        new = []
        for p, thr, move in zip(self.params, thresholds, limited, strict=True):
            y = p.detach()
            new.append(_prox(y if move is None else y - move, lr * thr))
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

    def _limited(self, moves: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The gradient moves, clamped to ±max_step (counted) in every group, or with outlier_ratio only in the
        outlying groups; unchanged without a trust region."""
        if self.max_step <= 0:
            return moves
        present = [m for m in moves if m is not None]
        if not present:
            return moves
        flags: list[torch.Tensor | bool] = [True] * len(present)
        if self.outlier_ratio > 0:
            rms = group_rms(present)
            bound = self.outlier_ratio * rms.median()  # no host sync: the flags stay tensors
            flags = list(rms > bound)
        it = iter(zip(present, flags, strict=True))
        out: list[torch.Tensor | None] = []
        for m in moves:
            if m is None:
                out.append(None)
                continue
            move, flag = next(it)
            clamped = move.clamp(-self.max_step, self.max_step)
            over = move.abs() > self.max_step
            if flag is True:
                out.append(clamped)
            else:
                over = over & flag
                out.append(torch.where(flag, clamped, move))
            self._clipped = self._clipped + over.sum()
        return out

    def values(self) -> list[torch.Tensor]:
        """The current mask iterates x (non-negative)."""
        return self.x

    def state_dict(self) -> dict:
        """Iterates, momentum scalar and restart count."""
        return {"x": [x.clone() for x in self.x], "t": self.t, "restarts": self.restarts, "clipped": self.clipped}

    @property
    def clipped(self) -> int:
        """Mask moves the trust region shortened, over the whole search."""
        return int(self._clipped)

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.x = [x.to(p.device, p.dtype).clone() for x, p in zip(state["x"], self.params, strict=True)]
        self.t, self.restarts = float(state["t"]), int(state["restarts"])
        self._clipped = int(state.get("clipped", 0))
