"""Data-free weight transforms for quantization: cross-layer equalization, bias absorption, bias correction.

Nagel et al. (2019), "Data-Free Quantization Through Weight Equalization and Bias Correction":

* **Cross-layer equalization** (Section 4.1). ReLU is positively homogeneous, ``relu(x / s) =
  relu(x) / s`` for ``s > 0``, so dividing output channel ``i`` of a layer by ``s_i`` and multiplying
  input channel ``i`` of the next layer by ``s_i`` leaves the network's function unchanged. Choosing
  ``s_i = sqrt(r1_i / r2_i)`` (eq. 9: ``s_i = sqrt(r1_i r2_i) / r2_i``), where ``r1_i`` is the range
  of output channel ``i`` of the first layer's (BatchNorm-folded) weight and ``r2_i`` that of input
  channel ``i`` of the second, makes both ranges ``sqrt(r1_i r2_i)``: every channel then uses the
  same share of a per-tensor quantization grid. Chains of more than two layers are equalized pair by
  pair until the scales converge.
* **High-bias absorption** (Section 4.2). With the pre-activation of channel ``i`` distributed as
  ``N(beta_i, gamma_i^2)`` (the BatchNorm after the first layer), ``c_i = max(0, beta_i - 3 |gamma_i|)``
  is (almost) always below it, so ``relu(x - c) = relu(x) - c`` and ``c`` can move from the first
  layer's shift into the second layer's bias (``b2 += W2 c``), shrinking the activation range.
* **Analytic bias correction** (Section 4.3). Quantizing a weight shifts the expected output by
  ``E[y_q - y] = (W_q - W) E[x]``; ``E[x]`` follows from the BatchNorm statistics before the layer
  (a ReLU of ``N(beta, gamma^2)`` has mean ``gamma phi(-beta / gamma) + beta (1 - Phi(-beta / gamma))``),
  and subtracting the shift from the quantized layer's bias removes the bias the rounding introduced.

Equalizable pairs are found on the traced data-flow graph (Torch-Pruning's dependency graph, as for
:func:`~lightning_compress.quantization.fusion.find_fusion_pairs`): a Conv / Linear layer whose
output goes, through an optional BatchNorm and a chain of channel-wise positively homogeneous ops
(ReLU, LeakyReLU, max / average pooling, flattening before a Linear), to exactly one Conv / Linear
layer that reads nothing else. Depthwise and grouped convolutions work on both sides of a pair (a
depthwise channel only depends on its own input channel, so MobileNet's ``1x1 -> depthwise 3x3 ->
1x1`` is two pairs, equalized together). ReLU6 clips at 6 and is not homogeneous: by default it ends
a chain; ``relu6="relu"`` replaces the ReLU6 modules inside chains by ReLU, as Nagel et al. do for
MobileNetV2 (this changes the outputs wherever an activation exceeded 6).

When a BatchNorm sits between the two layers (an unfolded training model), the first layer's range
is that of the folded weight, ``|gamma_i / sqrt(var_i + eps)| max|W1_i|``, and the scaling is applied
to the BatchNorm's ``gamma`` and ``beta`` instead of ``W1``; a BatchNorm after the second layer
enters its input ranges the same way. So the transforms keep every module's type and every
``Parameter`` object, work on a training model (in train and eval mode alike) and give the same
weights as equalizing after folding.

References:
    M. Nagel, M. van Baalen, T. Blankevoort and M. Welling, "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019.

    G. Fang, X. Ma, M. Song, M. Bi Mi and X. Wang, "DepGraph: Towards Any Structural Pruning",
    CVPR 2023.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch_pruning.ops import OPTYPE

from lightning_compress.core.channels import call_model
from lightning_compress.core.validation import check_choice, check_int, check_number
from lightning_compress.functional.fusion import is_foldable_layer

__all__ = [
    "EqualizationPair",
    "absorb_high_bias",
    "channel_ranges",
    "clipped_normal_mean",
    "correct_bias",
    "cross_layer_equalize",
    "expected_input_means",
    "find_equalization_pairs",
    "measure_input_means",
]

#: How a ReLU6 inside a chain is handled.
_RELU6_MODES: tuple[str, ...] = ("stop", "relu")
#: Channel-wise, positively homogeneous ops a chain may pass between its two layers.
_HOMOGENEOUS = ("relu", "leaky_relu", "maxpool", "avgpool", "reshape")
#: Mean-preserving ops between an activation and a layer (expected input means).
_MEAN_PRESERVING = ("avgpool", "reshape")
_MAX_POOLS = (
    "MaxPool1DWithIndicesBackward0",
    "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0",
    "AdaptiveMaxPool1DBackward0",
    "AdaptiveMaxPool2DBackward0",
    "AdaptiveMaxPool3DBackward0",
)
_AVG_POOLS = (
    "AvgPool2DBackward0",
    "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0",
)


@dataclass(frozen=True)
class EqualizationPair:
    """Two layers whose shared channels can be rescaled without changing the network's function.

    Attributes:
        producer: The Conv / Linear layer whose output channels are divided by ``s``.
        consumer: The Conv / Linear layer whose input channels are multiplied by ``s``.
        batchnorm: The BatchNorm right after ``producer`` (its ``gamma`` and ``beta`` are scaled
            instead of the producer's weight), or ``None``.
        consumer_batchnorm: The BatchNorm right after ``consumer`` (its folding factor enters the
            consumer's ranges; high-bias absorption shifts its running mean), or ``None``.
        path: The kinds of the ops between the two layers after the BatchNorm, in order: ``"relu"``,
            ``"relu6"``, ``"leaky_relu"``, ``"maxpool"``, ``"avgpool"``, ``"reshape"``.
        relu6: Names of the ``nn.ReLU6`` modules on the path (replaced by ``nn.ReLU`` on
            equalization).
    """

    producer: str
    consumer: str
    batchnorm: str | None = None
    consumer_batchnorm: str | None = None
    path: tuple[str, ...] = ()
    relu6: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------- tracing
_is_layer = is_foldable_layer


def _out_channels(layer: nn.Module) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def _in_channels(layer: nn.Module) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)


@dataclass
class _Trace:
    graph: Any
    names: dict[int, list[str]]
    calls: Counter
    gradfn_module: dict[Any, nn.Module]
    returned: set[Any]
    in_shapes: dict[int, tuple[int, ...]]
    out_shapes: dict[int, tuple[int, ...]]

    def name(self, module: nn.Module) -> str:
        return self.names[id(module)][0]

    def single(self, module: nn.Module) -> bool:
        """Registered under one name and called once per forward."""
        return len(self.names.get(id(module), ())) == 1 and self.calls[id(module)] == 1


def _trace(model: nn.Module, example_input: Any, owner: str) -> _Trace:
    # Imported here: the quantization package imports this module.
    from lightning_compress.quantization.fusion import _call, _resolve_example_input

    example_input = _resolve_example_input(model, example_input, owner)
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    calls: Counter = Counter()
    gradfn_module: dict[Any, nn.Module] = {}
    returned: set[Any] = set()
    in_shapes: dict[int, tuple[int, ...]] = {}
    out_shapes: dict[int, tuple[int, ...]] = {}
    active = [False]

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if not active[0]:
            return
        calls[id(module)] += 1
        if args and isinstance(args[0], Tensor):
            in_shapes[id(module)] = tuple(args[0].shape)
        if isinstance(output, Tensor):
            out_shapes[id(module)] = tuple(output.shape)
            if output.grad_fn is not None:
                gradfn_module[output.grad_fn] = module

    def forward_fn(net: nn.Module, _: Any) -> Any:
        active[0] = not calls  # record the first forward only (call counts)
        try:
            out = _call(net, example_input)
        finally:
            active[0] = False
        returned.update(
            t.grad_fn for t in tree_leaves(out) if isinstance(t, Tensor) and t.grad_fn is not None
        )
        return out

    training = {module: module.training for module in model.modules()}
    # The tracer follows autograd: frozen parameters would leave their layers out of the graph.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # Leaves (a container's output is its last child's) and the layers themselves (a fake-quantized
    # layer holds quantizer submodules).
    watched = [
        m
        for m in model.modules()
        if not m._modules or _is_layer(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    handles = [m.register_forward_hook(record) for m in watched]
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            traced_input = (example_input,) if isinstance(example_input, Tensor) else example_input
            try:
                graph = tp.DependencyGraph().build_dependency(
                    model, traced_input, forward_fn=forward_fn, verbose=False
                )
            except Exception as err:
                raise ValueError(
                    f"{owner}: Torch-Pruning could not trace {type(model).__name__} ({type(err).__name__}: "
                    f"{err}); pass an `example_input` its forward accepts (a tensor, a tuple of positional "
                    "arguments or a dict of keyword arguments) and make it return tensors."
                ) from err
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(False)
        for module, flag in training.items():
            module.training = flag
    return _Trace(graph, names, calls, gradfn_module, returned, in_shapes, out_shapes)


def _signed_dims(grad_fn: Any) -> list[int] | None:
    dims = getattr(grad_fn, "_saved_dim", None)
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dims is None or sizes is None:
        return None
    ndim = len(sizes)
    out = []
    for d in dims if isinstance(dims, (tuple, list)) else (dims,):
        d = int(d)
        if d >= 2**63:  # autograd stores negative dims as unsigned 64-bit values
            d -= 2**64
        out.append(d % ndim if ndim else d)
    return out


def _kind(node: Any, trace: _Trace) -> str:
    """What a graph node does, as far as equalization is concerned."""
    if node.type in (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.LINEAR):
        return "layer" if _is_layer(node.module) else "other"
    if node.type == OPTYPE.BN:
        return "bn"
    if node.type == OPTYPE.RESHAPE:
        return "reshape"
    if node.type != OPTYPE.ELEMENTWISE or node.grad_fn is None:
        return "other"
    fn = node.grad_fn.name()
    if fn.startswith("ReluBackward"):
        return "relu"
    if fn.startswith("LeakyReluBackward"):
        return "leaky_relu"
    if fn.startswith("HardtanhBackward"):
        module = trace.gradfn_module.get(node.grad_fn)
        if isinstance(module, nn.ReLU6) and trace.single(module):
            return "relu6"
        return "hardtanh"
    if fn in _MAX_POOLS:
        return "maxpool"
    if fn in _AVG_POOLS:
        return "avgpool"
    if fn.startswith("MeanBackward"):
        dims = _signed_dims(node.grad_fn)
        if dims and all(d >= 2 for d in dims):  # a global average pooling
            return "avgpool"
    return "other"


def _data_inputs(node: Any) -> list[Any]:
    """The node's inputs without the parameter transposes Torch-Pruning lists for Linear layers."""
    out = []
    for n in node.inputs:
        if n.type == OPTYPE.PARAMETER:
            continue
        if (
            n.type == OPTYPE.ELEMENTWISE
            and not n.inputs
            and n.grad_fn is not None
            and n.grad_fn.name().startswith("TBackward")
        ):
            continue
        out.append(n)
    return out


def _scalable_bn(module: nn.Module, channels: int, trace: _Trace) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.weight is not None
        and module.bias is not None
        and module.running_var is not None
        and module.num_features == channels
        and trace.single(module)
    )


def _reshape_keeps_channels(node: Any, channels: int) -> bool:
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None) if node.grad_fn is not None else None
    return sizes is not None and len(sizes) >= 2 and int(sizes[1]) == channels


