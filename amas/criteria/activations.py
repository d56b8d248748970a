"""Data-driven criteria: Taylor first order (Molchanov et al. 2019), HRank (Lin et al. 2020), APoZ (Hu et al. 2016).

All three read ``criteria.batches`` training batches with the model in eval mode (BN running statistics, no
state changes; the caller's model is left as it was).

- Taylor: per batch, the channel's (Σ_s g_s·w_s)² over its parameters s, averaged over the batches (g: gradient
  of the batch's mean cross-entropy). ``taylor_on="bn"`` (default, the paper's best variant for nets with BN,
  "a gate after BN"): the parameters are the producer BN's γ and β, i.e. (g_γ·γ + g_β·β)²; a producer without
  BN uses its own filter and bias. ``taylor_on="weight"``: the producing conv/linear filters (and bias).
  Scores are normalised per layer (mean 1) before the global ranking.
- HRank: the mean, over images, of the matrix rank of the channel's feature map, read at the group's producers
  (BN, or conv/linear without BN) after a ReLU. Ours: the ReLU is applied here rather than located in the graph;
  for ReLU/ReLU6 networks it is the map HRank reads (ReLU6 only clips, which rarely changes a rank), for SiLU or
  GELU networks it is an approximation. Per-layer normalised, like Taylor (ranks are bounded by the map size,
  which differs between stages).
- APoZ: the fraction of zeros after the ReLU over images and positions; score = 1 − APoZ (higher APoZ = less
  important). A fraction, so no per-layer normalisation.

Coupled groups take the mean over their producers (``amas.criteria.common``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from amas.channels.group import ChannelGroup
from amas.channels.masks import channel_dim
from amas.config import CriteriaConfig
from amas.criteria.common import aggregate, by_position, conv_members, model_device, take, to_group
from amas.data import Batches

__all__ = ["taylor_scores", "hrank_scores", "apoz_scores", "feature_rank"]


class _EvalMode:
    """Put a model in eval mode and restore its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)


def _taylor_members(model: nn.Module, group: ChannelGroup, on: str) -> list[tuple[str, bool]]:
    """(layer, reads via producer index map) pairs whose parameters carry the group's Taylor terms."""
    if on == "bn":
        return [(p, True) for p in group.producers]
    return [(n, False) for n in conv_members(model, group)]


def _channel_terms(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_s g_s·w_s per output channel over the module's weight (and bias)."""
    w = module.weight.detach()
    t = (grads["weight"] * w).flatten(1).sum(1) if w.dim() > 1 else grads["weight"] * w
    if getattr(module, "bias", None) is not None and "bias" in grads:
        t = t + grads["bias"] * module.bias.detach()
    return t


def taylor_scores(
    model: nn.Module, groups: list[ChannelGroup], batches: Batches, cfg: CriteriaConfig
) -> dict[str, torch.Tensor]:
    """Taylor first-order importance (Σ g·w)² per channel, averaged over cfg.batches batches."""
    members = {g.name: _taylor_members(model, g, cfg.taylor_on) for g in groups}
    layers = sorted({name for ms in members.values() for name, _ in ms})
    params: list[tuple[str, str, nn.Parameter]] = []
    for name in layers:
        mod = model.get_submodule(name)
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter):
                params.append((name, pname, p))
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    flags = [p.requires_grad for _, _, p in params]
    try:
        for _, _, p in params:
            p.requires_grad_(True)
        with _EvalMode(model), torch.enable_grad():
            for x, y in take(batches, cfg.batches):
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x).float(), y)
                grads = torch.autograd.grad(loss, [p for _, _, p in params], allow_unused=True)
                by_layer: dict[str, dict[str, torch.Tensor]] = {}
                for (name, pname, p), gr in zip(params, grads, strict=True):
                    by_layer.setdefault(name, {})[pname] = torch.zeros_like(p) if gr is None else gr.detach()
                for name in layers:
                    term = _channel_terms(model.get_submodule(name), by_layer[name]).double().cpu() ** 2
                    sums[name] = sums[name] + term if name in sums else term
                n += 1
    finally:
        for (_, _, p), f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    if n == 0:
        raise ValueError("the training batches are empty")
    out = {}
    for g in groups:
        per = [
            (to_group(sums[name] / n, g, name) if via_index else by_position(sums[name] / n, g).sum(1))
            for name, via_index in members[g.name]
        ]
        out[g.name] = aggregate(per, normalise=True)
    return out


def feature_rank(maps: torch.Tensor) -> torch.Tensor:
    """Matrix rank of each (image, channel) feature map of an N×C×H×W (or N×C) tensor → N×C."""
    if maps.dim() == 2:
        return (maps != 0).to(torch.float64)
    m = maps.reshape(maps.shape[0], maps.shape[1], maps.shape[2], -1) if maps.dim() > 4 else maps
    if m.dim() == 3:
        m = m.unsqueeze(2)
    return torch.linalg.matrix_rank(m.float().contiguous()).to(torch.float64)


def _producer_stats(model: nn.Module, groups: list[ChannelGroup], batches: Batches, n_batches: int,
                    stat: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over images of stat(ReLU(producer output)) per output channel, for every producer of the groups."""
    producers = sorted({p for g in groups for p in g.producers})
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            o = out.detach().float()
            v = stat(F.relu(o.movedim(channel_dim(module, o), 1)))  # N×C (a linear layer's features moved to dim 1)
            sums[name] = sums[name] + v.sum(0).cpu() if name in sums else v.sum(0).cpu()
            counts[name] = counts.get(name, 0) + v.shape[0]
        return fn

    device = model_device(model)
    try:
        for p in producers:
            handles.append(model.get_submodule(p).register_forward_hook(hook(p)))
        with _EvalMode(model), torch.no_grad():
            for x, _ in take(batches, n_batches):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if not counts:
        raise ValueError("the training batches are empty")
    return {p: sums[p] / counts[p] for p in producers}


def _zero_fraction(maps: torch.Tensor) -> torch.Tensor:
    """Fraction of zero entries per (image, channel)."""
    return (maps == 0).to(torch.float64).flatten(2).mean(2) if maps.dim() > 2 else (maps == 0).to(torch.float64)


def hrank_scores(
    model: nn.Module, groups: list[ChannelGroup], batches: Batches, cfg: CriteriaConfig
) -> dict[str, torch.Tensor]:
    """HRank: mean matrix rank of each channel's rectified feature maps over cfg.batches batches."""
    stats = _producer_stats(model, groups, batches, cfg.batches, feature_rank)
    return {g.name: aggregate([to_group(stats[p], g, p) for p in g.producers], normalise=True) for g in groups}


def apoz_scores(
    model: nn.Module, groups: list[ChannelGroup], batches: Batches, cfg: CriteriaConfig
) -> dict[str, torch.Tensor]:
    """1 − APoZ: one minus the average fraction of zeros after ReLU of each channel over cfg.batches batches."""
    stats = _producer_stats(model, groups, batches, cfg.batches, _zero_fraction)
    return {g.name: aggregate([1.0 - to_group(stats[p], g, p) for p in g.producers], normalise=False) for g in groups}
