"""Fold BatchNorm layers into the Conv / Linear layers before them, for inference.

An inference-mode BatchNorm (Ioffe and Szegedy, 2015) that directly follows a convolution or
linear layer is a fixed per-channel affine map, so it can be folded into that layer's weight and
bias (Jacob et al., 2018, Section 3.2): ``Conv -> BN -> ReLU`` becomes ``Conv' -> ReLU`` with the
BatchNorm replaced by ``nn.Identity``. The fused network computes the same eval-mode outputs with
one layer (and one memory pass over the activations) less per pair, and it is the form integer
quantization calibrates and quantizes.

The pairs are found on the traced data-flow graph, not on module order: Torch-Pruning's
dependency graph (Fang et al., 2023) tells which module consumes a layer's output, so a pair is
folded only when the BatchNorm is the *only* consumer of the layer's output and the layer is its
only producer. A convolution whose output also feeds a residual branch before the BatchNorm is left
alone (folding would change the other branch), and so is every module that runs more than once
per forward pass (shared weights).

* :func:`fuse` folds a model now (a copy, or in place).
* :class:`LayerFusion` folds the LightningModule at the end of ``trainer.fit`` through the
  compression engine, so the structure change (``add_bias`` / ``replace`` ops) is recorded in every
  later checkpoint and :func:`~lightning_compress.core.surgery.load_checkpoint` rebuilds the fused
  model.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015.

    B. Jacob, S. Kligys, B. Chen, M. Zhu, M. Tang, A. Howard, H. Adam and D. Kalenichenko,
    "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", CVPR 2018.

    G. Fang, X. Ma, M. Song, M. Bi Mi and X. Wang, "DepGraph: Towards Any Structural Pruning",
    CVPR 2023.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch_pruning as tp
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map_only
from typing_extensions import override

from lightning_compress.core.callback import compression_root
from lightning_compress.core.engine import CompressionEngine, get_engine
from lightning_compress.core.surgery import apply_ops
from lightning_compress.core.validation import check_choice
from lightning_compress.functional.fusion import fold_bn, is_foldable_layer

__all__ = ["LayerFusion", "find_fusion_pairs", "fuse"]

#: ``replace`` op target of a folded BatchNorm (registered with the structure surgery).
_IDENTITY_PATH = f"{nn.Identity.__module__}.{nn.Identity.__qualname__}"
#: When :class:`LayerFusion` folds.
_WHEN: tuple[str, ...] = ("fit_end",)

Folded = dict[str, tuple[Tensor, Tensor]]


#: A layer a following BatchNorm can be folded into: Linear or a non-transposed Conv.
_is_producer = is_foldable_layer


def _is_foldable_bn(module: nn.Module) -> bool:
    """A BatchNorm whose inference transform is fixed: it tracks running statistics."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    )


def _call(model: nn.Module, example_input: Any) -> Any:
    # Lightning's convention for example_input_array: a tuple holds positional arguments, a dict
    # keyword arguments, anything else is the single argument.
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def _resolve_example_input(model: nn.Module, example_input: Any, owner: str) -> Any:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            f"{owner} needs an example input to trace {type(model).__name__}: pass `example_input` "
            "(a tensor, a tuple of positional arguments or a dict of keyword arguments) or set "
            "`example_input_array` on the model."
        )
    parameter = next(model.parameters(), None)
    if parameter is not None:
        example_input = move_data_to_device(example_input, parameter.device)
        dtype = parameter.dtype  # bf16-true / 64-true models: floating inputs in the model's dtype
        example_input = tree_map_only(
            Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t, example_input
        )
    return example_input


