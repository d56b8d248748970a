"""Data-free criteria on the filters: L1 and L2 norms (Li et al. 2017), FPGM (He et al. 2019), and random.

- L1: Σ|W_j| of output filter j; L2: ‖W_j‖₂. Higher = keep.
- FPGM: score_j = Σ_k ‖W_j − W_k‖₂ over the layer's filters. The geometric median minimises this sum, so the
  filters nearest it (the most replaceable ones) score lowest and go first.
- random: i.i.d. uniform scores from a generator seeded with ``seed`` (same seed, same scores).

A filter is the layer's kernel weights (biases are left out, as in the papers). Coupled groups aggregate their
members as described in ``amas.criteria.common`` (per-layer mean normalisation, then the mean over members).
"""

from __future__ import annotations

import torch
from torch import nn

from amas.channels.group import ChannelGroup
from amas.criteria.common import aggregate, by_position, conv_members

__all__ = ["filters", "member_filters", "l1_scores", "l2_scores", "fpgm_scores", "random_scores"]


def filters(model: nn.Module, layer: str) -> torch.Tensor:
    """Output filters (kernel weights, no bias) of a conv/linear layer as rows, float64 on CPU."""
    return model.get_submodule(layer).weight.detach().double().cpu().flatten(1)


def member_filters(model: nn.Module, group: ChannelGroup) -> list[torch.Tensor]:
    """Each member layer's filters as one row per group channel (a grouped conv's rows of a position side by side)."""
    layers = conv_members(model, group)
    if not layers:
        raise ValueError(f"group {group.name!r} has no conv/linear layer producing its channels one to one")
    return [by_position(filters(model, n), group) for n in layers]


def l1_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per-channel L1 norm of the producing filters (normalised per layer, mean over coupled layers)."""
    return {g.name: aggregate([w.abs().sum(1) for w in member_filters(model, g)], normalise=True) for g in groups}


def l2_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per-channel L2 norm of the producing filters (normalised per layer, mean over coupled layers)."""
    return {g.name: aggregate([w.norm(dim=1) for w in member_filters(model, g)], normalise=True) for g in groups}


def fpgm_distance_sums(w: torch.Tensor) -> torch.Tensor:
    """Σ_k ‖w_j − w_k‖₂ for each row j of w (lowest = nearest the geometric median)."""
    return torch.cdist(w, w).sum(1)


def fpgm_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """FPGM: per-channel sum of distances to the layer's other filters (per-layer normalised, mean over members)."""
    return {g.name: aggregate([fpgm_distance_sums(w) for w in member_filters(model, g)], normalise=True)
            for g in groups}


def random_scores(groups: list[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random scores in [0, 1), drawn group by group from a generator seeded with seed."""
    gen = torch.Generator().manual_seed(int(seed))
    return {g.name: torch.rand(g.size, generator=gen) for g in groups}
