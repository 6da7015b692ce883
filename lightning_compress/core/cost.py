"""Cost model of the layers compression acts on: parameters, non-zeros, MACs and storage bytes.

This module is pure PyTorch (no Lightning import, no technique-specific code) so every technique,
the report and the export code share one definition of "how big / how expensive is this layer".

Rows. A *row* is every supported layer (:class:`torch.nn.Linear`, :class:`torch.nn.Conv1d`,
:class:`torch.nn.Conv2d`, :class:`torch.nn.Conv3d`, :class:`torch.nn.Embedding`), every
:class:`torch.nn.MultiheadAttention`, and every other module that directly owns parameters
(``module.parameters(recurse=False)`` is non-empty: a normalization layer, a custom module with its
own :class:`torch.nn.Parameter`, ...). A row's *weights* are its directly owned parameters whose
name does not contain ``"bias"`` (for a supported layer: ``module.weight``).

MACs with an example input (:func:`model_costs`, :func:`layer_costs`). ONE forward pass runs under
:class:`torch.utils.flop_counter.FlopCounterMode`, so every matmul / convolution / attention op
that PyTorch's own counter knows is counted, whichever module issued it (custom modules,
``torch.matmul``, ``bmm``, ``einsum``, attention, factorized pairs). PyTorch counts 2 flops per
multiply-accumulate, so ``MACs = flops / 2``. Each op is attributed to the innermost *row* whose
forward is running when it executes, so a row's MACs are exclusive: its inclusive count minus the
counts of the rows nested in it, and nothing is counted twice. Ops that run inside no row (a
``bmm`` in a parameter-free attention module or in the root's forward) are *unattributed*, keyed
by the innermost running module's name (``""`` for the root). Hence, per sample::

    sum(row MACs) + sum(unattributed MACs) == FlopCounterMode total flops / 2 / batch_size

An op that looks like a multiply-accumulate (``mm``, ``conv``, ``attention``, ``rnn``, ... in its
name) but has no flop formula in torch (e.g. ``aten._trilinear`` of ``nn.Bilinear``) is reported in
``ModelCost.uncounted`` and in the row's ``macs_note`` instead of silently counting 0. Formulas are
added here for ops torch's registry lacks on CPU: the CPU attention kernel, ``mkldnn_rnn_layer``
(``nn.LSTM``) and matrix-vector products.

A row whose weights are used by another row's forward (``nn.MultiheadAttention`` applies its
``out_proj`` weight through ``F.linear`` without calling ``out_proj``) has 0 MACs of its own and a
``macs_note`` such as ``"counted in parent 'layers.0.self_attn'"``; a row the forward never
reaches has ``macs_note="not run"``.

MACs without an example input: the shape formula of :func:`dense_macs` for supported layers (a
Linear counts one position, a convolution gives ``None``) and ``None`` for every other row.

Formulas (one sample, i.e. the batch dimension is excluded):

* Shape formula (:func:`dense_macs`). MACs of a layer whose weight has ``W`` entries and which is
  applied at ``P`` output positions: ``dense_macs = P * W``.

  - Linear on an input ``(N, *, in)``: ``P = prod(*)``, ``W = in * out``, so
    ``dense_macs = prod(*) * in * out``.
  - Conv on an output ``(N, C_out, *spatial)``: ``P = prod(spatial)`` and
    ``W = C_out * (C_in / groups) * prod(kernel)``, so
    ``dense_macs = out.numel() / N * (C_in / groups) * prod(kernel)``.
  - Embedding: 0.

  The flop counter gives exactly these numbers for Linear and Conv layers.

* ``effective_macs = dense_macs * nnz(W) / numel(W)`` where ``W`` are the weights of the row plus
  the weights of other rows whose MACs the counter attributed to it (e.g. ``out_proj`` in
  ``nn.MultiheadAttention``): the MACs a sparse kernel that skips zero weights performs (Han et
  al., 2015, "Learning both Weights and Connections for Efficient Neural Networks"). For a Linear
  or Conv this is exactly ``P * nnz(weight)``; a row without weights keeps ``dense_macs``.

* ``dense_bytes = params * 4`` (fp32 storage of every directly owned parameter).

* ``sparse_bytes = min(dense_bytes, nnz * 4 + min(ceil(params / 8), 4 * nnz))``: every non-zero
  value is kept in fp32, plus the cheaper of two index encodings: a bitmap with one bit per
  parameter, or an int32 coordinate (COO) index per non-zero. It never exceeds the dense size
  because a layer that is too dense to profit is simply stored dense.

Energy (:func:`energy_profile`, :class:`LayerEnergy`, :class:`EnergyTable`). Per-sample energy of
each Linear / Conv layer after Yang, Chen & Sze (CVPR 2017, "Designing Energy-Efficient
Convolutional Neural Networks using Energy-Aware Pruning") with the 45 nm per-operation energies
of Horowitz (ISSCC 2014). With weight density ``d`` and ``s = bits / 32``::

    E = d * macs * (mult + add) + d * macs * 2 * sram_read * s
        + d * weights * dram_read * s + (input_elems + output_elems) * dram_read * s

(every MAC reads its weight and input operand from the on-chip buffer, partial sums stay in
registers; each non-zero weight is fetched from DRAM once per sample; activations are read and
written once per layer). See :class:`LayerEnergy` for the assumptions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightning_compress.core.validation import check_int
from lightning_compress.functional.encoding import best_encoding

__all__ = [
    "BYTES_PER_VALUE",
    "ENERGY_LAYERS",
    "HOROWITZ_45NM",
    "MAX_LOW_BIT_LEVELS",
    "SUPPORTED_LAYERS",
    "EnergyTable",
    "LayerCost",
    "LayerEnergy",
    "ModelCost",
    "count_nonzero_params",
    "dense_macs",
    "energy_profile",
    "is_cost_row",
    "layer_costs",
    "low_bit_codebook",
    "measure_latency",
    "model_costs",
    "resolve_energy_table",
    "row_encoding",
    "sparse_storage_bytes",
]

#: Bytes per stored value for the dense (fp32) and sparse-value storage models.
BYTES_PER_VALUE = 4
#: Bytes per index in the COO encoding (int32).
_COO_INDEX_BYTES = 4

_CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Module types the shape formula understands (``ConvTranspose*`` are not subclasses of these).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV_LAYERS, nn.Embedding)
#: Layers the energy model (:func:`energy_profile`) covers: they own a ``weight`` and do MACs with it.
ENERGY_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV_LAYERS)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one row (see the module docstring for what a row is and for the formulas).

    Attributes:
        name: Fully qualified module name as given by ``model.named_modules()`` (``""`` for the
            root module).
        kind: Class name of the module, e.g. ``"Linear"`` or ``"MultiheadAttention"``.
        params: Number of entries of the directly owned parameters (weight and bias).
        nonzeros: Number of non-zero entries among them.
        sparsity: ``1 - nonzeros / params`` (0.0 for a layer without parameters).
        dense_macs: Multiply-accumulates of one sample with dense weights, exclusive of the rows
            nested in this one; ``None`` when unknown (no example input and no shape formula).
        effective_macs: ``dense_macs`` scaled by the non-zero fraction of the row's weights;
            ``None`` when ``dense_macs`` is.
        dense_bytes: fp32 storage, ``params * 4``.
        sparse_bytes: Storage of the non-zero values plus the cheaper index encoding, capped at
            ``dense_bytes``.
        calls: How many times the measured forward called the module; ``None`` when no forward
            was run.
        macs_note: Why ``dense_macs`` is 0 or ``None`` where that is not the whole story:
            ``"counted in parent '<row>'"`` / ``"counted in '<row>'"`` (the weights were used by
            that row's forward, which carries the MACs), ``"counted in unattributed '<module>'"``,
            ``"used in ... without MACs"``, ``"not run"``, ``"weights also used in ..."`` (tied
            weights), ``"needs example_input"``, ``"missing MACs of <ops> (no flop formula in
            torch)"`` (joined to another note with ``"; "``); ``None`` otherwise.
        energy_pj: Energy estimate of one sample through the row with dense weights (density 1),
            in picojoules (:class:`LayerEnergy`); ``None`` for rows that are not Linear / Conv,
            that the forward never called, or when no forward was run. Filled in by
            :func:`~lightning_compress.report.compression_summary`, ``None`` from
            :func:`model_costs`.
        compressed_energy_pj: The same for the row as it is (its current non-zero weights).
        encoding: The smallest encoding of the row's weights (:func:`row_encoding`): ``"dense"``,
            ``"bitmask"``, ``"csr"``, ``"relative"``, or ``"mixed"`` when the row's weight
            tensors differ; filled in by the summary, ``None`` from :func:`model_costs`.
        encoded_bytes: ``ceil(bits / 8)`` of all the row's parameters: the weights in
            ``encoding``, the biases dense fp32 (:func:`row_encoding`).
        channels: ``(original, now)`` output width (out features / out channels / BatchNorm
            features) of a layer whose output width structure ops changed
            (:func:`~lightning_compress.core.surgery.channel_widths`); ``None`` when it is unchanged.
            Filled in by the summary, ``None`` from :func:`model_costs`.
        weight_bits: Bits per weight of a quantized row: the weight quantizer's width of a
            fake-quantized layer, or the width a binary / ternary weight needs
            (:func:`low_bit_codebook`); ``None`` for a row stored in floating point. Filled in by
            the summary, ``None`` from :func:`model_costs`.
        quantized_bytes: Storage of a quantized row: its integer weights in their smallest encoding
            with ``weight_bits``-bit values (dense ``ceil(numel * bits / 8)``, or bitmask / CSR /
            relative index when pruning left zeros) plus 4 bytes per fp32 scale, 4 per bias entry
            (fp32 / int32) and, for a layer that quantizes its input, 8 for that quantizer's scale
            and zero point; ``None`` when
            ``weight_bits`` is. Filled in by the summary, ``None`` from :func:`model_costs`.
    """

    name: str
    kind: str
    params: int
    nonzeros: int
    sparsity: float
    dense_macs: int | None
    effective_macs: int | None
    dense_bytes: int
    sparse_bytes: int
    calls: int | None = None
    macs_note: str | None = None
    energy_pj: float | None = None
    compressed_energy_pj: float | None = None
    encoding: str | None = None
    encoded_bytes: int | None = None
    channels: tuple[int, int] | None = None
    weight_bits: int | None = None
    quantized_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain, JSON-serialisable dictionary."""
        return asdict(self)


@dataclass(frozen=True)
class ModelCost:
    """Every row of a model plus the MACs that fall in no row.

    Attributes:
        layers: One :class:`LayerCost` per row, in ``model.named_modules()`` order.
        unattributed: MACs per sample the flop counter saw outside every row, keyed by the name of
            the innermost module that was running (``""`` for the root's own forward). Empty when
            no forward was run.
        batch_size: The number of samples the measured flops were divided by; ``None`` when no
            forward was run.
        uncounted: Ops that look like multiply-accumulates (their name has a part such as ``mm``,
            ``conv``, ``attention``, ``rnn``) but for which torch's counter has no flop formula, so
            their MACs are missing: sorted op names keyed by the row (or, outside every row, the
            module) that ran them. Rows in it also say so in their ``macs_note``.
    """

    layers: list[LayerCost]
    unattributed: dict[str, int]
    batch_size: int | None
    uncounted: dict[str, list[str]] = field(default_factory=dict)


def sparse_storage_bytes(numel: int, nonzeros: int, value_bytes: int = BYTES_PER_VALUE) -> int:
    """Bytes needed to store ``numel`` values of which ``nonzeros`` are non-zero.

    ``min(numel * value_bytes, nonzeros * value_bytes + min(ceil(numel / 8), 4 * nonzeros))``:
    the non-zero values plus the cheaper of a one-bit-per-entry bitmap and int32 COO indices,
    never more than storing everything densely.

    Args:
        numel: Total number of entries.
        nonzeros: Number of non-zero entries, ``0 <= nonzeros <= numel``.
        value_bytes: Bytes per stored value (4 for fp32).

    Returns:
        The storage size in bytes.

    Raises:
        ValueError: If the counts are negative or ``nonzeros > numel``.
    """
    if numel < 0 or nonzeros < 0 or nonzeros > numel:
        raise ValueError(
            f"`numel` and `nonzeros` must satisfy 0 <= nonzeros <= numel, got numel={numel!r}, "
            f"nonzeros={nonzeros!r}."
        )
    dense = numel * value_bytes
    bitmap = -(-numel // 8)  # ceil without floats: exact for huge layers
    coo = _COO_INDEX_BYTES * nonzeros
    return min(dense, nonzeros * value_bytes + min(bitmap, coo))


def _conv_output_spatial(module: nn.Module, spatial_in: Sequence[int]) -> list[int]:
    """Output spatial size of a convolution from its input spatial size (PyTorch's formula)."""
    out = []
    for i, size in enumerate(spatial_in):
        kernel, stride, dilation = module.kernel_size[i], module.stride[i], module.dilation[i]
        if module.padding == "same":
            out.append(int(size))
            continue
        pad = 0 if module.padding == "valid" else module.padding[i]
        out.append((int(size) + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
    return out


def _conv_spatial(module: nn.Module, shape: Sequence[int], name: str) -> tuple[int, ...]:
    """The spatial dims of a conv's (batched or unbatched) input or output ``shape``."""
    n_spatial = len(module.kernel_size)
    shape = tuple(shape)
    if len(shape) not in (n_spatial + 1, n_spatial + 2):
        raise ValueError(
            f"`{name}` of a {type(module).__name__} must have {n_spatial + 2} dims "
            f"(N, C, *spatial) or {n_spatial + 1} unbatched, got {shape!r}."
        )
    return shape[-n_spatial:]


def _positions_conv(
    module: nn.Module, input_shape: Sequence[int] | None, output_shape: Sequence[int] | None
) -> int | None:
    """Number of output positions per sample of a convolution, or ``None`` when unknown."""
    if output_shape is not None:
        return math.prod(_conv_spatial(module, output_shape, "output_shape"))
    if input_shape is not None:
        return math.prod(_conv_output_spatial(module, _conv_spatial(module, input_shape, "input_shape")))
    return None


def _positions_linear(input_shape: Sequence[int] | None, output_shape: Sequence[int] | None) -> int:
    """Output positions per sample of a Linear: product of the dims between batch and features."""
    shape = output_shape if output_shape is not None else input_shape
    if shape is None or len(shape) <= 2:
        return 1
    return math.prod(int(d) for d in tuple(shape)[1:-1])


def _check_supported(module: nn.Module) -> None:
    if not isinstance(module, SUPPORTED_LAYERS):
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise TypeError(f"cost model does not support {type(module).__name__}; supported layers: {names}.")
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{type(module).__name__} has uninitialized (lazy) parameters; run one forward pass "
            "before computing its cost."
        )


def dense_macs(
    module: nn.Module,
    input_shape: Sequence[int] | None = None,
    output_shape: Sequence[int] | None = None,
) -> int | None:
    """Multiply-accumulates of ONE sample through ``module`` with dense weights.

    * Linear, input ``(N, *, in)``: ``prod(*) * in * out`` (``in * out`` when shapes are unknown
      or the input is ``(N, in)`` / ``(in,)``).
    * Conv1d/2d/3d, output ``(N, C_out, *spatial)``:
      ``out.numel() / N * (C_in / groups) * prod(kernel)``. The output shape is derived from
      ``input_shape`` with PyTorch's convolution formula when only the input shape is given.
    * Embedding: 0 (a table lookup).

    The batch dimension is always excluded (shapes without one, as PyTorch accepts for unbatched
    inputs, count as a single sample).

    Args:
        module: A supported layer (see :data:`SUPPORTED_LAYERS`).
        input_shape: Shape of the module's first input, if known.
        output_shape: Shape of the module's output, if known (preferred over ``input_shape``).

    Returns:
        The MAC count, or ``None`` for a convolution whose output shape is unknown.

    Raises:
        TypeError: If ``module`` is not a supported layer.
        ValueError: If a convolution shape has the wrong number of dimensions.
    """
    _check_supported(module)
    if isinstance(module, nn.Embedding):
        return 0
    if isinstance(module, nn.Linear):
        positions = _positions_linear(input_shape, output_shape)
    else:
        positions = _positions_conv(module, input_shape, output_shape)
        if positions is None:
            return None
    # weight.numel() == out*in for Linear and C_out*(C_in/groups)*prod(kernel) for Conv.
    return int(positions) * module.weight.numel()


def _count_nonzero(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    return int(torch.count_nonzero(tensor.detach()))


def _iter_supported(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED_LAYERS):
            yield name, module


def count_nonzero_params(model: nn.Module) -> tuple[int, int]:
    """Count non-zero and total weight entries of the supported layers of ``model``.

    Biases are not included (pruning acts on weights). Weights tied between layers are counted
    once per layer that uses them.

    Args:
        model: Any module; only its supported layers are counted.

    Returns:
        ``(nonzeros, total)``.
    """
    nonzeros = total = 0
    for _, module in _iter_supported(model):
        _check_supported(module)
        nonzeros += _count_nonzero(module.weight)
        total += module.weight.numel()
    return nonzeros, total


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"`batch_size` must be None or a positive int, got {batch_size!r}.")


def _infer_batch_size(example_input: Any) -> int:
    """Dim 0 of the first tensor of ``example_input``; 1 if that tensor has fewer than 2 dims."""
    tensor = _first_tensor(example_input)
    if tensor is None or tensor.dim() < 2:
        return 1
    size = int(tensor.shape[0])
    if size < 1:
        raise ValueError(
            f"`example_input` has an empty batch (dim 0 of its first tensor is 0, shape "
            f"{tuple(tensor.shape)!r}); pass at least one sample."
        )
    return size


# --------------------------------------------------------------------------- rows


def is_cost_row(module: nn.Module) -> bool:
    """Whether ``module`` gets its own row in :func:`model_costs`.

    A row is a supported layer, an ``nn.MultiheadAttention``, or any module with directly owned
    parameters (``module.parameters(recurse=False)`` non-empty). The parameter
    holders of :mod:`torch.nn.utils.parametrize` are not rows: their layer is.
    """
    if isinstance(module, ParametrizationList):
        return False
    if isinstance(module, (*SUPPORTED_LAYERS, nn.MultiheadAttention)):
        return True
    return next(module.parameters(recurse=False), None) is not None


def _row_tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(weights, other parameters)`` of a row; other = names containing ``"bias"``."""
    if isinstance(module, SUPPORTED_LAYERS):
        bias = getattr(module, "bias", None)
        return [module.weight], [] if bias is None else [bias]
    weights, others = [], []
    for name, param in module.named_parameters(recurse=False):
        (others if "bias" in name else weights).append(param)
    return weights, others


#: Most distinct values per output channel a weight may hold to count as low-bit (2 bits).
MAX_LOW_BIT_LEVELS = 4


def _codebook_size(values: torch.Tensor) -> int:
    """fp32 values needed to decode the sorted distinct ``values``.

    Zero is free; a sign-symmetric codebook (``v`` in it exactly when ``-v`` is) stores only its
    magnitudes.
    """
    nonzero = values[values != 0]
    if nonzero.numel() and torch.equal(nonzero, -nonzero.flip(0)):
        return int((nonzero > 0).sum())
    return int(nonzero.numel())


@torch.no_grad()
def low_bit_codebook(weight: torch.Tensor) -> tuple[int, int] | None:
    """Bits per entry and fp32 scales of a weight that holds only a few distinct values, else ``None``.

    Binary (``alpha_c * sign(w)``, XNOR-Net), ternary (TWN ``{-a, 0, a}``, TTQ ``{-wn, 0, wp}``) and
    other weights with at most :data:`MAX_LOW_BIT_LEVELS` distinct values (exact equality) in every
    output channel (dim 0): with ``k`` the most distinct values of a channel, ``bits =
    max(1, ceil(log2(k)))``. The scales are the fp32 values a decoder needs: the distinct non-zero
    values of each channel (only their magnitudes when the channel's values are sign-symmetric),
    or, when it is fewer and the whole tensor's distinct values (zero included) fit in ``bits``,
    those of the whole tensor. Zero needs no scale.

    ``None`` (not low-bit) for a weight with more than :data:`MAX_LOW_BIT_LEVELS` values in some
    channel, with at most one value in every channel (an all-zero, i.e. fully pruned, weight), with
    a single non-zero value in all (``{0, v}``: an identity / Dirac initialisation or a mask
    pattern rather than binary or ternary weights, which carry a sign), or whose scales would be no
    fewer than its non-zero entries (a tiny float layer whose channels merely have few entries:
    nothing is saved by a codebook).

    Args:
        weight: The weight, output channels on dim 0 (a 1-dim tensor is one value per channel).

    Returns:
        ``(bits, scales)`` or ``None``.
    """
    if weight.numel() == 0 or not weight.is_floating_point() or weight.is_meta:
        return None
    rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.detach().reshape(1, 1)
    # Cheap rejection of an ordinary float layer: its first channel alone has too many values.
    if torch.unique(rows[0]).numel() > MAX_LOW_BIT_LEVELS:
        return None
    ordered = rows.sort(dim=1).values
    levels = int((ordered[:, 1:] != ordered[:, :-1]).sum(1).max()) + 1 if ordered.shape[1] > 1 else 1
    if levels <= 1 or levels > MAX_LOW_BIT_LEVELS:
        return None
    bits = max(1, math.ceil(math.log2(levels)))
    scales = sum(_codebook_size(row.unique_consecutive()) for row in ordered)
    whole = torch.unique(ordered)
    if int((whole != 0).sum()) < 2:
        return None
    if whole.numel() <= 2**bits:
        scales = min(scales, _codebook_size(whole))
    if scales >= int(torch.count_nonzero(ordered)):
        return None
    return bits, scales


#: Bits per relative-index difference in :func:`row_encoding`: 4 for convolutions, 5 otherwise (the
#: figures this project's issue fixed; Deep Compression's paper stores 8-bit differences for conv
#: layers and 5-bit ones for fully connected layers: pass ``index_bits`` to
#: :func:`lightning_compress.functional.encoding.best_encoding` for another width).
CONV_INDEX_BITS = 4
LINEAR_INDEX_BITS = 5


def row_encoding(module: nn.Module, value_bits: int = 32) -> tuple[str, int]:
    """The smallest encoding of a row's weights and the bytes of all its parameters.

    Each weight tensor of the row (see :func:`is_cost_row`; for a supported layer its ``weight``)
    is stored in its smallest format by
    :func:`~lightning_compress.functional.encoding.best_encoding` (dense, bitmask, CSR or
    Deep Compression relative indexing) with 4-bit index differences for Conv1d/2d/3d and 5-bit
    ones for every other row; biases (parameter names containing ``"bias"``) are stored dense.
    ``bytes = ceil((sum of weight bits + bias entries * value_bits) / 8)``.

    Args:
        module: A row.
        value_bits: Bits per stored value (32 for fp32).

    Returns:
        ``(encoding, bytes)``: the common format of the weight tensors (``"dense"`` for a row
        without weights, ``"mixed"`` when its weight tensors use different formats) and the size.
    """
    weights, others = _row_tensors(module)
    index_bits = CONV_INDEX_BITS if isinstance(module, _CONV_LAYERS) else LINEAR_INDEX_BITS
    names, bits = set(), sum(t.numel() for t in others) * value_bits
    for weight in weights:
        name, size = best_encoding(weight, index_bits, value_bits)
        names.add(name)
        bits += size
    encoding = "dense" if not names else names.pop() if len(names) == 1 else "mixed"
    return encoding, -(-bits // 8)


def _check_initialized(module: nn.Module) -> None:
    tensors = [module.weight] if isinstance(module, SUPPORTED_LAYERS) else module.parameters(recurse=False)
    if any(isinstance(t, nn.parameter.UninitializedParameter) for t in tensors):
        raise ValueError(
            f"{type(module).__name__} has uninitialized (lazy) parameters; run one forward pass "
            "before computing its cost."
        )


# --------------------------------------------------------------------------- measurement

_aten = torch.ops.aten


def _mv_flop(mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _addmv_flop(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(mat_shape, vec_shape)


def _dot_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


def _sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``q @ k^T`` plus ``scores @ v``, as torch's own formula for the CUDA attention kernels."""
    batch = math.prod(query_shape[:-2])
    s_q, d_qk = query_shape[-2:]
    return 2 * batch * s_q * key_shape[-2] * (d_qk + value_shape[-1])


def _rnn_layer_flop(input_shape, weight_ih_shape, weight_hh_shape, *args, out_shape=None, **kwargs) -> int:
    """One RNN layer and direction: both weight matrices at every (step, sample) position."""
    return 2 * math.prod(input_shape[:-1]) * (math.prod(weight_ih_shape) + math.prod(weight_hh_shape))


#: Ops torch's flop registry does not know that still do MACs (the CPU attention and LSTM kernels,
#: matrix-vector products); 2 flops per MAC, like the registry.
_EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    _aten.mv: _mv_flop,
    _aten.addmv: _addmv_flop,
    _aten.dot: _dot_flop,
    _aten.vdot: _dot_flop,
}
for _name, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flop),
    ("mkldnn_rnn_layer", _rnn_layer_flop),
):
    if hasattr(_aten, _name):  # both exist in torch >= 2.2
        _EXTRA_FLOP_FORMULAS[getattr(_aten, _name)] = _formula
del _name, _formula

#: Name parts of ops that multiply-accumulate. Such an op without a flop formula is reported as
#: uncounted (``aten._trilinear`` of ``nn.Bilinear``, ``aten._cudnn_rnn``, int8 / int4 matmuls, ...)
#: rather than silently counted as 0.
_MAC_OP_TOKENS = frozenset(
    {
        "mm", "bmm", "addmm", "baddbmm", "matmul", "mv", "addmv", "dot", "vdot", "einsum", "tensordot",
        "linear", "bilinear", "trilinear", "conv", "conv1d", "conv2d", "conv3d", "convolution",
        "attention", "transformer", "rnn", "lstm", "gru",
    }
)  # fmt: skip


def _op_name(func: Any) -> str:
    return str(getattr(func, "_overloadpacket", func))


def _may_do_macs(name: str) -> bool:
    return not _MAC_OP_TOKENS.isdisjoint(name.replace(".", "_").split("_"))


#: Where an op's flops go: ``(True, row name)`` or ``(False, name of a module that is no row)``.
_Target = tuple[bool, str]


def _storage_ptr(tensor: torch.Tensor) -> int | None:
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
        return None
    return ptr or None  # 0: meta tensors and empty storages identify nothing


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _iter_tensors(item)


class _AttributionMode(TorchDispatchMode):
    """Attributes each op's flops to the current target.

    Sits above the flop counter's own dispatch mode, reads how much the counter's total grew while
    the op ran, and records which targets used each row's weights (by storage, so views such as
    ``weight.t()`` count).
    """

    def __init__(
        self,
        counter: FlopCounterMode,
        target: Callable[[], _Target],
        weight_owners: dict[int, list[str]],
    ) -> None:
        super().__init__()
        self.counter = counter
        self.target = target
        self.weight_owners = weight_owners
        self.flops: dict[_Target, int] = defaultdict(int)
        #: row name -> {target that used its weights: whether that op had flops}
        self.uses: dict[str, dict[_Target, bool]] = defaultdict(dict)
        #: target -> names of MAC-like ops the counter has no formula for
        self.uncounted: dict[_Target, set[str]] = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)  # runs (and is counted) in the flop counter's mode below
        flops = self.counter.get_total_flops() - before
        where = self.target()
        if flops:
            self.flops[where] += flops
        elif getattr(func, "_overloadpacket", None) not in self.counter.flop_registry:
            name = _op_name(func)
            if _may_do_macs(name):
                self.uncounted[where].add(name)
        for tensor in _iter_tensors((args, kwargs)):
            for owner in self.weight_owners.get(_storage_ptr(tensor), ()):
                seen = self.uses[owner]
                seen[where] = seen.get(where, False) or flops > 0
        return out


