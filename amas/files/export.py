"""Shipping a pruned model: torch.export `.pt2` and ONNX.

The report of an export is amas.pipeline.report; the cut of a checkpoint that `amas export` ships is
amas.pipeline.export.cut_checkpoint, and `amas export` itself is amas.pipeline.runner.run_export.
``pruned.pt2`` is a ``torch.export`` program: it loads with ``torch.export.load`` in a Python without amas.
The ``pruned.pt`` file format (save_pruned, load_pruned) is amas.files.pruned.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.errors import ExportError
from amas.files.atomic import atomic_path

__all__ = ["check_input", "export_onnx", "export_pt2", "onnx_available"]


# ---------------------------------------------------------------- torch.export and ONNX


def _example(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.randn((batch, *input_shape), device=device, dtype=dtype)


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """One eager forward of the model in eval mode on x (its mode restored); a failure is one ExportError naming the
    input the model expects."""
    first: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: first.append(m) if not first else None)
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except Exception as e:
        want = getattr(first[0], "in_channels", None) if first else None
        if isinstance(want, int) and want != x.shape[1]:
            raise ExportError(f"the model's first layer takes {want} input channels, but input_shape "
                              f"{tuple(x.shape[1:])} has {x.shape[1]}; pass input_shape=({want}, H, W)") from None
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise ExportError(f"the model fails on inputs of shape {tuple(x.shape)} ({type(e).__name__}: {msg}); "
                          "fix input_shape to the (C, H, W) of one image the model takes") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()


def export_pt2(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike,
               dynamic_batch: bool = True, check: bool = False, atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """torch.export the eval-mode model (dynamic batch when possible) and save it; returns {'dynamic_batch': bool}.

    The outputs may be a tensor or a dict/tuple of tensors (a segmenter's {"out": ...}); check: the program's outputs
    are compared with the eager model's on a fresh batch (their largest difference returned as max_abs_diff), an
    ExportError where they differ.
    """
    was_training = model.training
    model.eval()
    x = _example(model, tuple(input_shape))
    ep = None
    dynamic = False
    try:
        check_input(model, x)  # a wrong input_shape is named, not reported as a model torch.export cannot trace
        if dynamic_batch:
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
                dynamic = True
            except Exception:
                ep = None
        if ep is None:
            try:
                ep = torch.export.export(model, (x,))
            except Exception as e:
                raise ExportError(f"torch.export cannot trace this model ({type(e).__name__}); "
                                  "ship pruned.pt (amas.load_pruned) instead") from None
    finally:
        model.train(was_training)
    info: dict[str, Any] = {"path": str(path), "dynamic_batch": dynamic}
    if check:
        info["max_abs_diff"] = _check_outputs(model, ep.module(), _example(model, tuple(input_shape), 3 if dynamic
                                                                           else 2), atol, rtol, "pruned.pt2")
    p = Path(path)
    with atomic_path(p) as tmp:
        torch.export.save(ep, tmp)
    return info


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or a dict/tuple/list of them), in pytree order."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check_outputs(model: nn.Module, program: Any, x: torch.Tensor, atol: float, rtol: float, what: str) -> float:
    """The largest difference between an exported program's outputs and the eager model's on x; ExportError when
    they differ (in structure, shape, or beyond atol + rtol·|eager|)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want, got = _leaves(model(x)), _leaves(program(x))
    finally:
        model.train(was_training)
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got, strict=True)):
        raise ExportError(f"{what}'s outputs are {[tuple(t.shape) for t in got]}, the model's "
                          f"{[tuple(t.shape) for t in want]}; ship pruned.pt instead")
    diff = max((float((a - b).abs().max()) for a, b in zip(want, got, strict=True) if a.numel()), default=0.0)
    if not all(bool(((a - b).abs() <= atol + rtol * a.abs()).all()) for a, b in zip(want, got, strict=True)):
        raise ExportError(f"{what}'s outputs differ from the eager model's by up to {diff:.2e}; ship pruned.pt "
                          "instead")
    return diff


def onnx_available() -> bool:
    """Whether the optional onnx extra (onnx, onnxruntime, onnxscript) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def export_onnx(model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike,
                check: bool = True, atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Export ONNX (dynamic batch when possible) and, with check, compare onnxruntime with PyTorch outputs."""
    if not onnx_available():
        raise ExportError("ONNX export needs the onnx extra; install it with: pip install 'amas[onnx]'")
    import contextlib
    import io
    import warnings

    p0 = next(model.parameters(), None)
    if p0 is not None and (p0.dtype != torch.float32 or p0.device.type != "cpu"):
        model = copy.deepcopy(model).float().cpu()
    x = _example(model, tuple(input_shape))
    check_input(model, x)
    was_training = model.training
    model.eval()
    p = Path(path)
    dynamic = False
    with atomic_path(p) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), external_data=False, verbose=False)
            dynamic = True
        except Exception:
            try:
                torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                                  external_data=False, verbose=False)
            except Exception as e:
                raise ExportError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                                  "ship pruned.pt2 instead") from None
    info: dict[str, Any] = {"path": str(p), "dynamic_batch": dynamic}
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        xs = _example(model, tuple(input_shape), batch=3) if dynamic else x
        with torch.no_grad():
            refs = [t.numpy() for t in _leaves(model(xs))]  # a dense model's dict or tuple: every output, in order
        gots = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})
        if len(gots) != len(refs) or any(g.shape != r.shape for g, r in zip(gots, refs, strict=False)):
            raise ExportError(f"the ONNX model returns {len(gots)} outputs where PyTorch returns {len(refs)} (or "
                              "other shapes); ship pruned.pt2 instead")
        diff = max(float(abs(g - r).max()) for g, r in zip(gots, refs, strict=True))
        info["max_abs_diff"] = diff
        if not all((abs(g - r) <= atol + rtol * abs(r)).all() for g, r in zip(gots, refs, strict=True)):
            raise ExportError(
                f"the ONNX model's outputs differ from PyTorch's by up to {diff:.2e}; ship pruned.pt2 instead"
            )
    model.train(was_training)
    return info


# ---------------------------------------------------------------- cutting a checkpoint (amas export)
