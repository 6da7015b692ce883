"""Inference-time transforms toward quantized deployment: BatchNorm folding (layer fusion)."""

from lightning_compress.quantization.fusion import LayerFusion, fuse

__all__ = ["LayerFusion", "fuse"]