def find_fusion_pairs(model: nn.Module, example_input: Any = None) -> list[tuple[str, str]]:
    """The ``(layer, batchnorm)`` name pairs of ``model`` that can be folded, in module order.

    A Conv (non-transposed, any dimension) or Linear layer ``c`` pairs with a BatchNorm ``bn`` when,
    on Torch-Pruning's dependency graph traced with ``example_input``, the output of ``c`` goes to
    ``bn`` only and ``bn`` takes its input from ``c`` only, ``bn`` tracks running statistics, and
    neither module runs more than once per forward pass or is registered under two names. A
    Linear layer pairs only when its output is ``(N, C)``: on ``(N, L, C)`` a BatchNorm1d would
    normalize ``L``, not the layer's features. The model is traced in eval mode (so BatchNorm
    statistics are not updated) with gradients enabled (the tracer follows autograd); every
    module's training flag and every parameter's ``requires_grad`` are restored afterwards.

    Args:
        model: The network.
        example_input: Input for one forward pass: a tensor, a tuple of positional arguments or a
            dict of keyword arguments (default: ``model.example_input_array``). Moved to the
            model's device.

    Returns:
        The foldable pairs as module names relative to ``model``.

    Raises:
        ValueError: If there is no example input, or Torch-Pruning cannot trace the model.
    """
    example_input = _resolve_example_input(model, example_input, "fuse()")
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    candidates = [m for m in model.modules() if _is_producer(m) or _is_foldable_bn(m)]
    if not candidates:
        return []

    calls: Counter[int] = Counter()
    output_dims: dict[int, int] = {}

    produced: dict[int, Any] = {}

    def record(module: nn.Module, args: Any, output: Any) -> None:
        calls[id(module)] += 1
        output_dims[id(module)] = output.dim() if isinstance(output, Tensor) else -1
        produced[id(module)] = output

    training = {module: module.training for module in model.modules()}
    # The tracer follows autograd: frozen parameters would leave their layers out of the graph.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    handles = [m.register_forward_hook(record) for m in candidates]
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
        try:
            with torch.no_grad():
                out = _call(model, example_input)
            # A layer whose output the forward also returns must keep it: folding would change it.
            returned = {id(t) for t in tree_leaves(out) if isinstance(t, Tensor)}
            for handle in handles:
                handle.remove()
            handles = []
            with torch.enable_grad():
                # A one-element tuple, so the tracer calls model(x) and never model(*x).
                traced_input = (example_input,) if isinstance(example_input, Tensor) else example_input
                graph = tp.DependencyGraph().build_dependency(model, traced_input, verbose=False)
        except Exception as err:
            raise ValueError(
                f"fuse(): Torch-Pruning could not trace {type(model).__name__} "
                f"({type(err).__name__}: {err}); pass an `example_input` its forward accepts (a tensor, "
                "a tuple of positional arguments or a dict of keyword arguments) and make it return "
                "tensors."
            ) from err
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(False)
        for module, flag in training.items():
            module.training = flag

    pairs: list[tuple[str, str]] = []
    unfused: list[str] = []
    produced_ids = {k: id(v) for k, v in produced.items()}
    produced.clear()  # drop the activations

    for module in model.modules():
        if not _is_foldable_bn(module):
            continue
        bn_node = graph.module2node.get(module)
        producer_node = bn_node.inputs[0] if bn_node is not None and len(bn_node.inputs) == 1 else None
        producer = producer_node.module if producer_node is not None else None
        ok = (
            producer is not None
            and _is_producer(producer)
            and len(producer_node.outputs) == 1
            and producer_node.outputs[0] is bn_node
            and produced_ids.get(id(producer)) not in returned
            and calls[id(producer)] == 1
            and calls[id(module)] == 1
            and len(names[id(producer)]) == 1
            and len(names[id(module)]) == 1
            and _out_channels(producer) == module.num_features
            # BatchNorm normalizes dimension 1; a Linear maps the last one: only (N, C) outputs agree.
            and (not isinstance(producer, nn.Linear) or output_dims.get(id(producer)) == 2)
        )
        if ok:
            pairs.append((names[id(producer)][0], names[id(module)][0]))
        else:
            unfused.append(names[id(module)][0])
    if unfused:
        rank_zero_debug(
            f"fuse(): BatchNorm layers left unfolded (no exclusive Conv/Linear producer): {unfused}"
        )
    order = {name: i for i, name in enumerate(n for n, _ in model.named_modules())}
    pairs.sort(key=lambda pair: order[pair[0]])
    return pairs


