"""Post-training quantization without data: DFQ (Nagel et al., 2019) with ZeroQ inputs (Cai et al., 2020).

* :func:`distill_data` synthesizes calibration inputs from a network's BatchNorm statistics
  (ZeroQ, Cai et al., 2020, Section 3.2): starting from Gaussian noise, the inputs are optimized
  with Adam so that the batch mean and standard deviation of every BatchNorm's input match that
  BatchNorm's running mean and standard deviation (eq. 3).
* :func:`data_free_quantize` returns a fake-quantized copy of a network following the data-free
  quantization pipeline of Nagel et al. (2019): cross-layer equalization and high-bias absorption
  on the float network (:mod:`lightning_compress.functional.equalization`), BatchNorm folding
  (:func:`~lightning_compress.quantization.fusion.fuse`), fake quantization
  (:func:`~lightning_compress.quantization.fake_quant.quantize_model`), analytic bias correction,
  and activation ranges calibrated on distilled (or given) inputs.
* :class:`DataFreeQuantization` applies equalization and bias absorption to the LightningModule
  when ``trainer.fit`` starts or ends (a function-preserving weight transform that keeps every
  module and ``Parameter``), and optionally builds the quantized copy at the end of training.

References:
    M. Nagel, M. van Baalen, T. Blankevoort and M. Welling, "Data-Free Quantization Through Weight
    Equalization and Bias Correction", ICCV 2019.

    Y. Cai, Z. Yao, Z. Dong, A. Gholami, M. W. Mahoney and K. Keutzer, "ZeroQ: A Novel Zero Shot
    Quantization Framework", CVPR 2020.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import compression_root, is_distributed
from lightning_compress.core.engine import CompressionEngine, get_engine
from lightning_compress.core.surgery import register_module_class
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.functional.equalization import (
    EqualizationPair,
    absorb_high_bias,
    cross_layer_equalize,
    expected_input_means,
    find_equalization_pairs,
    measure_input_means,
)
from lightning_compress.functional.equalization import correct_bias as _correct_bias
from lightning_compress.quantization.fake_quant import (
    calibrate,
    check_bits,
    layers_needing_output_quant,
    quantize_model,
)
from lightning_compress.quantization.fusion import fuse

__all__ = ["DataFreeQuantization", "bn_statistics_loss", "data_free_quantize", "distill_data"]

# ReLU6 -> ReLU replacements (relu6="relu") go through the structure recipe.
register_module_class(nn.ReLU)
_RELU_PATH = f"{nn.ReLU.__module__}.{nn.ReLU.__qualname__}"
_WHEN: tuple[str, ...] = ("fit_start", "fit_end")
_CALIBRATION: tuple[str, ...] = ("distill", "train")
_RELU6: tuple[str, ...] = ("stop", "relu")


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    ]


def _bn_loss(model: nn.Module, x: Tensor, bns: Sequence[nn.Module]) -> Tensor:
    """ZeroQ eq. 3 for one forward of ``x`` (the model must be in eval mode)."""
    terms: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        h = args[0]
        dims = [0, *range(2, h.dim())]
        mean = h.mean(dims)
        std = torch.sqrt(h.var(dims, unbiased=False) + module.eps)
        ref_std = torch.sqrt(module.running_var + module.eps)
        terms.append((mean - module.running_mean).pow(2).sum() + (std - ref_std).pow(2).sum())

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not terms:
        raise ValueError("distill_data(): no BatchNorm layer ran in the forward pass.")
    return torch.stack(terms).sum()


def bn_statistics_loss(model: nn.Module, x: Tensor) -> Tensor:
    """ZeroQ's BatchNorm statistics loss of the input batch ``x`` (Cai et al., 2020, eq. 3).

    ``sum_i ||mu_i(x) - running_mean_i||^2 + ||sigma_i(x) - sqrt(running_var_i + eps)||^2`` over every
    BatchNorm ``i`` with running statistics, where ``mu_i(x)`` and ``sigma_i(x)`` are the
    per-channel mean and standard deviation of that BatchNorm's input over the batch (and spatial
    dimensions), with the network in eval mode. The training flags are restored.

    Args:
        model: The network (with BatchNorm layers).
        x: A batch of inputs, ``(N, ...)``.

    Returns:
        The loss, a scalar tensor (differentiable with respect to ``x``).

    Raises:
        ValueError: If ``model`` has no BatchNorm layer with running statistics, or none ran.
    """
    bns = _batchnorms(model)
    if not bns:
        raise ValueError(
            f"bn_statistics_loss(): {type(model).__name__} has no BatchNorm layer with running statistics."
        )
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        return _bn_loss(model, x, bns)
    finally:
        for module, flag in training.items():
            module.training = flag


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    if (
        isinstance(input_shape, (str, bytes))
        or not isinstance(input_shape, Sequence)
        or not input_shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise ValueError(
            f"`input_shape`={input_shape!r} is not supported; expected the shape of one input "
            "without the batch dimension, a non-empty sequence of positive ints, e.g. (1, 28, 28)."
        )
    return tuple(input_shape)


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None, owner: str) -> tuple[int, ...]:
    if input_shape is not None:
        return _check_input_shape(input_shape)
    example = getattr(model, "example_input_array", None)
    if isinstance(example, Tensor) and example.dim() >= 2:
        return tuple(example.shape[1:])
    raise ValueError(
        f"{owner} needs the input shape of {type(model).__name__}: pass `input_shape` (one input without "
        "the batch dimension, e.g. (1, 28, 28)) or set a tensor `example_input_array` on the model."
    )


def distill_data(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    num_batches: int = 1,
    batch_size: int = 32,
    iterations: int = 500,
    lr: float = 0.1,
    input_stats: tuple[float, float] | None = None,
    seed: int = 0,
) -> list[Tensor]:
    """Synthesize calibration inputs that match the network's BatchNorm statistics (ZeroQ).

    Each batch starts as standard Gaussian noise and is optimized with Adam for ``iterations``
    steps on :func:`bn_statistics_loss` (Cai et al., 2020, eq. 3), the network in eval mode and its
    parameters untouched (gradients are taken with respect to the input only). With
    ``input_stats=(mean, std)`` the inputs' own per-channel mean and standard deviation are pulled
    toward ``mean`` and ``std`` as well (ZeroQ's term for the normalized input; use it when inputs
    are standardized).

    Args:
        model: The network, with BatchNorm layers that track running statistics.
        input_shape: Shape of one input without the batch dimension (default:
            ``model.example_input_array.shape[1:]``).
        num_batches: Number of batches, >= 1.
        batch_size: Inputs per batch, >= 2 (a batch needs a spread to match variances).
        iterations: Adam steps per batch, >= 0 (ZeroQ uses 500).
        lr: Adam learning rate, > 0.
        input_stats: Optional ``(mean, std)`` target of the inputs' own statistics.
        seed: Seed of the initial noise (a private generator; the global RNG is untouched).

    Returns:
        ``num_batches`` tensors of shape ``(batch_size, *input_shape)`` on the model's device, in
        its dtype, detached.

    Raises:
        ValueError: For an argument out of range, a model without BatchNorm statistics, or no input
            shape.

    Example:
        >>> from lightning_compress.demos import SmallVGG
        >>> batches = distill_data(SmallVGG(width=8), batch_size=4, iterations=2)
        >>> batches[0].shape
        torch.Size([4, 1, 28, 28])
    """
    check_int("num_batches", num_batches, minimum=1)
    check_int("batch_size", batch_size, minimum=2)
    check_int("iterations", iterations, minimum=0)
    check_number("lr", lr, low=0.0, low_open=True)
    check_int("seed", seed, minimum=0)
    if input_stats is not None and (
        not isinstance(input_stats, (tuple, list))
        or len(input_stats) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in input_stats)
        or not input_stats[1] > 0
    ):
        raise ValueError(
            f"`input_stats`={input_stats!r} is not supported; expected None or (mean, std) with std > 0."
        )
    bns = _batchnorms(model)
    if not bns:
        raise ValueError(
            f"distill_data(): {type(model).__name__} has no BatchNorm layer with running statistics; ZeroQ "
            "needs them (pass your own `calibration_data` instead)."
        )
    shape = _input_shape(model, input_shape, "distill_data()")
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    training = {m: m.training for m in model.modules()}
    batches = []
    try:
        model.eval()
        for _ in range(num_batches):
            init = torch.randn((batch_size, *shape), generator=generator)
            x = init.to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=lr)
            for _ in range(iterations):
                with torch.enable_grad():
                    loss = _bn_loss(model, x, bns)
                    if input_stats is not None:
                        dims = [0, *range(2, x.dim())]
                        mean, std = float(input_stats[0]), float(input_stats[1])
                        loss = loss + (x.mean(dims) - mean).pow(2).sum() + (x.std(dims) - std).pow(2).sum()
                    (grad,) = torch.autograd.grad(loss, [x])
                x.grad = grad
                optimizer.step()
            batches.append(x.detach())
    finally:
        for module, flag in training.items():
            module.training = flag
    return batches


def _resolve_example(model: nn.Module, example_input: Any, batches: Sequence[Any]) -> Any:
    if example_input is not None:
        return example_input
    if getattr(model, "example_input_array", None) is not None:
        return model.example_input_array
    first = batches[0] if batches else None
    if isinstance(first, Tensor):
        return first[:1]
    return first


def data_free_quantize(
    model: nn.Module,
    weight_bits: int = 8,
    activation_bits: int = 8,
    per_channel: bool = False,
    equalize: bool = True,
    absorb_bias: bool = True,
    correct_bias: bool = True,
    calibration_data: Iterable[Any] | None = None,
    num_batches: int = 4,
    batch_size: int = 32,
    iterations: int = 500,
    input_shape: Sequence[int] | None = None,
    relu6: Literal["stop", "relu"] = "stop",
    num_std: float = 3.0,
    example_input: Any = None,
    seed: int = 0,
) -> nn.Module:
    """A fake-quantized copy of ``model``, made without data (Nagel et al., 2019; Cai et al., 2020).

    The pipeline, on a deep copy in eval mode (``model`` itself is never changed):

    1. calibration inputs: ``calibration_data``, or ``num_batches`` batches distilled from the
       BatchNorm statistics (:func:`distill_data`, before anything changes them);
    2. cross-layer equalization (``equalize``) and high-bias absorption (``absorb_bias``) on the
       float network with its BatchNorm layers
       (:func:`~lightning_compress.functional.equalization.cross_layer_equalize`,
       :func:`~lightning_compress.functional.equalization.absorb_high_bias`);
    3. the expected input of every layer (``correct_bias``): analytic from the BatchNorm statistics
       where a layer reads ``BatchNorm -> activation`` (Section 4.3), measured on the calibration
       inputs elsewhere (the first layer, inputs after residual additions or max pooling);
    4. BatchNorm folding (:func:`~lightning_compress.quantization.fusion.fuse`);
    5. fake quantization of every Linear / Conv1d / Conv2d layer
       (:func:`~lightning_compress.quantization.fake_quant.quantize_model`: symmetric weights, per
       tensor by default as in the paper, and per-tensor affine inputs);
    6. bias correction (``correct_bias``): ``(W_q - W) E[x]`` subtracted from each layer's bias;
    7. activation ranges: min / max of every quantized layer's input over the calibration inputs
       (:func:`~lightning_compress.quantization.fake_quant.calibrate`).

    Args:
        model: The float network (with its BatchNorm layers, not folded, for the data-free parts).
        weight_bits: Weight bit width, 2..8.
        activation_bits: Activation bit width, 2..8.
        per_channel: Per-output-channel weight scales (default per tensor, where equalization
            matters).
        equalize: Run cross-layer equalization.
        absorb_bias: Run high-bias absorption.
        correct_bias: Run analytic bias correction.
        calibration_data: Model inputs for the activation ranges (tensors, or tuples of positional
            arguments); default: ZeroQ inputs distilled from the BatchNorm statistics.
        num_batches: Distilled batches, >= 1.
        batch_size: Distilled inputs per batch, >= 2.
        iterations: Adam steps per distilled batch, >= 0.
        input_shape: Shape of one input without batch dimension, for distillation (default:
            ``model.example_input_array.shape[1:]``).
        relu6: ``"stop"`` (ReLU6 ends an equalization chain) or ``"relu"`` (ReLU6 modules inside
            chains become ReLU, as Nagel et al. do for MobileNetV2; changes outputs above 6).
        num_std: Bias absorption keeps ``num_std`` standard deviations of each pre-activation, > 0.
        example_input: Input for tracing (default: ``model.example_input_array``, else the first
            calibration batch).
        seed: Seed of the distilled inputs.

    Returns:
        The quantized copy, in eval mode. It carries ``equalization_pairs`` (the pairs equalized),
        ``absorbed_bias`` (``{BatchNorm: c}``), ``bias_corrections`` (``{layer: E[y_q - y]}``) and
        ``calibration_data`` (the batches used).

    Raises:
        ValueError: For an argument out of range (naming it), no calibration data and no BatchNorm
            statistics to distill from, or an untraceable model.
    """
    check_bits("weight_bits", weight_bits)
    check_bits("activation_bits", activation_bits)
    for name, value in (
        ("per_channel", per_channel),
        ("equalize", equalize),
        ("absorb_bias", absorb_bias),
        ("correct_bias", correct_bias),
    ):
        check_bool(name, value)
    check_int("num_batches", num_batches, minimum=1)
    check_int("batch_size", batch_size, minimum=2)
    check_int("iterations", iterations, minimum=0)
    check_choice("relu6", relu6, _RELU6)
    check_number("num_std", num_std, low=0.0, low_open=True)
    check_int("seed", seed, minimum=0)
    if input_shape is not None:
        _check_input_shape(input_shape)
    if isinstance(calibration_data, Tensor):
        raise ValueError(
            "`calibration_data` must be an iterable of batches (e.g. a list of tensors), not one tensor; "
            "wrap it: calibration_data=[x]."
        )

    net = copy.deepcopy(model).eval()
    if calibration_data is None:
        batches: list[Any] = distill_data(
            net, input_shape, num_batches=num_batches, batch_size=batch_size, iterations=iterations, seed=seed
        )
    else:
        batches = list(calibration_data)
        if not batches:
            raise ValueError("`calibration_data` is empty; give at least one batch of model inputs.")
        parameter = next(net.parameters(), None)
        if parameter is not None:
            batches = [move_data_to_device(b, parameter.device) for b in batches]
    example = _resolve_example(net, example_input, batches)

    pairs: list[EqualizationPair] = []
    if equalize or absorb_bias:
        pairs = find_equalization_pairs(net, example, relu6=relu6)
    if equalize:
        if not pairs:
            hint = (
                " (ReLU6 ends a chain: pass relu6='relu' to replace it by ReLU inside chains)"
                if relu6 == "stop" and any(isinstance(m, nn.ReLU6) for m in net.modules())
                else ""
            )
            rank_zero_warn(
                f"data_free_quantize(): no equalizable layer pair was found in {type(model).__name__}{hint}; "
                "cross-layer equalization changes nothing."
            )
        cross_layer_equalize(net, pairs)
    absorbed = absorb_high_bias(net, pairs, num_std=num_std) if absorb_bias else {}
    means: dict[str, Tensor] = {}
    if correct_bias:
        means = expected_input_means(net, example)
    if _batchnorms(net):
        net = fuse(net, example, inplace=True)
    if correct_bias:
        measured = measure_input_means(
            net, batches, [n for n, m in net.named_modules() if _is_quantizable(m)]
        )
        means = {**measured, **means}
        reference = copy.deepcopy(net)
    # Layers whose output feeds a residual add, global pooling or the logits also quantize their
    # output, so onnxruntime runs every layer of the exported model as an integer kernel.
    names = [n for n, m in net.named_modules() if _is_quantizable(m)]
    outputs = layers_needing_output_quant(net, example, names)
    quantize_model(
        net,
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        per_channel=per_channel,
        quantize_outputs=outputs,
    )
    corrections = _correct_bias(reference, net, input_means=means) if correct_bias else {}
    calibrate(net, batches)
    net.eval()
    net.equalization_pairs = pairs if equalize else []
    net.absorbed_bias = absorbed
    net.bias_corrections = corrections
    net.calibration_data = batches
    return net


def _is_quantizable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d)


class DataFreeQuantization(pl.Callback):
    """Equalize a LightningModule for quantization when fit starts or ends, and quantize a copy of it.

    At ``on`` (``"fit_start"``: before the first training step; ``"fit_end"``: when training ends,
    ``on_train_end``) the compression root of the LightningModule is transformed in place by
    cross-layer equalization (``equalize``) and high-bias absorption (``absorb_bias``) of Nagel et
    al. (2019) (:mod:`lightning_compress.functional.equalization`). Both are weight transforms that
    keep every module type and ``Parameter`` object (an optimizer stays valid) and preserve the
    float function: equalization exactly, absorption for pre-activations above ``beta - 3 |gamma|``.
    High-bias absorption only touches pairs whose second layer has a bias or a following BatchNorm
    (no new parameters). With ``relu6="relu"`` the ReLU6 modules inside equalization chains are
    replaced by ReLU (function-changing above 6) through the compression engine, so the change is
    in the structure recipe of every later checkpoint.

    With ``quantize=True``, when training ends, :func:`data_free_quantize` builds a fake-quantized
    copy of the (equalized) root, stored as :attr:`quantized_model`; the LightningModule itself
    stays float. Its activation ranges are calibrated on ZeroQ inputs distilled from the BatchNorm
    statistics (``calibration="distill"``) or on the inputs of the first ``num_batches`` training
    batches (``calibration="train"``: the first element of a tuple / list batch).

    Args:
        on: When to equalize: ``"fit_start"`` or ``"fit_end"``.
        equalize: Run cross-layer equalization.
        absorb_bias: Run high-bias absorption.
        quantize: Build :attr:`quantized_model` at the end of training.
        weight_bits: Weight bit width of the quantized copy, 2..8.
        activation_bits: Activation bit width of the quantized copy, 2..8.
        per_channel: Per-channel weight scales in the quantized copy (default per tensor).
        correct_bias: Bias correction in the quantized copy.
        calibration: ``"distill"`` or ``"train"``.
        num_batches: Calibration batches, >= 1.
        batch_size: Distilled inputs per batch, >= 2.
        iterations: Adam steps per distilled batch, >= 0.
        relu6: ``"stop"`` or ``"relu"`` (see
            :func:`~lightning_compress.functional.equalization.find_equalization_pairs`).
        example_input: Input for tracing (default: the root's ``example_input_array``).
        input_shape: Shape of one input without batch dimension for distillation (default:
            from ``example_input_array``).

    Raises:
        ValueError: If an argument is not supported (naming it); at setup, if there is no example
            input.

    Attributes:
        pairs: The pairs equalized (names relative to the LightningModule).
        absorbed: ``{BatchNorm name: c}`` of the absorbed shifts.
        quantized_model: The quantized copy (``None`` until the end of training or without
            ``quantize``); the same on every DDP rank (``"train"`` calibrates on rank 0's batches).

    With ``on="fit_end"`` the transform happens after the last ``ModelCheckpoint`` save of the fit,
    as for :class:`~lightning_compress.LayerFusion`: save a checkpoint after ``fit``
    (``trainer.save_checkpoint``) to keep the equalized weights.
    """

    def __init__(
        self,
        on: Literal["fit_start", "fit_end"] = "fit_end",
        equalize: bool = True,
        absorb_bias: bool = True,
        quantize: bool = True,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = False,
        correct_bias: bool = True,
        calibration: Literal["distill", "train"] = "distill",
        num_batches: int = 4,
        batch_size: int = 32,
        iterations: int = 500,
        relu6: Literal["stop", "relu"] = "stop",
        example_input: Any = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.on = check_choice("on", on, _WHEN)
        for name, value in (
            ("equalize", equalize),
            ("absorb_bias", absorb_bias),
            ("quantize", quantize),
            ("per_channel", per_channel),
            ("correct_bias", correct_bias),
        ):
            check_bool(name, value)
        self.equalize = equalize
        self.absorb_bias = absorb_bias
        self.quantize = quantize
        self.weight_bits = check_bits("weight_bits", weight_bits)
        self.activation_bits = check_bits("activation_bits", activation_bits)
        self.per_channel = per_channel
        self.correct_bias = correct_bias
        self.calibration = check_choice("calibration", calibration, _CALIBRATION)
        self.num_batches = check_int("num_batches", num_batches, minimum=1)
        self.batch_size = check_int("batch_size", batch_size, minimum=2)
        self.iterations = check_int("iterations", iterations, minimum=0)
        self.relu6 = check_choice("relu6", relu6, _RELU6)
        self.example_input = example_input
        self.input_shape = None if input_shape is None else _check_input_shape(input_shape)
        self.pairs: list[EqualizationPair] = []
        self.absorbed: dict[str, Tensor] = {}
        self.quantized_model: nn.Module | None = None
        self.engine: CompressionEngine | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        root = compression_root(pl_module)[0]
        if self.example_input is None and getattr(root, "example_input_array", None) is None:
            raise ValueError(
                f"DataFreeQuantization needs an example input to trace {type(root).__name__} (the "
                "compression root): pass `example_input` or set `example_input_array` on it."
            )
        if self.relu6 == "relu":
            # ReLU6 replacements are structure ops: the engine records them in every checkpoint.
            self.engine = get_engine(trainer)
            self.engine.setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "fit_start":
            self._transform(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "fit_end":
            self._transform(trainer, pl_module)
        if self.quantize:
            self._quantize(trainer, pl_module)

    def _example(self, root: nn.Module) -> Any:
        return self.example_input if self.example_input is not None else root.example_input_array

    def _transform(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.equalize or self.absorb_bias):
            return
        root, prefix = compression_root(pl_module)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Each DDP rank updated its own BatchNorm statistics: transform with rank 0's everywhere.
            for bn in _batchnorms(root):
                for buffer in bn.buffers():
                    dist.broadcast(buffer.data, src=0)
        example = self._example(root)
        pairs = find_equalization_pairs(root, example, relu6=self.relu6)
        relu6_ops = [
            {
                "op": "replace",
                "module": prefix + name,
                "class_path": _RELU_PATH,
                "init_args": {"inplace": bool(root.get_submodule(name).inplace)},
            }
            for pair in pairs
            for name in pair.relu6
        ]
        if relu6_ops and (self.equalize or self.absorb_bias):
            engine = self.engine if self.engine is not None else get_engine(trainer)
            engine.change_structure(trainer, pl_module, relu6_ops, "DataFreeQuantization", rebuild=False)
        if self.equalize:
            cross_layer_equalize(root, pairs)
        absorbed = absorb_high_bias(root, pairs, add_bias=False) if self.absorb_bias else {}
        self.pairs = [
            EqualizationPair(
                producer=prefix + p.producer,
                consumer=prefix + p.consumer,
                batchnorm=prefix + p.batchnorm if p.batchnorm else None,
                consumer_batchnorm=prefix + p.consumer_batchnorm if p.consumer_batchnorm else None,
                path=p.path,
                relu6=tuple(prefix + n for n in p.relu6),
            )
            for p in pairs
        ]
        self.absorbed = {prefix + k: v for k, v in absorbed.items()}
        if not pairs:
            rank_zero_warn(
                f"DataFreeQuantization: no equalizable layer pair was found in {type(root).__name__}; "
                "its weights are left unchanged."
            )
        rank_zero_info(
            f"DataFreeQuantization: equalized {len(pairs) if self.equalize else 0} layer pairs, absorbed "
            f"the high biases of {len(absorbed)}, replaced {len(relu6_ops)} ReLU6 by ReLU."
        )

    def _train_batches(self, trainer: pl.Trainer) -> list[Any]:
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError(
                "DataFreeQuantization(calibration='train'): the trainer has no training dataloader."
            )
        out = []
        for batch in itertools.islice(iter(loader), self.num_batches):
            if isinstance(batch, Mapping):
                raise ValueError(
                    "DataFreeQuantization(calibration='train'): the training batches are dicts, so the model "
                    "input cannot be told from the labels; use calibration='distill', or call "
                    "data_free_quantize(model, calibration_data=[inputs, ...]) after fit."
                )
            out.append(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if is_distributed():
            # Every rank calibrates on rank 0's batches, so the quantized copies agree.
            holder = [out]
            dist.broadcast_object_list(holder, src=0)
            out = holder[0]
        return out

    def _quantize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = compression_root(pl_module)[0]
        data = self._train_batches(trainer) if self.calibration == "train" else None
        self.quantized_model = data_free_quantize(
            root,
            weight_bits=self.weight_bits,
            activation_bits=self.activation_bits,
            per_channel=self.per_channel,
            equalize=False,  # already applied to the module (when enabled)
            absorb_bias=False,
            correct_bias=self.correct_bias,
            calibration_data=data,
            num_batches=self.num_batches,
            batch_size=self.batch_size,
            iterations=self.iterations,
            input_shape=self.input_shape,
            example_input=self.example_input,
        )
        rank_zero_info(
            f"DataFreeQuantization: built the {self.weight_bits}-bit weight / {self.activation_bits}-bit "
            "activation quantized copy (callback.quantized_model)."
        )
