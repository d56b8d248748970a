"""amas: structured channel pruning with adversarial alignment and architecture selection."""

__version__ = "0.1.0"

from amas.errors import AmasError  # noqa: E402

__all__ = ["AmasError", "__version__", "load_pruned"]


def __getattr__(name: str):
    """Lazy attributes: `amas.load_pruned` imports torch and amas.pruned_file only when first used."""
    if name == "load_pruned":
        from amas.pruned_file import load_pruned

        return load_pruned
    raise AttributeError(f"module 'amas' has no attribute {name!r}")
