"""int8 post-training static quantization: PT2E (torch.export + the x86 Inductor quantizer) and ONNX Runtime.

``quantize_pt2e`` exports the float model, prepares it with torchao's ``X86InductorQuantizer`` (its default
symmetric config: int8 activations per tensor, int8 weights per channel), calibrates on the first
``num_batches`` training batches, converts and saves an int8 ``.pt2`` (weights stored as int8). The ``.pt2``
needs no amas and no torchao to load: its quantize/dequantize ops are core torch's ``quantized_decomposed``
library, registered by ``import torch.ao.quantization.fx._decomposed`` (or by any use of torch.compile) before
``torch.export.load(path).module()``; that runs the quantize/dequantize ops in float. int8 kernels (oneDNN
qconv/qlinear) come from ``torch.compile`` with ``torch._inductor.config.freezing = True`` and torchao's Inductor
passes registered (``import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer``): without torchao, the
compiled graph keeps float convolutions on dequantized weights. ``quantize_onnx`` quantizes amas' float ONNX
export with ONNX Runtime's static QDQ quantization over the same batches.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amas.errors import QuantizeError
from amas.files.atomic import atomic_path

__all__ = ["COMPILE_HINT", "LOAD_HINT", "QuantizeResult", "calibration_inputs", "load_int8", "quantize_onnx",
           "int8_score", "quantize_pt2e", "top1_accuracy"]

# what a process without amas runs before torch.export.load of an int8 .pt2
LOAD_HINT = "import torch.ao.quantization.fx._decomposed  # registers the int8 quantize/dequantize ops"
# what a process runs before torch.compile of the loaded module to get int8 kernels (needs torchao)
COMPILE_HINT = ("import torch._inductor.config; torch._inductor.config.freezing = True; "
                "import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")


@dataclass
class QuantizeResult:
    """What amas.quantize returns: the converted (reference, quantize-dequantize) model and what was written."""

    model: nn.Module
    path: str | None
    calib_batches: int
    quantized_layers: list[str] = field(default_factory=list)
    float_layers: list[str] = field(default_factory=list)
    dynamic_batch: bool = False
    onnx_path: str | None = None


def torchao_pt2e() -> Any:
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError:
        raise QuantizeError("int8 quantization needs torchao; install it with: pip install 'amas[quant]'") from None
    return quantize_pt2e, x86_inductor_quantizer


def calibration_inputs(batches: Iterable, num_batches: int) -> list[torch.Tensor]:
    """The images of the first num_batches batches ((images, labels) or images), as CPU float tensors.

    Reads exactly num_batches items from the iterable (fewer if it ends first), nothing more.
    """
    if num_batches < 1:
        raise QuantizeError(f"num_batches must be at least 1, got {num_batches}")
    out = []
    for item in islice(iter(batches), num_batches):
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise QuantizeError(f"a calibration batch must be images or (images, labels), got {type(x).__name__}")
        out.append(x.detach().float().cpu())
    if not out:
        raise QuantizeError("the calibration batches are empty; pass the training DataLoader (or a list of batches)")
    return out


def _owner(model: nn.Module, exc: BaseException) -> str | None:
    """The qualified name of the innermost layer of model whose forward the traceback of exc passes through."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if obj is not None and id(obj) in names:
            found = names[id(obj)] or type(model).__name__
    return found


def export_graph(model: nn.Module, x: torch.Tensor, what: str) -> tuple[Any, bool]:
    """torch.export with a dynamic batch where possible, else static; a failure names the layer."""
    try:
        batch = torch.export.Dim("batch", min=1, max=65536)
        return torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), True
    except Exception:
        pass
    try:
        return torch.export.export(model, (x,)), False
    except Exception as e:
        where = _owner(model, e)
        first = (str(e).strip().splitlines() or [""])[0][:120]
        at = f" in layer '{where}'" if where else ""
        raise QuantizeError(f"torch.export cannot trace the {what}{at} ({type(e).__name__}: {first}); make its "
                            "forward traceable (no data-dependent Python control flow) to quantize it") from None


def _layers(gm: nn.Module) -> tuple[list[str], list[str]]:
    """(quantized, float) conv/linear nodes of a converted graph: quantized ones read a dequantized weight."""
    quantized, floating = [], []
    for n in gm.graph.nodes:
        if n.op != "call_function" or not any(k in str(n.target) for k in ("conv", "linear")):
            continue
        w = n.args[1] if len(n.args) > 1 else None
        name = n.meta.get("nn_module_stack")
        label = list(name.values())[-1][0] if name else n.name
        deq = getattr(w, "op", None) == "call_function" and "dequantize" in str(getattr(w, "target", ""))
        (quantized if deq else floating).append(str(label))
    return quantized, floating