def _consumer_batchnorm(cnode: Any, trace: _Trace) -> str | None:
    consumer = cnode.module
    outs = cnode.outputs
    if len(outs) != 1 or cnode.grad_fn in trace.returned:
        return None
    bn_node = outs[0]
    if bn_node.type != OPTYPE.BN or len(_data_inputs(bn_node)) != 1:
        return None
    bn = bn_node.module
    ok = (
        bn.running_var is not None
        and bn.num_features == _out_channels(consumer)
        and trace.single(bn)
        and (not isinstance(consumer, nn.Linear) or len(trace.out_shapes.get(id(consumer), ())) == 2)
    )
    return trace.name(bn) if ok else None


def _pair_from(pnode: Any, trace: _Trace, relu6: str) -> EqualizationPair | None:
    producer = pnode.module
    if not trace.single(producer) or pnode.grad_fn in trace.returned:
        return None
    channels = _out_channels(producer)
    out_shape = trace.out_shapes.get(id(producer), ())
    linear_producer = isinstance(producer, nn.Linear)
    if len(out_shape) < 2 or out_shape[-1 if linear_producer else 1] != channels:
        return None
    node, bn, path, relu6_modules, reshapes = pnode, None, [], [], []
    while True:
        outs = node.outputs
        if len(outs) != 1:
            return None
        nxt = outs[0]
        if len(_data_inputs(nxt)) != 1:
            return None
        kind = _kind(nxt, trace)
        if kind == "layer":
            break
        if kind == "bn":
            if node is not pnode or not _scalable_bn(nxt.module, channels, trace):
                return None
            if linear_producer and len(out_shape) != 2:
                return None  # BatchNorm1d on (N, C, L) normalizes C, not the Linear's features
            bn = nxt.module
        elif kind in _HOMOGENEOUS or (kind == "relu6" and relu6 == "relu"):
            if linear_producer and kind not in ("relu", "leaky_relu", "relu6"):
                return None  # pooling / reshaping a Linear output mixes its features with other dims
            if kind == "relu6":
                relu6_modules.append(trace.name(trace.gradfn_module[nxt.grad_fn]))
            if kind == "reshape":
                reshapes.append(nxt)
            path.append(kind)
        else:
            return None
        if nxt.grad_fn in trace.returned:
            return None
        node = nxt
    consumer = nxt.module
    if consumer is producer or not trace.single(consumer):
        return None
    if isinstance(consumer, nn.Linear):
        in_shape = trace.in_shapes.get(id(consumer), ())
        if linear_producer:
            if consumer.in_features != channels or in_shape != out_shape:
                return None
        else:
            if len(in_shape) != 2 or consumer.in_features % channels or len(reshapes) > 1:
                return None
            if consumer.in_features != channels and not reshapes:
                return None
            if reshapes and not _reshape_keeps_channels(reshapes[0], channels):
                return None
    else:
        if linear_producer or reshapes or consumer.in_channels != channels:
            return None
    return EqualizationPair(
        producer=trace.name(producer),
        consumer=trace.name(consumer),
        batchnorm=trace.name(bn) if bn is not None else None,
        consumer_batchnorm=_consumer_batchnorm(nxt, trace),
        path=tuple(path),
        relu6=tuple(relu6_modules),
    )


