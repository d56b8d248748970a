"""BN scale criterion (network slimming, Liu et al. 2017): a channel's importance is |γ| of its BatchNorm.

Scores are raw |γ| (no per-layer normalisation): network slimming ranks all channels of the network by one
global threshold on |γ|, which the sparsity training makes meaningful across layers. A group with several BN
producers (coupled channels) takes the mean |γ| over them. A group without any BN (rare: a conv/linear
followed by no BN) falls back to the mean-normalised L1 norm of its filters, the closest data-free proxy.

Sparsity training (``criteria.bn_sparsity``): before scoring, the model is fine-tuned *in place* with
``lambda · Σ|γ|`` over the BNs of the prunable groups added to the cross-entropy, through the one engine
(``Trainer`` with ``BNSparsityObjective``) for ``criteria.bn_sparsity_train`` (default 1 epoch, lr 0.01). In
place because network slimming prunes the sparsified network, not the original one. Ours: the penalty covers
only the BNs whose γ decide the pruning (the groups' producers); the paper penalises every BN, but a γ that
is never thresholded gains nothing from being pushed to zero.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from amas.channels.group import ChannelGroup
from amas.config import CriteriaConfig
from amas.criteria.common import aggregate, is_bn, model_device, to_group
from amas.criteria.norms import l1_scores
from amas.data import Batches
from amas.engine.loop import Objective, StepOutput, Trainer

__all__ = ["bn_scale_scores", "BNSparsityObjective", "sparsity_train", "group_bns"]


def group_bns(model: nn.Module, group: ChannelGroup) -> list[str]:
    """The BatchNorm producers of a group."""
    return [p for p in group.producers if is_bn(model.get_submodule(p))]


def bn_scale_scores(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """|γ| per channel (mean over the group's BNs); L1 of the filters for a group without BN."""
    scores: dict[str, torch.Tensor] = {}
    no_bn = []
    for g in groups:
        bns = group_bns(model, g)
        if not bns:
            no_bn.append(g)
            continue
        scores[g.name] = aggregate([to_group(model.get_submodule(b).weight.abs(), g, b) for b in bns], normalise=False)
    if no_bn:
        scores.update(l1_scores(model, no_bn))
    return {g.name: scores[g.name] for g in groups}


class BNSparsityObjective(Objective):
    """Cross-entropy plus lambda·Σ|γ| over the given BatchNorms (network slimming's sparsity training)."""

    def __init__(self, bn_names: list[str], lam: float, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        self.bn_names = list(bn_names)
        self.lam = float(lam)
        self._bns: list[nn.Module] = []

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Resolve the BN modules on the (moved) model."""
        self._bns = [model.get_submodule(n) for n in self.bn_names]

    def compute(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """CE + lambda·Σ|γ|."""
        out = super().compute(model, images, labels)
        if not self._bns:
            return out
        l1 = torch.stack([bn.weight.abs().sum() for bn in self._bns]).sum()
        penalty = self.lam * l1
        terms = dict(out.terms)
        terms["bn_l1"] = l1.detach()
        return StepOutput(out.loss + penalty, out.logits, terms)


def sparsity_train(model: nn.Module, groups: list[ChannelGroup], train: Batches, cfg: CriteriaConfig,
                   num_classes: int) -> list[dict]:
    """Fine-tune model in place with the L1 penalty on its groups' BN γ (the engine's loop); returns the history."""
    bns = sorted({b for g in groups for b in group_bns(model, g)})
    objective = BNSparsityObjective(bns, cfg.bn_sparsity_lambda, cfg.bn_sparsity_train.label_smoothing)
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="amas_bn_sparsity_") as tmp:
        trainer = Trainer(model, train, cfg.bn_sparsity_train, tmp, num_classes=num_classes, objective=objective,
                          stage="bn_sparsity", device=model_device(model))
        history = trainer.fit()
        if trainer.model is not model:  # the engine may wrap or convert the model (e.g. SyncBatchNorm)
            model.load_state_dict(trainer.model.state_dict())
    model.train(was_training)
    return history
