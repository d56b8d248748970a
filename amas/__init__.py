"""amas: structured channel pruning with adversarial alignment and architecture selection.

The public API (``import amas`` stays light: each name imports torch and its module when first used):

- ``amas.prune``: the whole pipeline on your trained model and your batches; returns a ``PruneResult``.
- ``amas.MaskSearch``: the mask search inside your own training loop, then ``cut``.
- ``amas.save_pruned`` / ``amas.load_pruned``: a pruned model to and from a ``weights_only`` file.
- ``amas.export``: a ``.pt2`` or ONNX file that runs without amas.
- ``amas.quantize``: int8 post-training static quantization (PT2E ``.pt2``, optionally ONNX Runtime ONNX).
- ``amas.Config`` / ``amas.load_config``: typed recipes; ``amas.list_methods``: the pruning methods;
  ``amas.count``: (MACs, params) of a model; ``amas.AmasError``: the base of every one-line user error.
"""

__version__ = "0.1.0"

from amas.errors import AmasError  # noqa: E402

__all__ = ["AmasError", "Config", "MaskSearch", "PruneResult", "__version__", "count", "export", "list_methods",
           "load_config", "load_pruned", "prune", "quantize", "save_pruned"]

# public name -> (module, attribute), imported on first use
_LAZY = {
    "prune": ("amas.api", "prune"),
    "PruneResult": ("amas.api", "PruneResult"),
    "save_pruned": ("amas.api", "save_pruned"),
    "export": ("amas.api", "export"),
    "quantize": ("amas.api", "quantize"),
    "list_methods": ("amas.api", "list_methods"),
    "MaskSearch": ("amas.search.mask_search", "MaskSearch"),
    "load_pruned": ("amas.files.pruned", "load_pruned"),
    "Config": ("amas.config", "Config"),
    "load_config": ("amas.config", "load_config"),
    "count": ("amas.channels.cost", "count"),
}


def __getattr__(name: str):
    """Lazy attributes: the public API imports torch and its modules only when first used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'amas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
