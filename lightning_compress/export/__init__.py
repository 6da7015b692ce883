"""Export compressed models to artifacts that are genuinely smaller or faster.

* :func:`to_sparse` -- run sparse ``nn.Linear`` layers through ``torch.sparse`` CSR kernels where
  that is measured to be faster (:class:`SparseLinear`).
"""

from lightning_compress.export.sparse import (
    LayerDecision,
    SparseLinear,
    SparseReport,
    measure_latency,
    to_sparse,
)

__all__ = ["LayerDecision", "SparseLinear", "SparseReport", "measure_latency", "to_sparse"]
