"""Export compressed models to artifacts that are genuinely smaller or faster.

* :func:`to_sparse` -- run sparse ``nn.Linear`` layers through ``torch.sparse`` CSR kernels where
  that is measured to be faster (:class:`SparseLinear`).
* :func:`export_onnx` -- ONNX, as a QDQ int8 graph that onnxruntime runs with integer kernels when
  the model was quantized.
"""

from lightning_compress.export.onnx import export_onnx, optimized_ops
from lightning_compress.export.sparse import (
    LayerDecision,
    SparseLinear,
    SparseReport,
    measure_latency,
    to_sparse,
)

__all__ = [
    "LayerDecision",
    "SparseLinear",
    "SparseReport",
    "export_onnx",
    "measure_latency",
    "optimized_ops",
    "to_sparse",
]
