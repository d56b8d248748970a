"""The runtimes latency is measured on: eager PyTorch, the exported program compiled for the CPU, ONNX Runtime.

Each runtime turns (model, example input) into a zero-argument callable that runs one forward pass, so the
same timing code (amas.latency.timing) serves all of them. ``compiled`` is torch.export's program run through
torch.compile (the Inductor CPU backend: what the installed torch supports without a C++ packaging step);
``onnx`` needs the onnx and onnxruntime packages (the ``onnx`` extra).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from amas.errors import AmasError

RUNTIMES = ("eager", "compiled", "onnx")

__all__ = ["RUNTIMES", "available_runtimes", "make_runner"]


def available_runtimes() -> list[str]:
    """The runtimes usable in this environment (eager always; compiled with torch.compile; onnx with onnxruntime)."""
    out = ["eager"]
    if hasattr(torch, "compile") and hasattr(torch, "export"):
        out.append("compiled")
    if importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnx")
    return out


def _prepared(model: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    net = copy.deepcopy(model).eval()
    if channels_last and x.dim() == 4:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return net, x


def make_runner(model: nn.Module, x: torch.Tensor, runtime: str = "eager", channels_last: bool = True
                ) -> Callable[[], object]:
    """A callable running one inference forward pass of (a copy of) model on x with the given runtime."""
    if runtime not in RUNTIMES:
        raise AmasError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime not in available_runtimes():
        raise AmasError(f"runtime {runtime!r} is not available here; install the onnx extra (pip install "
                        f"'amas[onnx]') or use runtime eager")
    net, x = _prepared(model, x, channels_last and runtime != "onnx")
    if runtime == "eager":
        def run() -> object:
            with torch.inference_mode():
                return net(x)
        return run
    if runtime == "compiled":
        with torch.no_grad():
            program = torch.export.export(net, (x,))
        compiled = torch.compile(program.module(), dynamic=False)

        def run_compiled() -> object:
            with torch.no_grad():
                return compiled(x)
        run_compiled()  # compile now, not inside the timed calls
        return run_compiled
    return _onnx_runner(net, x)


def _onnx_runner(net: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """An ONNX Runtime session of net exported at x's shape (single-threaded settings follow torch's)."""
    import onnxruntime as ort

    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(net, (x,), path, input_names=["x"], output_names=["y"], external_data=False,
                              verbose=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(path)
    feed = {"x": x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)
