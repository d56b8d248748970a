"""Baseline pruning criteria on amas' removal path: per-channel scores per group, or a plan at a MACs target.

Methods (``METHODS``): l1, l2, fpgm, random (``norms``), bn_scale (``bn_scale``), taylor, hrank, apoz
(``activations``), blend (``blend``, He et al. 2021) and srr (``srr``, Wang et al. 2021). Every score is
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

import difflib
from typing import Any

import torch
from torch import nn

from amas.config import CriteriaConfig, PruneConfig
from amas.data import Batches
from amas.errors import AmasError
from amas.masks import ChannelGroup, CostModel
from amas.prune import plan_keep

__all__ = [
    "METHODS",
    "SCORE_METHODS",
    "DATA_METHODS",
    "CriteriaError",
    "channel_scores",
    "plan_for_method",
    "check_method",
    "prepare_model",
]

METHODS: tuple[str, ...] = ("l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "apoz", "random", "blend", "srr")
SCORE_METHODS: tuple[str, ...] = ("l1", "l2", "fpgm", "bn_scale", "taylor", "hrank", "apoz", "random")
DATA_METHODS: tuple[str, ...] = ("taylor", "hrank", "apoz")


class CriteriaError(AmasError):
    """A pruning method that is unknown or lacks what it needs."""


def check_method(method: str, allowed: tuple[str, ...] = METHODS) -> str:
    """Return method if it is one of allowed, else raise a one-line CriteriaError with the closest name."""
    if method in allowed:
        return method
    close = difflib.get_close_matches(str(method), allowed, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise CriteriaError(f"unknown pruning method '{method}'{hint}; choose one of {', '.join(allowed)}")


def _criteria_cfg(cfg: Any) -> CriteriaConfig:
    """The criteria section: a CriteriaConfig as is, or a whole Config's .criteria."""
    if isinstance(cfg, CriteriaConfig):
        return cfg
    inner = getattr(cfg, "criteria", None)
    if isinstance(inner, CriteriaConfig):
        return inner
    raise CriteriaError(
        f"criteria settings must be a CriteriaConfig (config section 'criteria'), got {type(cfg).__name__}"
    )


_SPARSIFIED = "_amas_bn_sparsified"


def prepare_model(method: str, model: nn.Module, groups: list[ChannelGroup], train: Batches | None, cfg: CriteriaConfig,
                  *, num_classes: int) -> nn.Module:
    """In-place preparation a method needs before planning (bn_scale + bn_sparsity: sparsity training), once."""
    check_method(method)
    cfg = _criteria_cfg(cfg)
    if method == "bn_scale" and cfg.bn_sparsity and not getattr(model, _SPARSIFIED, False):
        from amas.criteria.bn_scale import sparsity_train

        data = _need_batches("bn_scale with criteria.bn_sparsity", train)
        sparsity_train(model, groups, data, cfg, num_classes)
        setattr(model, _SPARSIFIED, True)  # deep copies carry it: planning on a copy does not train again
    return model


def _need_batches(method: str, batches: Batches | None, what: str = "training") -> Batches:
    if batches is None:
        raise CriteriaError(f"method '{method}' reads {what} batches but none were given; pass the data split "
                            f"or choose a data-free method (l1, l2, fpgm, bn_scale, random, srr)")
    return batches


def channel_scores(method: str, model: nn.Module, groups: list[ChannelGroup], batches: Batches | None,
                   cfg: CriteriaConfig, *, seed: int = 0, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Per-channel importance per group (higher = keep) for a score-based method."""
    check_method(method)
    cfg = _criteria_cfg(cfg)
    if method in ("blend", "srr"):
        raise CriteriaError(f"method '{method}' plans its channels itself rather than scoring them; "
                            f"use plan_for_method or one of {', '.join(SCORE_METHODS)}")
    if not groups:
        return {}
    if method == "l1":
        from amas.criteria.norms import l1_scores
        return l1_scores(model, groups)
    if method == "l2":
        from amas.criteria.norms import l2_scores
        return l2_scores(model, groups)
    if method == "fpgm":
        from amas.criteria.norms import fpgm_scores
        return fpgm_scores(model, groups)
    if method == "random":
        from amas.criteria.norms import random_scores
        return random_scores(groups, seed)
    if method == "bn_scale":
        from amas.criteria.bn_scale import bn_scale_scores
        prepare_model(method, model, groups, batches, cfg, num_classes=num_classes or _num_classes(model))
        return bn_scale_scores(model, groups)
    from amas.criteria.activations import apoz_scores, hrank_scores, taylor_scores
    data = _need_batches(method, batches)
    fn = {"taylor": taylor_scores, "hrank": hrank_scores, "apoz": apoz_scores}[method]
    return fn(model, groups, data, cfg)


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
                    target_reduction: float, *, train: Batches | None, val: Batches | None, cfg: CriteriaConfig,
                    prune_cfg: PruneConfig, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Kept channel indices per group at the MACs target, chosen by the given method."""
    check_method(method)
    cfg = _criteria_cfg(cfg)
    if method == "srr":
        from amas.criteria import srr
        return srr.plan(model, groups, cost_model, target_reduction, cfg, prune_cfg)
    if method == "blend":
        from amas.criteria import blend
        for c in cfg.blend_pool:
            check_method(c, SCORE_METHODS)
        if any(c in DATA_METHODS for c in cfg.blend_pool):
            _need_batches("blend (its pool has data-driven criteria)", train)
        held_out = _need_batches("blend", val, "held-out validation")
        return blend.search(model, groups, cost_model, target_reduction, train=train, val=held_out, cfg=cfg,
                            prune_cfg=prune_cfg, num_classes=num_classes, seed=seed).keep
    scores = channel_scores(method, model, groups, train, cfg, seed=seed, num_classes=num_classes)
    return plan_keep(scores, cost_model, target_reduction, prune_cfg.min_channels, prune_cfg.round_to)
