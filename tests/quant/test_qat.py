"""amas.quant.prepare_qat / convert_qat: a trainable fake-quantized copy whose int8 program computes what it did."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_NET_SHAPE, TinyNet, quadrants
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("torchao")

from amas.quant import convert_qat, prepare_qat  # noqa: E402 -- needs torchao

SHAPE = TINY_NET_SHAPE  # 1x16x16, 4 classes


def test_qat_trains_the_fake_quantized_copy_and_converts_to_the_same_function(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare_qat(model, SHAPE)
    assert prepared.training
    train = DataLoader(quadrants(256, 1), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(3):
        for x, y in train:
            loss = nn.functional.cross_entropy(prepared(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8  # the fake-quantized copy learns
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the float model is untouched

    # .eval() switches the graph's BatchNorm to running statistics: a row's output no longer depends on its batch
    x = torch.randn(6, *SHAPE)
    assert not prepared.eval().training
    with torch.no_grad():
        fake = prepared(x)
        assert torch.allclose(prepared(x[:3]), fake[:3], atol=1e-5)
    result = convert_qat(prepared, SHAPE, tmp_path / "qat_int8.pt2", steps=len(losses))
    assert result.calib_batches == len(losses) and result.dynamic_batch and result.quantized_layers
    from torch.ao.quantization.fx import _decomposed  # noqa: F401 -- registers the int8 quantize/dequantize ops

    loaded = torch.export.load(str(tmp_path / "qat_int8.pt2")).module()
    with torch.no_grad():
        out = loaded(x)
    # the int8 program computes the fake-quantized function (to int8 rounding of a few activations)
    assert (out - fake).abs().max() <= 0.05 * fake.abs().max()
    assert torch.equal(out.argmax(1), fake.argmax(1))
