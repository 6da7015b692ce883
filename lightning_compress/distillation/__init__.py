"""Knowledge distillation (a LightningModule wrapper) and the output cache of frozen networks."""

from lightning_compress.distillation.cache import (
    FeatureCache,
    IndexedDataset,
    OutputCache,
    indexed_collate,
    split_batch,
)
from lightning_compress.distillation.module import DistillationModule, build_teacher

__all__ = [
    "DistillationModule",
    "FeatureCache",
    "IndexedDataset",
    "OutputCache",
    "build_teacher",
    "indexed_collate",
    "split_batch",
]
