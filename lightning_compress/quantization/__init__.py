"""Quantization: quantization-aware training, binary / ternary weights, BatchNorm folding (layer fusion)."""

from lightning_compress.quantization.data_free import DataFreeQuantization, data_free_quantize, distill_data
from lightning_compress.quantization.fake_quant import (
    QuantConv1d,
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    calibrate,
    quantize_model,
)
from lightning_compress.quantization.fusion import LayerFusion, fuse
from lightning_compress.quantization.lowbit import LowBitWeights, add_binary_activations
from lightning_compress.quantization.qat import QuantizationAwareTraining, restore_quantization

__all__ = [
    "DataFreeQuantization",
    "LayerFusion",
    "LowBitWeights",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizationAwareTraining",
    "QuantizedLayer",
    "add_binary_activations",
    "calibrate",
    "data_free_quantize",
    "distill_data",
    "fuse",
    "quantize_model",
    "restore_quantization",
]
