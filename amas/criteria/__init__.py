"""Baseline pruning criteria on amas' removal path: per-channel scores per group, or a plan at a MACs target.

Methods (``METHODS``, from the registry in ``amas.criteria.registry``): l1, l2, fpgm, random (``norms``), bn_scale
(``bn_scale``), taylor, hrank, apoz (``activations``), blend (``blend``, He et al. 2021) and srr (``srr``, Wang et
al. 2021); ``amas`` (the searched masks as scores) is registered too, cut from the searched student. Every score is
"higher = keep". Score-based methods plan through ``prune.plan_keep`` (global ranking by score per MAC saved,
``prune.min_channels``, ``prune.round_to``); blend evolves a blend of the others and plans each candidate the
same way; srr removes filters layer by layer from the most redundant layer until the MACs target.

How each criterion aggregates a coupled group's members (several convs/BNs per group) is in
``amas.criteria.common``: per-layer scores, each divided by its layer's mean (except |γ|, APoZ and random, which
share one scale across layers already), then the mean over the group's members.

Network slimming's sparsity training (``criteria.bn_sparsity``) changes the model: ``prepare_model`` runs it in
place once (a marker on the model, carried by deep copies, stops it running again), so a caller that plans
several targets on copies of one source model calls ``prepare_model`` on the source first and prunes that
source; ``channel_scores``/``plan_for_method`` for bn_scale call it themselves otherwise (training the model
they are given). ``cfg`` may also be a whole ``Config`` (its ``criteria`` section is used).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.group import ChannelGroup
from amas.config import CriteriaConfig, PruneConfig
from amas.criteria.registry import (
    REGISTRY,
    Criterion,
    ScoreInputs,
    check_name,
    criteria_cfg,
    get,
    need_batches,
    plan_with,
    register,
)
from amas.errors import CriteriaError

__all__ = ["METHODS", "Criterion", "REGISTRY", "ScoreInputs", "blend_pool_scores", "channel_scores", "plan_for_method",
           "plan_with", "check_method", "prepare_model", "register"]

Scores = dict[str, torch.Tensor]


class _Filters(Criterion):
    """A data-free score of each channel's producing filters (amas.criteria.norms)."""

    def __init__(self, name: str, fn: str) -> None:
        self.name, self._fn = name, fn

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """The filters' norm (or FPGM distance sum) per channel."""
        from amas.criteria import norms

        return getattr(norms, self._fn)(model, groups)


class _Random(Criterion):
    name = "random"

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """Seeded uniform scores."""
        from amas.criteria.norms import random_scores

        return random_scores(groups, inputs.seed)


_SPARSIFIED = "_amas_bn_sparsified"


