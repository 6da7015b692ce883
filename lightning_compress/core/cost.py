"""Cost model of the layers compression acts on: parameters, non-zeros, MACs and storage bytes.

This module is pure PyTorch (no Lightning import, no technique-specific code) so every technique,
the report and the export code share one definition of "how big / how expensive is this layer".

Supported layers are :class:`torch.nn.Linear`, :class:`torch.nn.Conv1d`, :class:`torch.nn.Conv2d`,
:class:`torch.nn.Conv3d` (any ``groups``, ``stride``, ``dilation``, ``padding``) and
:class:`torch.nn.Embedding` (parameters only: a lookup performs no multiply-accumulate).

Formulas (one sample, i.e. the batch dimension is excluded):

* MACs of a layer whose weight has ``W`` entries and which is applied at ``P`` output positions:
  ``dense_macs = P * W``.

  - Linear on an input ``(N, *, in)``: ``P = prod(*)``, ``W = in * out``, so
    ``dense_macs = prod(*) * in * out``.
  - Conv on an output ``(N, C_out, *spatial)``: ``P = prod(spatial)`` and
    ``W = C_out * (C_in / groups) * prod(kernel)``, so
    ``dense_macs = out.numel() / N * (C_in / groups) * prod(kernel)``.
  - Embedding: 0.

* ``effective_macs = dense_macs * nnz(weight) / numel(weight)``: the MACs a sparse kernel that
  skips zero weights performs (Han et al., 2015, "Learning both Weights and Connections for
  Efficient Neural Networks"). Since ``dense_macs = P * W`` this is exactly ``P * nnz(weight)``.

* ``dense_bytes = params * 4`` (fp32 storage of weight and bias).

* ``sparse_bytes = min(dense_bytes, nnz * 4 + min(ceil(params / 8), 4 * nnz))``: every non-zero
  value is kept in fp32, plus the cheaper of two index encodings: a bitmap with one bit per
  parameter, or an int32 coordinate (COO) index per non-zero. It never exceeds the dense size
  because a layer that is too dense to profit is simply stored dense.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BYTES_PER_VALUE",
    "SUPPORTED_LAYERS",
    "LayerCost",
    "count_nonzero_params",
    "dense_macs",
    "layer_costs",
    "sparse_storage_bytes",
]

#: Bytes per stored value for the dense (fp32) and sparse-value storage models.
BYTES_PER_VALUE = 4
#: Bytes per index in the COO encoding (int32).
_COO_INDEX_BYTES = 4

_CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Module types the cost model understands (``ConvTranspose*`` are not subclasses of these).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV_LAYERS, nn.Embedding)


@dataclass(frozen=True)
class LayerCost:
    """Cost of one supported layer; see the module docstring for the formulas.

    Attributes:
        name: Fully qualified module name as given by ``model.named_modules()``.
        kind: Class name of the module, e.g. ``"Linear"`` or ``"Conv2d"``.
        params: Number of entries in weight and bias.
        nonzeros: Number of non-zero entries in weight and bias.
        sparsity: ``1 - nonzeros / params`` (0.0 for a layer without parameters).
        dense_macs: Multiply-accumulates of one sample with dense weights; ``None`` when a
            convolution's output shape is unknown.
        effective_macs: ``dense_macs`` scaled by the weight's non-zero fraction; ``None`` when
            ``dense_macs`` is.
        dense_bytes: fp32 storage, ``params * 4``.
        sparse_bytes: Storage of the non-zero values plus the cheaper index encoding, capped at
            ``dense_bytes``.
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

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain, JSON-serialisable dictionary."""
        return asdict(self)


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


def _record_shapes(model: nn.Module, example_input: Any) -> dict[str, list[tuple[Any, Any]]]:
    """Run one forward in eval mode and record (input_shape, output_shape) per supported layer call."""
    calls: dict[str, list[tuple[Any, Any]]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            in_shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            out_shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            calls.setdefault(name, []).append((in_shape, out_shape))

        return hook

    # Remember every module's own flag: a model may keep parts (a frozen teacher) in eval on purpose.
    modes = [(module, module.training) for module in model.modules()]
    example_input = _to_device(example_input, _model_device(model))
    try:
        for name, module in _iter_supported(model):
            handles.append(module.register_forward_hook(make_hook(name)))
        # Eval so BatchNorm/Dropout neither update state nor reject a batch of one.
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            elif isinstance(example_input, dict):
                model(**example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return calls


def layer_costs(model: nn.Module, example_input: Any = None) -> list[LayerCost]:
    """Compute the :class:`LayerCost` of every supported layer of ``model``, in module order.

    Without ``example_input`` the MACs follow :func:`dense_macs` with unknown shapes (a Linear
    counts one position, a convolution gives ``None``). With it, ONE forward pass is run under
    :func:`torch.no_grad` in eval mode with forward hooks that record each layer's input and
    output shape; the hooks are removed and every module's training flag is restored afterwards,
    even if the forward raises. A layer called several times sums its calls; a layer the forward
    never reaches costs 0 MACs.

    Formulas (see the module docstring): ``params = numel(weight) + numel(bias)``,
    ``nonzeros`` counted with one :func:`torch.count_nonzero` per tensor,
    ``sparsity = 1 - nonzeros / params``,
    ``effective_macs = dense_macs * nnz(weight) / numel(weight)``, ``dense_bytes = 4 * params``,
    ``sparse_bytes = min(dense_bytes, 4 * nonzeros + min(ceil(params / 8), 4 * nonzeros))``.

    Args:
        model: The model to analyse.
        example_input: A tensor, a tuple/list of positional tensors, or a dict of keyword
            tensors to feed ``model``. Moved to the model's device.

    Returns:
        One :class:`LayerCost` per supported layer, in ``model.named_modules()`` order.

    Raises:
        TypeError: If ``model`` is not an :class:`torch.nn.Module`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    calls = _record_shapes(model, example_input) if example_input is not None else None

    costs = []
    for name, module in _iter_supported(model):
        _check_supported(module)
        weight, bias = module.weight, getattr(module, "bias", None)
        weight_numel = weight.numel()
        weight_nnz = _count_nonzero(weight)
        params = weight_numel + (bias.numel() if bias is not None else 0)
        nonzeros = weight_nnz + _count_nonzero(bias)

        if calls is None:
            macs = dense_macs(module)
        else:
            layer_calls = calls.get(name, [])
            per_call = [dense_macs(module, in_shape, out_shape) for in_shape, out_shape in layer_calls]
            macs = None if any(m is None for m in per_call) else sum(per_call)
        # dense_macs is a multiple of weight_numel, so this integer division is exact.
        effective = None if macs is None else (macs * weight_nnz // weight_numel if weight_numel else 0)

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
            )
        )
    return costs
