"""Run sparse ``nn.Linear`` layers through ``torch.sparse`` (CSR) where that is measurably faster.

Magnitude pruning (Han et al., 2015) leaves most weights of a layer at exactly zero, but a dense
``F.linear`` still multiplies every one of them. Stored in the compressed sparse row (CSR) layout
(``torch.sparse_csr_tensor``; see https://pytorch.org/docs/stable/sparse.html#sparse-csr-tensor),
only the non-zeros are read and multiplied, which is what turns a pruned model into a faster one.
Whether CSR actually wins depends on the sparsity, the layer shape, the batch size, the thread
count and the CPU: dense GEMM kernels are very efficient, sparse kernels pay for indirect
indexing. :func:`to_sparse` therefore does not guess: it *times* both paths for every candidate
layer on the machine it runs on and swaps in a :class:`SparseLinear` only where CSR is faster.

Kernel choice (measured on this project's CI CPU, torch 2.13, LeNet-300-100 shapes at 90 / 98 %
sparsity, batch 1 and 64, 1 and 2 threads). For ``y = x W^T + b`` with ``W`` in CSR:

* ``torch.sparse.addmm(b[:, None], W_csr, x.t()).t()`` (CSR @ dense, bias fused, the result
  returned as a transposed view) was the fastest variant everywhere: e.g. 300x784 at 98 %,
  batch 64, 1 thread: 70 us vs 330 us dense.
* The same followed by ``.contiguous()`` costs ~20 % more at batch 64, and is what ``SparseLinear``
  does: a transposed view broke models that call ``.view()`` on a Linear's output;
  ``torch.sparse.mm`` plus a separate bias add ~5 % more.
* ``F.linear(x, W_csr, b)`` / ``torch.addmm(b, x, W_csr.t())`` (dense @ CSR^T): up to 3x slower
  at batch 64.
* ``x @ W^T`` with ``W^T`` stored as CSR (dense @ CSR): 5-70x slower; COO: 2-35x slower except on
  tiny layers.
* One input row: ``torch.addmv(b, W_csr, x)`` (CSR matrix-vector) is 1.1-3x faster than the
  matrix-matrix kernel (300x784 at 98 %: 7 us vs 9 us; dense: 20 us).
* int32 indices are 3-15 % faster than int64 (the CPU kernel converts int64 indices to int32
  internally), so :class:`SparseLinear` stores int32 indices whenever they fit.

References:
    S. Han, J. Pool, J. Tran and W. J. Dally, "Learning both Weights and Connections for Efficient
    Neural Networks", NeurIPS 2015.

    PyTorch documentation, "torch.sparse: Sparse CSR Tensor",
    https://pytorch.org/docs/stable/sparse.html
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.validation import check_bool, check_int, check_number

__all__ = ["LayerDecision", "SparseLinear", "SparseReport", "measure_latency", "to_sparse"]

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_BUFFERS = frozenset({"crow_indices", "col_indices", "values", "bias"})
# Raised once per process by torch when a CSR tensor is built; it is noise for our users.
_BETA_WARNING = "Sparse CSR tensor support is in beta state"


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_BETA_WARNING)
        # Invariants are checked once per (re)build, never per call: a corrupt state_dict then
        # fails with torch's message instead of reading out of bounds in the kernel.
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=True)


class SparseLinear(nn.Module):
    """Inference replacement of ``nn.Linear`` whose weight is stored as a CSR sparse tensor.

    Computes ``y = x W^T + b`` as ``torch.sparse.addmm(b[:, None], W_csr, x^T)^T``, or
    ``torch.addmv(b, W_csr, x)`` for a single row (the fastest of the variants measured on CPU; see
    the module docstring), reading only the non-zero weights: a
    pruned layer (Han et al., 2015) at 98 % sparsity does ~50x fewer multiply-adds.

    The CSR weight is kept as three buffers, ``crow_indices`` (``out_features + 1``),
    ``col_indices`` and ``values`` (``nnz`` each), plus a dense ``bias`` buffer, so ``state_dict``,
    ``torch.save`` / ``torch.load`` and ``.to(device)`` work as for any module. Loading a
    ``state_dict`` whose ``nnz`` differs resizes ``col_indices`` / ``values``. The layer has no
    ``Parameter``: it is meant for inference (``torch.no_grad`` or not; gradients still flow to
    the *input*, never to the weights). Use :meth:`to_dense` to get a trainable ``nn.Linear`` back.

    Inputs of shape ``(*, in_features)`` give outputs ``(*, out_features)``, row-major like
    ``nn.Linear``'s (the kernel's ``(out_features, N)`` result is copied: ~20 % of the layer's time
    at batch 64, so that ``.view()`` on the output works as with the dense layer).

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        bias: Whether the layer has an additive bias.
        device: Device of the (empty) buffers.
        dtype: Floating dtype of ``values`` and ``bias``.

    Example:
        >>> linear = nn.Linear(8, 4)
        >>> with torch.no_grad():
        ...     linear.weight[:, 2:] = 0
        >>> sparse = SparseLinear.from_linear(linear)
        >>> sparse
        SparseLinear(in_features=8, out_features=4, bias=True, nnz=8, sparsity=75.00%)
        >>> torch.allclose(sparse(torch.ones(3, 8)), linear(torch.ones(3, 8)), atol=1e-6)
        True
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    bias: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        # An all-zero weight (nnz = 0) until from_linear or load_state_dict fills it.
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("values", torch.zeros(0, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # (CSR weight, bias column view, bias), built from and aliasing the buffers: building a CSR
        # tensor costs ~2.5 us and every nn.Module buffer lookup ~1 us, a large share of a ~7 us
        # batch-1 call, so forward reads only this plain attribute. In-place edits of the buffers
        # are seen through the alias; replacing a buffer (assignment, .to(), load_state_dict)
        # clears it (__setattr__, _apply, _load_from_state_dict).
        self._fast: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BUFFERS:
            self.__dict__["_fast"] = None
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # A copied / pickled CSR tensor would no longer alias the copied buffers: rebuild instead.
        state = dict(super().__getstate__())
        state["_fast"] = None
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> SparseLinear:
        self._fast = None
        return super()._apply(fn, recurse)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """Build a :class:`SparseLinear` holding the non-zeros of ``linear.weight`` and its bias.

        Args:
            linear: The dense layer; its weight is read as it is (zeros are dropped), not changed.

        Returns:
            A new layer on the weight's device and dtype, computing the same function.

        Raises:
            TypeError: If ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_BETA_WARNING)
            csr = weight.to_sparse_csr()
        crow, col = csr.crow_indices(), csr.col_indices()
        if col.numel() <= _INT32_MAX and linear.in_features <= _INT32_MAX:
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        layer.crow_indices = crow.contiguous()
        layer.col_indices = col.contiguous()
        layer.values = csr.values().clone()
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out_features x in_features`` weights that are zero."""
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def _build(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        weight = _csr_tensor(
            self.crow_indices, self.col_indices, self.values, (self.out_features, self.in_features)
        )
        bias = self.bias
        fast = (weight, None if bias is None else bias.unsqueeze(1), bias)
        self.__dict__["_fast"] = fast
        return fast

    @property
    def weight_csr(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor of shape ``(out_features, in_features)``.

        It shares memory with the ``crow_indices`` / ``col_indices`` / ``values`` buffers.
        """
        return (self._fast or self._build())[0]

    def to_dense(self) -> nn.Linear:
        """Return an equivalent dense ``nn.Linear`` (trainable again; zeros stored explicitly)."""
        values = self.values
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=values.device,
            dtype=values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight_csr.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x W^T + b`` for ``x`` of shape ``(*, in_features)``."""
        weight, bias_column, bias = self._fast or self._build()
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.shape[0] == 1:
            # One row: the CSR matrix-vector kernel is 1.1-3x faster than the matrix-matrix one.
            row = x2[0]
            y = (torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)).unsqueeze(0)
        elif bias_column is None:
            y = torch.sparse.mm(weight, x2.t()).t().contiguous()
        else:
            # The bias column broadcasts over the batch inside the kernel (no separate add).
            # Row-major output, like nn.Linear's: code that calls .view() on it keeps working.
            y = torch.sparse.addmm(bias_column, weight, x2.t()).t().contiguous()
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A state_dict of the same layer pruned differently has another nnz: resize the two
        # nnz-sized buffers so the load copies into them instead of failing on the shape
        # (crow_indices is sized by out_features and keeps its strict shape check).
        for name in ("col_indices", "values"):
            incoming = state_dict.get(prefix + name)
            current = self._buffers[name]
            if isinstance(incoming, Tensor) and incoming.dim() == 1 and incoming.shape != current.shape:
                self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        self._fast = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        """Shape, bias, number of stored weights and sparsity."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, sparsity={self.sparsity:.2%}"
        )


# ---------------------------------------------------------------------------- measurement
def measure_latency(module: nn.Module, x: Tensor, *, repeats: int, warmup: int) -> float:
    """Median wall time in seconds of one ``module(x)`` call under ``torch.no_grad``.

    ``warmup`` untimed calls first (allocator, kernel dispatch and cache warm-up), then ``repeats``
    individually timed calls; the median ignores the occasional preemption. CUDA calls are
    synchronized so the time covers the kernel, not just its launch.

    Args:
        module: The layer to time.
        x: Its input.
        repeats: Number of timed calls.
        warmup: Number of untimed calls before them.

    Returns:
        The median time of one call, in seconds.
    """
    sync = torch.cuda.synchronize if x.is_cuda else None
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            module(x)
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            if sync is not None:
                sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------- report
@dataclass
class LayerDecision:
    """What :func:`to_sparse` decided for one ``nn.Linear`` layer and why.

    Attributes:
        name: Module name in the model (the first one, if the module is shared).
        in_features: Input width.
        out_features: Output width.
        nnz: Non-zero weights.
        sparsity: Fraction of zero weights.
        candidate: Whether the layer was considered (named in ``layers``, or passed the
            ``min_sparsity`` / ``min_numel`` thresholds).
        converted: Whether it was replaced by a :class:`SparseLinear`.
        reason: Why, in words.
        dense_s: Median latency of the dense layer per batch size (seconds); empty if not measured.
        sparse_s: Median latency of the CSR layer per batch size (seconds); empty if not measured.
        max_abs_diff: Largest ``|dense - CSR|`` output difference on the timing inputs
            (``None`` if not measured).
    """

    name: str
    in_features: int
    out_features: int
    nnz: int
    sparsity: float
    candidate: bool
    converted: bool
    reason: str
    dense_s: dict[int, float] = field(default_factory=dict)
    sparse_s: dict[int, float] = field(default_factory=dict)
    max_abs_diff: float | None = None

    @property
    def speedup(self) -> dict[int, float]:
        """``dense time / CSR time`` per measured batch size (> 1: CSR is faster)."""
        return {b: self.dense_s[b] / self.sparse_s[b] for b in self.sparse_s if self.sparse_s[b] > 0}


@dataclass
class SparseReport:
    """Decisions and measurements of one :func:`to_sparse` call (``model.sparse_report``).

    Attributes:
        model: Class name of the converted model.
        threads: ``torch.get_num_threads()`` during the measurement: the decision holds for it.
        batch_sizes: Batch sizes timed.
        forced: Whether the speed rule was skipped (``force=True``).
        layers: One :class:`LayerDecision` per ``nn.Linear`` of the model, in module order.
        max_abs_diff: Largest output difference dense vs converted on ``example_input``
            (``None`` when no example input was given).
    """

    model: str
    threads: int
    batch_sizes: tuple[int, ...]
    forced: bool
    layers: list[LayerDecision]
    max_abs_diff: float | None = None

    @property
    def converted(self) -> list[str]:
        """Names of the layers now running through CSR."""
        return [d.name for d in self.layers if d.converted]

    def to_markdown(self) -> str:
        """A markdown table: one row per Linear layer with its times and decision."""
        sizes = self.batch_sizes
        head = ["Layer", "Shape", "Sparsity"]
        head += [f"dense / CSR us (batch {b})" for b in sizes] + ["Decision"]
        lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (1 + len(sizes)) + "---|"]
        for d in self.layers:
            times = [
                f"{d.dense_s[b] * 1e6:.1f} / {d.sparse_s[b] * 1e6:.1f}" if b in d.sparse_s else "-"
                for b in sizes
            ]
            decision = ("CSR" if d.converted else "dense") + f": {d.reason}"
            row = [d.name, f"{d.out_features}x{d.in_features}", f"{d.sparsity:.1%}", *times, decision]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"to_sparse({self.model}): {len(self.converted)} layer(s) to CSR {self.converted}, "
            f"{self.threads} thread(s), batch sizes {list(self.batch_sizes)}\n{self.to_markdown()}"
        )


# ---------------------------------------------------------------------------- conversion
def _check_batch_sizes(batch_sizes: Any) -> tuple[int, ...]:
    ok = isinstance(batch_sizes, Sequence) and not isinstance(batch_sizes, str) and len(batch_sizes) > 0
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes)
    if not ok:
        raise ValueError(
            f"`batch_sizes`={batch_sizes!r} is not supported; expected a non-empty list of ints >= 1, "
            "e.g. (1, 64)."
        )
    return tuple(dict.fromkeys(batch_sizes))  # keep order, drop repeats


def _check_layers(layers: Any) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(
            f"`layers`={layers!r} is not supported; expected None or a non-empty list of module names "
            "(fnmatch patterns allowed), e.g. ['fc1', 'fc2']."
        )
    for entry in layers:
        if not isinstance(entry, str) or not entry:
            raise ValueError(f"`layers` entries must be non-empty module names; got {entry!r} in {layers!r}.")
    return list(layers)


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _max_abs_diff(a: Any, b: Any) -> float:
    diffs = [
        float((x.detach().double() - y.detach().double()).abs().max())
        for x, y in zip(_tensors(a), _tensors(b))
        if x.numel()
    ]
    return max(diffs, default=0.0)


def _describe(name: str, module: nn.Linear, nnz: int) -> str:
    numel = module.weight.numel()
    shape = f"{module.out_features}x{module.in_features}"
    return f"{name} ({shape}, {numel:,} weights, sparsity {1 - nnz / numel:.1%})"


def _csr_unsupported(weight: Tensor) -> str | None:
    """Why the CSR kernels cannot run this weight here, or ``None`` (checked before anything changes)."""
    if weight.device.type == "cpu" and weight.dtype not in (torch.float32, torch.float64):
        return f"kept dense: torch's CPU CSR kernels do not support {weight.dtype} (use float32)"
    if weight.device.type not in ("cpu", "cuda"):
        return f"kept dense: no CSR kernels on device {weight.device.type!r}"
    return None


def to_sparse(
    model: nn.Module,
    example_input: Any = None,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    min_sparsity: float = 0.5,
    min_numel: int = 4096,
    layers: Sequence[str] | None = None,
    force: bool = False,
    repeats: int = 50,
    warmup: int = 10,
    inplace: bool = False,
) -> nn.Module:
    """Swap the sparse ``nn.Linear`` layers of ``model`` for :class:`SparseLinear` where CSR is faster.

    Pruning (Han et al., 2015) zeroes most weights, but only a sparse kernel turns that into a
    speedup, and only above some sparsity that depends on the layer shape, batch size, thread count
    and CPU. So for every candidate layer this function times the dense layer against its
    ``torch.sparse`` CSR version (:class:`SparseLinear`) on this machine, with random inputs of the
    layer's width (``in_features``) at every batch size in ``batch_sizes``, at the current
    ``torch.get_num_threads()``: after ``warmup`` untimed calls, the median of ``repeats`` timed
    calls, measured dense, CSR, CSR, dense (ABBA, so a drift of the machine's speed cancels) and
    averaged per path. **Rule: a layer is converted only if CSR is faster at every batch size**;
    otherwise it stays dense. Layers are measured first and swapped together at the end; with
    ``inplace=True`` an error while running ``example_input`` on the converted model puts the
    dense layers back before it propagates, so an error leaves the model unchanged. Layers whose
    dtype / device torch's CSR kernels do not support (bf16 / fp16 on CPU) stay dense, with the
    reason in the report.

    Candidates are the layers named in ``layers`` if given, else every ``nn.Linear`` whose weight
    has sparsity (fraction of exact zeros) ``>= min_sparsity`` and at least ``min_numel``
    elements. Only modules of exact type ``nn.Linear`` qualify: subclasses may have their own
    forward, and ``nn.MultiheadAttention`` reads its ``out_proj.weight`` directly. Hooks
    registered on a replaced layer are not carried over. A module shared under several names is
    replaced under all of them.

    The decisions and times are attached to the returned model as ``model.sparse_report``
    (:class:`SparseReport`) and logged at INFO level by the ``lightning_compress.export.sparse``
    logger.

    Args:
        model: The (pruned) model. With ``inplace=False`` it is never modified.
        example_input: Optional input of ``model`` (a tensor, a tuple of positional arguments or a
            dict of keyword arguments). If given, dense and converted models are run on it (in eval
            mode, without gradients; training flags are restored) and the largest output difference
            is recorded as ``sparse_report.max_abs_diff``.
        batch_sizes: Batch sizes (rows of the 2-D input of a layer) to time.
        min_sparsity: Smallest weight sparsity of a candidate, in ``[0, 1)``.
        min_numel: Smallest weight size of a candidate (tiny layers never benefit).
        layers: Module names (fnmatch patterns allowed) to consider instead of the thresholds.
        force: Convert every candidate without timing (the speed rule is skipped).
        repeats: Timed calls per layer, path and batch size (each of the two ABBA halves).
        warmup: Untimed calls before each timing.
        inplace: Modify ``model`` itself instead of a deep copy.

    Returns:
        The converted model (``model`` itself if ``inplace``, else a deep copy) with a
        ``sparse_report`` attribute.

    Raises:
        ValueError: If an argument is invalid, a ``layers`` entry matches no ``nn.Linear`` of the
            model, or (without ``layers``) no Linear layer is a candidate; the message lists the
            model's Linear layers with their shape and sparsity.
        TypeError: If ``model`` is not an ``nn.Module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> with torch.no_grad():
        ...     model[0].weight[:, 8:] = 0
        >>> fast = to_sparse(model, force=True)
        >>> fast.sparse_report.converted
        ['0']
        >>> type(fast[0]).__name__
        'SparseLinear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_sparse expects an nn.Module, got {type(model).__name__}.")
    sizes = _check_batch_sizes(batch_sizes)
    min_sparsity = check_number("min_sparsity", min_sparsity, low=0.0, high=1.0, high_open=True)
    check_int("min_numel", min_numel, minimum=0)
    check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_bool("force", force)
    check_bool("inplace", inplace)
    patterns = _check_layers(layers)
    cls = type(model).__name__

    # Every Linear once (a shared module is one layer), with its sparsity.
    linears: dict[str, nn.Linear] = {}
    nnz: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            linears[name] = module
            nnz[name] = int(torch.count_nonzero(module.weight.detach()))

    if patterns is not None:
        chosen: list[str] = []
        for pattern in patterns:
            matched = [n for n in linears if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                found = dict(model.named_modules()).get(pattern)
                what = "no such module" if found is None else f"it is a {type(found).__name__}"
                if isinstance(found, nn.Linear):
                    what += "; only modules of exact type nn.Linear are converted"
                raise ValueError(
                    f"to_sparse: `layers` entry {pattern!r} is not an nn.Linear of {cls} ({what}); "
                    f"its nn.Linear layers are: {', '.join(linears) or 'none'}."
                )
            chosen += [n for n in matched if n not in chosen]
        candidates = [n for n in linears if n in chosen]
    else:
        candidates = [
            n
            for n, m in linears.items()
            if m.weight.numel() >= min_numel and 1 - nnz[n] / m.weight.numel() >= min_sparsity
        ]
        if not candidates:
            listing = "; ".join(_describe(n, m, nnz[n]) for n, m in linears.items()) or "none"
            raise ValueError(
                f"to_sparse: {cls} has no sparse nn.Linear layer to convert. A layer qualifies with weight "
                f"sparsity >= `min_sparsity`={min_sparsity:g} and at least `min_numel`={min_numel} weights "
                f"(or by being named in `layers`). Its nn.Linear layers: {listing}. Prune the model first "
                "(e.g. GradualPruning) or lower the thresholds."
            )

    target = model if inplace else copy.deepcopy(model)
    target_modules = dict(target.named_modules())
    threads = torch.get_num_threads()
    decisions: list[LayerDecision] = []
    replacements: dict[str, SparseLinear] = {}
    for name, module in linears.items():
        weight = module.weight
        decision = LayerDecision(
            name=name,
            in_features=module.in_features,
            out_features=module.out_features,
            nnz=nnz[name],
            sparsity=1 - nnz[name] / weight.numel(),
            candidate=name in candidates,
            converted=False,
            reason="",
        )
        decisions.append(decision)
        if not decision.candidate:
            decision.reason = (
                "not in `layers`"
                if patterns is not None
                else f"below the thresholds (min_sparsity {min_sparsity:g}, min_numel {min_numel})"
            )
            continue
        unsupported = _csr_unsupported(weight)
        if unsupported:
            decision.reason = unsupported
            continue
        dense = target_modules[name]
        sparse = SparseLinear.from_linear(dense)
        if force:
            decision.converted, decision.reason = True, "forced (force=True, not timed)"
            replacements[name] = sparse
            continue
        generator = torch.Generator(device=weight.device).manual_seed(0)
        diffs = []
        for b in sizes:
            x = torch.randn(
                b, module.in_features, generator=generator, device=weight.device, dtype=weight.dtype
            )
            # ABBA: dense, CSR, CSR, dense; each path's time is the mean of its two medians.
            d1 = measure_latency(dense, x, repeats=repeats, warmup=warmup)
            s1 = measure_latency(sparse, x, repeats=repeats, warmup=warmup)
            s2 = measure_latency(sparse, x, repeats=repeats, warmup=warmup)
            d2 = measure_latency(dense, x, repeats=repeats, warmup=warmup)
            decision.dense_s[b], decision.sparse_s[b] = (d1 + d2) / 2, (s1 + s2) / 2
            with torch.no_grad():
                diffs.append(_max_abs_diff(dense(x), sparse(x)))
        decision.max_abs_diff = max(diffs)
        slower = [b for b in sizes if decision.sparse_s[b] >= decision.dense_s[b]]
        speedups = ", ".join(f"batch {b}: {v:.2f}x" for b, v in decision.speedup.items())
        if slower:
            decision.reason = f"CSR not faster at batch {', '.join(map(str, slower))} ({speedups})"
        else:
            decision.converted, decision.reason = True, f"CSR faster at every batch size ({speedups})"
            replacements[name] = sparse

    reference = None
    flags = {m: m.training for m in target.modules()}
    if example_input is not None:
        target.eval()
        with torch.no_grad():
            reference = _run(target, example_input)

    # Swap under every name the module is registered with (shared modules).
    originals = {id(target_modules[n]): n for n in replacements}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(target.modules()):
        # _modules, not named_children(): the latter lists a child registered twice only once.
        for child_name, child in list(parent._modules.items()):
            name = originals.get(id(child))
            if name is not None:
                setattr(parent, child_name, replacements[name])
                swapped.append((parent, child_name, child))
                flags[replacements[name]] = flags.get(child, True)

    report = SparseReport(cls, threads, sizes, force, decisions)
    if example_input is not None:
        target.eval()
        try:
            with torch.no_grad():
                report.max_abs_diff = _max_abs_diff(reference, _run(target, example_input))
        except Exception:
            for parent, child_name, child in swapped:  # put the dense layers back: nothing half-applied
                setattr(parent, child_name, child)
            for m in target.modules():
                m.training = flags.get(m, m.training)
            raise
    for m in target.modules():
        m.training = flags.get(m, m.training)
    target.sparse_report = report

    for d in decisions:
        log.info("to_sparse(%s): %s -> %s: %s", cls, d.name, "CSR" if d.converted else "dense", d.reason)
    log.info(
        "to_sparse(%s): %d of %d Linear layer(s) to CSR %s at %d thread(s)%s",
        cls,
        len(report.converted),
        len(decisions),
        report.converted,
        threads,
        ""
        if report.max_abs_diff is None
        else f"; max |dense - sparse| on example_input {report.max_abs_diff:.3g}",
    )
    return target