class _BnScale(Criterion):
    name, reads_data = "bn_scale", True  # its sparsity training (criteria.bn_sparsity) reads training batches

    def prepare(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> None:
        """Network slimming's sparsity training (criteria.bn_sparsity), in place and once per model."""
        if inputs.cfg.bn_sparsity and not getattr(model, _SPARSIFIED, False):
            from amas.criteria.bn_scale import sparsity_train

            sparsity_train(model, groups, need_batches("bn_scale with criteria.bn_sparsity", inputs.train),
                           inputs.cfg, inputs.num_classes or _num_classes(model))
            setattr(model, _SPARSIFIED, True)  # deep copies carry it: planning on a copy does not train again

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """|γ| of each channel's BatchNorm (after the sparsity training, when set)."""
        from amas.criteria.bn_scale import bn_scale_scores

        self.prepare(model, groups, inputs)
        return bn_scale_scores(model, groups)


class _Activations(Criterion):
    """A data-driven score from forward (and backward) passes (amas.criteria.activations)."""

    reads_data = True

    def __init__(self, name: str, fn: str) -> None:
        self.name, self._fn = name, fn

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """Scores from the criterion's statistics over cfg.batches training batches."""
        from amas.criteria import activations

        return getattr(activations, self._fn)(model, groups, need_batches(self.name, inputs.train), inputs.cfg)


class _Blend(Criterion):
    name, reads_data, scores_channels = "blend", True, False

    def plan(self, model: nn.Module, groups: list[ChannelGroup], cost: CostModel, target: float,
             inputs: ScoreInputs) -> Scores:
        """He et al.'s blended criteria: an evolutionary search of blend weights on held-out accuracy."""
        from amas.criteria import blend

        scorers = [get(c, _SCORERS) for c in inputs.cfg.blend_pool]
        if any(c.reads_data for c in scorers):
            need_batches("blend (its pool has data-driven criteria)", inputs.train)
        held_out = need_batches("blend", inputs.val, "held-out validation")
        pool_scores = blend_pool_scores(model, groups, inputs.train, inputs.cfg, seed=inputs.seed)
        return blend.search(model, groups, cost, target, pool_scores=pool_scores, val=held_out, cfg=inputs.cfg,
                            prune_cfg=inputs.prune, num_classes=inputs.num_classes, seed=inputs.seed).keep


class _Srr(Criterion):
    name, scores_channels = "srr", False

    def plan(self, model: nn.Module, groups: list[ChannelGroup], cost: CostModel, target: float,
             inputs: ScoreInputs) -> Scores:
        """Wang et al.'s structural redundancy reduction, layer by layer from the most redundant one."""
        from amas.criteria import srr

        return srr.plan(model, groups, cost, target, inputs.cfg, inputs.prune)


class SearchedMasks(Criterion):
    """The mask search's result as a criterion: |mask| per channel, cut from the searched student (masks folded)."""

    name, source = "amas", "search"

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """|m| of the searched masks, for the groups the model has."""
        masks = inputs.masks
        if masks is None:
            raise CriteriaError("method 'amas' scores channels by searched masks, but none were given; run the search")
        names = {g.name for g in groups}
        unknown = [n for n in masks if n not in names]
        if unknown:
            raise CriteriaError(f"the searched masks name group {unknown[0]!r}, which the student does not have; "
                                "redo the search with --redo search")
        return {n: torch.as_tensor(m).abs() for n, m in masks.items()}


for _c in (_Filters("l1", "l1_scores"), _Filters("l2", "l2_scores"), _Filters("fpgm", "fpgm_scores"), _BnScale(),
           _Activations("taylor", "taylor_scores"), _Activations("hrank", "hrank_scores"),
           _Activations("apoz", "apoz_scores"), _Random(), _Blend(), _Srr(), SearchedMasks()):
    register(_c)

# the baselines: every criterion that plans on the teacher
METHODS: tuple[str, ...] = tuple(n for n, c in REGISTRY.items() if c.source == "teacher")
_SCORERS: tuple[str, ...] = tuple(n for n in METHODS if REGISTRY[n].scores_channels)


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    """Return method if it is one of allowed, else raise a one-line CriteriaError with the closest name."""
    return check_name(method, allowed)


def prepare_model(method: str, model: nn.Module, groups: list[ChannelGroup], train: Any, cfg: CriteriaConfig,
                  *, num_classes: int) -> nn.Module:
    """In-place preparation a method needs before planning (bn_scale + bn_sparsity: sparsity training), once."""
    get(method).prepare(model, groups, ScoreInputs(train=train, cfg=criteria_cfg(cfg), num_classes=num_classes))
    return model


def channel_scores(method: str, model: nn.Module, groups: list[ChannelGroup], batches: Any,
                   cfg: CriteriaConfig, *, seed: int = 0, num_classes: int | None = None) -> Scores:
    """Per-channel importance per group (higher = keep) for a score-based method."""
    criterion = get(method, METHODS)
    inputs = ScoreInputs(train=batches, cfg=criteria_cfg(cfg), seed=seed, num_classes=num_classes)
    if not criterion.scores_channels:
        criterion.scores(model, groups, inputs)  # says it plans itself
    if not groups:
        return {}
    return criterion.scores(model, groups, inputs)


def blend_pool_scores(model: nn.Module, groups: list[ChannelGroup], train: Any, cfg: CriteriaConfig, *,
                      seed: int = 0) -> dict[str, Scores]:
    """The channel scores of each criterion of cfg.blend_pool, as blend.search takes them (no BN sparsity training)."""
    data_free_cfg = replace(criteria_cfg(cfg), bn_sparsity=False)
    return {c: channel_scores(c, model, groups, train, data_free_cfg, seed=seed) for c in data_free_cfg.blend_pool}


def _num_classes(model: nn.Module) -> int:
    """Output width of the model's last linear layer (the class count), for sparsity training's accuracy metric."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise CriteriaError("cannot tell the class count of this model; pass num_classes to channel_scores")
    return int(last.out_features)


def plan_for_method(method: str, model: nn.Module, groups: list[ChannelGroup], cost_model: CostModel,
                    target_reduction: float, *, train: Any, val: Any, cfg: CriteriaConfig,
                    prune_cfg: PruneConfig, num_classes: int, seed: int = 0) -> Scores:
    """Kept channel indices per group at the MACs target, chosen by the given method."""
    inputs = ScoreInputs(train=train, val=val, cfg=criteria_cfg(cfg), prune=prune_cfg, seed=seed,
                         num_classes=num_classes)
    return plan_with(get(method, METHODS), model, groups, cost_model, target_reduction, inputs)