@dataclass
class _Measurement:
    flops: dict[_Target, int]
    calls: dict[str, int]
    uses: dict[str, dict[_Target, bool]]
    uncounted: dict[_Target, set[str]]
    #: row name -> [input elements, output elements] summed over calls (whole batch); only rows
    #: asked for in ``_measure(activations_of=...)``.
    activations: dict[str, list[int]] = field(default_factory=dict)


def _numel_first(obj: Any) -> int:
    tensor = _first_tensor(obj)
    return 0 if tensor is None else tensor.numel()


def _measure(
    model: nn.Module,
    example_input: Any,
    rows: list[tuple[str, nn.Module]],
    activations_of: frozenset[str] = frozenset(),
) -> _Measurement:
    """One eval-mode, no-grad forward under ``FlopCounterMode``, attributing flops to rows.

    For the rows named in ``activations_of`` the same forward also records the element counts of
    the first input tensor and of the output tensor of every call (for the energy model).
    """
    row_ids = {id(module) for _, module in rows}
    stack: list[_Target] = []
    calls: dict[str, int] = defaultdict(int)
    activations: dict[str, list[int]] = {}

    def target() -> _Target:
        for entry in reversed(stack):
            if entry[0]:
                return entry
        return stack[-1] if stack else (False, "")

    def make_hooks(name: str, is_row: bool):
        def pre_hook(module: nn.Module, args: Any) -> None:
            stack.append((is_row, name))
            if is_row:
                calls[name] += 1

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            stack.pop()
            if name in activations_of and is_row:
                sizes = activations.setdefault(name, [0, 0])
                sizes[0] += _numel_first(args)
                sizes[1] += _numel_first(output)

        return pre_hook, post_hook

    weight_owners: dict[int, list[str]] = defaultdict(list)
    for name, module in rows:
        for weight in _row_tensors(module)[0]:
            ptr = _storage_ptr(weight)
            if ptr is not None:
                weight_owners[ptr].append(name)

    # Remember every module's own flag: a model may keep parts (a frozen teacher) in eval on purpose.
    modes = [(module, module.training) for module in model.modules()]
    example_input = _to_device(example_input, _model_device(model))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    handles = []
    try:
        for name, module in model.named_modules():
            pre_hook, post_hook = make_hooks(name, id(module) in row_ids)
            # Outermost hooks, so ops in the user's own hooks belong to the module they hook.
            handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        # Eval so BatchNorm/Dropout neither update state nor reject a batch of one; no MHA fast path
        # (its fused kernels are invisible to the flop counter).
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with (
            torch.no_grad(),
            FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter,
            _AttributionMode(counter, target, dict(weight_owners)) as attribution,
        ):
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return _Measurement(
        flops=dict(attribution.flops),
        calls=dict(calls),
        uses=dict(attribution.uses),
        uncounted=dict(attribution.uncounted),
        activations=activations,
    )


