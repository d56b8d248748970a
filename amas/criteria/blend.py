"""Blended pruning criteria (He, Huang, Liang, Liang, Yang, ICANN 2021), as amas implements it.

The paper's method, as far as it is public: different criteria rank filters inconsistently; (1) per layer,
cluster the criteria by the Spearman rank correlation of their importance scores and keep representatives;
(2) calibrate the selected criteria and blend them, searching the blend with an evolutionary algorithm whose
fitness is the accuracy of the pruned network. The pool, clustering rule, calibration formula and EA settings
are not public; the choices below are ours.

Ours:
- Pool: ``criteria.blend_pool`` (default l1, l2, fpgm, bn_scale, taylor, hrank, apoz; random is left out), each
  scored by ``amas.criteria.blend_pool_scores`` (data-driven ones on the training batches; BN sparsity training is
  never run inside the blend).
- Clustering, per group: Spearman ρ between every pair of criteria over the group's channels (Pearson
  correlation of average ranks, ties averaged); complete-linkage agglomerative clustering that merges two
  clusters while every pair across them has ρ ≥ ``criteria.blend_rho`` (default 0.8). A criterion whose
  scores are constant in a group carries no ranking and has ρ = 0 with every other one. Representative of a
  cluster: its member with the highest mean ρ to the other members (ties: pool order).
- Calibration: each representative's scores are rank-normalised within the group to (0, 1] (average rank /
  number of channels), which puts criteria of very different scales (|γ|, ranks, (Σg·w)²) on one scale.
- Blend: group score = Σ_reps w_c·r_c / Σ_reps w_c with one weight w_c ∈ [0, 1] per pool criterion, shared by
  all groups; a criterion's weight counts in a group only where it represents its cluster, so a cluster of
  near-identical criteria (l1, l2, fpgm usually) votes once, not three times. With
  ``criteria.blend_layer_scales`` the genome also holds one factor exp(s_g), s_g ∈ [−1, 1], per group (lets the
  search move channels between layers; off by default, so the blend only changes the ranking).
- Planning: the blended scores go through ``prune.plan_keep`` (global score-per-MAC ranking, min_channels,
  round_to) like every score-based criterion, so the MACs target is met the same way.
- Fitness: top-1 accuracy of the pruned network, before any fine-tuning, on the first
  ``criteria.blend_val_batches`` held-out validation batches (never the test set); ties are broken by lower
  validation cross-entropy. Plans that keep the same channels are evaluated once (cache).
- EA: population ``blend_population``; generation 0 holds the equal blend (all weights 1, scales 0) and random
  genomes; each generation keeps the ``blend_elite`` best unchanged and breeds the rest by binary tournament
  selection, uniform crossover and Gaussian mutation (std ``blend_mutation``, clipped to the gene's range), for
  ``blend_generations`` generations; every random draw comes from a generator seeded with ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.cut import prune_model
from amas.channels.group import ChannelGroup
from amas.channels.plan import plan_keep
from amas.config import CriteriaConfig, PruneConfig
from amas.criteria.common import model_device, take
from amas.data import Batches
from amas.engine.loop import evaluate

__all__ = ["BlendResult", "average_ranks", "spearman_matrix", "cluster_criteria", "blend_scores", "search"]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of x with ties given their average rank."""
    x = x.detach().double().flatten().cpu()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():  # average tied ranks
        total = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        count = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (total / count)[inverse]
    return ranks


def spearman_matrix(scores: torch.Tensor) -> torch.Tensor:
    """Spearman ρ between the rows of a criteria × channels score matrix (0 for a constant row, 1 on the diagonal)."""
    r = torch.stack([average_ranks(s) for s in scores])
    r = r - r.mean(1, keepdim=True)
    norm = r.norm(dim=1)
    ok = norm > 1e-12
    rho = torch.zeros(r.shape[0], r.shape[0], dtype=torch.float64)
    if ok.any():
        rn = r[ok] / norm[ok].unsqueeze(1)
        idx = torch.nonzero(ok).flatten()
        rho[idx.unsqueeze(1), idx.unsqueeze(0)] = (rn @ rn.T).clamp(-1, 1)
    rho.fill_diagonal_(1.0)
    return rho


def cluster_criteria(rho: torch.Tensor, threshold: float) -> list[list[int]]:
    """Complete-linkage clusters of criteria (ρ ≥ threshold between all members), each led by its representative."""
    clusters = [[i] for i in range(rho.shape[0])]
    while len(clusters) > 1:
        best, pair = -math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(rho[clusters[a]][:, clusters[b]].min())
                if link > best:
                    best, pair = link, (a, b)
        if pair is None or best < threshold:
            break
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    out = []
    for c in clusters:
        if len(c) == 1:
            out.append(c)
            continue
        mean_rho = [(float(rho[i, [j for j in c if j != i]].mean()), -i) for i in c]
        rep = c[max(range(len(c)), key=lambda k: mean_rho[k])]
        out.append([rep] + [i for i in c if i != rep])
    return sorted(out, key=lambda c: c[0])


@dataclass
class _GroupBlend:
    reps: list[int]  # pool positions of the representatives
    calibrated: torch.Tensor  # reps × channels, rank-normalised to (0, 1]
    clusters: list[list[int]]


def _prepare(
    pool_scores: list[dict[str, torch.Tensor]], groups: list[ChannelGroup], rho: float
) -> dict[str, _GroupBlend]:
    """Per group: Spearman clustering of the pool, representatives and their calibrated scores."""
    out = {}
    for g in groups:
        s = torch.stack([ps[g.name].double().flatten() for ps in pool_scores])
        clusters = cluster_criteria(spearman_matrix(s), rho)
        reps = [c[0] for c in clusters]
        cal = torch.stack([average_ranks(s[i]) / g.size for i in reps])
        out[g.name] = _GroupBlend(reps, cal, clusters)
    return out


