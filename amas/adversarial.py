"""Compatibility names: the alignment objective moved to amas.search.alignment, the mask search to
amas.search.objective and the search stage to amas.pipeline.search."""

from amas.pipeline.search import check_teacher_matches, search
from amas.search.alignment import (
    AlignmentObjective,
    Discriminator,
    SearchError,
    discriminator_loss,
    fast_inference_copy,
    kd_loss,
    last_global_pool,
    real_fake_bce,
)
from amas.search.objective import BudgetController, ProximalMaskUpdate, SearchObjective

__all__ = [
    "AlignmentObjective", "BudgetController", "Discriminator", "ProximalMaskUpdate", "SearchError", "SearchObjective",
    "check_teacher_matches", "discriminator_loss", "fast_inference_copy", "kd_loss", "last_global_pool",
    "real_fake_bce", "search",
]