def _per_sample(flops: int, batch_size: int) -> int:
    """``flops / 2 / batch_size`` rounded half up, in integers (exact for huge counts)."""
    return (flops + batch_size) // (2 * batch_size)


def _describe(where: _Target, row: str) -> str:
    is_row, name = where
    label = f"'{name or '(root)'}'"
    if not is_row:
        return f"unattributed {label}"
    if name == row:
        return label
    return f"parent {label}" if name == "" or row.startswith(name + ".") else label


def _note(row: str, calls: int, uses: dict[_Target, bool]) -> str | None:
    elsewhere = {where: had_flops for where, had_flops in uses.items() if where != (True, row)}
    with_flops = [_describe(where, row) for where, had in elsewhere.items() if had]
    if calls:
        return f"weights also used in {', '.join(with_flops)}" if with_flops else None
    if with_flops:
        return f"counted in {', '.join(with_flops)}"
    if elsewhere:
        return f"used in {', '.join(_describe(where, row) for where in elsewhere)} without MACs"
    return "not run"


# --------------------------------------------------------------------------- public entry points


def model_costs(model: nn.Module, example_input: Any = None, *, batch_size: int | None = None) -> ModelCost:
    """Compute the :class:`LayerCost` of every row of ``model`` and the MACs outside all rows.

    Without ``example_input`` no forward runs: supported layers follow :func:`dense_macs` with
    unknown shapes (a Linear counts one position, a convolution gives ``None``), other rows get
    ``None`` MACs (``macs_note="needs example_input"``) and ``unattributed`` is empty.

    With it, ONE forward pass runs under :func:`torch.no_grad` in eval mode (with the
    ``nn.MultiheadAttention`` fast path off) inside
    :class:`torch.utils.flop_counter.FlopCounterMode`; each op's flops go to the innermost row whose
    forward is running, or to ``unattributed[<innermost module>]`` when no row is. Per sample,
    ``MACs = flops / 2 / batch_size`` (rounded half up), so
    ``sum(row MACs) + sum(unattributed) == total flops / 2 / batch_size``. A module called several
    times sums its calls. The hooks are removed and every module's training flag and the fast-path
    flag are restored afterwards, even if the forward raises.

    Formulas (see the module docstring): ``params = sum(numel(p))`` over directly owned
    parameters, ``nonzeros`` counted with one :func:`torch.count_nonzero` per tensor,
    ``sparsity = 1 - nonzeros / params``, ``effective_macs = dense_macs * nnz(W) / numel(W)``,
    ``dense_bytes = 4 * params``,
    ``sparse_bytes = min(dense_bytes, 4 * nonzeros + min(ceil(params / 8), 4 * nonzeros))``.

    Args:
        model: The model to analyse.
        example_input: A tensor, a tuple/list of positional tensors, or a dict of keyword
            tensors to feed ``model``. Moved to the model's device.
        batch_size: Samples in ``example_input``. ``None`` takes dim 0 of its first tensor
            (depth first through tuples, lists and dict values), or 1 if that tensor has fewer
            than 2 dims. Pass it for inputs whose batch is not dim 0, e.g. ``(L, N, E)`` for
            ``nn.MultiheadAttention(batch_first=False)`` or an unbatched ``(C, H, W)`` image.

    Returns:
        The :class:`ModelCost`.

    Raises:
        TypeError: If ``model`` is not an :class:`torch.nn.Module`.
        ValueError: If ``batch_size`` is not a positive int, the inferred batch is empty, or a row
            has uninitialized (lazy) parameters.
    """
    return _model_costs(model, example_input, batch_size)[0]


