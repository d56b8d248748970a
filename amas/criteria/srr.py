"""Structural redundancy reduction (Wang, Li, Wang, CVPR 2021), as amas implements it.

The paper's method: per conv layer, a graph whose vertices are the layer's filters, normalised to unit length,
with an edge where two filters are closer than γ. A layer is more redundant when its graph has fewer connected
components (a smaller quotient space) and a smaller ℓ-covering number (the fewest vertices whose ℓ-hop
neighbourhoods cover the graph; NP-hard, estimated greedily). Pruning repeatedly takes one filter from the most
redundant layer and updates that layer's redundancy, until the FLOPs target; inside a layer the filters with the
smallest L1 norm go first; the pruned network is fine-tuned afterwards.

Ours (not public or not applicable as published):
- Redundancy of a layer with n remaining filters, c components and greedy ℓ-covering number κ:
  r = 1 − (c + κ) / (2n), in [0, 1): 0 when no two filters are within γ, near 1 when all filters coincide.
  Dividing by n makes layers of different widths comparable; the two counts weigh equally.
- γ: one value for every layer, as in the paper. ``criteria.srr_gamma`` > 0 sets it; the default 0 picks it
  from the network: the ``criteria.srr_edge_fraction`` quantile (default 5%) of the pairwise distances of all
  layers' filters pooled. Trained filters are nearly orthogonal (distances cluster just under √2 ≈ 1.41 on the
  Fashion-MNIST ResNet-20), so a fixed γ such as 1.0 finds no edge at all and every layer scores r = 0.
  ℓ = ``criteria.srr_ell`` (1 or 2 hops). Ties in r (e.g. several layers without any edge) go to the layer with
  more remaining filters, then to the earlier layer.
- A "layer" is a channel group; a coupled group's filter for channel j concatenates its members' unit-normalised
  filters j (each member counts equally) and is normalised again. The L1 order is ``norms.l1_scores``.
- Stop: as soon as the MACs of the kept counts, each rounded up to ``prune.round_to`` and at least
  ``prune.min_channels`` (exactly what the pruned model will have, from ``CostModel``), meet the target; a
  rounded-up group keeps its largest-L1 filters. Groups at ``min_channels`` leave the competition; if every group
  is there and the target is not met, the target is out of reach (one-line PruneError, as ``plan_keep``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.group import ChannelGroup
from amas.channels.plan import rounded_count
from amas.config import CriteriaConfig, PruneConfig
from amas.criteria.norms import l1_scores, member_filters
from amas.errors import PruneError

__all__ = [
    "group_filters",
    "connected_components",
    "covering_number",
    "redundancy",
    "layer_redundancy",
    "plan",
    "auto_gamma",
]


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    norm = w.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, w / norm.clamp(min=1e-300), torch.zeros_like(w))


def group_filters(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Unit-length filter per group channel (members' unit filters concatenated, then normalised), float64."""
    return _unit_rows(torch.cat([_unit_rows(w) for w in member_filters(model, group)], 1))


def connected_components(adj: torch.Tensor) -> int:
    """Number of connected components of an undirected graph given by a boolean adjacency matrix."""
    n = adj.shape[0]
    if n == 0:
        return 0
    link = adj | torch.eye(n, dtype=torch.bool)
    labels = torch.arange(n)
    big = torch.full((n, n), n, dtype=labels.dtype)
    while True:
        new = torch.where(link, labels.unsqueeze(0).expand(n, n), big).min(1).values
        if torch.equal(new, labels):
            return int(torch.unique(labels).numel())
        labels = new


def covering_number(adj: torch.Tensor, ell: int = 1) -> int:
    """Greedy ℓ-covering number: vertices picked (most newly covered first) until all are within ℓ hops of one."""
    n = adj.shape[0]
    if n == 0:
        return 0
    step = (adj | torch.eye(n, dtype=torch.bool)).double()
    reach = step.clone()
    for _ in range(max(1, int(ell)) - 1):
        reach = ((reach @ step) > 0).double()
    reach_b = reach > 0
    uncovered = torch.ones(n, dtype=torch.bool)
    count = 0
    while bool(uncovered.any()):
        gains = (reach_b & uncovered.unsqueeze(0)).sum(1)
        pick = int(torch.argmax(gains))
        uncovered &= ~reach_b[pick]
        count += 1
    return count


