"""The registry of channel criteria: one scorer object per method, planned the same way (in the manner of
Torch-Pruning's ``Importance`` classes plugging into its pruner).

A criterion scores each group's channels (higher = keep); the cut planner (amas.latency.plan.plan_scores: MACs through
``amas.channels.plan.plan_keep``, or latency) turns scores into kept channels (``plan_with``). Blend and srr plan their
channels themselves. ``source`` says what a pipeline cuts from: the teacher,
or the searched student whose masks are the scores (``amas``, the mask search).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from amas.channels.cost import CostModel
from amas.channels.group import ChannelGroup
from amas.config import CriteriaConfig, PruneConfig
from amas.errors import CriteriaError

__all__ = ["Criterion", "REGISTRY", "ScoreInputs", "register", "get", "check_name", "criteria_cfg", "need_batches",
           "plan_with"]

Scores = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ScoreInputs:
    """What a criterion may read besides the model and its groups: training and held-out batches, the criteria
    and cut settings, the seed, the class count, the searched masks (each criterion reads only its own)."""

    train: Any = None
    val: Any = None
    cfg: CriteriaConfig = field(default_factory=CriteriaConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    seed: int = 0
    num_classes: int | None = None
    masks: Scores | None = None


def criteria_cfg(cfg: Any) -> CriteriaConfig:
    """The criteria section: a CriteriaConfig as is, or a whole Config's .criteria."""
    if isinstance(cfg, CriteriaConfig):
        return cfg
    inner = getattr(cfg, "criteria", None)
    if isinstance(inner, CriteriaConfig):
        return inner
    raise CriteriaError(
        f"criteria settings must be a CriteriaConfig (config section 'criteria'), got {type(cfg).__name__}"
    )


def need_batches(method: str, batches: Any, what: str = "training") -> Any:
    """batches, or a one-line CriteriaError naming the method that reads them."""
    if batches is None:
        raise CriteriaError(f"method '{method}' reads {what} batches but none were given; pass the data split "
                            f"or choose a data-free method (l1, l2, fpgm, bn_scale, random, srr)")
    return batches


class Criterion:
    """A channel criterion: per-channel scores per group (higher = keep), planned at a MACs target."""

    name = ""
    reads_data = False  # scores or plans from batches of the data
    scores_channels = True  # False: plans its channels itself and has no per-channel scores
    source = "teacher"  # what the pipeline cuts from: "teacher", or "search" (the searched student, masks folded)

    def prepare(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> None:
        """In-place preparation of model before planning (none by default)."""

    def scores(self, model: nn.Module, groups: list[ChannelGroup], inputs: ScoreInputs) -> Scores:
        """Per-channel importance per group (higher = keep)."""
        scorers = ", ".join(n for n, c in REGISTRY.items() if c.scores_channels and c.source == "teacher")
        raise CriteriaError(f"method '{self.name}' plans its channels itself rather than scoring them; use "
                            f"plan_for_method or one of {scorers}")

    def plan(self, model: nn.Module, groups: list[ChannelGroup], cost: CostModel, target: float,
             inputs: ScoreInputs) -> Scores:
        """Kept channel indices per group at the target, for a criterion that plans itself (scores_channels False)."""
        raise CriteriaError(f"method '{self.name}' scores channels; plan them with amas.criteria.registry.plan_with")


def plan_with(criterion: Criterion, model: nn.Module, groups: list[ChannelGroup], cost: CostModel, target: float,
              inputs: ScoreInputs) -> Scores:
    """Kept channel indices per group at the target: a scoring criterion's scores planned by the cut planner (MACs
    or latency under inputs.prune, amas.latency.plan.plan_scores), or the plan of a criterion that plans itself."""
    if not criterion.scores_channels:
        return criterion.plan(model, groups, cost, target, inputs)
    from amas.latency.plan import plan_scores

    return plan_scores(criterion.scores(model, groups, inputs), model, groups, cost, target, inputs.prune)


REGISTRY: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Add a criterion to the registry under its name."""
    REGISTRY[criterion.name] = criterion
    return criterion


def check_name(method: str, allowed: tuple[str, ...]) -> str:
    """Return method if it is one of allowed, else raise a one-line CriteriaError with the closest name."""
    if method in allowed:
        return method
    close = difflib.get_close_matches(str(method), allowed, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise CriteriaError(f"unknown pruning method '{method}'{hint}; choose one of {', '.join(allowed)}")


def get(method: str, allowed: tuple[str, ...] | None = None) -> Criterion:
    """The registered criterion of that name (among allowed names), or a one-line CriteriaError."""
    return REGISTRY[check_name(method, tuple(REGISTRY) if allowed is None else allowed)]