def _model_costs(
    model: nn.Module, example_input: Any, batch_size: int | None, with_activations: bool = False
) -> tuple[ModelCost, _Measurement | None]:
    """:func:`model_costs` plus the raw measurement (activation sizes of the energy layers)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    _check_batch_size(batch_size)
    rows = [(name, module) for name, module in model.named_modules() if is_cost_row(module)]
    for _, module in rows:
        _check_initialized(module)

    measurement = None
    if example_input is not None:
        batch_size = batch_size if batch_size is not None else _infer_batch_size(example_input)
        tracked = frozenset(name for name, module in rows if isinstance(module, ENERGY_LAYERS))
        measurement = _measure(model, example_input, rows, tracked if with_activations else frozenset())
    else:
        batch_size = None

    tensors = {name: _row_tensors(module) for name, module in rows}
    absorbed: dict[str, list[str]] = defaultdict(list)  # row -> other rows whose weights it used
    if measurement is not None:
        for owner, uses in measurement.uses.items():
            for (is_row, where), had_flops in uses.items():
                if is_row and had_flops and where != owner:
                    absorbed[where].append(owner)

    costs = []
    for name, module in rows:
        weights, others = tensors[name]
        params = sum(t.numel() for t in weights) + sum(t.numel() for t in others)
        nonzeros = sum(_count_nonzero(t) for t in weights) + sum(_count_nonzero(t) for t in others)
        calls = note = None
        if measurement is None:
            macs = dense_macs(module) if isinstance(module, SUPPORTED_LAYERS) else None
            if macs is None:
                note = "needs example_input"
        else:
            calls = measurement.calls.get(name, 0)
            macs = _per_sample(measurement.flops.get((True, name), 0), batch_size)
            note = _note(name, calls, measurement.uses.get(name, {}))
            missing = measurement.uncounted.get((True, name))
            if missing:
                text = f"missing MACs of {', '.join(sorted(missing))} (no flop formula in torch)"
                note = text if note is None else f"{note}; {text}"

        effective = None
        if macs is not None:
            density_tensors = weights + [w for other in absorbed.get(name, ()) for w in tensors[other][0]]
            numel = sum(t.numel() for t in density_tensors)
            nnz = sum(_count_nonzero(t) for t in density_tensors)
            effective = macs * nnz // numel if numel else macs

        costs.append(
            LayerCost(
                name=name,
                kind=type(module).__name__,
                params=params,
                nonzeros=nonzeros,
                sparsity=1.0 - nonzeros / params if params else 0.0,
                dense_macs=macs,
                effective_macs=effective,
                dense_bytes=params * BYTES_PER_VALUE,
                sparse_bytes=sparse_storage_bytes(params, nonzeros),
                calls=calls,
                macs_note=note,
            )
        )
    unattributed: dict[str, int] = {}
    uncounted: dict[str, list[str]] = {}
    if measurement is not None:
        unattributed = {
            where: _per_sample(flops, batch_size)
            for (is_row, where), flops in measurement.flops.items()
            if not is_row
        }
        uncounted = {where: sorted(ops) for (_, where), ops in measurement.uncounted.items()}
    cost = ModelCost(layers=costs, unattributed=unattributed, batch_size=batch_size, uncounted=uncounted)
    return cost, measurement


def layer_costs(
    model: nn.Module, example_input: Any = None, *, batch_size: int | None = None
) -> list[LayerCost]:
    """The rows of :func:`model_costs`: one :class:`LayerCost` per row, in module order.

    See :func:`model_costs` for the measurement, the formulas and the arguments; the MACs that
    fall in no row are only in ``model_costs(...).unattributed``.

    Args:
        model: The model to analyse.
        example_input: A tensor, a tuple/list of positional tensors, or a dict of keyword
            tensors to feed ``model``; ``None`` runs no forward.
        batch_size: Samples in ``example_input``; ``None`` infers it (see :func:`model_costs`).

    Returns:
        One :class:`LayerCost` per row, in ``model.named_modules()`` order.

    Raises:
        TypeError: If ``model`` is not an :class:`torch.nn.Module`.
        ValueError: As :func:`model_costs`.
    """
    return model_costs(model, example_input, batch_size=batch_size).layers


# --------------------------------------------------------------------------- energy model


_ENERGY_KEYS: tuple[str, ...] = ("fp32_mult", "fp32_add", "int8_mult", "int8_add", "sram_read", "dram_read")


def _check_energy_entry(label: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{label} must be a finite number >= 0 (picojoules), got {value!r}.")


def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ValueError(f"`bits` must be an int in [2, 32], got {bits!r}.")


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation in picojoules (pJ).

    The defaults are the 45 nm, 0.9 V figures of Horowitz (ISSCC 2014, "Computing's energy
    problem (and what we can do about it)"), the table Yang, Chen & Sze (CVPR 2017) build their
    energy model on. A table is validated on construction: every entry must be a finite number
    ``>= 0``.

    Attributes:
        fp32_mult: One 32-bit floating-point multiply.
        fp32_add: One 32-bit floating-point add.
        int8_mult: One 8-bit integer multiply.
        int8_add: One 8-bit integer add.
        sram_read: One 32-bit access to an on-chip SRAM buffer (Horowitz: 5 pJ for an 8 kB SRAM).
        dram_read: One 32-bit off-chip DRAM access.

    Raises:
        ValueError: If an entry is negative, not finite or not a number.
    """

    fp32_mult: float = 3.7
    fp32_add: float = 0.9
    int8_mult: float = 0.2
    int8_add: float = 0.03
    sram_read: float = 5.0  # one 32-bit on-chip SRAM access
    dram_read: float = 640.0  # one 32-bit DRAM access

    def __post_init__(self) -> None:
        for key in _ENERGY_KEYS:
            _check_energy_entry(f"`EnergyTable.{key}`", getattr(self, key))

    @classmethod
    def from_mapping(cls, table: Mapping[str, float]) -> EnergyTable:
        """Build a table from a user mapping (e.g. a YAML dict) that gives EVERY entry.

        Args:
            table: ``{"fp32_mult": ..., "fp32_add": ..., "int8_mult": ..., "int8_add": ...,
                "sram_read": ..., "dram_read": ...}`` in picojoules.

        Returns:
            The :class:`EnergyTable`.

        Raises:
            ValueError: If ``table`` is not a mapping, an entry is missing, a key is unknown, or a
                value is negative, not finite or not a number; the message names the entry.
        """
        expected = ", ".join(repr(key) for key in _ENERGY_KEYS)
        if not isinstance(table, Mapping):
            raise ValueError(
                f"`energy_table` must be None, an EnergyTable or a mapping with the entries [{expected}], "
                f"got {table!r}."
            )
        unknown = [key for key in table if key not in _ENERGY_KEYS]
        if unknown:
            raise ValueError(
                f"`energy_table` has unknown entry {unknown[0]!r}; expected exactly the entries [{expected}]."
            )
        missing = [key for key in _ENERGY_KEYS if key not in table]
        if missing:
            raise ValueError(f"`energy_table` is missing {missing[0]!r}; expected all of [{expected}].")
        for key in _ENERGY_KEYS:
            _check_energy_entry(f"`energy_table[{key!r}]`", table[key])
        return cls(**{key: float(table[key]) for key in _ENERGY_KEYS})

    def mac_pj(self, bits: int = 32) -> float:
        """Energy of one multiply plus one add: int8 arithmetic for ``bits <= 8``, fp32 above."""
        _check_bits(bits)
        return self.int8_mult + self.int8_add if bits <= 8 else self.fp32_mult + self.fp32_add


