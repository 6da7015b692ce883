"""lightning-compress: neural-network compression as ordinary PyTorch Lightning callbacks.

Every public class is re-exported here, so LightningCLI resolves short names such as
``class_path: GradualPruning`` in YAML files.
"""

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.schedules import SCHEDULES, sparsity_at
from lightning_compress.core.targets import select_modules
from lightning_compress.pruning import GradualPruning
from lightning_compress.report import CompressionReport, CompressionSummary, compression_summary

__version__ = "0.1.0"

__all__ = [
    "SCHEDULES",
    "CompressionCallback",
    "CompressionReport",
    "CompressionSummary",
    "GradualPruning",
    "MaskSet",
    "__version__",
    "compression_summary",
    "select_modules",
    "sparsity_at",
]
