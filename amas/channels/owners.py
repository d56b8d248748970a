"""Which layer ran each op of a traced forward: names the layers behind a Torch-Pruning failure or a stuck walk.

``OpOwners`` records, during a forward, the innermost module running each op (by the op's output grad_fn), the real
input sizes of every channel concatenation and the ops that reshape the channel dimension; ``untraceable`` turns a
crash inside Torch-Pruning's tracer into one line naming the layer and the ``prune.ignore`` list that gets through.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from amas.channels.units import custom_pruners
from amas.errors import MaskError

__all__ = ["OpOwners", "collapse", "untraceable"]


class OpOwners(TorchFunctionMode):
    """Records, for each op run in a forward, the innermost module running it (by the op's output grad_fn)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.owner: dict[Any, str] = {}
        self.reshapes: list[str] = []  # owners of ops that reshape the channel dimension (not a flatten)
        self.channel_reshapes: set[Any] = set()  # those ops' grad_fns
        self.cat_sizes: dict[Any, tuple[int, list[int]]] = {}  # grad_fn of a cat along dim 1 -> rank, input sizes
        self.multi: set[str] = set()  # modules that return something other than one tensor (prune.ignore cannot)
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave(name)))

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            """Push the module's name."""
            self.stack.append(name)
        return hook

    def _leave(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            """Pop the module's name; note a module whose output is not one tensor."""
            self.stack.pop()
            if not isinstance(output, torch.Tensor):
                self.multi.add(name)
        return hook

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and self.stack:
            self.owner.setdefault(out.grad_fn, self.stack[-1])
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            name = getattr(func, "__name__", "")
            if (src is not None and name in ("view", "reshape", "unflatten") and src.dim() >= 3 and out.dim() > 2
                    and tuple(out.shape[:2]) != tuple(src.shape[:2])):
                self.reshapes.append(self.stack[-1])
                self.channel_reshapes.add(out.grad_fn)
            if name in ("cat", "concat", "concatenate") and out.dim() > 1:
                tensors = args[0] if args else (kwargs or {}).get("tensors", ())
                dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
                if isinstance(dim, int) and dim % out.dim() == 1:
                    sizes = [int(t.shape[1]) if t.dim() == out.dim() else 0 for t in tensors]
                    self.cat_sizes[out.grad_fn] = (out.dim(), sizes)
        return out

    def close(self) -> None:
        """Remove the module hooks."""
        for h in self.handles:
            h.remove()


def _failed_node(exc: BaseException) -> Any:
    """The Torch-Pruning graph node the tracer was handling when it raised (from the innermost frame holding one)."""
    node = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        args = [frame.f_locals.get(a) for a in code.co_varnames[:code.co_argcount]]
        node = next((a for a in args if isinstance(a, tp.dependency.Node)), node)
    return node


def collapse(names: Iterable[str], model: nn.Module, multi: Iterable[str] = ()) -> list[str]:
    """names with every module all of whose children are named replaced by the module itself (never the model).

    A module in multi (its output is not one tensor, which prune.ignore cannot keep whole) stands for its parent.
    """
    multi = set(multi)
    chosen = set()
    for name in names:
        while name and name in multi:
            name = name.rpartition(".")[0]
        if name:
            chosen.add(name)
    modules = dict(model.named_modules())
    for name in sorted(modules, key=lambda n: -n.count(".")):
        children = [f"{name}.{c}" if name else c for c, _ in modules[name].named_children()]
        if name and children and all(c in chosen for c in children):
            chosen -= set(children)
            chosen.add(name)
    chosen = {n for n in chosen if not any(n.startswith(c + ".") for c in chosen)}
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def untraceable(model: nn.Module, x: torch.Tensor, exc: BaseException) -> MaskError:
    """The one-line error for a model Torch-Pruning cannot trace: the layer it failed in, and what to ignore."""
    where = traceback.extract_tb(exc.__traceback__)[-1].name
    kind = f"{type(exc).__name__} in its {where}"
    cls = type(model).__name__
    node = _failed_node(exc)
    rec = OpOwners(model)
    try:
        with rec, torch.enable_grad():
            tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False,
                                                  customized_pruners=custom_pruners())
    except (ZeroDivisionError, IndexError, KeyError, TypeError) as again:
        node = _failed_node(again) or node
    finally:
        rec.close()
    owner = rec.owner.get(getattr(node, "grad_fn", None)) if node is not None else None
    if not owner:
        return MaskError(f"Torch-Pruning cannot trace {cls} for channel groups ({kind}, in the model's own forward: a "
                         "channel shuffle or a reshape of channels); this model cannot be pruned by amas yet")
    layer = type(model.get_submodule(owner)).__name__
    suggest = collapse([n for n in rec.reshapes if n] or [owner], model, rec.multi)
    err = MaskError(f"Torch-Pruning cannot trace layer '{owner}' ({layer}) of {cls} for channel groups ({kind}: a "
                    f"channel shuffle or a reshape of channels); keep such layers whole with prune.ignore: "
                    f"[{', '.join(suggest)}]")
    err.suggest = suggest  # type: ignore[attr-defined]  # build_graph completes the list
    return err
