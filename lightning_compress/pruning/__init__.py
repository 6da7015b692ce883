"""Pruning techniques."""

from lightning_compress.pruning.energy import EnergyAwarePruning
from lightning_compress.pruning.gradual import GradualPruning
from lightning_compress.pruning.regularizer import SparsityRegularizer
from lightning_compress.pruning.slimming import NetworkSlimming
from lightning_compress.pruning.structured import StructuredPruning
from lightning_compress.pruning.surgery import DynamicNetworkSurgery

__all__ = [
    "DynamicNetworkSurgery",
    "EnergyAwarePruning",
    "GradualPruning",
    "NetworkSlimming",
    "SparsityRegularizer",
    "StructuredPruning",
]