def find_equalization_pairs(
    model: nn.Module, example_input: Any = None, relu6: Literal["stop", "relu"] = "stop"
) -> list[EqualizationPair]:
    """The pairs of ``model`` that cross-layer equalization can rescale, in module order.

    A Conv (non-transposed, any dimension and any ``groups``) or Linear layer ``a`` pairs with a
    Conv / Linear layer ``b`` when, on Torch-Pruning's dependency graph traced with
    ``example_input``, the output of ``a`` goes only to ``b`` through: an optional BatchNorm (affine,
    with running statistics) right after ``a``, then any sequence of ReLU, LeakyReLU, max pooling,
    average pooling (global average pooling included) and one flatten before a Linear ``b``, each op
    feeding only the next, nothing of it returned by the forward, and ``b`` reading nothing else.
    Every module involved runs once per forward and has one name. Flattening is accepted between a
    convolution's ``(N, C, ...)`` output and a Linear layer whose ``in_features`` is a multiple of
    ``C`` (channel ``i`` becomes a block of consecutive features). Between two Linear layers only
    activations are accepted (pooling a Linear output would mix features with other dimensions).

    ReLU6 (``nn.ReLU6``) is not positively homogeneous: with ``relu6="stop"`` (default) it ends a
    chain; with ``relu6="relu"`` it is accepted and listed in :attr:`EqualizationPair.relu6`, and
    :func:`cross_layer_equalize` replaces it by ``nn.ReLU`` (Nagel et al. do so for MobileNetV2).
    Residual connections (an output read twice) end a chain; concatenations and other ops are not
    followed.

    Args:
        model: The network. Traced in eval mode; training flags and ``requires_grad`` are restored.
        example_input: Input for the traced forward pass: a tensor, a tuple of positional arguments
            or a dict of keyword arguments (default: ``model.example_input_array``).
        relu6: ``"stop"`` or ``"relu"`` (see above).

    Returns:
        The pairs, ordered by the producer's position in ``model.named_modules()``.

    Raises:
        ValueError: If ``relu6`` is not supported, there is no example input or the model cannot be
            traced.
    """
    check_choice("relu6", relu6, _RELU6_MODES)
    if not any(_is_layer(m) for m in model.modules()):
        return []
    trace = _trace(model, example_input, "find_equalization_pairs()")
    pairs = []
    for node in trace.graph.module2node.values():
        if _kind(node, trace) == "layer":
            pair = _pair_from(node, trace, relu6)
            if pair is not None:
                pairs.append(pair)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    pairs.sort(key=lambda p: order[p.producer])
    return pairs


