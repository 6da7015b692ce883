"""lightning-compress: neural-network compression as ordinary PyTorch Lightning callbacks.

Every public class is re-exported here, so LightningCLI resolves short names such as
``class_path: GradualPruning`` in YAML files.
"""

from lightning_compress.core.callback import CompressionCallback, compression_root
from lightning_compress.core.channel_importance import (
    BNScaleImportance,
    ChannelImportance,
    FPGMImportance,
    GroupTaylorImportance,
    NormImportance,
)
from lightning_compress.core.channels import ChannelGroup, build_channel_groups
from lightning_compress.core.cost import HOROWITZ_45NM, EnergyTable, LayerEnergy, energy_profile
from lightning_compress.core.engine import CompressionEngine, Constraint, FunctionConstraint, get_engine
from lightning_compress.core.importance import (
    ActivationImportance,
    Importance,
    LAMPImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.params import TargetParam, select_parameters
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at
from lightning_compress.core.surgery import (
    StructureChange,
    channel_widths,
    load_checkpoint,
    register_module_class,
)
from lightning_compress.core.targets import select_modules
from lightning_compress.distillation import (
    DistillationModule,
    FeatureCache,
    IndexedDataset,
    OutputCache,
    indexed_collate,
)
from lightning_compress.export import SparseLinear, export_onnx, to_sparse
from lightning_compress.pruning import (
    DynamicNetworkSurgery,
    EnergyAwarePruning,
    GradualPruning,
    NetworkSlimming,
    SparsityRegularizer,
    StructuredPruning,
)
from lightning_compress.quantization import (
    DataFreeQuantization,
    LayerFusion,
    LowBitWeights,
    QuantizationAwareTraining,
    data_free_quantize,
    fuse,
)
from lightning_compress.report import CompressionReport, CompressionSummary, compression_summary

__version__ = "0.1.0"

__all__ = [
    "HOROWITZ_45NM",
    "SCHEDULES",
    "ActivationImportance",
    "BNScaleImportance",
    "ChannelGroup",
    "ChannelImportance",
    "CompressionCallback",
    "CompressionEngine",
    "CompressionReport",
    "CompressionSummary",
    "Constraint",
    "DataFreeQuantization",
    "DistillationModule",
    "DynamicNetworkSurgery",
    "EnergyAwarePruning",
    "EnergyTable",
    "FPGMImportance",
    "FeatureCache",
    "FunctionConstraint",
    "GradualPruning",
    "GroupTaylorImportance",
    "Importance",
    "IndexedDataset",
    "LAMPImportance",
    "LayerEnergy",
    "LayerFusion",
    "LowBitWeights",
    "MagnitudeImportance",
    "MaskSet",
    "NetworkSlimming",
    "NormImportance",
    "OutputCache",
    "QuantizationAwareTraining",
    "RandomImportance",
    "SparseLinear",
    "SparsityRegularizer",
    "StepSchedule",
    "StructureChange",
    "StructuredPruning",
    "TargetParam",
    "TaylorImportance",
    "__version__",
    "build_channel_groups",
    "channel_widths",
    "compression_root",
    "compression_summary",
    "data_free_quantize",
    "energy_profile",
    "export_onnx",
    "fuse",
    "get_engine",
    "indexed_collate",
    "load_checkpoint",
    "register_module_class",
    "select_modules",
    "select_parameters",
    "sparsity_at",
    "to_sparse",
]
