"""Pruning techniques."""

from lightning_compress.pruning.gradual import GradualPruning

__all__ = ["GradualPruning"]