#: Horowitz (ISSCC 2014), 45 nm: the default table.
HOROWITZ_45NM: EnergyTable = EnergyTable()


def resolve_energy_table(table: EnergyTable | Mapping[str, float] | None) -> EnergyTable:
    """The :class:`EnergyTable` to use: ``None`` -> :data:`HOROWITZ_45NM`, a mapping -> checked.

    Args:
        table: ``None``, an :class:`EnergyTable`, or a mapping giving every entry (see
            :meth:`EnergyTable.from_mapping`).

    Returns:
        The table.

    Raises:
        ValueError: If ``table`` is of another type, or a mapping with a missing, unknown or invalid
            entry (the message names it).
    """
    if table is None:
        return HOROWITZ_45NM
    if isinstance(table, EnergyTable):
        return table
    return EnergyTable.from_mapping(table)


@dataclass(frozen=True)
class LayerEnergy:
    """What the energy model needs to know about one Linear / Conv layer, for ONE sample.

    The model (Yang, Chen & Sze, CVPR 2017, "Designing Energy-Efficient Convolutional Neural
    Networks using Energy-Aware Pruning", with Horowitz's ISSCC 2014 45 nm table) splits a layer's
    energy into computation and data movement. With the weight density ``d`` (non-zero fraction),
    ``s = bits / 32`` (memory accesses are 32-bit words; narrower values move proportionally less)
    and ``mac = mult + add`` (int8 arithmetic for ``bits <= 8``, fp32 above)::

        E = d * macs * mac                      # effective MACs: pruned weights do no MAC
          + d * macs * 2 * sram_read * s        # weight and input operand of every MAC from SRAM
          + d * weights * dram_read * s         # each non-zero weight fetched from DRAM once
          + (input_elems + output_elems) * dram_read * s   # activations read / written once

        = fixed_pj + d * weights * per_weight_pj

    Data-reuse assumptions: partial sums stay in registers (no SRAM traffic for them); batch 1,
    so every non-zero weight is read from DRAM once per sample (no reuse across samples); full
    reuse inside a layer, so each input activation is read from DRAM once and each output
    activation written once; the on-chip buffer then serves both operands of every MAC. Biases,
    activation functions, normalization and index decoding are not modelled; zero activations are
    not skipped (weights only).

    Attributes:
        name: Module name as in ``model.named_modules()``.
        kind: Class name of the module.
        macs: Dense MACs of one sample.
        weights: Entries of the layer's weight tensor (not the bias).
        nonzero_weights: Non-zero entries among them.
        input_elems: Input activation elements of one sample (summed over calls).
        output_elems: Output activation elements of one sample (summed over calls).
    """

    name: str
    kind: str
    macs: int
    weights: int
    nonzero_weights: int
    input_elems: int
    output_elems: int

    @property
    def density(self) -> float:
        """``nonzero_weights / weights`` (1.0 for a layer without weights)."""
        return self.nonzero_weights / self.weights if self.weights else 1.0

    def fixed_pj(self, table: EnergyTable = HOROWITZ_45NM, bits: int = 32) -> float:
        """Energy that does not depend on the weights kept: ``(in + out) * dram_read * bits / 32``.

        Args:
            table: Energy per operation.
            bits: Bits per stored value, 2..32.

        Returns:
            Picojoules per sample.

        Raises:
            ValueError: If ``bits`` is not an int in [2, 32].
        """
        _check_bits(bits)
        return (self.input_elems + self.output_elems) * table.dram_read * bits / 32

    def per_weight_pj(self, table: EnergyTable = HOROWITZ_45NM, bits: int = 32) -> float:
        """Energy one non-zero weight costs per sample.

        Its DRAM read plus its ``macs / weights`` MACs, each with two SRAM operand reads:
        ``dram_read * s + (macs / weights) * (mult + add + 2 * sram_read * s)``, ``s = bits / 32``.

        Args:
            table: Energy per operation.
            bits: Bits per stored value, 2..32 (int8 arithmetic for ``bits <= 8``, fp32 above).

        Returns:
            Picojoules per sample and non-zero weight.

        Raises:
            ValueError: If ``bits`` is not an int in [2, 32].
        """
        mac = table.mac_pj(bits)  # validates bits
        scale = bits / 32
        macs_per_weight = self.macs / self.weights if self.weights else 0.0
        return table.dram_read * scale + macs_per_weight * (mac + 2 * table.sram_read * scale)

    def energy_pj(
        self, density: float | None = None, table: EnergyTable = HOROWITZ_45NM, bits: int = 32
    ) -> float:
        """Energy of one sample: ``fixed_pj + density * weights * per_weight_pj``.

        Args:
            density: Fraction of weights kept, in [0, 1]; ``None`` uses the current model's
                ``nonzero_weights / weights``; ``1.0`` gives the dense energy.
            table: Energy per operation.
            bits: Bits per stored value, 2..32.

        Returns:
            Picojoules per sample.

        Raises:
            ValueError: If ``density`` is not ``None`` or a number in [0, 1], or ``bits`` is not an
                int in [2, 32].
        """
        if density is None:
            density = self.density
        elif (
            isinstance(density, bool)
            or not isinstance(density, (int, float))
            or not 0.0 <= density <= 1.0  # also rejects NaN
        ):
            raise ValueError(f"`density` must be None or a number in [0, 1], got {density!r}.")
        return self.fixed_pj(table, bits) + density * self.weights * self.per_weight_pj(table, bits)


