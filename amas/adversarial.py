"""Compatibility names: the alignment objective moved to amas.alignment, the mask search to amas.mask_search and
the search stage to amas.search_stage."""

from amas.alignment import (
    AlignmentObjective,
    Discriminator,
    SearchError,
    discriminator_loss,
    fast_inference_copy,
    kd_loss,
    last_global_pool,
    real_fake_bce,
)
from amas.mask_search import BudgetController, ProximalMaskUpdate, SearchObjective
from amas.search_stage import check_teacher_matches, search

__all__ = [
    "AlignmentObjective", "BudgetController", "Discriminator", "ProximalMaskUpdate", "SearchError", "SearchObjective",
    "check_teacher_matches", "discriminator_loss", "fast_inference_copy", "kd_loss", "last_global_pool",
    "real_fake_bce", "search",
]
