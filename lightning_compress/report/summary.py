"""Per-layer and total compression figures of a model, as data, a rich table or plain text."""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from torch import nn

from lightning_compress.core.cost import (
    BYTES_PER_VALUE,
    CONV_INDEX_BITS,
    ENERGY_LAYERS,
    HOROWITZ_45NM,
    LINEAR_INDEX_BITS,
    EnergyTable,
    LayerCost,
    _costs_and_energy,
    _model_device,
    low_bit_codebook,
    measure_latency,
    resolve_energy_table,
    row_encoding,
)
from lightning_compress.core.surgery import channel_widths
from lightning_compress.core.validation import check_int
from lightning_compress.functional.encoding import best_encoding
from lightning_compress.quantization.fake_quant import QuantizedLayer

__all__ = [
    "CompressionSummary",
    "compression_summary",
    "format_bytes",
    "format_count",
    "format_energy",
    "format_ms",
    "shorten_name",
]

#: Width ``str(summary)`` renders at: a common terminal.
STR_WIDTH = 100
#: Layer names up to this many cells (or 2/5 of the width) are kept whole, hiding columns if needed.
_NAME_TARGET = 40
#: Narrowest Layer column the layout shortens names to.
_MIN_NAME = 12
#: Longest class name shown in the Type column before it is cut with an ellipsis.
_MAX_KIND = 18
#: Columns shown only when some row has a value for them.
_OPTIONAL = frozenset({"channels", "quantized_bytes"})
#: (key, header, justify) in display order.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("layer", "Layer", "left"),
    ("type", "Type", "left"),
    ("channels", "Channels", "right"),
    ("params", "Params", "right"),
    ("nonzeros", "Non-zeros", "right"),
    ("sparsity", "Sparsity", "right"),
    ("dense_macs", "Dense MACs", "right"),
    ("effective_macs", "Eff. MACs", "right"),
    ("dense_bytes", "Dense", "right"),
    ("sparse_bytes", "Sparse", "right"),
    ("encoding", "Enc.", "left"),
    ("quantized_bytes", "Quant.", "right"),
    ("ratio", "Ratio", "right"),
    ("energy", "Energy", "right"),
)
#: Columns hidden first to last while the table is too wide; Layer, Params and Sparsity always stay.
_DROP_ORDER = (
    "dense_bytes",
    "dense_macs",
    "nonzeros",
    "encoding",
    "type",
    "ratio",
    "energy",
    "channels",
    "quantized_bytes",
    "sparse_bytes",
    "effective_macs",
)


def format_bytes(num: int | float) -> str:
    """Human-readable decimal byte size: ``512 B``, ``1.02 MB``."""
    if num < 1000:
        return f"{int(num)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        num /= 1000.0
        if num < 1000 or unit == "TB":
            return f"{num:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_energy(picojoules: float | None) -> str:
    """Human-readable energy: ``950 pJ``, ``1.23 nJ``, ``172.05 µJ``; ``n/a`` for ``None``."""
    if picojoules is None:
        return "n/a"
    if picojoules < 1000:
        return f"{picojoules:.0f} pJ"
    for unit in ("nJ", "µJ", "mJ", "J"):
        picojoules /= 1000.0
        if picojoules < 1000 or unit == "J":
            return f"{picojoules:.2f} {unit}"
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