def _out_channels(module: nn.Module) -> int:
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def _fold_pairs(model: nn.Module, pairs: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], Folded]:
    """Folded ``(weight, bias)`` of every pair, and the ops that make room for them."""
    folded: Folded = {}
    add_bias: list[dict[str, Any]] = []
    replace: list[dict[str, Any]] = []
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        folded[layer_name] = fold_bn(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        if layer.bias is None:
            add_bias.append({"op": "add_bias", "module": layer_name})
        replace.append({"op": "replace", "module": bn_name, "class_path": _IDENTITY_PATH, "init_args": {}})
    return add_bias + replace, folded


def _copy_folded(model: nn.Module, folded: Folded) -> None:
    with torch.no_grad():
        for layer_name, (weight, bias) in folded.items():
            layer = model.get_submodule(layer_name)
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def fuse(model: nn.Module, example_input: Any = None, inplace: bool = False) -> nn.Module:
    """Fold every eligible BatchNorm into the Conv / Linear layer before it, for inference.

    Each pair found by :func:`find_fusion_pairs` is folded with
    :func:`~lightning_compress.functional.fusion.fold_bn` (Jacob et al., 2018, Section 3.2): the
    layer gets the folded weight and a bias (a zero bias is added first where it had none) and the
    BatchNorm is replaced by ``nn.Identity``. ``Conv -> BN -> ReLU`` thus becomes ``Conv -> ReLU``:
    activations stay where the model's own ``forward`` applies them. In eval mode the fused model
    computes the same outputs as the original (up to float rounding); it is meant for inference,
    since training it further would no longer normalize.

    The structure change uses the ops of :mod:`lightning_compress.core.surgery`; the list of ops
    applied is stored on the returned model as ``fusion_ops`` (``add_bias`` ops, then ``replace``
    ops) and the folded pairs as ``fused_pairs``. When nothing can be folded the model is returned
    unchanged (still copied unless ``inplace``) with empty lists, and a warning is emitted.

    Args:
        model: The network (any ``nn.Module``, e.g. a LightningModule).
        example_input: Input for one traced forward pass: a tensor, a tuple of positional arguments
            or a dict of keyword arguments (default: ``model.example_input_array``).
        inplace: Fold ``model`` itself instead of a deep copy.

    Returns:
        The fused model (``model`` itself when ``inplace``).

    Raises:
        ValueError: If there is no example input, or Torch-Pruning cannot trace the model.

    Example:
        >>> from lightning_compress.demos import SmallVGG
        >>> fused = fuse(SmallVGG().eval())
        >>> len(fused.fused_pairs), fused.features[1]
        (6, Identity())
    """
    target = model if inplace else copy.deepcopy(model)
    pairs = find_fusion_pairs(target, example_input)
    ops, folded = _fold_pairs(target, pairs)
    if pairs:
        apply_ops(target, ops)
        _copy_folded(target, folded)
    else:
        rank_zero_warn(
            f"fuse(): no Conv/Linear-BatchNorm pair was found in {type(model).__name__} to fold "
            "(each BatchNorm must be the only consumer of a Conv or Linear output); the model is "
            "returned unchanged."
        )
    target.fusion_ops = ops
    target.fused_pairs = pairs
    return target


class LayerFusion(pl.Callback):
    """Fold BatchNorm layers into the Conv / Linear layers before them when ``trainer.fit`` ends.

    When training ends (``on_train_end``, on every rank; before ``on_fit_end``, so a
    ``CompressionReport`` at fit end reports the fused model) the compression root of the
    LightningModule (the module itself, or the one named by its ``compression_root``) is fused in
    place like :func:`fuse`
    (Jacob et al., 2018, Section 3.2): ``Conv -> BN -> ReLU`` becomes ``Conv -> ReLU`` with the
    BatchNorm replaced by ``nn.Identity`` and folded into the convolution's weight and bias. The
    change goes through the trainer's
    :class:`~lightning_compress.core.engine.CompressionEngine`, so the ``add_bias`` / ``replace``
    ops are recorded in the structure recipe of every checkpoint saved afterwards
    (``trainer.save_checkpoint``) and :func:`~lightning_compress.core.surgery.load_checkpoint`
    rebuilds the fused model. The number of folded pairs is logged as ``fusion/pairs`` (rank-zero
    info). Optimizers are not rebuilt: the fused model is for inference.

    Args:
        on: When to fold; only ``"fit_end"`` for now.
        example_input: Input for the traced forward pass (a tensor, a tuple of positional
            arguments or a dict of keyword arguments); default: the compression root's
            ``example_input_array``.

    Raises:
        ValueError: If ``on`` is not supported; at fit end, if there is no example input or the
            model cannot be traced.

    Attributes:
        fused_pairs: The ``(layer, batchnorm)`` pairs folded (names relative to the
            LightningModule), after fit end.
        ops: The structure ops applied, after fit end.
    """

    def __init__(self, on: Literal["fit_end"] = "fit_end", example_input: Any = None) -> None:
        super().__init__()
        self.on = check_choice("on", on, _WHEN)
        self.example_input = example_input
        self.fused_pairs: list[tuple[str, str]] = []
        self.ops: list[dict[str, Any]] = []
        self.engine: CompressionEngine | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        launcher = getattr(trainer.strategy, "_launcher", None)
        if launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher":
            raise RuntimeError(
                "LayerFusion changes parameter shapes, which strategy='ddp_spawn' / 'ddp_fork' cannot carry "
                "back to the main process (Lightning reloads the workers' weights into the original, "
                "unfused module). Use strategy='ddp', or call lightning_compress.fuse(model) after fit."
            )
        root = compression_root(pl_module)[0]
        if self.example_input is None and getattr(root, "example_input_array", None) is None:
            raise ValueError(
                f"LayerFusion needs an example input to trace {type(root).__name__} (the compression "
                "root): pass `example_input` or set `example_input_array` on it."
            )
        # Insert the engine now, so it is a callback for the whole fit (and writes the recipe into
        # every checkpoint); its own setup (recipe replay on resume) must run before training.
        self.engine = get_engine(trainer)
        self.engine.setup(trainer, pl_module, stage)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root, prefix = compression_root(pl_module)
        example_input = self.example_input
        if example_input is None:
            example_input = getattr(root, "example_input_array", None)
        if example_input is None and root is not pl_module:
            raise ValueError(
                f"LayerFusion needs an example input to trace {type(root).__name__} (the compression "
                "root): pass `example_input` or set `example_input_array` on it."
            )
        example_input = _resolve_example_input(root, example_input, "LayerFusion")
        pairs = find_fusion_pairs(root, example_input)
        if pairs and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Under DDP each rank updated its own BatchNorm statistics since the last forward (DDP
            # broadcasts rank 0's buffers at the *start* of a forward): fold rank 0's everywhere, the
            # statistics rank 0's checkpoints hold, so every rank gets the same fused weights.
            for _, bn_name in pairs:
                for buffer in root.get_submodule(bn_name).buffers():
                    dist.broadcast(buffer.data, src=0)
        if not pairs:
            rank_zero_warn(
                f"LayerFusion: no Conv/Linear-BatchNorm pair was found in {type(root).__name__} to fold; "
                "the model is left unchanged."
            )
            return
        ops, folded = _fold_pairs(root, pairs)
        # The engine applies ops to the LightningModule: names relative to it.
        self.ops = [{**op, "module": prefix + op["module"]} for op in ops]
        engine = self.engine if self.engine is not None else get_engine(trainer)
        engine.change_structure(trainer, pl_module, self.ops, "LayerFusion", rebuild=False)
        _copy_folded(root, folded)
        self.fused_pairs = [(prefix + layer, prefix + bn) for layer, bn in pairs]
        rank_zero_info(
            f"LayerFusion: folded {len(pairs)} BatchNorm layers into their Conv/Linear layers "
            f"(fusion/pairs={len(pairs)})."
        )
