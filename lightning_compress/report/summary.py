"""Per-layer and total compression figures of a model, as data, a rich table or plain text."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_compress.core.cost import LayerCost, layer_costs

__all__ = ["CompressionSummary", "compression_summary", "format_bytes", "format_count"]


def format_bytes(num: int | float) -> str:
    """Human-readable decimal byte size: ``512 B``, ``1.02 MB``."""
    if num < 1000:
        return f"{int(num)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        num /= 1000.0
        if num < 1000 or unit == "TB":
            return f"{num:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(num: int | float | None) -> str:
    """Human-readable count with SI suffix: ``950``, ``266.2 K``, ``1.3 G``; ``n/a`` for ``None``."""
    if num is None:
        return "n/a"
    if num < 1000:
        return f"{int(num)}"
    for unit in ("K", "M", "G", "T"):
        num /= 1000.0
        if num < 1000 or unit == "T":
            return f"{num:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class CompressionSummary:
    """Per-layer costs of a model and their totals.

    Attributes:
        layers: One :class:`~lightning_compress.core.cost.LayerCost` per supported layer.

    The totals are properties summed over ``layers``: ``params``, ``nonzeros``, ``sparsity``,
    ``dense_macs`` and ``effective_macs`` (``None`` if any layer's MACs are unknown),
    ``dense_bytes``, ``sparse_bytes`` and ``compression_ratio`` (``dense_bytes / sparse_bytes``).
    """

    layers: list[LayerCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        """Total parameters (weights and biases) of the supported layers."""
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        """Total non-zero parameters."""
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """``1 - nonzeros / params`` over all supported layers (0.0 when there are none)."""
        params = self.params
        return 1.0 - self.nonzeros / params if params else 0.0

    @property
    def dense_macs(self) -> int | None:
        """Total dense MACs of one sample, ``None`` if any layer's MACs are unknown."""
        values = [layer.dense_macs for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def effective_macs(self) -> int | None:
        """Total MACs that skip zero weights, ``None`` if any layer's MACs are unknown."""
        values = [layer.effective_macs for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def dense_bytes(self) -> int:
        """Total fp32 storage in bytes."""
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def sparse_bytes(self) -> int:
        """Total sparse storage in bytes (values plus the cheaper index encoding per layer)."""
        return sum(layer.sparse_bytes for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """``dense_bytes / sparse_bytes``: 1.0 without layers, ``inf`` if every weight is zero."""
        dense, sparse = self.dense_bytes, self.sparse_bytes
        if sparse == 0:
            return 1.0 if dense == 0 else math.inf
        return dense / sparse

    def totals(self) -> dict[str, Any]:
        """Return the totals as a dictionary (``compression_ratio`` may be ``inf``)."""
        return {
            "params": self.params,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "dense_macs": self.dense_macs,
            "effective_macs": self.effective_macs,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "compression_ratio": self.compression_ratio,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"layers": [...], "totals": {...}}``, JSON-ready; an infinite ratio becomes ``None``."""
        totals = self.totals()
        totals["compression_ratio"] = _finite_or_none(totals["compression_ratio"])
        return {"layers": [layer.to_dict() for layer in self.layers], "totals": totals}

    def to_rich_table(self) -> Table:
        """Render the per-layer rows and a TOTAL row as a :class:`rich.table.Table`."""
        table = Table(title="Compression summary")
        table.add_column("Layer", no_wrap=True)
        table.add_column("Type")
        for header in (
            "Params",
            "Non-zeros",
            "Sparsity",
            "Dense MACs",
            "Eff. MACs",
            "Dense",
            "Sparse",
            "Ratio",
        ):
            table.add_column(header, justify="right")

        def ratio(dense: int, sparse: int) -> str:
            if sparse == 0:
                return "1.00x" if dense == 0 else "inf"
            return f"{dense / sparse:.2f}x"

        for i, layer in enumerate(self.layers):
            table.add_row(
                layer.name or "(root)",
                layer.kind,
                f"{layer.params:,}",
                f"{layer.nonzeros:,}",
                f"{layer.sparsity:.2%}",
                format_count(layer.dense_macs),
                format_count(layer.effective_macs),
                format_bytes(layer.dense_bytes),
                format_bytes(layer.sparse_bytes),
                ratio(layer.dense_bytes, layer.sparse_bytes),
                end_section=i == len(self.layers) - 1,
            )
        table.add_row(
            "TOTAL",
            "",
            f"{self.params:,}",
            f"{self.nonzeros:,}",
            f"{self.sparsity:.2%}",
            format_count(self.dense_macs),
            format_count(self.effective_macs),
            format_bytes(self.dense_bytes),
            format_bytes(self.sparse_bytes),
            ratio(self.dense_bytes, self.sparse_bytes),
            style="bold",
        )
        return table

    def __rich__(self) -> Table:
        return self.to_rich_table()

    def __str__(self) -> str:
        console = Console(
            file=io.StringIO(), record=True, width=120, no_color=True, color_system=None, force_terminal=False
        )
        console.print(self.to_rich_table())
        return console.export_text(styles=False)


def compression_summary(model: nn.Module, example_input: Any = None) -> CompressionSummary:
    """Summarise parameters, non-zeros, MACs and storage of ``model``'s supported layers.

    Args:
        model: The model to analyse (Linear, Conv1d/2d/3d and Embedding layers are counted).
        example_input: A tensor, tuple/list of tensors or dict of tensors for one forward pass
            that records layer shapes (needed for convolution MACs). When ``None`` and the model
            has an ``example_input_array`` attribute that is a tensor, tuple/list or dict (as a
            ``LightningModule`` may), that is used.

    Returns:
        The :class:`CompressionSummary`; ``print(summary)`` shows it as a table.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> summary = compression_summary(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4))
        >>> summary.params, summary.dense_macs
        (10, 8)
    """
    if example_input is None:
        candidate = getattr(model, "example_input_array", None)
        if isinstance(candidate, (torch.Tensor, tuple, list, dict)):
            example_input = candidate
    return CompressionSummary(layers=layer_costs(model, example_input))
