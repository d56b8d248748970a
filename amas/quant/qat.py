"""Quantization-aware training with PT2E: a fake-quantized, trainable copy of a float model and its int8 program.

``prepare_qat`` folds each BatchNorm that follows a convolution into it (BN statistics frozen, as QAT recipes do
for a short fine-tune of a trained model; it also spares torchao's conv+BN pattern matching, ~20 s per model on a
CPU), exports the copy in training mode and inserts torchao's x86 QAT fake-quantize modules (int8 activations per
tensor, int8 weights per channel). ``.train()`` / ``.eval()`` switch its dropout/BatchNorm ops and its range
observers, so the engine's loop and evaluation run it like any model. ``convert_qat`` turns the trained copy into
the same kind of int8 program ``quantize_pt2e`` writes.
"""

from __future__ import annotations

import os
import types

from torch import nn

from amas.engine.fold import folded_copy
from amas.quant.ptq import QuantizeResult, finish_int8, prepare_int8, torchao_pt2e

__all__ = ["convert_qat", "prepare_qat"]


def prepare_qat(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """A trainable fake-quantized (int8) CPU copy of a float model; model is left unchanged.

    ``.train()`` / ``.eval()`` switch its BatchNorm and dropout ops and turn its range observers on / off, so only
    training batches set the int8 ranges (an evaluation reads them without moving them).
    """
    from torchao.quantization.pt2e import (
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    folded = folded_copy(model, input_shape)  # None where torch.fx cannot: BN then trains inside the QAT graph
    prepared = prepare_int8(folded or model, input_shape, qat=True)

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        self.apply(enable_observer if mode else disable_observer)
        for m in self.modules():
            m.training = mode
        return self

    def evaluate(self: nn.Module) -> nn.Module:
        return train(self, False)

    prepared.train = types.MethodType(train, prepared)  # type: ignore[method-assign]
    prepared.eval = types.MethodType(evaluate, prepared)  # type: ignore[method-assign]
    return prepared


def convert_qat(prepared: nn.Module, input_shape: tuple[int, ...], path: str | os.PathLike | None = None,
                steps: int = 0) -> QuantizeResult:
    """The int8 program of a QAT-trained copy (converted in place, on CPU) and its .pt2 at path."""
    quantize_pt2e_mod, _ = torchao_pt2e()
    prepared = prepared.cpu().eval()
    return finish_int8(quantize_pt2e_mod.convert_pt2e(prepared), input_shape, path, steps)