def _per_sample_elems(count: int, batch_size: int) -> int:
    return (2 * count + batch_size) // (2 * batch_size)  # rounded half up, exact integers


def _energy_layers(model: nn.Module, cost: ModelCost, measurement: _Measurement) -> list[LayerEnergy]:
    modules = dict(model.named_modules())
    batch = cost.batch_size or 1
    layers = []
    for row in cost.layers:
        module = modules[row.name]
        if not isinstance(module, ENERGY_LAYERS) or not measurement.calls.get(row.name):
            continue
        in_elems, out_elems = measurement.activations.get(row.name, (0, 0))
        layers.append(
            LayerEnergy(
                name=row.name,
                kind=row.kind,
                macs=int(row.dense_macs or 0),
                weights=module.weight.numel(),
                nonzero_weights=_count_nonzero(module.weight),
                input_elems=_per_sample_elems(in_elems, batch),
                output_elems=_per_sample_elems(out_elems, batch),
            )
        )
    return layers


def _costs_and_energy(
    model: nn.Module, example_input: Any, batch_size: int | None = None
) -> tuple[ModelCost, list[LayerEnergy]]:
    """:func:`model_costs` and :func:`energy_profile` from ONE forward (no forward without input)."""
    cost, measurement = _model_costs(model, example_input, batch_size, with_activations=True)
    if measurement is None:
        return cost, []
    return cost, _energy_layers(model, cost, measurement)


