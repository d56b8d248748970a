"""amas.quantize: int8 PT2E .pt2 that runs without amas, ONNX Runtime int8 ONNX, calibration reads, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_NET_SHAPE, quadrants
from torch import nn
from torch.utils.data import DataLoader

import amas
from amas.errors import QuantizeError
from amas.files.export import onnx_available
from amas.models import create_model
from amas.quant import load_int8

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()

pytest.importorskip("torchao")

SHAPE = TINY_NET_SHAPE  # 1x16x16, 4 classes


class Counting:
    """An iterable of batches that counts how many it handed out."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.read = loader, 0

    def __iter__(self):
        for batch in self.loader:
            self.read += 1
            yield batch


class Untouchable:
    """A validation iterable that must never be read."""

    def __iter__(self):
        raise AssertionError("calibration read the validation batches")


@pytest.fixture(scope="module")
def trained():
    """resnet20 (1 channel in, 4 classes) trained 12 SGD steps on the quadrants task, and its train loader."""
    torch.manual_seed(0)
    train = DataLoader(quadrants(192, 1), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = create_model("resnet20", num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in train:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), train


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    model, train = trained
    counting, val = Counting(train), Untouchable()
    path = tmp_path_factory.mktemp("q") / "int8.pt2"
    result = amas.quantize(model, counting, SHAPE, path=path, num_batches=3)
    return result, counting, val


def test_calibration_reads_only_the_given_number_of_training_batches(quantized) -> None:
    result, counting, _val = quantized
    assert counting.read == 3 and result.calib_batches == 3  # 12 batches available, 3 read, val never iterated
    assert len(result.quantized_layers) == 20 and result.float_layers == []  # 19 convs + the linear head
    assert result.dynamic_batch


def test_int8_pt2_runs_without_amas_and_agrees(trained, quantized, tmp_path) -> None:
    model, _ = trained
    result, _, _ = quantized
    x = quadrants(64, 3).tensors[0]
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["amas"] = None; sys.modules["torchao"] = None  # neither may be needed to load and run
        try:
            import amas
            raise SystemExit("amas imported")
        except ImportError:
            pass
        import torch
        import torch.ao.quantization.fx._decomposed  # core torch: registers the quantize/dequantize ops
        ep = torch.export.load({str(result.path)!r})
        assert torch.int8 in {{v.dtype for v in ep.state_dict.values()}}
        torch.save(ep.module()(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        ref, fp = result.model(x), model(x)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)  # the .pt2 is the converted model
    assert (got.argmax(1) == fp.argmax(1)).float().mean() >= 0.9  # int8 keeps (nearly) every float top-1
    assert (got - fp).abs().max() <= 0.15 * fp.abs().max()  # measured: a few percent of the logit range


def test_int8_pt2_loads_with_the_two_lines_the_readme_shows_and_not_without(quantized, tmp_path) -> None:
    """PyTorch resolves a .pt2's ops by name and cannot import the library that registers them: a plain
    torch.export.load of the int8 .pt2 fails until core torch's quantized_decomposed ops are imported."""
    result, _, _ = quantized
    plain = f"import torch; torch.export.load({str(result.path)!r}).module()"
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "quantized_decomposed" in out.stderr
    readme = ("import torch, torch.ao.quantization.fx._decomposed  # registers the int8 quantize/dequantize ops\n"
              f"model = torch.export.load({str(result.path)!r}).module()\n")
    assert "model = torch.export.load(\"pruned_int8.pt2\").module()" in README  # the README shows these lines
    assert readme.splitlines()[0] in README
    subprocess.run([sys.executable, "-c", readme], check=True, cwd=tmp_path, timeout=120)


def test_load_int8_says_in_one_line_why_a_file_does_not_load(quantized, tmp_path, capfd) -> None:
    result, _, _ = quantized
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(load_int8(result.path)(x), result.model(x))
    op_file = tmp_path / "custom_op.pt2"  # a .pt2 whose op is registered only by a library this process lacks
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import torch
        @torch.library.custom_op("amas_test::twice", mutates_args=())
        def twice(x: torch.Tensor) -> torch.Tensor:
            return x * 2
        twice.register_fake(lambda x: torch.empty_like(x))
        class M(torch.nn.Module):
            def forward(self, x):
                return twice(x) + 1
        torch.export.save(torch.export.export(M(), (torch.randn(2, 3),)), {str(op_file)!r})
    """)], check=True, timeout=120)
    (tmp_path / "junk.pt2").write_text("not a pt2")
    capfd.readouterr()
    for path, says in ((op_file, "operator torch.ops.amas_test.twice.default is not registered"),
                       (tmp_path / "junk.pt2", "does not load as a torch.export program"),
                       (tmp_path / "missing.pt2", "does not exist")):
        with pytest.raises(QuantizeError, match=says) as e:
            load_int8(path)
        assert "\n" not in str(e.value)
    assert "Traceback" not in capfd.readouterr().err  # no 40-line deserialisation dump either


def test_int8_pt2_is_smaller_than_the_float_pt2(trained, quantized, tmp_path) -> None:
    model, _ = trained
    result, _, _ = quantized
    amas.export(model, tmp_path / "float.pt2", input_shape=SHAPE)
    assert result.path and (tmp_path / "float.pt2").stat().st_size > 1.5 * os.path.getsize(result.path)


@pytest.mark.skipif(not onnx_available(), reason="needs the onnx extra")
def test_int8_onnx_runs_in_onnxruntime(trained, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    model, train = trained
    counting = Counting(train)
    result = amas.quantize(model, counting, SHAPE, onnx_path=tmp_path / "int8.onnx", num_batches=2)
    assert counting.read == 2 and result.path is None and result.onnx_path
    sess = ort.InferenceSession(result.onnx_path, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(result.onnx_path).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = quadrants(64, 3).tensors[0]
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        fp = model(x)
    assert (got.argmax(1) == fp.argmax(1)).float().mean() >= 0.9


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x)).mean((2, 3))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
            return x
        return -x


class PoolOnly(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)


def test_a_model_that_cannot_be_quantized_stops_with_one_line() -> None:
    batches = [torch.randn(4, *SHAPE)]
    with pytest.raises(QuantizeError) as e:
        amas.quantize(DataDependent(), batches, SHAPE)
    assert "'gate'" in str(e.value) and "traceable" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QuantizeError, match="no layer .* int8 support") as e:
        amas.quantize(PoolOnly(), batches, SHAPE)
    assert "\n" not in str(e.value)
    with pytest.raises(QuantizeError, match="empty"):
        amas.quantize(create_model("resnet20", num_classes=4, in_channels=1), [], SHAPE)


def test_without_torchao_the_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e", None)
    with pytest.raises(QuantizeError, match=r"pip install 'amas\[quant\]'"):
        amas.quantize(create_model("resnet20", num_classes=4, in_channels=1), [torch.randn(2, *SHAPE)], SHAPE)