def _drop_unused(gm: nn.Module) -> None:
    """Remove parameters and buffers the converted graph no longer reads (the float weights it replaced)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        *path, leaf = name.split(".")
        mod = gm
        for p in path:
            mod = getattr(mod, p)
        mod._parameters.pop(leaf, None)
        mod._buffers.pop(leaf, None)


def quantize_pt2e(model: nn.Module, batches: Iterable, input_shape: tuple[int, ...],
                  path: str | os.PathLike | None = None, num_batches: int = 8,
                  inputs: list[torch.Tensor] | None = None) -> QuantizeResult:
    """int8 PT2E static quantization of a float model (left unchanged), calibrated on num_batches batches."""
    quantize_pt2e_mod, _ = torchao_pt2e()
    calib = inputs if inputs is not None else calibration_inputs(batches, num_batches)
    prepared = prepare_int8(model, input_shape)
    with torch.no_grad():
        for xb in calib:
            if tuple(xb.shape[1:]) != tuple(input_shape):
                raise QuantizeError(f"a calibration batch has shape {tuple(xb.shape)}, expected (N, "
                                    f"{', '.join(map(str, input_shape))}) from input_shape")
            prepared(xb)
    return finish_int8(quantize_pt2e_mod.convert_pt2e(prepared), input_shape, path, len(calib))


def prepare_int8(model: nn.Module, input_shape: tuple[int, ...], qat: bool = False) -> nn.Module:
    """A CPU float copy of model exported and prepared for int8: observers (PTQ), or trainable fake-quant (qat)."""
    quantize_pt2e_mod, _ = torchao_pt2e()
    float_model = copy.deepcopy(model).float().cpu().train(qat)
    ep, _ = export_graph(float_model, torch.randn((2, *tuple(input_shape))), "model")
    prepare = quantize_pt2e_mod.prepare_qat_pt2e if qat else quantize_pt2e_mod.prepare_pt2e
    try:
        return prepare(ep.module(), x86_quantizer(qat))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise QuantizeError(f"the x86 int8 quantizer cannot prepare this model ({type(e).__name__}: {first}); "
                            "quantize a model made of Conv2d/Linear/BatchNorm/ReLU/pooling layers") from None


def x86_quantizer(qat: bool = False) -> Any:
    """torchao's X86InductorQuantizer with its default symmetric config (the QAT variant when qat)."""
    _, xiq = torchao_pt2e()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    return quantizer


def finish_int8(converted: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike | None,
                calib_batches: int) -> QuantizeResult:
    """A converted PT2E model checked for int8 layers, stripped of its float weights and saved as .pt2 at path."""
    quantized, floating = _layers(converted)
    if not quantized:
        ops = sorted({str(n.target).split(".")[0] for n in converted.graph.nodes if n.op == "call_function"
                      and "assert" not in str(n.target) and "sym_size" not in str(n.target)})
        raise QuantizeError(f"no layer of this model has int8 support in the x86 quantizer (its ops: "
                            f"{', '.join(ops[:8])}); int8 needs Conv2d or Linear layers")
    _drop_unused(converted)
    result = QuantizeResult(model=converted, path=None, calib_batches=calib_batches, quantized_layers=quantized,
                            float_layers=floating)
    if path is not None:
        x = torch.randn((2, *tuple(input_shape)))
        ep8, dynamic = export_graph(converted, x, "quantized model")
        p = Path(path)
        with atomic_path(p) as tmp:
            torch.export.save(ep8, tmp)
        result.path, result.dynamic_batch = str(p), dynamic
    return result