@dataclass
class Redundancy:
    """A layer's graph statistics: filters, connected components, greedy ℓ-covering number, redundancy r."""

    filters: int
    components: int
    covering: int
    redundancy: float


def redundancy(dist: torch.Tensor, gamma: float, ell: int = 1) -> Redundancy:
    """Redundancy of a layer from the pairwise distances of its unit-normalised filters."""
    n = dist.shape[0]
    if n <= 1:
        return Redundancy(n, n, n, 0.0)
    adj = dist < gamma
    adj.fill_diagonal_(False)
    c, k = connected_components(adj), covering_number(adj, ell)
    return Redundancy(n, c, k, 1.0 - (c + k) / (2.0 * n))


def auto_gamma(dists: list[torch.Tensor], fraction: float) -> float:
    """The given quantile of all off-diagonal pairwise distances pooled over layers."""
    pooled = torch.cat([d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)] for d in dists])
    if pooled.numel() == 0:
        return 0.0
    return float(torch.quantile(pooled.double(), min(max(float(fraction), 0.0), 1.0)))


def _distances(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    out = {}
    for g in groups:
        f = group_filters(model, g)
        out[g.name] = torch.cdist(f, f)
    return out


def _gamma(dists: dict[str, torch.Tensor], cfg: CriteriaConfig) -> float:
    """criteria.srr_gamma, or the automatic one when it is 0 (ties at the quantile count as edges)."""
    if cfg.srr_gamma > 0:
        return float(cfg.srr_gamma)
    return math.nextafter(auto_gamma(list(dists.values()), cfg.srr_edge_fraction), math.inf)


def layer_redundancy(model: nn.Module, groups: list[ChannelGroup], cfg: CriteriaConfig) -> dict[str, Redundancy]:
    """Redundancy of every group's full set of filters."""
    dists = _distances(model, groups)
    gamma = _gamma(dists, cfg)
    return {g.name: redundancy(dists[g.name], gamma, cfg.srr_ell) for g in groups}


def plan(model: nn.Module, groups: list[ChannelGroup], cost_model: CostModel, target_reduction: float,
         cfg: CriteriaConfig, prune_cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """Kept channels per group: remove smallest-L1 filters one by one from the most redundant group to the target."""
    if not 0.0 <= float(target_reduction) < 1.0:
        raise PruneError(
            f"target MACs reduction must be in [0, 1), got {target_reduction}; e.g. 0.5 removes half the MACs"
        )
    min_ch, round_to = int(prune_cfg.min_channels), int(prune_cfg.round_to)
    budget = (1.0 - float(target_reduction)) * cost_model.total_macs
    l1 = l1_scores(model, groups)
    order = {g.name: sorted(range(g.size), key=lambda i: (float(l1[g.name][i]), i)) for g in groups}  # removal order
    dist = _distances(model, groups)
    gamma = _gamma(dist, cfg)
    removed = {g.name: 0 for g in groups}
    floor = {g.name: min(-(-min_ch // g.conv_groups), g.size) for g in groups}
    position = {g.name: i for i, g in enumerate(groups)}
    sizes = {g.name: g.size for g in groups}
    units = {g.name: g.conv_groups for g in groups}

    def current(name: str) -> Redundancy:
        rest = torch.tensor(order[name][removed[name]:], dtype=torch.long)
        return redundancy(dist[name][rest][:, rest], gamma, cfg.srr_ell)

    def counts() -> dict[str, int]:
        return {n: rounded_count(sizes[n] - removed[n], sizes[n], round_to, min_ch, unit=units[n]) for n in sizes}

    red = {g.name: current(g.name) for g in groups}
    while cost_model.macs(counts()) > budget:
        open_groups = [n for n in sizes if sizes[n] - removed[n] > floor[n]]
        if not open_groups:
            reach = 100.0 * (1.0 - cost_model.macs(counts()) / cost_model.total_macs)
            raise PruneError(
                f"a {100 * target_reduction:.1f}% MACs reduction is out of reach: at most {reach:.1f}% with "
                f"min_channels={min_ch}, round_to={round_to} on the prunable groups; lower the target or round_to"
            )
        pick = max(open_groups, key=lambda n: (red[n].redundancy, sizes[n] - removed[n], -position[n]))
        removed[pick] += 1
        red[pick] = current(pick)
    kept = counts()
    return {n: torch.tensor(sorted(order[n][sizes[n] - kept[n]:]), dtype=torch.long) for n in sizes}
