"""int8 post-training quantization of a (pruned) float model: PT2E int8 .pt2 and ONNX Runtime int8 ONNX."""

from amas.quant.ptq import (
    COMPILE_HINT,
    LOAD_HINT,
    QuantizeResult,
    calibration_inputs,
    quantize_onnx,
    quantize_pt2e,
    top1_accuracy,
)

__all__ = ["COMPILE_HINT", "LOAD_HINT", "QuantizeResult", "calibration_inputs", "quantize_onnx", "quantize_pt2e",
           "top1_accuracy"]
