"""Exact storage sizes, in bits, of a (sparse) weight tensor in common sparse formats.

Pure tensor code (no Lightning import). Every function returns an exact Python ``int`` number of
BITS, computed with a constant number of vectorized torch calls (no per-element Python loop), for
a weight ``W`` with ``n = W.numel()`` entries of which ``nnz`` are non-zero, each stored value
taking ``value_bits`` bits:

* dense: ``n * value_bits``;
* bitmask: ``n + nnz * value_bits`` (one presence bit per entry, then the non-zero values);
* CSR: ``nnz * (value_bits + 32) + (rows + 1) * 32`` with ``rows = W.shape[0]`` (conv filters are
  rows, the rest of each filter is flattened into the columns);
* relative index (Han, Mao & Dally, ICLR 2016, "Deep Compression", Sec. 2 and Fig. 2):
  ``(nnz + fillers) * (value_bits + index_bits)``.

:func:`best_encoding` picks the smallest of them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "CSR_INDEX_BITS",
    "ENCODINGS",
    "best_encoding",
    "bitmask_bits",
    "csr_bits",
    "dense_bits",
    "encoding_sizes",
    "relative_index_bits",
    "relative_index_fillers",
]

#: The encodings :func:`best_encoding` compares, simplest first (ties go to the earlier one).
ENCODINGS: tuple[str, ...] = ("dense", "bitmask", "csr", "relative")
#: Bits of a CSR column index and of a CSR row pointer (int32).
CSR_INDEX_BITS = 32


def _check_weight(weight: Any) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}.")
    return weight.detach()


def _check_bits(name: str, bits: Any, maximum: int = 64) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= maximum:
        raise ValueError(f"`{name}` must be an int in [1, {maximum}], got {bits!r}.")
    return bits


def _nnz(weight: torch.Tensor) -> int:
    return int(torch.count_nonzero(weight))


def dense_bits(weight: torch.Tensor, value_bits: int = 32) -> int:
    """Dense storage: every entry as a value, ``n * value_bits``.

    Args:
        weight: The tensor.
        value_bits: Bits per stored value, 1..64 (32 for fp32).

    Returns:
        Size in bits.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``value_bits`` is not an int in [1, 64].
    """
    weight = _check_weight(weight)
    return weight.numel() * _check_bits("value_bits", value_bits)


def bitmask_bits(weight: torch.Tensor, value_bits: int = 32) -> int:
    """Bitmask storage: one presence bit per entry plus the non-zero values, ``n + nnz * value_bits``.

    The bitmap format (also the bitmap branch of ``sparse_bytes`` in
    :mod:`lightning_compress.core.cost`): the mask says where the non-zeros are, the values follow
    in flattened order.

    Args:
        weight: The tensor.
        value_bits: Bits per stored value, 1..64.

    Returns:
        Size in bits.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``value_bits`` is not an int in [1, 64].
    """
    weight = _check_weight(weight)
    value_bits = _check_bits("value_bits", value_bits)
    return weight.numel() + _nnz(weight) * value_bits


def _rows(weight: torch.Tensor) -> int:
    return int(weight.shape[0]) if weight.dim() > 0 else 1  # a scalar is one row of one entry


def csr_bits(weight: torch.Tensor, value_bits: int = 32) -> int:
    """Compressed Sparse Row storage: ``nnz * (value_bits + 32) + (rows + 1) * 32``.

    The tensor is viewed as a matrix of ``rows = weight.shape[0]`` rows (output features of a
    Linear, filters of a convolution) whose other dims are flattened into columns. Each non-zero
    stores its value and an int32 column index; ``rows + 1`` int32 row pointers delimit the rows
    (the classic CSR / Yale format, as used by Han et al. 2016 for their sparse baseline).

    Args:
        weight: The tensor (a 0-dim tensor counts as one row).
        value_bits: Bits per stored value, 1..64.

    Returns:
        Size in bits.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``value_bits`` is not an int in [1, 64].
    """
    weight = _check_weight(weight)
    value_bits = _check_bits("value_bits", value_bits)
    return _nnz(weight) * (value_bits + CSR_INDEX_BITS) + (_rows(weight) + 1) * CSR_INDEX_BITS


def relative_index_fillers(weight: torch.Tensor, index_bits: int) -> int:
    """Filler zeros the relative-index format needs (Han, Mao & Dally 2016, Fig. 2).

    The non-zeros are stored in flattened (row-major) order; each stored entry keeps, in
    ``index_bits`` bits, the number of zeros skipped since the previous stored entry (the start of
    the tensor for the first one), so at most ``L - 1`` zeros with ``L = 2 ** index_bits``; put
    differently, the index difference to the previous stored entry is at most ``L``, counting the
    first entry from a virtual position ``-1``. A longer run of ``r`` zeros is bridged with filler
    zeros (a stored entry whose value is 0), one per ``L`` positions: ``r // L`` of them. Hence,
    with the non-zero positions ``p_1 < p_2 < ...`` and ``p_0 = -1``::

        fillers = sum_i (p_i - p_{i-1} - 1) // L

    Zeros after the last non-zero are not stored (the tensor's size is known).

    Args:
        weight: The tensor.
        index_bits: Bits per stored index difference, 1..32 (Deep Compression uses 8 for conv and 5
            for fully connected layers; the compression summary uses 4 and 5).

    Returns:
        The number of filler entries.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``index_bits`` is not an int in [1, 32].
    """
    weight = _check_weight(weight)
    span = 1 << _check_bits("index_bits", index_bits, maximum=32)
    positions = torch.nonzero(weight.reshape(-1)).reshape(-1)  # int64, sorted
    if positions.numel() == 0:
        return 0
    previous = torch.cat([positions.new_full((1,), -1), positions[:-1]])
    runs = positions - previous - 1  # zeros skipped before each non-zero
    return int(torch.div(runs, span, rounding_mode="floor").sum())


def relative_index_bits(weight: torch.Tensor, index_bits: int, value_bits: int = 32) -> int:
    """Relative-index storage of Deep Compression: ``(nnz + fillers) * (value_bits + index_bits)``.

    Han, Mao & Dally (ICLR 2016), "Deep Compression", Sec. 2 and Fig. 2: each non-zero is stored
    as its value and its index difference to the previous stored entry in ``index_bits`` bits;
    gaps longer than ``index_bits`` can express are bridged with filler zeros (see
    :func:`relative_index_fillers`), each costing a value and an index.

    Args:
        weight: The tensor.
        index_bits: Bits per index difference, 1..32.
        value_bits: Bits per stored value, 1..64.

    Returns:
        Size in bits.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``index_bits`` or ``value_bits`` is out of range.
    """
    value_bits = _check_bits("value_bits", value_bits)
    fillers = relative_index_fillers(weight, index_bits)
    return (_nnz(weight.detach()) + fillers) * (value_bits + index_bits)


def encoding_sizes(weight: torch.Tensor, index_bits: int, value_bits: int = 32) -> dict[str, int]:
    """Size in bits of ``weight`` in every format of :data:`ENCODINGS`, in that order.

    Args:
        weight: The tensor.
        index_bits: Bits per relative index difference, 1..32.
        value_bits: Bits per stored value, 1..64.

    Returns:
        ``{"dense": ..., "bitmask": ..., "csr": ..., "relative": ...}``.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``index_bits`` or ``value_bits`` is out of range.
    """
    return {
        "dense": dense_bits(weight, value_bits),
        "bitmask": bitmask_bits(weight, value_bits),
        "csr": csr_bits(weight, value_bits),
        "relative": relative_index_bits(weight, index_bits, value_bits),
    }


def best_encoding(weight: torch.Tensor, index_bits: int, value_bits: int = 32) -> tuple[str, int]:
    """The smallest encoding of ``weight`` and its size in bits.

    Compares dense, bitmask, CSR and relative index (see :func:`encoding_sizes`); a tie goes to
    the simpler format, in the order ``"dense"``, ``"bitmask"``, ``"csr"``, ``"relative"``.

    Args:
        weight: The tensor.
        index_bits: Bits per relative index difference, 1..32.
        value_bits: Bits per stored value, 1..64.

    Returns:
        ``(name, bits)``.

    Raises:
        TypeError: If ``weight`` is not a tensor.
        ValueError: If ``index_bits`` or ``value_bits`` is out of range.
    """
    sizes = encoding_sizes(weight, index_bits, value_bits)
    name = min(ENCODINGS, key=lambda key: (sizes[key], ENCODINGS.index(key)))
    return name, sizes[name]
