"""int8 quantization of a (pruned) float model: PT2E post-training and quantization-aware, int8 .pt2 and ONNX."""

from amas.quant.ptq import (
    COMPILE_HINT,
    LOAD_HINT,
    QuantizeResult,
    calibration_inputs,
    int8_score,
    load_int8,
    quantize_onnx,
    quantize_pt2e,
    top1_accuracy,
)
from amas.quant.qat import convert_qat, prepare_qat

__all__ = ["COMPILE_HINT", "LOAD_HINT", "QuantizeResult", "calibration_inputs", "convert_qat", "int8_score",
           "load_int8", "prepare_qat", "quantize_onnx", "quantize_pt2e", "top1_accuracy"]
