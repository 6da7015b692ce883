"""Export a (possibly quantized) model to ONNX: a plain float graph, or a QDQ int8 graph.

A model whose layers were fake-quantized (:class:`~lightning_compress.QuantizationAwareTraining`,
:func:`~lightning_compress.data_free_quantize`) is exported in the *QDQ* form onnxruntime's CPU
provider turns into integer kernels: every quantized layer reads ``DequantizeLinear(QuantizeLinear
(x))`` (uint8, per tensor) and a ``DequantizeLinear`` of its int8 weight (per output channel); the
runtime's graph optimizer fuses ``DQ -> Conv -> (Relu) -> Q`` into ``QLinearConv`` and the linear
layers into ``QGemm`` / ``QLinearMatMul`` / ``MatMulInteger``.

Before exporting, a copy of the model is put in its deployment form: BatchNorms folded into the
layers before them (:func:`~lightning_compress.quantization.fuse`, the same folding QAT simulated),
weights of fewer than 8 bits snapped to their grid and written on the int8 grid with the same scale
(exact), activations of fewer than 8 bits written on the uint8 grid with their trained step size and
zero point (values above their clipping point are kept, not clipped: a ``Clip`` node would stop
onnxruntime from fusing the integer kernel). Torch's QDQ export is only fused by
onnxruntime for the ranges ``(0, 255)`` and ``(-128, 127)``, which is why lower bit widths are
expressed on the 8-bit grid. The model passed in is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from lightning_compress.quantization.fake_quant import quantized_layers, unbind_stale_bns

__all__ = ["INTEGER_OPS", "export_onnx", "optimized_ops"]

#: Operators of onnxruntime's optimized graph that run integer arithmetic.
INTEGER_OPS: frozenset[str] = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "MatMulIntegerToFloat",
        "QLinearAdd",
    }
)


def _check_quantized(model: nn.Module) -> bool:
    layers = quantized_layers(model)
    if not layers:
        return False
    off = [name for name, layer in layers.items() if not layer.weight_quant.enabled]
    if off:
        raise ValueError(
            f"export_onnx: quantization of layers {off} has not started (QuantizationAwareTraining `start` "
            "was not reached, or quantize_model(enabled=False)); train past `start` or calibrate the model "
            "with lightning_compress.quantization.fake_quant.calibrate before exporting."
        )
    unseen = [
        name
        for name, layer in layers.items()
        if (layer.quantize_input and layer.input_quant.enabled and not layer.input_quant.ready)
        or (layer.quantize_output and layer.output_quant.enabled and not layer.output_quant.ready)
    ]
    if unseen:
        raise ValueError(
            f"export_onnx: the activation observers of layers {unseen} never saw data, so their int8 ranges "
            "are unknown; train with QuantizationAwareTraining past `start`, or calibrate the model "
            "(lightning_compress.quantization.fake_quant.calibrate(model, batches)) before exporting."
        )
    return True


def deployment_copy(model: nn.Module, example_input: Any) -> nn.Module:
    """A copy of ``model`` in the form the ONNX export writes (BatchNorms folded, int8 grids)."""
    from lightning_compress.quantization.fusion import find_fusion_pairs, fuse

    target = copy.deepcopy(model).eval()
    for param in target.parameters():  # the exporter picks the autograd variant of the quant ops otherwise
        param.requires_grad_(False)
    quantized = _check_quantized(target)
    if quantized and any(layer.folded_bn is not None for layer in quantized_layers(target).values()):
        if find_fusion_pairs(target, example_input):
            target = fuse(target, example_input, inplace=True)
        unbind_stale_bns(target)
        left = [name for name, layer in quantized_layers(target).items() if layer.folded_bn is not None]
        if left:
            raise ValueError(
                f"export_onnx: the BatchNorms that layers {left} folded during training could not be folded "
                "for export (they are no longer the only consumer of the layer's output)."
            )
    for layer in quantized_layers(target).values():
        layer.weight_quant.prepare_export(layer.weight)
        # The forward now reads the int8 levels; drop the float copy so the file stores int8 only.
        layer.weight = nn.Parameter(torch.empty(0, device=layer.weight.device), requires_grad=False)
        layer.input_quant.prepare_export()
        if layer.quantize_output:
            layer.output_quant.prepare_export()
    return target


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    dynamic_batch: bool = True,
    opset_version: int = 18,
) -> Path:
    """Write ``model`` to ``path`` as ONNX (QDQ int8 for quantized layers, float otherwise).

    Args:
        model: The model (a LightningModule or any ``nn.Module``); left unchanged.
        example_input: One input batch: a tensor, a tuple of positional arguments or a dict of
            keyword arguments (Lightning's ``example_input_array`` convention).
        path: Output file.
        dynamic_batch: Make dimension 0 of every tensor input dynamic.
        opset_version: ONNX opset.

    Returns:
        The path written.

    Raises:
        ValueError: A quantized layer whose activation range is unknown (observers never saw data)
            or whose quantization never started, named in the message; an ``example_input`` of the
            wrong kind.
    """
    if example_input is None:
        raise ValueError(
            "export_onnx: `example_input` is None; give one input batch (a tensor, a tuple of positional "
            "arguments or a dict of keyword arguments), e.g. model.example_input_array."
        )
    param = next(model.parameters(), None)
    if param is not None:
        example_input = tree_map_only(Tensor, lambda t: t.to(param.device), example_input)
    target = deployment_copy(model, example_input)
    if isinstance(example_input, dict):
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dict(example_input)
    elif isinstance(example_input, tuple):
        args, kwargs = example_input, {}
    else:
        args, kwargs = (example_input,), {}
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)

        def spec(value: Any) -> Any:
            return {0: batch} if isinstance(value, Tensor) and value.dim() > 0 else None

        import inspect

        try:
            sig = inspect.signature(target.forward)
            bound = sig.bind(*args, **kwargs)
            dynamic_shapes = {
                name: tree_map_only(Tensor, spec, value) for name, value in bound.arguments.items()
            }
        except TypeError:
            dynamic_shapes = None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            target,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translation_table(),
            opset_version=opset_version,
            verbose=False,
        )
        proto = program.model_proto
    import onnx

    # A deployment artifact: drop the exporter's per-node debugging metadata (Python stack traces)
    # and intermediate shape annotations, about half of a small model's file.
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))
    return path


def _translation_table() -> dict[Any, Any]:
    """ONNX translation of the export form of the input quantizers: ``QuantizeLinear -> DequantizeLinear``."""
    import onnx
    from onnxscript import opset18 as op

    def fake_quant_uint8(x: Any, scale: float, zero_point: int) -> Any:
        s = op.Constant(value_float=scale)
        z = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [zero_point]))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def dequantize_int8(levels: Any, scale: Any, zero_point: Any, axis: int) -> Any:
        return op.DequantizeLinear(levels, scale, zero_point, axis=axis)

    return {
        torch.ops.lightning_compress.fake_quant_uint8.default: fake_quant_uint8,
        torch.ops.lightning_compress.dequantize_int8.default: dequantize_int8,
    }


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporter's progress prints and optional-dependency warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def optimized_ops(path: str | os.PathLike[str], threads: int = 1) -> list[str]:
    """The operator types of ``path`` after onnxruntime's CPU graph optimizations (in graph order).

    Use it to check that a QDQ model really runs integer kernels (:data:`INTEGER_OPS`).
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
        return [node.op_type for node in graph.node]