class _Reader:
    """An onnxruntime CalibrationDataReader over a list of image batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name, self.it = name, iter(batches)

    def get_next(self) -> dict | None:
        x = next(self.it, None)
        return None if x is None else {self.name: x.numpy()}

    def rewind(self) -> None:  # pragma: no cover - only some calibration methods call it
        raise QuantizeError("ONNX calibration reads the batches once")


def quantize_onnx(model: nn.Module, batches: Iterable, input_shape: tuple[int, int, int],
                  path: str | os.PathLike, num_batches: int = 8,
                  inputs: list[torch.Tensor] | None = None) -> str:
    """int8 ONNX (QDQ, per-channel int8 weights, uint8 activations) of amas' float ONNX export; returns the path."""
    from amas.files.export import export_onnx, onnx_available

    if not onnx_available():
        raise QuantizeError("int8 ONNX needs the onnx extra; install it with: pip install 'amas[onnx]'")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = inputs if inputs is not None else calibration_inputs(batches, num_batches)
    reader_cls = type("AmasCalibrationReader", (_Reader, CalibrationDataReader), {})
    p = Path(path)
    with tempfile.TemporaryDirectory() as d:
        fp = Path(d) / "float.onnx"
        export_onnx(model, tuple(input_shape), fp, check=False)
        try:
            import onnx

            name = onnx.load(str(fp), load_external_data=False).graph.input[0].name
            root = logging.getLogger()  # onnxruntime logs its pre-processing advice on the root logger
            level = root.level
            root.setLevel(logging.ERROR)
            try:
                with atomic_path(p) as tmp:
                    quantize_static(str(fp), str(tmp), reader_cls(name, calib), quant_format=QuantFormat.QDQ,
                                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
        except QuantizeError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            raise QuantizeError(f"ONNX Runtime cannot quantize this model ({type(e).__name__}: {first}); "
                                "ship the int8 .pt2 instead") from None
    return str(p)


def load_int8(path: str | os.PathLike) -> nn.Module:
    """The runnable module of an int8 .pt2 (registers core torch's quantize/dequantize ops first), or a one-line
    QuantizeError when the file does not load (missing, not a .pt2, or ops this process does not register).

    PyTorch resolves a .pt2's operators by name and has no hook to import the library that registers them, so a
    plain ``torch.export.load`` of an int8 .pt2 needs ``LOAD_HINT`` run first; this loader runs it.
    """
    import torch.ao.quantization.fx._decomposed  # noqa: F401 -- registers quantized_decomposed ops

    p = Path(path)
    if not p.is_file():
        raise QuantizeError(f"{p} does not exist; pass the int8 .pt2 that amas.quantize wrote")
    log, caught = logging.getLogger("torch.export"), _Caught()
    # torch.export.load logs a 40-line traceback before it raises: kept here, for the cause, instead of printed
    handlers, propagate, level = log.handlers[:], log.propagate, log.level
    log.handlers, log.propagate, log.level = [caught], False, logging.WARNING
    try:
        return torch.export.load(str(p)).module()
    except Exception as e:
        causes = [e] + [r.exc_info[1] for r in caught.records if r.exc_info and r.exc_info[1] is not None]
        why = next((w for c in causes if (w := _unregistered_op(c))), None)
        why = why or f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
        raise QuantizeError(f"{p} does not load as a torch.export program ({why}); load a .pt2 written by "
                            "amas.quantize or amas.export, with this torch version") from None
    finally:
        log.handlers, log.propagate, log.level = handlers, propagate, level


class _Caught(logging.Handler):
    """The records torch.export logs while it loads (they hold the real cause of a failed load)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _unregistered_op(exc: BaseException) -> str | None:
    """'operator X is not registered in this process' when exc (or its cause) says torch could not resolve an op."""
    import re

    seen: BaseException | None = exc
    while seen is not None:
        m = re.search(r"failed to resolve (\S+) to an operator", str(seen))
        if m:
            return f"operator {m.group(1)} is not registered in this process; import the library that defines it"
        seen = seen.__cause__ or seen.__context__
    return None


def _outputs(model: Any, x: torch.Tensor, batch: int | None) -> Any:
    """model(x) on CPU, in chunks of the fixed batch (padded, real rows kept) when batch is set; a dict or tuple of
    outputs (a segmenter's) keeps its structure."""
    from torch.utils._pytree import tree_map

    if batch is None:
        return tree_map(torch.as_tensor, model(x))
    pad = -len(x) % batch
    xp = torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad else x
    outs = [tree_map(torch.as_tensor, model(c)) for c in xp.split(batch)]
    return tree_map(lambda *ts: torch.cat(ts)[: len(x)], *outs)


def top1_accuracy(model: Any, batches: Any, batch: int | None = None) -> float | None:
    """Top-1 (%) over batches of model(images) -> logits on CPU: a converted or loaded int8 program (no .eval()), an
    ONNX Runtime call; batch: the fixed batch of a program exported without a dynamic one (padded, real rows kept)."""
    return int8_score(model, batches, batch)


def int8_score(model: Any, batches: Any, batch: int | None = None, task: Any = None,
               num_classes: int | None = None) -> float | None:
    """The task's metric (%) over batches of an int8 program on CPU (top-1 without a task or for classification;
    a segmenter's mean IoU); batch as top1_accuracy's."""
    if batches is None:
        return None
    dense = task is not None and task.name != "classification"
    metric = task.metric(num_classes) if dense else None
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            out = _outputs(model, x.detach().float().cpu().contiguous(), batch)
            if dense:
                metric.update(out, y.cpu())
                total += 1
                continue
            correct += int((out.argmax(1) == y.cpu()).sum())
            total += int(y.numel())
    if not total:
        return None
    return float(metric.compute()) if dense else 100.0 * correct / total