# ---------------------------------------------------------------------------------------- ranges
def _fold_factor(bn: nn.Module) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` in float64 (the BatchNorm's eval-mode scale)."""
    std = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(std)
    return gamma / std


def _grouped(weight: Tensor, layer: nn.Module, channels: int) -> Tensor:
    """``weight`` as ``(groups, out_per_group, in_per_group, rest)`` over the ``channels`` inputs.

    For a Linear layer whose ``in_features`` is ``k * channels`` (a flattened ``(N, C, ...)``
    input), input channel ``i`` is the block of features ``[i k, (i + 1) k)``.
    """
    if isinstance(layer, nn.Linear):
        return weight.reshape(1, weight.shape[0], channels, -1)
    groups = layer.groups
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)


def _modules(model: nn.Module, pair: EqualizationPair) -> tuple[nn.Module, nn.Module, Any, Any]:
    producer = model.get_submodule(pair.producer)
    consumer = model.get_submodule(pair.consumer)
    bn = model.get_submodule(pair.batchnorm) if pair.batchnorm else None
    cbn = model.get_submodule(pair.consumer_batchnorm) if pair.consumer_batchnorm else None
    return producer, consumer, bn, cbn


def _ranges64(model: nn.Module, pair: EqualizationPair) -> tuple[Tensor, Tensor]:
    producer, consumer, bn, cbn = _modules(model, pair)
    channels = _out_channels(producer)
    r1 = producer.weight.detach().double().abs().flatten(1).amax(1)
    if bn is not None:
        r1 = r1 * _fold_factor(bn).abs()
    w2 = _grouped(consumer.weight.detach().double().abs(), consumer, channels)
    if cbn is not None:
        w2 = w2 * _fold_factor(cbn).abs().reshape(w2.shape[0], w2.shape[1], 1, 1)
    r2 = w2.amax(dim=(1, 3)).reshape(-1)
    return r1, r2


def channel_ranges(model: nn.Module, pair: EqualizationPair) -> tuple[Tensor, Tensor]:
    """Per-channel weight ranges of a pair, as quantization after BatchNorm folding sees them.

    Args:
        model: The network holding the pair's modules.
        pair: The pair (from :func:`find_equalization_pairs`).

    Returns:
        ``(r1, r2)``, float32 tensors of one entry per shared channel: ``r1_i`` is the largest
        ``|w|`` of the producer's output channel ``i`` (times ``|gamma_i / sqrt(var_i + eps)|`` of its
        BatchNorm), ``r2_i`` the largest ``|w|`` of the consumer's weights reading channel ``i``
        (each output row times its own BatchNorm factor). After :func:`cross_layer_equalize`,
        ``r1 == r2`` (Nagel et al., 2019, eq. 9).
    """
    r1, r2 = _ranges64(model, pair)
    return r1.float(), r2.float()


def _scales(r1: Tensor, r2: Tensor) -> Tensor:
    tiny = torch.finfo(torch.float32).tiny
    ok = (r1 > tiny) & (r2 > tiny)
    s = torch.sqrt(torch.where(ok, r1, torch.ones_like(r1)) / torch.where(ok, r2, torch.ones_like(r2)))
    return torch.where(ok, s, torch.ones_like(s))


@torch.no_grad()
def _apply_scale(model: nn.Module, pair: EqualizationPair, s: Tensor) -> None:
    """Output channel ``i`` of the producer / 1 / ``s_i``; input channel ``i`` of the consumer * ``s_i``."""
    producer, consumer, bn, _ = _modules(model, pair)
    if bn is not None:
        # BN(x) / s: scale and shift both divided (ReLU and pooling commute with a positive scale).
        bn.weight.copy_(bn.weight.double() / s)
        bn.bias.copy_(bn.bias.double() / s)
    else:
        shape = (-1,) + (1,) * (producer.weight.dim() - 1)
        producer.weight.copy_(producer.weight.double() / s.reshape(shape))
        if producer.bias is not None:
            producer.bias.copy_(producer.bias.double() / s)
    w2 = _grouped(consumer.weight.double(), consumer, s.numel())
    w2 = w2 * s.reshape(w2.shape[0], 1, w2.shape[2], 1)
    consumer.weight.copy_(w2.reshape(consumer.weight.shape))


def _replace_relu6(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.ReLU6):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.ReLU(inplace=module.inplace))


def cross_layer_equalize(
    model: nn.Module,
    pairs: Sequence[EqualizationPair] | None = None,
    iterations: int = 100,
    tolerance: float = 1e-6,
    example_input: Any = None,
    relu6: Literal["stop", "relu"] = "stop",
) -> list[EqualizationPair]:
    """Equalize the per-channel weight ranges of consecutive layers, in place (Nagel et al., 2019, 4.1).

    For each pair with ranges ``(r1, r2)`` (see :func:`channel_ranges`), ``s_i = sqrt(r1_i / r2_i)``
    (eq. 9); output channel ``i`` of the producer is divided by ``s_i`` (its weight and bias, or the
    ``gamma`` and ``beta`` of the BatchNorm after it) and every weight of the consumer that reads
    channel ``i`` is multiplied by ``s_i``. Channels with a zero range keep ``s_i = 1``. All pairs are
    swept again until no scale differs from 1 by more than ``tolerance`` (relative) or
    ``iterations`` sweeps ran; pairs sharing a layer (a depthwise convolution between two 1x1
    convolutions) converge to ranges equal across the whole chain.

    The network's outputs are unchanged (up to float rounding; the arithmetic runs in float64),
    except where ReLU6 modules listed in the pairs are replaced by ReLU (``relu6="relu"``). Weights
    change in place: ``Parameter`` objects, module types (but those ReLU6) and running statistics
    are kept, so an optimizer holding the parameters stays valid.

    Args:
        model: The network.
        pairs: The pairs to equalize (default: :func:`find_equalization_pairs` of ``model``).
        iterations: Largest number of sweeps over the pairs, >= 1.
        tolerance: Stop when every ``|s_i - 1| <= tolerance``, >= 0.
        example_input: Input for tracing when ``pairs`` is ``None`` (default:
            ``model.example_input_array``).
        relu6: ``"stop"`` or ``"relu"``, when ``pairs`` is ``None`` (see
            :func:`find_equalization_pairs`).

    Returns:
        The pairs equalized.

    Raises:
        ValueError: For an argument out of range, no example input, or an untraceable model.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[0] *= 100
        >>> pairs = cross_layer_equalize(net, example_input=torch.zeros(1, 4))
        >>> r1, r2 = channel_ranges(net, pairs[0])
        >>> torch.allclose(r1, r2)
        True
    """
    check_int("iterations", iterations, minimum=1)
    check_number("tolerance", tolerance, low=0.0)
    check_choice("relu6", relu6, _RELU6_MODES)
    if pairs is None:
        pairs = find_equalization_pairs(model, example_input, relu6)
    pairs = list(pairs)
    for pair in pairs:
        _replace_relu6(model, pair.relu6)
    for _ in range(iterations):
        change = 0.0
        for pair in pairs:
            s = _scales(*_ranges64(model, pair))
            change = max(change, float((s - 1).abs().max()) if s.numel() else 0.0)
            _apply_scale(model, pair, s)
        if change <= tolerance:
            break
    return pairs


# ------------------------------------------------------------------------------- high-bias absorption
def _absorbable(model: nn.Module, pair: EqualizationPair) -> bool:
    if pair.batchnorm is None or ("relu" not in pair.path and not pair.relu6):
        return False
    for kind in pair.path:
        if kind not in ("relu", "relu6", "maxpool", "avgpool", "reshape"):
            return False  # LeakyReLU passes negative values: relu(x - c) + c == relu(x) fails
    # Clipping ReLU6 modules must have been replaced (by cross_layer_equalize) first.
    return not any(isinstance(model.get_submodule(name), nn.ReLU6) for name in pair.relu6)


@torch.no_grad()
def absorb_high_bias(
    model: nn.Module,
    pairs: Sequence[EqualizationPair] | None = None,
    num_std: float = 3.0,
    add_bias: bool = True,
    example_input: Any = None,
) -> dict[str, Tensor]:
    """Move the always-active part of a ReLU input into the next layer's bias, in place (Section 4.2).

    For a pair ``producer -> BatchNorm -> ReLU (-> pooling / flatten) -> consumer``, the BatchNorm's
    output channel ``i`` is taken as ``N(beta_i, gamma_i^2)`` and ``c_i = max(0, beta_i - num_std
    |gamma_i|)``. Then ``beta_i -= c_i`` and the consumer's output gets ``+ W2 c`` (the weights reading
    channel ``i`` summed over the kernel, times ``c_i``): added to its bias, or, when a BatchNorm
    follows the consumer, subtracted from that BatchNorm's running mean (no bias needed; a training
    BatchNorm removes the shift by itself). Since ``relu(x - c) = relu(x) - c`` whenever ``x >= c``
    and max / average pooling and flattening commute with a per-channel shift, outputs are unchanged
    for every input whose pre-activations stay above ``c`` (at the chosen ``num_std``, almost all of
    them). Two approximations are left, as in the paper: inputs below ``c``, and zero padding of a
    consumer convolution (padded border positions read 0, not ``-c``: border outputs move by the
    padded taps' share of ``W2 c``).

    Only pairs with a BatchNorm on the producer side and a ReLU on the path are absorbed (a
    LeakyReLU passes negative values, a ReLU6 clips from above: such pairs are skipped; run
    :func:`cross_layer_equalize` with ``relu6="relu"`` first to replace ReLU6).

    Args:
        model: The network (not folded: the BatchNorm statistics are the pre-activation
            distribution).
        pairs: The pairs (default: :func:`find_equalization_pairs` of ``model``).
        num_std: ``c_i = max(0, beta_i - num_std |gamma_i|)``; > 0 (3 in the paper).
        add_bias: Give a consumer without bias and without a following BatchNorm a bias (a new
            ``Parameter``); ``False`` skips such pairs (structure unchanged).
        example_input: Input for tracing when ``pairs`` is ``None``.

    Returns:
        ``{producer-side BatchNorm name: c}`` of the pairs absorbed (entries of ``c`` may be 0).

    Raises:
        ValueError: For an argument out of range, no example input, or an untraceable model.
    """
    check_number("num_std", num_std, low=0.0, low_open=True)
    if not isinstance(add_bias, bool):
        raise ValueError(f"`add_bias`={add_bias!r} is not supported; expected true or false.")
    if pairs is None:
        pairs = find_equalization_pairs(model, example_input)
    absorbed: dict[str, Tensor] = {}
    for pair in pairs:
        if not _absorbable(model, pair):
            continue
        _, consumer, bn, cbn = _modules(model, pair)
        if cbn is None and consumer.bias is None and not add_bias:
            continue
        gamma, beta = bn.weight.double(), bn.bias.double()
        c = torch.clamp(beta - num_std * gamma.abs(), min=0.0)
        w2 = _grouped(consumer.weight.detach().double(), consumer, c.numel())
        groups, in_pg = w2.shape[0], w2.shape[2]
        shift = torch.einsum("goik,gi->go", w2, c.reshape(groups, in_pg)).reshape(-1)
        bn.bias.copy_(beta - c)
        if cbn is not None:
            cbn.running_mean.copy_(cbn.running_mean.double() - shift)
        elif consumer.bias is not None:
            consumer.bias.copy_(consumer.bias.double() + shift)
        else:
            consumer.bias = nn.Parameter(shift.to(consumer.weight.dtype))
        absorbed[pair.batchnorm] = c.to(bn.bias.dtype)
    return absorbed


# ---------------------------------------------------------------------------------------- bias correction
def clipped_normal_mean(mean: Tensor, std: Tensor, low: float = 0.0, high: float = math.inf) -> Tensor:
    """``E[clamp(z, low, high)]`` for ``z ~ N(mean, std^2)``, elementwise.

    With ``a = (low - mean) / std`` and ``b = (high - mean) / std``:
    ``low Phi(a) + high (1 - Phi(b)) + mean (Phi(b) - Phi(a)) + std (phi(a) - phi(b))``. For a ReLU
    (``low=0``, ``high=inf``) this is ``std phi(-mean / std) + mean (1 - Phi(-mean / std))`` (Nagel et
    al., 2019, Section 4.3). A zero ``std`` gives ``clamp(mean, low, high)``.

    Args:
        mean: Means of the normal distributions.
        std: Standard deviations (the absolute value is used).
        low: Lower clipping bound (may be ``-inf``).
        high: Upper clipping bound (may be ``inf``).

    Returns:
        The expected clipped values, in float64.

    Example:
        >>> clipped_normal_mean(torch.tensor([0.0]), torch.tensor([1.0]))  # 1 / sqrt(2 pi)
        tensor([0.3989], dtype=torch.float64)
    """
    mean = torch.as_tensor(mean).double()
    std = torch.as_tensor(std).double().abs()
    safe = torch.where(std > 0, std, torch.ones_like(std))

    def pdf(x: Tensor) -> Tensor:
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    out = torch.zeros_like(mean)
    if math.isfinite(low):
        a = (low - mean) / safe
        out = out + low * torch.special.ndtr(a) - mean * torch.special.ndtr(a) + safe * pdf(a)
    if math.isfinite(high):
        b = (high - mean) / safe
        out = out + high * (1 - torch.special.ndtr(b)) + mean * torch.special.ndtr(b) - safe * pdf(b)
    else:
        out = out + mean
    return torch.where(std > 0, out, mean.clamp(low, high))


def _activation_mean(kind: str, node: Any, beta: Tensor, gamma: Tensor) -> Tensor | None:
    if kind == "none":
        return beta
    if kind == "relu":
        return clipped_normal_mean(beta, gamma, 0.0, math.inf)
    if kind in ("relu6", "hardtanh"):
        low = float(getattr(node.grad_fn, "_saved_min_val", 0.0))
        high = float(getattr(node.grad_fn, "_saved_max_val", 6.0))
        return clipped_normal_mean(beta, gamma, low, high)
    if kind == "leaky_relu":
        slope = float(getattr(node.grad_fn, "_saved_negative_slope", 0.01))
        # leaky(z) = relu(z) + slope (z - relu(z))
        relu = clipped_normal_mean(beta, gamma, 0.0, math.inf)
        return (1 - slope) * relu + slope * beta
    return None


def _layer_input_mean(lnode: Any, trace: _Trace) -> Tensor | None:
    layer = lnode.module
    if not trace.single(layer):
        return None
    inputs = _data_inputs(lnode)
    if len(inputs) != 1:
        return None
    node = inputs[0]
    tail: list[Any] = []
    activation: tuple[str, Any] | None = None
    while True:
        kind = _kind(node, trace)
        if kind == "bn":
            break
        if kind in _MEAN_PRESERVING and activation is None:
            tail.append(node)
        elif kind in ("relu", "relu6", "hardtanh", "leaky_relu") and activation is None:
            activation = (kind, node)
        else:
            return None
        inputs = _data_inputs(node)
        if len(inputs) != 1:
            return None
        node = inputs[0]
    bn = node.module
    if bn.running_mean is None:
        return None
    channels = bn.num_features
    ones = torch.ones(channels, dtype=torch.float64, device=bn.running_mean.device)
    beta = bn.bias.detach().double() if bn.bias is not None else 0 * ones
    gamma = bn.weight.detach().double() if bn.weight is not None else ones
    kind, act_node = activation if activation is not None else ("none", None)
    mean = _activation_mean(kind, act_node, beta, gamma)
    if mean is None:
        return None
    reshapes = [n for n in tail if _kind(n, trace) == "reshape"]
    if isinstance(layer, nn.Linear):
        in_shape = trace.in_shapes.get(id(layer), ())
        if len(in_shape) != 2 or layer.in_features % channels:
            return None
        repeat = layer.in_features // channels
        if repeat > 1 and (len(reshapes) != 1 or not _reshape_keeps_channels(reshapes[0], channels)):
            return None
        return mean.repeat_interleave(repeat)
    if reshapes or layer.in_channels != channels:
        return None
    return mean


def expected_input_means(model: nn.Module, example_input: Any = None) -> dict[str, Tensor]:
    """Analytic ``E[x]`` of every Conv / Linear layer input that comes from a BatchNorm (Section 4.3).

    A layer's input qualifies when, on the traced graph, it is ``BatchNorm -> [activation] ->
    [average pooling / flatten]* -> layer`` (the BatchNorm's output may have other readers). The
    BatchNorm output channel ``i`` is taken as ``N(beta_i, gamma_i^2)``; the activation's mean follows
    in closed form (:func:`clipped_normal_mean` for ReLU / ReLU6 / Hardtanh, a mix for LeakyReLU, none
    for no activation), and average pooling and flattening keep it. Inputs after max pooling,
    residual additions or anything else get no entry.

    Args:
        model: The network, with its BatchNorm layers (not folded).
        example_input: Input for the traced forward pass (default: ``model.example_input_array``).

    Returns:
        ``{layer name: E[x]}``, float64, one entry per input channel of a convolution, per input
        feature of a Linear layer.

    Raises:
        ValueError: If there is no example input or the model cannot be traced.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return {}
    trace = _trace(model, example_input, "expected_input_means()")
    means: dict[str, Tensor] = {}
    for module, node in trace.graph.module2node.items():
        if _kind(node, trace) != "layer":
            continue
        mean = _layer_input_mean(node, trace)
        if mean is not None:
            means[trace.name(module)] = mean
    return means


@torch.no_grad()
def measure_input_means(
    model: nn.Module, batches: Iterable[Any], layers: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Empirical ``E[x]`` of the inputs of Conv / Linear layers over ``batches`` (eval mode).

    Args:
        model: The network.
        batches: Model inputs: a tensor (``model(x)``), a tuple / list (``model(*x)``) or a dict
            (``model(**x)``) each.
        layers: Layer names (default: every Conv / Linear layer).

    Returns:
        ``{layer name: mean}``, float64: per input channel (dimension 1) of a convolution, per input
        feature (last dimension) of a Linear layer. Layers that never ran get no entry.
    """
    if layers is None:
        layers = [name for name, m in model.named_modules() if _is_layer(m)]
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().double()
            if isinstance(module, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:
                flat = x.movedim(1, -1).reshape(-1, x.shape[1])
            sums[name] = sums.get(name, 0) + flat.sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return record

    training = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        model.eval()
        for batch in batches:
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    return {name: sums[name] / counts[name] for name in sums}


@torch.no_grad()
def correct_bias(
    float_model: nn.Module,
    quant_model: nn.Module,
    input_means: Mapping[str, Tensor] | None = None,
    data: Iterable[Any] | None = None,
    example_input: Any = None,
) -> dict[str, Tensor]:
    """Remove the expected output shift weight quantization causes, in place (Section 4.3).

    For every fake-quantized layer of ``quant_model`` (a module with ``quantized_weight()``, e.g.
    from :func:`~lightning_compress.quantization.fake_quant.quantize_model`), the expected error of
    its output is ``E[y_q - y] = (W_q - W) E[x]``, with ``W`` the weight of the layer of the same name
    in ``float_model`` and ``W_q`` the weight the quantized forward uses (for a convolution, summed
    over the kernel: ``E[x]`` is taken constant over space and zero padding is ignored). It is
    subtracted from the quantized layer's bias (a bias ``Parameter`` is created where there is none).

    ``E[x]`` per layer comes from ``input_means`` when given there; for the other layers, from
    ``data`` run through ``float_model`` (:func:`measure_input_means`, the paper's empirical variant)
    when given, else analytically from ``float_model``'s BatchNorm statistics
    (:func:`expected_input_means`). Layers without an ``E[x]`` are left alone.

    Args:
        float_model: The float network ``quant_model`` was made from (same layer names), not
            changed.
        quant_model: The fake-quantized network (its weight quantizers enabled).
        input_means: ``{layer name: E[x]}`` per input channel (Conv) / feature (Linear).
        data: Model inputs for the empirical means.
        example_input: Input for tracing ``float_model`` (analytic means).

    Returns:
        ``{layer name: E[y_q - y]}`` of the layers corrected (float64).

    Raises:
        ValueError: If ``quant_model`` has no quantized layer, a quantized layer has no float
            counterpart of the same weight shape, or an ``E[x]`` has the wrong length.
    """
    layers = {
        name: m for name, m in quant_model.named_modules() if callable(getattr(m, "quantized_weight", None))
    }
    if not layers:
        raise ValueError(
            "correct_bias(): `quant_model` has no quantized layer (a module with quantized_weight()); "
            "quantize it first (lightning_compress.quantization.fake_quant.quantize_model)."
        )
    means = dict(input_means or {})
    missing = [name for name in layers if name not in means]
    if missing:
        if data is not None:
            found = measure_input_means(float_model, data, missing)
        else:
            found = expected_input_means(float_model, example_input)
        means.update({k: v for k, v in found.items() if k in missing})
    corrections: dict[str, Tensor] = {}
    for name, layer in layers.items():
        if name not in means:
            continue
        try:
            reference = float_model.get_submodule(name)
        except AttributeError:
            reference = None
        if (
            reference is None
            or getattr(reference, "weight", None) is None
            or (reference.weight.shape != layer.weight.shape)
        ):
            raise ValueError(
                f"correct_bias(): quantized layer {name!r} has no float layer of the same name and weight "
                "shape in `float_model`; pass the model `quant_model` was quantized from."
            )
        mean = torch.as_tensor(means[name]).double().to(layer.weight.device).reshape(-1)
        if mean.numel() != _in_channels(layer):
            unit = "feature" if isinstance(layer, nn.Linear) else "channel"
            raise ValueError(
                f"correct_bias(): E[x] of {name!r} has {mean.numel()} entries; expected "
                f"{_in_channels(layer)} (one per input {unit})."
            )
        delta_w = layer.quantized_weight().detach().double() - reference.weight.detach().double()
        grouped = _grouped(delta_w, layer, mean.numel())
        groups, in_pg = grouped.shape[0], grouped.shape[2]
        shift = torch.einsum("goik,gi->go", grouped, mean.reshape(groups, in_pg)).reshape(-1)
        if layer.bias is None:
            layer.bias = nn.Parameter((-shift).to(layer.weight.dtype))
        else:
            layer.bias.copy_(layer.bias.double() - shift)
        corrections[name] = shift
    return corrections
