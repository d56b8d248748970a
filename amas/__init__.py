"""amas: structured channel pruning with adversarial alignment and architecture selection."""

__version__ = "0.1.0"

from amas.errors import AmasError  # noqa: E402

__all__ = ["AmasError", "__version__"]
