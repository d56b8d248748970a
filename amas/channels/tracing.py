"""Torch-Pruning's dependency graph of a model, with the layers of ``prune.ignore`` kept whole.

An ignored layer runs as usual, but during tracing its output is handed on through one opaque autograd op
(``_KeptWhole``) that hides the layer's insides from Torch-Pruning. Torch-Pruning sees an element-wise op that
couples the layer's inputs to its outputs, so every channel group that reaches the layer holds that op, and
``amas.channels.groups`` leaves such groups out: the layer, the layers feeding it and the layers reading it keep their
channels. That is how a model with an op Torch-Pruning cannot follow (shufflenet's channel shuffle, a reshape of
channels) still gets its other groups.

When Torch-Pruning fails inside its tracer, the error names the layer (module) whose forward ran the op it failed
on, and suggests the ``prune.ignore`` list of every layer that reshapes channels.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from amas.channels.cost import device_dtype
from amas.channels.shortcut import CUSTOM_PRUNERS
from amas.errors import MaskError

__all__ = ["build_graph", "is_kept_whole", "ignored_modules"]

_KEPT_WHOLE = "keptwhole"  # in the name of the opaque op's backward node


class _KeptWhole(torch.autograd.Function):
    """The output of an ignored layer, linked to the layer's inputs by one op Torch-Pruning cannot see into."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """out unchanged (a copy); the inputs only link the graph."""
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        """Never used for training (tracing only)."""
        return (grad, *([None] * 64))


def is_kept_whole(node: Any) -> bool:
    """True for the traced op that stands for an ignored layer."""
    fn = getattr(node, "grad_fn", None)
    return fn is not None and hasattr(fn, "name") and _KEPT_WHOLE in fn.name().lower()


def ignored_modules(model: nn.Module, ignore: Iterable[str]) -> dict[str, nn.Module]:
    """The modules prune.ignore names, by name, or a one-line MaskError naming one the model does not have."""
    modules = dict(model.named_modules())
    out = {}
    for name in ignore:
        name = str(name)
        if not name or name not in modules:
            import difflib

            close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise MaskError(f"prune.ignore names {name!r}, which {type(model).__name__} has no module of{hint}; use "
                            "names from model.named_modules()")
        out[name] = modules[name]
    return out


def _barrier_hook(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise MaskError(f"prune.ignore: {type(module).__name__} returns a {type(output).__name__}, not one tensor; "
                        "ignore the module around it")
    return _KeptWhole.apply(output.detach(), *[x for x in inputs if isinstance(x, torch.Tensor)])


def build_graph(model: nn.Module, input_shape: Sequence[int], ignore: Iterable[str] = ()) -> tp.DependencyGraph:
    """Trace model with one example input (on its device) into a DependencyGraph; ignored layers stay opaque."""
    device, dtype = device_dtype(model)
    x = torch.randn((1, *input_shape), device=device, dtype=dtype)
    kept = ignored_modules(model, ignore)
    inside = [m for top in kept.values() for m in top.modules()]
    handles = [m.register_forward_hook(_barrier_hook) for m in kept.values()]
    was_training = model.training
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False,
                                                       customized_pruners=dict(CUSTOM_PRUNERS),
                                                       ignored_layers=inside or None)
    except (ZeroDivisionError, IndexError, KeyError) as e:  # inside Torch-Pruning's tracer: say where, in one line
        raise _untraceable(model, x, e) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return dg


# ---------------------------------------------------------------- naming the layer Torch-Pruning cannot trace


class _OpOwners(TorchFunctionMode):
    """Records, for each op run in a forward, the innermost module running it (by the op's output grad_fn)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.owner: dict[Any, str] = {}
        self.reshapes: list[str] = []  # owners of ops that reshape the channel dimension (not a flatten)
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name)))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            """Push the module's name."""
            self.stack.append(name)
        return hook

    def _leave(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Pop it."""
        self.stack.pop()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and self.stack:
            self.owner.setdefault(out.grad_fn, self.stack[-1])
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            name = getattr(func, "__name__", "")
            if (src is not None and name in ("view", "reshape", "unflatten") and src.dim() >= 3 and out.dim() > 2
                    and tuple(out.shape[:2]) != tuple(src.shape[:2])):
                self.reshapes.append(self.stack[-1])
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


def _collapse(names: Iterable[str], model: nn.Module) -> list[str]:
    """names with every module all of whose children are named replaced by the module itself (never the model)."""
    chosen = set(names)
    modules = dict(model.named_modules())
    for name in sorted(modules, key=lambda n: -n.count(".")):
        children = [f"{name}.{c}" if name else c for c, _ in modules[name].named_children()]
        if name and children and all(c in chosen for c in children):
            chosen -= set(children)
            chosen.add(name)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def _untraceable(model: nn.Module, x: torch.Tensor, exc: BaseException) -> MaskError:
    """The one-line error for a model Torch-Pruning cannot trace: the layer it failed in, and what to ignore."""
    where = traceback.extract_tb(exc.__traceback__)[-1].name
    kind = f"{type(exc).__name__} in its {where}"
    cls = type(model).__name__
    node = _failed_node(exc)
    rec = _OpOwners(model)
    try:
        with rec, torch.enable_grad():
            tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False,
                                                  customized_pruners=dict(CUSTOM_PRUNERS))
    except (ZeroDivisionError, IndexError, KeyError) as again:
        node = _failed_node(again) or node
    finally:
        rec.close()
    owner = rec.owner.get(getattr(node, "grad_fn", None)) if node is not None else None
    if not owner:
        return MaskError(f"Torch-Pruning cannot trace {cls} for channel groups ({kind}, in the model's own forward: a "
                         "channel shuffle or a reshape of channels); this model cannot be pruned by amas yet")
    layer = type(model.get_submodule(owner)).__name__
    suggest = _collapse([n for n in rec.reshapes if n] or [owner], model)
    return MaskError(f"Torch-Pruning cannot trace layer '{owner}' ({layer}) of {cls} for channel groups ({kind}: a "
                     f"channel shuffle or a reshape of channels); keep such layers whole with prune.ignore: "
                     f"[{', '.join(suggest)}]")