def energy_profile(
    model: nn.Module,
    example_input: Any,
    table: EnergyTable | Mapping[str, float] | None = None,
    *,
    batch_size: int | None = None,
) -> list[LayerEnergy]:
    """Per-layer inputs of the energy model (see :class:`LayerEnergy`) from one forward pass.

    One entry per :class:`torch.nn.Linear` / ``Conv1d`` / ``Conv2d`` / ``Conv3d`` (subclasses
    included) whose forward ran, in ``model.named_modules()`` order. MACs come from the
    :func:`model_costs` measurement (:class:`torch.utils.flop_counter.FlopCounterMode`, MACs of
    one sample); on the same forward, hooks record the element counts of each layer's first input
    and of its output, divided by the batch size (rounded half up) and summed over calls. The
    forward runs in eval mode under :func:`torch.no_grad`; every module's training flag is
    restored afterwards. Layers the forward never called are left out, including weights applied
    by a parent's forward such as ``nn.MultiheadAttention.out_proj`` (their MACs are the
    parent's).

    Energies are computed by the entries' methods, e.g. the model's per-sample energy as it is:
    ``sum(layer.energy_pj(table=table) for layer in energy_profile(model, x))``; at density 1
    (``energy_pj(1.0)``) it is the dense model's.

    Args:
        model: The model to analyse.
        example_input: A tensor, tuple/list of positional tensors or dict of keyword tensors.
        table: Validated before anything is measured so a bad table fails early; ``None`` is
            :data:`HOROWITZ_45NM`. The entries do not depend on it: pass the table to their
            methods.
        batch_size: Samples in ``example_input``; ``None`` infers it (see :func:`model_costs`).

    Returns:
        The :class:`LayerEnergy` entries.

    Raises:
        ValueError: If ``table`` is invalid (see :func:`resolve_energy_table`), ``example_input``
            is ``None``, or as :func:`model_costs`.
        TypeError: If ``model`` is not an :class:`torch.nn.Module`.
    """
    resolve_energy_table(table)
    if example_input is None:
        raise ValueError(
            "`example_input` must be a tensor, a tuple/list or a dict of tensors to run one forward pass, "
            "got None."
        )
    return _costs_and_energy(model, example_input, batch_size)[1]