def shorten_name(name: str, width: int) -> str:
    """Fit a dotted module name into ``width`` characters with a middle ellipsis.

    The last component is always kept, then as many whole components before it as fit, then the
    start of the name: ``shorten_name("encoder.layers.11.self_attn.out_proj", 24)`` is
    ``"en…11.self_attn.out_proj"``. A last component that alone does not fit keeps both ends of
    the name instead. Names that fit are returned unchanged.

    Args:
        name: The name to shorten.
        width: Maximum length of the result, at least 1.

    Returns:
        ``name`` itself, or a string of exactly ``width`` characters containing ``"…"``.

    Raises:
        ValueError: If ``width`` is not a positive int.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive int, got {width!r}.")
    if len(name) <= width:
        return name
    if width == 1:
        return "…"
    parts = name.split(".")
    tail = parts[-1]
    if len(tail) + 1 > width:
        head = (width - 1) // 2
        return name[:head] + "…" + name[len(name) - (width - 1 - head) :]
    for part in reversed(parts[:-1]):
        candidate = f"{part}.{tail}"
        if len(candidate) + 1 > width:
            break
        tail = candidate
    return name[: width - 1 - len(tail)] + "…" + tail


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _sum_known(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _energy_cell(picojoules: float | None) -> str:
    return "-" if picojoules is None else format_energy(picojoules)


def _times(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return "inf" if math.isinf(ratio) else f"{ratio:.2f}x"


def _ratio(dense: int, sparse: int) -> str:
    if sparse == 0:
        return "1.00x" if dense == 0 else "inf"
    return f"{dense / sparse:.2f}x"


def _macs_cell(value: int | None, note: str | None) -> str:
    """The MAC count, or a short marker when the row's MACs are carried by another row.

    A ``?`` follows a count that misses the MACs of ops torch's counter has no formula for.
    """
    if note and "missing MACs" in note:
        return format_count(value) + "?"
    if note and not value:
        if note.startswith("counted in parent"):
            return "in parent"
        if note.startswith("counted in"):
            return "elsewhere"
        if note == "not run":
            return "not run"
    return format_count(value)


def _kind_cell(kind: str) -> str:
    return kind if len(kind) <= _MAX_KIND else kind[: _MAX_KIND - 1] + "…"


def _is_norm(kind: str) -> bool:
    """Normalization rows lose the channels of the layer they follow: counted once, with that layer."""
    return kind.lower().startswith(("batchnorm", "layernorm", "groupnorm", "instancenorm"))


def _channels_cell(channels: tuple[int, int] | None) -> str:
    return "-" if channels is None else f"{channels[1]}/{channels[0]}"


def _quant_cell(quantized_bytes: int | None, bits: int | None) -> str:
    if quantized_bytes is None:
        return "-"
    return format_bytes(quantized_bytes) + ("" if bits is None else f" ({bits}b)")


#: Bytes of an input quantizer's parameters: an fp32 scale and an int32 zero point.
_INPUT_QPARAM_BYTES = 8


def _quantized_storage(module: nn.Module) -> tuple[int | None, int | None]:
    """``(weight_bits, quantized_bytes)`` of a row, ``(None, None)`` when it is not quantized.

    A fake-quantized layer with its weight quantizer enabled stores its weight with the
    quantizer's bits and one fp32 scale per output channel (or one per tensor), plus the scale and
    zero point of its input quantizer when it quantizes its input. Any other Linear / Conv layer
    counts as quantized when its weight holds only a few distinct values (binary / ternary weights,
    :func:`~lightning_compress.core.cost.low_bit_codebook`), with its codebook's fp32 scales.
    Biases are 4 bytes per entry either way. The weights are counted in their smallest encoding
    with ``bits``-bit values (dense, bitmask, CSR or relative index), so a pruned and quantized layer
    is stored sparse, as in Deep Compression.
    """
    if not isinstance(module, ENERGY_LAYERS):
        return None, None
    weight = module.weight
    bias = getattr(module, "bias", None)
    extra = 0 if bias is None else bias.numel() * BYTES_PER_VALUE
    if isinstance(module, QuantizedLayer) and module.weight_quant.enabled:
        bits = module.weight_quant.bits
        scales = weight.shape[0] if module.weight_quant.per_channel else 1
        if module.quantize_input:
            extra += _INPUT_QPARAM_BYTES
    else:
        found = low_bit_codebook(weight)
        if found is None:
            return None, None
        bits, scales = found
    # The integer weights in their smallest encoding with `bits`-bit values: dense, or sparse
    # (bitmask / CSR / relative index) when pruning left enough zeros, as Deep Compression stores them.
    with torch.no_grad():
        values = module.quantized_weight() if isinstance(module, QuantizedLayer) else weight
    index_bits = CONV_INDEX_BITS if isinstance(module, nn.modules.conv._ConvNd) else LINEAR_INDEX_BITS
    _, weight_bits = best_encoding(values.detach(), index_bits, bits)
    return bits, -(-weight_bits // 8) + scales * BYTES_PER_VALUE + extra


def format_ms(milliseconds: float) -> str:
    """Milliseconds with three or more significant digits: ``0.123 ms``, ``4.10 ms``, ``123 ms``."""
    if milliseconds >= 100:
        return f"{milliseconds:.0f} ms"
    if milliseconds >= 10:
        return f"{milliseconds:.1f} ms"
    if milliseconds >= 1:
        return f"{milliseconds:.2f} ms"
    return f"{milliseconds:.3f} ms"


def _check_optional_positive(name: str, value: Any, meaning: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}`={value!r} is not supported; expected None ({meaning}) or an int >= 1.")


class _FittingTable(Table):
    """A full :class:`~rich.table.Table` that lays itself out again for the width it is printed at.

    ``to_rich_table()`` returns one, so a console of any width (a terminal, a log at 120 columns)
    gets readable names and whole columns instead of cells squeezed to ``…``.
    """

    def __init__(self, fit: Callable[[int], Table], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fit = fit

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._fit(options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._fit(options.max_width))


@dataclass
class CompressionSummary:
    """Per-row costs of a model, the MACs outside every row, and their totals.

    Attributes:
        layers: One :class:`~lightning_compress.core.cost.LayerCost` per row (every supported
            layer, ``nn.MultiheadAttention`` and any module that directly owns parameters).
        unattributed: MACs per sample the flop counter saw outside every row, keyed by the name
            of the innermost running module (``""``: the root's own forward). Empty without an
            example input.
        batch_size: Samples in the example input the MACs were divided by; ``None`` when no
            forward was run (MACs from the shape formula).
        uncounted: Ops that look like multiply-accumulates but have no flop formula in torch, so
            their MACs are missing, keyed by the row or module that ran them (see
            :class:`~lightning_compress.core.cost.ModelCost`). Marked ``?`` in the table.
        energy_table: The energy per operation the rows' ``energy_pj`` were computed with
            (:data:`~lightning_compress.core.cost.HOROWITZ_45NM` unless the user gave one).
        latency_ms: Median time of one forward of ``latency_batch`` samples through the model,
            in milliseconds (:func:`~lightning_compress.core.cost.measure_latency`); ``None`` when
            no latency was measured.
        baseline_latency_ms: The same for the baseline (uncompressed) model; ``None`` without one.
        latency_batch: Samples per timed forward; ``None`` when no latency was measured.
        latency_repeats: Timed forwards the medians are taken over; ``None`` likewise.
        threads: :func:`torch.get_num_threads` during the timing; ``None`` likewise.
        latency_device: Device the timed models ran on (``"cpu"``, ``"cuda:0"``); ``None`` likewise.

    The totals are properties: ``params``, ``nonzeros``, ``sparsity``, ``dense_macs`` and
    ``effective_macs`` (sums over ``layers``; ``None`` if any row's MACs are unknown),
    ``unattributed_macs`` (sum of ``unattributed``), ``total_macs = dense_macs + unattributed_macs``
    and ``total_effective_macs = effective_macs + unattributed_macs`` (everything the counter saw,
    per sample), ``dense_bytes``, ``sparse_bytes`` and ``compression_ratio``
    (``dense_bytes / sparse_bytes``), ``encoded_bytes`` (every row in its best encoding),
    ``quantized_bytes`` (quantized rows quantized, the others fp32; ``None`` without one), and the
    energy estimates ``energy_pj`` (dense), ``compressed_energy_pj`` (as stored) and
    ``energy_ratio`` (their ratio), summed over the rows that have one (Linear / Conv layers
    the forward ran; ``None`` when there is none, e.g. without an example input),
    ``channels_removed`` (output channels structure ops removed, over all rows) and ``speedup``
    (``baseline_latency_ms / latency_ms``).
    """

    layers: list[LayerCost] = field(default_factory=list)
    unattributed: dict[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    uncounted: dict[str, list[str]] = field(default_factory=dict)
    energy_table: EnergyTable = HOROWITZ_45NM
    latency_ms: float | None = None
    baseline_latency_ms: float | None = None
    latency_batch: int | None = None
    latency_repeats: int | None = None
    threads: int | None = None
    latency_device: str | None = None

    @property
    def _energy_label(self) -> str:
        source = "Horowitz 45 nm table" if self.energy_table == HOROWITZ_45NM else "user energy table"
        return f"{source}, fp32"

    @property
    def params(self) -> int:
        """Total parameters (weights and biases) of the rows."""
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        """Total non-zero parameters."""
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """``1 - nonzeros / params`` over all rows (0.0 when there are none)."""
        params = self.params
        return 1.0 - self.nonzeros / params if params else 0.0

    @property
    def dense_macs(self) -> int | None:
        """Sum of the rows' dense MACs of one sample, ``None`` if any row's MACs are unknown."""
        values = [layer.dense_macs for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def effective_macs(self) -> int | None:
        """Sum of the rows' MACs that skip zero weights, ``None`` if any row's MACs are unknown."""
        values = [layer.effective_macs for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def unattributed_macs(self) -> int:
        """MACs of one sample that fall in no row (0 without an example input)."""
        return sum(self.unattributed.values())

    @property
    def total_macs(self) -> int | None:
        """``dense_macs + unattributed_macs``: all MACs of one sample the counter saw."""
        dense = self.dense_macs
        return None if dense is None else dense + self.unattributed_macs

    @property
    def total_effective_macs(self) -> int | None:
        """``effective_macs + unattributed_macs`` (unattributed MACs use no weight to skip)."""
        effective = self.effective_macs
        return None if effective is None else effective + self.unattributed_macs

    @property
    def dense_bytes(self) -> int:
        """Total fp32 storage in bytes."""
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def sparse_bytes(self) -> int:
        """Total sparse storage in bytes (values plus the cheaper index encoding per row)."""
        return sum(layer.sparse_bytes for layer in self.layers)

    @property
    def encoded_bytes(self) -> int | None:
        """Total bytes with every row in its best encoding; ``None`` if a row has none."""
        values = [layer.encoded_bytes for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def quantized_bytes(self) -> int | None:
        """Total bytes with the quantized rows quantized and every other row in fp32.

        ``None`` when no row is quantized (see :attr:`LayerCost.quantized_bytes
        <lightning_compress.core.cost.LayerCost.quantized_bytes>`).
        """
        if all(layer.quantized_bytes is None for layer in self.layers):
            return None
        return sum(
            layer.dense_bytes if layer.quantized_bytes is None else layer.quantized_bytes
            for layer in self.layers
        )

    @property
    def energy_pj(self) -> float | None:
        """Per-sample energy estimate of the dense rows (density 1), in picojoules.

        Sum over the rows that have one (Linear / Conv layers the forward ran); ``None`` when no
        row has one. Yang, Chen & Sze (2017) model, see :class:`~lightning_compress.core.cost.LayerEnergy`.
        """
        return _sum_known([layer.energy_pj for layer in self.layers])

    @property
    def compressed_energy_pj(self) -> float | None:
        """Per-sample energy estimate of the rows as they are (their current non-zeros), in pJ."""
        return _sum_known([layer.compressed_energy_pj for layer in self.layers])

    @property
    def energy_ratio(self) -> float | None:
        """``energy_pj / compressed_energy_pj`` (``inf`` if compressed is 0, ``None`` if unknown)."""
        dense, compressed = self.energy_pj, self.compressed_energy_pj
        if dense is None or compressed is None:
            return None
        if compressed == 0:
            return 1.0 if dense == 0 else math.inf
        return dense / compressed

    @property
    def channels_removed(self) -> int:
        """Output channels of Linear / Conv rows removed by structure ops (0 when none were).

        Normalization rows (a BatchNorm after a conv) show their width too but are not counted
        again: they lose the same channels as the layer they follow.
        """
        return sum(
            layer.channels[0] - layer.channels[1]
            for layer in self.layers
            if layer.channels and not _is_norm(layer.kind)
        )

    @property
    def speedup(self) -> float | None:
        """``baseline_latency_ms / latency_ms`` (``inf`` if latency is 0); ``None`` without both."""
        before, after = self.baseline_latency_ms, self.latency_ms
        if before is None or after is None:
            return None
        if after == 0:
            return 1.0 if before == 0 else math.inf
        return before / after

    @property
    def compression_ratio(self) -> float:
        """``dense_bytes / sparse_bytes``: 1.0 without layers, ``inf`` if every weight is zero."""
        dense, sparse = self.dense_bytes, self.sparse_bytes
        if sparse == 0:
            return 1.0 if dense == 0 else math.inf
        return dense / sparse

    def totals(self) -> dict[str, Any]:
        """Return the totals as a dictionary (the ratios and ``speedup`` may be ``inf``).

        Besides the size, MAC and energy totals: ``channels_removed`` and the latency figures
        ``latency_ms``, ``baseline_latency_ms``, ``speedup``, ``latency_batch``, ``latency_repeats``,
        ``threads`` and ``latency_device`` (``None`` when no latency was measured).
        """
        return {
            "params": self.params,
            "nonzeros": self.nonzeros,
            "sparsity": self.sparsity,
            "dense_macs": self.dense_macs,
            "effective_macs": self.effective_macs,
            "unattributed_macs": self.unattributed_macs,
            "total_macs": self.total_macs,
            "total_effective_macs": self.total_effective_macs,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "compression_ratio": self.compression_ratio,
            "encoded_bytes": self.encoded_bytes,
            "quantized_bytes": self.quantized_bytes,
            "energy_pj": self.energy_pj,
            "compressed_energy_pj": self.compressed_energy_pj,
            "energy_ratio": self.energy_ratio,
            "channels_removed": self.channels_removed,
            "latency_ms": self.latency_ms,
            "baseline_latency_ms": self.baseline_latency_ms,
            "speedup": self.speedup,
            "latency_batch": self.latency_batch,
            "latency_repeats": self.latency_repeats,
            "threads": self.threads,
            "latency_device": self.latency_device,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return every field, JSON-ready, with full names; an infinite ratio becomes ``None``.

        Keys: ``layers`` (each :meth:`LayerCost.to_dict`, with ``channels`` given as
        ``channels_original`` / ``channels_kept``: the output width before and after structure
        ops, ``None`` for an unchanged layer), ``unattributed``, ``batch_size``, ``uncounted``,
        ``energy_table`` (picojoules per operation) and ``totals`` (:meth:`totals`).
        """
        totals = self.totals()
        totals["compression_ratio"] = _finite_or_none(totals["compression_ratio"])
        for key in ("energy_ratio", "speedup"):
            if totals[key] is not None:
                totals[key] = _finite_or_none(totals[key])
        layers = []
        for layer in self.layers:
            row = layer.to_dict()
            channels = row.pop("channels")
            row["channels_original"], row["channels_kept"] = channels if channels else (None, None)
            layers.append(row)
        return {
            "layers": layers,
            "unattributed": dict(self.unattributed),
            "batch_size": self.batch_size,
            "uncounted": {name: list(ops) for name, ops in self.uncounted.items()},
            "energy_table": asdict(self.energy_table),
            "totals": totals,
        }

    # ------------------------------------------------------------------ rendering

    def _cells(self) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str]]:
        """Cell texts of the rows, the unattributed rows and the TOTAL row, by column key."""
        rows = [
            {
                "layer": layer.name or "(root)",
                "type": _kind_cell(layer.kind),
                "channels": _channels_cell(layer.channels),
                "params": f"{layer.params:,}",
                "nonzeros": f"{layer.nonzeros:,}",
                "sparsity": f"{layer.sparsity:.2%}",
                "dense_macs": _macs_cell(layer.dense_macs, layer.macs_note),
                "effective_macs": _macs_cell(layer.effective_macs, layer.macs_note),
                "dense_bytes": format_bytes(layer.dense_bytes),
                "sparse_bytes": format_bytes(layer.sparse_bytes),
                "encoding": layer.encoding or "n/a",
                "quantized_bytes": _quant_cell(layer.quantized_bytes, layer.weight_bits),
                "ratio": _ratio(layer.dense_bytes, layer.sparse_bytes),
                "energy": _energy_cell(layer.compressed_energy_pj),
            }
            for layer in self.layers
        ]
        free = [
            {
                **dict.fromkeys((key for key, _, _ in _COLUMNS), "-"),
                "layer": name or "(root)",
                "type": "(no params)",
                "dense_macs": format_count(macs),
                "effective_macs": format_count(macs),
            }
            for name, macs in self.unattributed.items()
        ]
        total = {
            "layer": "TOTAL",
            "type": "",
            "channels": self._channels_total(),
            "params": f"{self.params:,}",
            "nonzeros": f"{self.nonzeros:,}",
            "sparsity": f"{self.sparsity:.2%}",
            "dense_macs": format_count(self.total_macs),
            "effective_macs": format_count(self.total_effective_macs),
            "dense_bytes": format_bytes(self.dense_bytes),
            "sparse_bytes": format_bytes(self.sparse_bytes),
            "encoding": "",
            "quantized_bytes": _quant_cell(self.quantized_bytes, None),
            "ratio": _ratio(self.dense_bytes, self.sparse_bytes),
            "energy": format_energy(self.compressed_energy_pj),
        }
        return rows, free, total

    def _channels_total(self) -> str:
        """Kept / original output channels summed over the layers structure ops narrowed."""
        changed = [layer.channels for layer in self.layers if layer.channels and not _is_norm(layer.kind)]
        if not changed:
            return "-"
        return f"{sum(now for _, now in changed)}/{sum(original for original, _ in changed)}"

    def _latency_note(self) -> str | None:
        """The footer line with the measured latencies, ``None`` when none was measured."""
        if self.latency_ms is None:
            return None
        threads = "" if self.threads is None else f", {self.threads} thread{'s' if self.threads != 1 else ''}"
        device = "" if self.latency_device in (None, "cpu") else f" on {self.latency_device}"
        text = (
            f"Latency{device} (batch {self.latency_batch}{threads}, median of {self.latency_repeats}): "
            f"{format_ms(self.latency_ms)}"
        )
        if self.baseline_latency_ms is not None:
            text += f" vs {format_ms(self.baseline_latency_ms)} before ({_times(self.speedup)})"
        return text + "."

    def _table(self, width: int | None, table_type: type[Table] = Table, **kwargs: Any) -> Table:
        rows, free, total = self._cells()
        everything = [*rows, *free, total]
        natural = {
            key: max(cell_len(header), *(cell_len(cells[key]) for cells in everything))
            for key, header, _ in _COLUMNS
        }

        def table_width(keys: list[str], name_width: int) -> int:
            # Every column has one cell of padding each side and one border; plus the last border.
            return name_width + sum(natural[k] for k in keys if k != "layer") + 3 * len(keys) + 1

        shown = {
            "channels": any(layer.channels for layer in self.layers),
            "quantized_bytes": self.quantized_bytes is not None,
        }
        keys = [key for key, _, _ in _COLUMNS if key not in _OPTIONAL or shown[key]]
        name_width = natural["layer"]
        hidden: list[str] = []
        if width is not None:
            # Whole names up to 40 cells, or 2/5 of a narrower width, before any shortening.
            wanted = min(natural["layer"], _NAME_TARGET, max(_MIN_NAME, 2 * width // 5))
            for key in _DROP_ORDER:
                if table_width(keys, wanted) <= width:
                    break
                if key not in keys:
                    continue
                keys.remove(key)
                hidden.append(key)
            room = width - table_width(keys, 0)
            name_width = max(min(natural["layer"], room), min(natural["layer"], _MIN_NAME))
        shortened = name_width < natural["layer"]

        notes = [
            f"MACs per sample (example batch of {self.batch_size}), counted by torch FlopCounterMode."
            if self.batch_size is not None
            else "MACs from layer shapes (no example input): a Linear counts one position, others n/a."
        ]
        if self.compressed_energy_pj is not None:
            unknown = any(layer.compressed_energy_pj is None for layer in self.layers)
            dense, stored = format_energy(self.energy_pj), format_energy(self.compressed_energy_pj)
            notes.append(
                f"Energy per sample (Yang et al. 2017 model, {self._energy_label}): {dense} dense, "
                f"{stored} as stored ({_times(self.energy_ratio)} less)"
                + ("; '-': not a Linear/Conv layer that ran." if unknown else ".")
            )
        encoded = self.encoded_bytes
        if encoded is not None and self.layers:
            notes.append(
                "Enc.: smallest weight format (dense, bitmask, CSR, Deep Compression relative index); "
                f"all rows encoded: {format_bytes(encoded)}."
            )
        if shown["quantized_bytes"]:
            quantized = self.quantized_bytes
            count = sum(layer.quantized_bytes is not None for layer in self.layers)
            ratio = self.dense_bytes / quantized if quantized else math.inf
            notes.append(
                f"Quant.: {count} row{'s' if count != 1 else ''} as (N-bit) integer weights plus fp32 scales "
                f"and biases; quantized: {format_bytes(quantized)} with the other rows fp32 "
                f"({_times(ratio)} smaller than fp32)."
            )
        if shown["channels"]:
            notes.append(
                "Channels: output channels kept/original of layers structure ops narrowed "
                f"('-': unchanged); {self.channels_removed:,} removed in all."
            )
        if free:
            notes.append("Rows with '-' params: MACs in modules without parameters; TOTAL includes them.")
        markers = {cells["dense_macs"] for cells in rows}
        explained = {
            "in parent": "'in parent': a parent row's forward uses the weights and carries their MACs.",
            "elsewhere": "'elsewhere': another row's forward uses the weights and carries their MACs.",
            "not run": "'not run': the forward never called the module.",
        }
        notes += [text for marker, text in explained.items() if marker in markers]
        if self.uncounted:
            ops = sorted({op for names in self.uncounted.values() for op in names})
            where = ", ".join(f"'{name or '(root)'}'" for name in self.uncounted)
            notes.append(f"'?': MACs missing, torch has no flop formula for {', '.join(ops)} (in {where}).")
        if hidden or shortened:
            headers = dict((key, header) for key, header, _ in _COLUMNS)
            fit = [f"hidden: {', '.join(headers[k] for k in hidden)}"] if hidden else []
            fit += ["names shortened with '…'"] if shortened else []
            notes.append(f"Fitted to {width} columns ({'; '.join(fit)}); to_dict() has every field.")
        latency = self._latency_note()
        if latency is not None:
            notes.append(latency)

        table = table_type(
            title="Compression summary", caption="\n".join(notes), caption_justify="left", **kwargs
        )
        for key, header, justify in _COLUMNS:
            if key in keys:
                table.add_column(header, justify=justify, no_wrap=True)

        def add(cells: dict[str, str], **row_kwargs: Any) -> None:
            cells = {**cells, "layer": shorten_name(cells["layer"], name_width)}
            table.add_row(*(cells[key] for key in keys), **row_kwargs)

        for i, cells in enumerate(rows):
            add(cells, end_section=i == len(rows) - 1)
        for i, cells in enumerate(free):
            add(cells, end_section=i == len(free) - 1, style="italic")
        add(total, style="bold")
        return table

    def to_rich_table(self, width: int | None = None) -> Table:
        """Render the rows, the unattributed MACs and a TOTAL row as a :class:`rich.table.Table`.

        The Channels column (output channels kept/original) is there only when structure ops
        changed some layer's output width, the Quant. column (bytes of a quantized row and its
        weight bits, e.g. ``1.23 kB (4b)``) only when some row is quantized. The table fits
        ``width`` terminal columns: while it is too wide, columns are hidden in the order Dense
        (bytes), Dense MACs, Non-zeros, Enc. (best encoding), Type, Ratio, Energy (as stored),
        Channels, Quant., Sparse, Eff. MACs (Layer, Params and Sparsity always stay) until names of
        up to 40 characters fit; longer names are then shortened with a middle ellipsis that keeps
        their last components (:func:`shorten_name`).
        A caption says how MACs were counted and what was hidden, and ends with the measured
        latency when there is one. :meth:`to_dict` always has every field and the full names.

        Args:
            width: Terminal columns to fit. ``None`` returns the full table, which lays itself out
                again for the width of the console it is printed to.

        Returns:
            The table; with ``width=None`` it holds every column and full name.

        Raises:
            ValueError: If ``width`` is not ``None`` or a positive int.
        """
        if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
            raise ValueError(f"`width` must be None or a positive int, got {width!r}.")
        if width is not None:
            return self._table(width)
        return self._table(None, _FittingTable, fit=self._table)

    def __rich__(self) -> Table:
        return self.to_rich_table()

    def __str__(self) -> str:
        console = Console(
            file=io.StringIO(),
            record=True,
            width=STR_WIDTH,
            no_color=True,
            color_system=None,
            force_terminal=False,
        )
        console.print(self.to_rich_table(width=STR_WIDTH))
        return console.export_text(styles=False)


def _paired_latency(
    models: tuple[nn.Module, ...], example_input: Any, batch_size: int, repeats: int, warmup: int
) -> list[float]:
    """Median forward time of each model in ms, the timed runs alternating between the models.

    Alternating puts both models under the same machine load, so a busy spell (another process on
    the cores) slows both instead of skewing their ratio.
    """
    if warmup:
        for model in models:
            # One call of `warmup` forwards; its single timed run is discarded.
            measure_latency(model, example_input, batch_size, repeats=1, warmup=warmup - 1)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, runs in zip(models, times):
            runs.append(measure_latency(model, example_input, batch_size, repeats=1, warmup=0))
    return [statistics.median(runs) for runs in times]


def compression_summary(
    model: nn.Module,
    example_input: Any = None,
    *,
    batch_size: int | None = None,
    energy_table: EnergyTable | Mapping[str, float] | None = None,
    latency_batch: int | None = None,
    baseline: nn.Module | None = None,
    latency_repeats: int = 30,
    latency_warmup: int = 5,
) -> CompressionSummary:
    """Summarise parameters, non-zeros, MACs, storage and energy of ``model``'s rows.

    Rows are every Linear, Conv1d/2d/3d, Embedding and MultiheadAttention and every other module
    that directly owns parameters. With an example input, MACs come from ONE forward pass under
    :class:`torch.utils.flop_counter.FlopCounterMode`, divided by ``batch_size``; MACs in no row
    go to :attr:`CompressionSummary.unattributed` (see
    :func:`~lightning_compress.core.cost.model_costs`).

    Storage: besides ``sparse_bytes``, every row gets ``encoding`` / ``encoded_bytes``: its weights
    in the smallest of dense, bitmask, CSR and Deep Compression relative indexing (4-bit index
    differences for convolutions, 5-bit otherwise), its biases dense
    (:func:`~lightning_compress.core.cost.row_encoding`).

    Energy: on the same forward, each Linear / Conv layer that ran gets ``energy_pj`` (dense
    weights) and ``compressed_energy_pj`` (its current non-zeros), per sample in fp32, from the
    model of Yang, Chen & Sze (CVPR 2017) with the energies of Horowitz (ISSCC 2014)
    (:class:`~lightning_compress.core.cost.LayerEnergy`). Other rows, and every row without an
    example input, have ``None``.

    Quantization: a fake-quantized layer
    (:mod:`~lightning_compress.quantization.fake_quant`) whose weight quantizer is enabled, and any
    other Linear / Conv layer whose weight holds at most 4 distinct values per output channel
    (binary / ternary weights, :func:`~lightning_compress.core.cost.low_bit_codebook`), gets
    ``weight_bits`` and ``quantized_bytes``: ``ceil(weight.numel() * bits / 8)`` plus 4 bytes per
    fp32 scale (per output channel or per tensor; a low-bit weight's codebook), 4 per bias entry,
    and 8 for the input quantizer's scale and zero point of a layer that quantizes its input.
    Other rows have ``None``; the total ``quantized_bytes`` counts them in fp32.

    Structure: every Linear / Conv / BatchNorm row whose output width structure ops
    (:func:`~lightning_compress.core.surgery.apply_ops` on ``model``) changed gets ``channels =
    (original, now)``, shown in a Channels column; ``channels_removed`` sums what was removed.

    Latency: with ``latency_batch``, the median wall-clock time of one forward of that many samples
    (copies of the example input's first sample) through ``model`` and, when given, through
    ``baseline``, each in eval mode under :func:`torch.inference_mode` on its own device
    (:func:`~lightning_compress.core.cost.measure_latency`); ``speedup`` is their ratio. With a
    baseline, both are warmed up, then their timed runs alternate so that a busy machine slows
    both alike. The figures depend on the machine and on :func:`torch.get_num_threads`, which is
    recorded.

    Args:
        model: The model to analyse.
        example_input: A tensor, tuple/list of tensors or dict of tensors for one forward pass
            (needed for convolution, attention and custom-module MACs). When ``None`` and the
            model has an ``example_input_array`` attribute that is a tensor, tuple/list or dict
            (as a ``LightningModule`` may), that is used.
        batch_size: Samples in the example input; ``None`` takes dim 0 of its first tensor (1 if
            that tensor has fewer than 2 dims).
        energy_table: Energy per operation in picojoules: ``None`` for
            :data:`~lightning_compress.core.cost.HOROWITZ_45NM`, an
            :class:`~lightning_compress.core.cost.EnergyTable`, or a mapping that gives every
            entry. Checked before anything is measured.
        latency_batch: Samples per timed forward; ``None`` measures no latency. Needs an example
            input (or ``example_input_array``).
        baseline: The uncompressed model to time the same way ("before"); ``None`` times only
            ``model``. Needs ``latency_batch``.
        latency_repeats: Timed forwards per model (the median is reported), at least 1.
        latency_warmup: Untimed forwards per model before them, at least 0.

    Returns:
        The :class:`CompressionSummary`; ``print(summary)`` shows it as a table.

    Raises:
        ValueError: If ``batch_size`` is not a positive int (see ``model_costs``),
            ``energy_table`` is invalid (the message names the entry), a latency argument is out
            of range, ``baseline`` is given without ``latency_batch`` or ``latency_batch`` without
            an example input. Every argument is checked before anything is measured.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> summary = compression_summary(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4))
        >>> summary.params, summary.dense_macs
        (10, 8)
    """
    table = resolve_energy_table(energy_table)  # fail before measuring anything
    _check_optional_positive("latency_batch", latency_batch, "no latency measured")
    check_int("latency_repeats", latency_repeats, 1)
    check_int("latency_warmup", latency_warmup, 0)
    if baseline is not None and not isinstance(baseline, nn.Module):
        raise ValueError(
            f"`baseline`={type(baseline).__name__} is not supported; expected None or an nn.Module "
            "(the uncompressed model)."
        )
    if baseline is not None and latency_batch is None:
        # A baseline is only ever timed: silently ignoring it would hide a missing `latency_batch`.
        raise ValueError(
            "`baseline` is only used to measure latency; expected `latency_batch` (an int >= 1) with it."
        )
    if example_input is None:
        candidate = getattr(model, "example_input_array", None)
        if isinstance(candidate, (torch.Tensor, tuple, list, dict)):
            example_input = candidate
    if latency_batch is not None and example_input is None:
        raise ValueError(
            "`latency_batch` needs `example_input` (a tensor, tuple/list or dict of tensors, or the "
            "model's `example_input_array`) to build the timed batch from; got None."
        )
    cost, energies = _costs_and_energy(model, example_input, batch_size)
    energy = {layer.name: layer for layer in energies}
    widths = channel_widths(model)
    modules = dict(model.named_modules())
    layers = []
    for row in cost.layers:
        encoding, encoded_bytes = row_encoding(modules[row.name])
        layer_energy = energy.get(row.name)
        out = widths.get(row.name, {}).get("out")
        weight_bits, quantized_bytes = _quantized_storage(modules[row.name])
        layers.append(
            replace(
                row,
                energy_pj=None if layer_energy is None else layer_energy.energy_pj(1.0, table),
                compressed_energy_pj=None if layer_energy is None else layer_energy.energy_pj(None, table),
                encoding=encoding,
                encoded_bytes=encoded_bytes,
                # Only a changed output width counts: a layer whose inputs alone shrank lost no channel.
                channels=out if out is not None and out[0] != out[1] else None,
                weight_bits=weight_bits,
                quantized_bytes=quantized_bytes,
            )
        )
    summary = CompressionSummary(
        layers=layers,
        unattributed=cost.unattributed,
        batch_size=cost.batch_size,
        uncounted=cost.uncounted,
        energy_table=table,
    )
    if latency_batch is not None:
        if baseline is None:
            summary.latency_ms = measure_latency(
                model, example_input, latency_batch, repeats=latency_repeats, warmup=latency_warmup
            )
        else:
            summary.baseline_latency_ms, summary.latency_ms = _paired_latency(
                (baseline, model), example_input, latency_batch, latency_repeats, latency_warmup
            )
        summary.latency_batch = latency_batch
        summary.latency_repeats = latency_repeats
        summary.threads = torch.get_num_threads()
        summary.latency_device = str(_model_device(model) or torch.device("cpu"))
    return summary
