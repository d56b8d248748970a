"""The module a removed residual block becomes (amas.channels.blocks): its shortcut plus a constant, activated.

Kept with the models, apart from the pruning code, so that loading a pruned model never imports Torch-Pruning.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RemovedBlock"]


class RemovedBlock(nn.Module):
    """A residual block reduced to its shortcut: act(shortcut(x) + bias), bias the dropped branch's constant."""

    def __init__(self, shortcut: nn.Module | None, bias: torch.Tensor, act: nn.Module | None = None) -> None:
        super().__init__()
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.register_buffer("bias", bias.detach().clone().flatten())
        self.act = act if act is not None else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut plus the constant, through the block's activation."""
        return self.act(self.shortcut(x) + self.bias.view(1, -1, 1, 1).to(x.dtype))
