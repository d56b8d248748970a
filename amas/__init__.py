"""amas: structured channel pruning with adversarial alignment and architecture selection."""

__version__ = "0.1.0"

from amas.errors import AmasError  # noqa: E402

__all__ = ["AmasError", "MaskSearch", "PruneResult", "__version__", "load_pruned", "prune"]


def __getattr__(name: str):
    """Lazy attributes: `amas.load_pruned`, `amas.prune` import torch and their modules only when first used."""
    if name == "load_pruned":
        from amas.files.pruned import load_pruned

        return load_pruned
    if name == "prune":
        from amas.api import prune

        return prune
    if name == "MaskSearch":
        from amas.search.mask_search import MaskSearch

        return MaskSearch
    if name == "PruneResult":
        from amas.api import PruneResult

        return PruneResult
    raise AttributeError(f"module 'amas' has no attribute {name!r}")