# --------------------------------------------------------------------------- latency


def _batched(obj: Any, batch_size: int) -> Any:
    """``obj`` with every tensor of at least one dim made ``batch_size`` copies of its first sample."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0:
            return obj
        return obj[:1].expand(batch_size, *obj.shape[1:]).contiguous()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_batched(o, batch_size) for o in obj)
    if isinstance(obj, dict):
        return {k: _batched(v, batch_size) for k, v in obj.items()}
    return obj


def measure_latency(
    model: nn.Module, example_input: Any, batch_size: int, repeats: int = 30, warmup: int = 5
) -> float:
    """Median wall-clock time of one forward pass of ``batch_size`` samples, in milliseconds.

    The batch is built from the first sample of ``example_input``: every tensor with at least one
    dim is taken to hold the batch on dim 0 and becomes ``batch_size`` copies of its first entry
    (``t[:1].expand(batch_size, ...)``, made contiguous); 0-dim tensors and non-tensors are passed
    as they are. The input goes to the device of the model's first parameter or buffer. The
    forward runs in eval mode under :func:`torch.inference_mode` (every module's training flag is
    restored afterwards), ``warmup`` times untimed, then ``repeats`` times, each timed with
    :func:`time.perf_counter` (after a CUDA synchronize on a CUDA model). On the CPU the result
    depends on :func:`torch.get_num_threads`.

    Args:
        model: The model to time.
        example_input: A tensor, tuple/list of positional tensors or dict of keyword tensors with
            at least one sample.
        batch_size: Samples per timed forward, at least 1.
        repeats: Timed forwards, at least 1; the median is returned.
        warmup: Untimed forwards before them (allocator, caches, lazy init), at least 0.

    Returns:
        The median time of one forward in milliseconds.

    Raises:
        ValueError: If ``batch_size``, ``repeats`` or ``warmup`` is out of range, or
            ``example_input`` holds no tensor or an empty batch.
        TypeError: If ``model`` is not an :class:`torch.nn.Module`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    check_int("batch_size", batch_size, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    first = _first_tensor(example_input)
    if first is None:
        raise ValueError(
            f"`example_input` must be a tensor, a tuple/list or a dict of tensors to time a forward pass, "
            f"got {type(example_input).__name__}."
        )
    if first.dim() > 0 and first.shape[0] == 0:
        raise ValueError(
            f"`example_input` has an empty batch (dim 0 of its first tensor is 0, shape "
            f"{tuple(first.shape)!r}); pass at least one sample."
        )
    device = _model_device(model)
    batch = _batched(_to_device(example_input, device), batch_size)
    cuda = device is not None and device.type == "cuda"

    def forward() -> None:
        if isinstance(batch, (tuple, list)):
            model(*batch)
        elif isinstance(batch, dict):
            model(**batch)
        else:
            model(batch)
        if cuda:
            torch.cuda.synchronize(device)  # kernels run asynchronously: time their completion

    # Remember every module's own flag: a model may keep parts (a frozen teacher) in eval on purpose.
    modes = [(module, module.training) for module in model.modules()]
    times: list[float] = []
    try:
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                forward()
            for _ in range(repeats):
                start = time.perf_counter()
                forward()
                times.append(time.perf_counter() - start)
    finally:
        for module, training in modes:
            module.training = training
    # The median, not the mean: one descheduled run must not move the figure.
    return statistics.median(times) * 1000.0
