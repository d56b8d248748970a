"""The runtimes latency is measured on: eager PyTorch, the exported program compiled for the CPU, ONNX Runtime, and
the int8 versions of the last two.

Each runtime turns (model, example input) into a zero-argument callable that runs one forward pass, so the
same timing code (amas.latency.timing) serves all of them. ``compiled`` is torch.export's program run through
torch.compile (the Inductor CPU backend: what the installed torch supports without a C++ packaging step);
``onnx`` needs the onnx and onnxruntime packages (the ``onnx`` extra). ``compiled_int8`` is the model quantized
as amas.quantize does (PT2E, x86 quantizer) and compiled with Inductor freezing, which lowers it to oneDNN int8
convolutions (needs torchao); ``onnx_int8`` is ONNX Runtime on the static QDQ int8 model. Both calibrate on the
example input: ranges do not change the time of an int8 kernel. Eager PyTorch has no int8 runtime here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterator

import torch
from torch import nn

from amas.errors import AmasError

RUNTIMES = ("eager", "compiled", "onnx", "compiled_int8", "onnx_int8")

__all__ = ["RUNTIMES", "available_runtimes", "install_hint", "make_runner", "make_runners"]


def available_runtimes() -> list[str]:
    """The runtimes usable in this environment (eager always; compiled with torch.compile; onnx with onnxruntime)."""
    out = ["eager"]
    if hasattr(torch, "compile") and hasattr(torch, "export"):
        out.append("compiled")
    onnx = importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None
    if onnx:
        out.append("onnx")
    if "compiled" in out and importlib.util.find_spec("torchao") is not None:
        out.append("compiled_int8")
    if onnx:
        out.append("onnx_int8")
    return out


def install_hint(runtime: str) -> str:
    """What to install for a runtime that is not available here."""
    extra = "quant" if runtime == "compiled_int8" else "onnx"
    return f"install the {extra} extra (pip install 'amas[{extra}]')"


@contextlib.contextmanager
def _onnx_file() -> Iterator[str]:
    """A temporary .onnx path, deleted on exit (a session keeps what it loaded)."""
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


def _prepared(model: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    net = copy.deepcopy(model).eval()
    if channels_last and x.dim() == 4:
        from amas.engine.formats import runs_channels_last

        net = net.to(memory_format=torch.channels_last)
        if runs_channels_last(net, x[:1]):  # else a .view of a feature map: timed in the contiguous format
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            net = net.to(memory_format=torch.contiguous_format)
    return net, x


def make_runner(model: nn.Module, x: torch.Tensor, runtime: str = "eager", channels_last: bool = True
                ) -> Callable[[], object]:
    """A callable running one inference forward pass of (a copy of) model on x with the given runtime."""
    if runtime not in RUNTIMES:
        raise AmasError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime not in available_runtimes():
        raise AmasError(f"runtime {runtime!r} is not available here; {install_hint(runtime)} or use runtime eager")
    if runtime == "compiled_int8":
        return _compiled_int8_runner(model, x)
    if runtime == "onnx_int8":
        return _onnx_int8_runner(model, x)
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


def make_runners(model: nn.Module, xs: list[torch.Tensor], runtime: str = "eager") -> list[Callable[[], object]]:
    """make_runner for each input of xs (one model, several batch sizes); the ONNX runtimes export (and quantize)
    the model once with a dynamic batch and open one session per input."""
    if runtime not in ("onnx", "onnx_int8") or len(xs) < 2 or runtime not in available_runtimes():
        return [make_runner(model, x, runtime) for x in xs]
    from amas.files.export import export_onnx
    from amas.quant import quantize_onnx

    net = copy.deepcopy(model).cpu().eval()
    shape = tuple(xs[0].shape[1:])
    with _onnx_file() as path:
        if runtime == "onnx":
            export_onnx(net, shape, path, check=False)
        else:
            quantize_onnx(net, None, shape, path, inputs=[xs[0].detach().float().cpu()])
        runners = []
        for x in xs:
            try:
                run = _session(path, x)
                run()
            except Exception:  # a model exported with a fixed batch: its own session for this batch size
                run = make_runner(model, x, runtime)
            runners.append(run)
        return runners


def _compiled_int8_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The int8 PT2E program of model (calibrated on x) compiled by Inductor with freezing (oneDNN int8 kernels)."""
    import torch._inductor.config as inductor_config

    from amas.quant import quantize_pt2e
    from amas.quant.ptq import torchao_pt2e

    torchao_pt2e()  # registers torchao's Inductor int8 lowering passes
    program = quantize_pt2e(model, None, tuple(x.shape[1:]), inputs=[x.detach().float().cpu()]).model
    with inductor_config.patch(freezing=True):
        compiled = torch.compile(program, dynamic=False)
        with torch.no_grad():
            compiled(x)  # compile now (freezing applies at compile time), not inside the timed calls

    def run() -> object:
        with torch.no_grad():
            return compiled(x)
    return run


def _onnx_int8_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """An ONNX Runtime session of model's static QDQ int8 ONNX (calibrated on x)."""
    from amas.quant import quantize_onnx

    with _onnx_file() as path:
        quantize_onnx(copy.deepcopy(model).cpu().eval(), None, tuple(x.shape[1:]), path,
                      inputs=[x.detach().float().cpu()])
        return _session(path, x)


def _onnx_runner(net: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """An ONNX Runtime session of net exported at x's shape (single-threaded settings follow torch's)."""
    with _onnx_file() as path, torch.no_grad():
        torch.onnx.export(net, (x,), path, input_names=["x"], output_names=["y"], external_data=False, verbose=False)
        return _session(path, x)


def _session(path: str, x: torch.Tensor) -> Callable[[], object]:
    """A callable running the ONNX file at path on x with ONNX Runtime (as many threads as torch uses)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = onnx.load(path, load_external_data=False).graph.input[0].name
    feed = {name: x.detach().cpu().numpy()}
    return lambda: sess.run(None, feed)