def blend_scores(prepared: dict[str, _GroupBlend], groups: list[ChannelGroup], weights: torch.Tensor,
                 scales: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Blended per-channel scores per group for pool weights (and optional per-group log-scales)."""
    out = {}
    for gi, g in enumerate(groups):
        pb = prepared[g.name]
        w = weights.double()[pb.reps]
        if float(w.sum()) <= 1e-12:
            w = torch.ones_like(w)
        s = (w.unsqueeze(1) * pb.calibrated).sum(0) / w.sum()
        if scales is not None:
            s = s * math.exp(float(scales[gi]))
        out[g.name] = s.float()
    return out


@dataclass
class BlendResult:
    """The searched blend: kept channels, best genome, its fitness, and the best fitness of every generation."""

    keep: dict[str, torch.Tensor]
    weights: dict[str, float]
    scales: dict[str, float] | None
    fitness: float  # held-out accuracy (%) of the pruned network before fine-tuning
    val_loss: float
    history: list[float] = field(default_factory=list)  # best accuracy per generation
    clusters: dict[str, list[list[str]]] = field(default_factory=dict)  # per group, representative first
    evaluations: int = 0


def search(model: nn.Module, groups: list[ChannelGroup], cost_model: CostModel, target_reduction: float, *,
           pool_scores: dict[str, dict[str, torch.Tensor]], val: Batches, cfg: CriteriaConfig,
           prune_cfg: PruneConfig, num_classes: int, seed: int = 0) -> BlendResult:
    """Cluster the pool per group, then evolve the blend weights; fitness = held-out accuracy after pruning.

    pool_scores: each pool criterion's channel scores (``amas.criteria.blend_pool_scores``).
    """
    from amas.errors import CriteriaError

    pool = list(cfg.blend_pool)
    if not pool:
        raise CriteriaError("criteria.blend_pool is empty; list at least one criterion, e.g. [l1, taylor, apoz]")
    if cfg.blend_elite >= cfg.blend_population:
        raise CriteriaError(f"criteria.blend_elite={cfg.blend_elite} leaves no room to breed in a population of "
                            f"{cfg.blend_population}; lower blend_elite or raise blend_population")
    prepared = _prepare([pool_scores[c] for c in pool], groups, cfg.blend_rho)
    device = model_device(model)
    val_batches = [(x.to(device), y.to(device)) for x, y in take(val, cfg.blend_val_batches)]
    if not val_batches:
        raise CriteriaError("the validation split is empty; blend needs held-out batches (data.val_size > 0)")
    n_w, n_s = len(pool), (len(groups) if cfg.blend_layer_scales else 0)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    cache: dict[tuple, tuple[float, float]] = {}

    def plan(genome: torch.Tensor) -> dict[str, torch.Tensor]:
        scales = genome[n_w:] if n_s else None
        scores = blend_scores(prepared, groups, genome[:n_w], scales)
        return plan_keep(scores, cost_model, target_reduction, prune_cfg.min_channels, prune_cfg.round_to)

    def fitness(genome: torch.Tensor) -> tuple[float, float]:
        keep = plan(genome)
        key = tuple((n, tuple(v.tolist())) for n, v in sorted(keep.items()))
        if key not in cache:
            pruned = prune_model(model, groups, keep)
            res = evaluate(pruned, val_batches, num_classes, device)  # type: ignore[arg-type]
            cache[key] = (res["acc"], -res["loss"])
        return cache[key]

    lo = torch.cat([torch.zeros(n_w), -torch.ones(n_s)]).double()
    hi = torch.ones(n_w + n_s, dtype=torch.float64)

    def random_genome() -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n_w + n_s, generator=gen, dtype=torch.float64)

    population = [torch.cat([torch.ones(n_w), torch.zeros(n_s)]).double()]
    population += [random_genome() for _ in range(cfg.blend_population - 1)]
    history: list[float] = []
    best: tuple[tuple[float, float], torch.Tensor] | None = None
    for generation in range(cfg.blend_generations):
        fits = [fitness(p) for p in population]
        ranked = sorted(range(len(population)), key=lambda i: (fits[i], -i), reverse=True)
        if best is None or fits[ranked[0]] > best[0]:
            best = (fits[ranked[0]], population[ranked[0]].clone())
        history.append(best[0][0])
        if generation == cfg.blend_generations - 1:
            break

        def tournament(population: list[torch.Tensor] = population, fits: list = fits) -> torch.Tensor:
            i, j = torch.randint(len(population), (2,), generator=gen).tolist()
            return population[i] if (fits[i], -i) >= (fits[j], -j) else population[j]

        children = [population[i].clone() for i in ranked[: cfg.blend_elite]]
        while len(children) < cfg.blend_population:
            a, b = tournament(), tournament()
            take_a = torch.rand(n_w + n_s, generator=gen) < 0.5
            child = torch.where(take_a, a, b)
            child = child + cfg.blend_mutation * (hi - lo) * torch.randn(n_w + n_s, generator=gen, dtype=torch.float64)
            children.append(torch.minimum(torch.maximum(child, lo), hi))
        population = children
    assert best is not None
    genome = best[1]
    keep = plan(genome)
    names = {g.name: g for g in groups}
    return BlendResult(
        keep=keep,
        weights={c: round(float(genome[i]), 4) for i, c in enumerate(pool)},
        scales={g.name: round(float(genome[n_w + i]), 4) for i, g in enumerate(groups)} if n_s else None,
        fitness=best[0][0],
        val_loss=-best[0][1],
        history=history,
        clusters={n: [[pool[i] for i in c] for c in prepared[n].clusters] for n in names},
        evaluations=len(cache),
    )
