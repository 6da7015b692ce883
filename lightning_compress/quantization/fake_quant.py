"""Fake-quantized Conv / Linear layers that keep the user's ``Parameter`` objects.

Quantization-aware training (Jacob et al., 2018) simulates integer inference in float: every
quantized layer rounds its weight and its input onto the integer grid they will have at inference
(*fake quantization*), and the straight-through estimator (Bengio et al., 2013) passes gradients
through the rounding. The layers here are subclasses of ``nn.Linear`` / ``nn.Conv1d`` /
``nn.Conv2d`` built by ``from_module`` around the *same* ``Parameter`` objects as the layer they
replace, so an optimizer that already holds them stays valid, the model's ``state_dict`` keeps the
user's keys (quantizer state is never saved there: it lives in the callback's checkpoint state) and
every ``isinstance(m, nn.Conv2d)`` check (cost model, channel graph, fusion) still holds.

* **Weights**: symmetric, per output channel (or per tensor), narrow range
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, scale ``max|w_c| / (2^(b-1) - 1)`` recomputed from the current
  weight at every forward (so pruning masks, equalization or bias correction are always seen). Zero
  is exactly representable: pruned weights stay exactly zero.
* **Activations**: the *input* of each quantized layer, per tensor, affine on ``[0, 2^b - 1]``,
  with an exponential-moving-average min/max observer (Jacob et al., 2018, Section 3.1). Observing
  the input (not the output) needs no knowledge of the user's forward: whatever ReLU, pooling or
  flattening happened in between, the quantizer sees the tensor the integer kernel will read.
  Optionally the step size is learned (LSQ, Esser et al., 2020) once the observers are frozen.
* **BatchNorm folding during training** (Krishnamoorthi, 2018, Section 2.4; Jacob et al., 2018,
  Section 3.2): a Conv / Linear followed by a BatchNorm quantizes the *folded* weight
  ``w * gamma / sqrt(running_var + eps)`` and divides the folded scale back out of its output, so the
  user's BatchNorm still runs (batch statistics while training, running statistics once frozen) and
  the quantization error is that of the folded integer layer that will be deployed.

Observed ranges are not applied in the forward pass: each forward only records the batch min / max
(``pending``); :func:`commit_observations` turns them into the new range once per training step,
after reducing them across DDP ranks, so every rank quantizes with the same range.

References:
    B. Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018.

    R. Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A
    whitepaper", arXiv:1806.08342, 2018.

    S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy and D. S. Modha, "Learned Step Size
    Quantization", ICLR 2020.

    Y. Bengio, N. Leonard and A. Courville, "Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation", arXiv:1308.3432, 2013.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.core.channels import call_model
from lightning_compress.core.surgery import register_module_class
from lightning_compress.core.targets import select_modules

__all__ = [
    "QUANTIZABLE_TYPES",
    "ActivationQuantizer",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "WeightQuantizer",
    "calibrate",
    "check_bits",
    "commit_observations",
    "dequantize_model",
    "quantize_model",
    "quantized_layers",
    "unbind_stale_bns",
]

#: Float layer types that have a fake-quantized counterpart.
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_EPS = torch.finfo(torch.float32).eps


@torch.library.custom_op("lightning_compress::fake_quant_uint8", mutates_args=())
def fake_quant_uint8(x: Tensor, scale: float, zero_point: int) -> Tensor:
    """Fake-quantize ``x`` on the uint8 grid with constant parameters (the export form of an input quantizer).

    A custom op so that ``torch.export`` keeps it whole with a dynamic batch dimension (torch's own
    fake-quant op has no symbolic-shape rule) and the ONNX exporter writes it as
    ``QuantizeLinear -> DequantizeLinear`` (:mod:`lightning_compress.export.onnx`).
    """
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


@fake_quant_uint8.register_fake
def _fake_quant_uint8_meta(x: Tensor, scale: float, zero_point: int) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lightning_compress::dequantize_int8", mutates_args=())
def dequantize_int8(levels: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """``levels * scale`` for int8 ``levels`` and per-tensor or per-``axis`` scales (export form of a weight).

    Written to ONNX as ``DequantizeLinear(levels, scale, zero_point, axis)`` with ``levels`` an int8
    initializer, so the exported file stores int8 weights (:mod:`lightning_compress.export.onnx`).
    ``zero_point`` is all zeros (symmetric weights); onnxruntime's Gemm fusion wants it explicit.
    """
    if scale.dim() == 0:
        return levels.float() * scale
    shape = [1] * levels.dim()
    shape[axis] = -1
    return levels.float() * scale.reshape(shape)


@dequantize_int8.register_fake
def _dequantize_int8_meta(levels: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return levels.new_empty(levels.shape, dtype=torch.float32)


def check_bits(name: str, value: Any) -> int:
    """Validate a bit width: an int in 2..8.

    Raises:
        ValueError: naming the argument and the accepted range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        raise ValueError(
            f"`{name}`={value!r} is not supported; expected an int from 2 to 8 (integer kernels run "
            "8-bit; fewer bits are simulated on the 8-bit grid)."
        )
    return value


class _NotInStateDict(nn.Module):
    """A module whose parameters and buffers never appear in (or are expected from) a ``state_dict``.

    Quantizer state belongs to the QAT callback's checkpoint section, so the model ``state_dict``
    keeps exactly the user's keys and loads into the plain, unquantized module.
    """

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        return


class WeightQuantizer(_NotInStateDict):
    """Symmetric fake quantization of a weight, per output channel or per tensor (narrow range).

    Args:
        bits: Bit width, 2..8 (2 bits gives the ternary grid ``{-s, 0, s}``).
        per_channel: One scale per output channel (dimension 0) instead of one per tensor.
    """

    def __init__(self, bits: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        self.bits = check_bits("weight_bits", bits)
        self.per_channel = bool(per_channel)
        self.enabled = False
        #: Export mode: emit the 8-bit grid ``[-128, 127]`` (what onnxruntime fuses) with the weight
        #: already snapped to ``bits``; set by :func:`~lightning_compress.export.onnx.export_onnx`.
        self.export_int8 = False

    @property
    def qmax(self) -> int:
        """Largest integer level, ``2^(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    def scale(self, weight: Tensor) -> Tensor:
        """Per-output-channel (or per-tensor) scales of ``weight``: ``max|w| / qmax``."""
        w = weight.detach()
        amax = w.abs().flatten(1).amax(1) if self.per_channel else w.abs().amax()
        return (amax / self.qmax).clamp_min(_EPS).float()

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize ``weight`` (identity while disabled)."""
        if not self.enabled:
            return weight
        if self.export_int8:
            # The int8 levels fixed by `prepare_export` (an int8 initializer in the ONNX file).
            return dequantize_int8(self.export_q, self.export_scale, self.export_zero, 0)
        return self._fq(weight, self.scale(weight), -self.qmax, self.qmax)

    @torch.no_grad()
    def prepare_export(self, weight: Tensor) -> Tensor:
        """Store ``weight``'s integer levels (int8) and scales, and switch to export mode.

        From then on the forward ignores the float weight and dequantizes the stored levels, which
        the ONNX exporter writes as an int8 initializer read by ``DequantizeLinear``. Returns the
        snapped float weight (``levels * scale``).
        """
        scale = self.scale(weight)
        shape = (-1,) + (1,) * (weight.dim() - 1) if self.per_channel else ()
        levels = torch.round(weight.float() / scale.reshape(shape)).clamp(-self.qmax, self.qmax)
        self.register_buffer("export_q", levels.to(torch.int8), persistent=False)
        self.register_buffer("export_scale", scale, persistent=False)
        self.register_buffer("export_zero", torch.zeros(scale.shape, dtype=torch.int8), persistent=False)
        self.export_int8 = True
        return levels * scale.reshape(shape)

    def _fq(self, weight: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
        if self.per_channel:
            zero = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, lo, hi)
        zero = torch.zeros((), dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_tensor_affine(weight, scale, zero, lo, hi)

    def extra_repr(self) -> str:  # noqa: D102
        return f"bits={self.bits}, per_channel={self.per_channel}, enabled={self.enabled}"


class ActivationQuantizer(_NotInStateDict):
    """Per-tensor affine fake quantization of an activation on ``[0, 2^bits - 1]``, with an EMA observer.

    While :attr:`observing`, each training forward records the batch min / max in ``pending_min`` /
    ``pending_max``; :meth:`commit` folds them into the running range (``min += c * (batch - min)``,
    Jacob et al., 2018) once per step. The very first forward, before any range exists, quantizes
    with the batch's own range. Evaluation forwards never observe.

    Args:
        bits: Bit width, 2..8.
        averaging_constant: EMA constant ``c`` of the observer.
        learn_scale: Learn the step size (LSQ, Esser et al., 2020) once :meth:`freeze` ran; the
            parameter :attr:`learned_scale` exists from the start so the optimizer holds it.
    """

    def __init__(self, bits: int = 8, averaging_constant: float = 0.01, learn_scale: bool = False) -> None:
        super().__init__()
        self.bits = check_bits("activation_bits", bits)
        self.averaging_constant = float(averaging_constant)
        self.enabled = False
        self.observing = True
        self.export_int8 = False
        #: ``(scale, zero_point)`` as Python numbers, fixed by :meth:`prepare_export`.
        self.export_qparams: tuple[float, int] = (1.0, 0)
        self.register_buffer("min_val", torch.zeros(()), persistent=False)
        self.register_buffer("max_val", torch.zeros(()), persistent=False)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool), persistent=False)
        self.register_buffer("pending_min", torch.full((), math.inf), persistent=False)
        self.register_buffer("pending_max", torch.full((), -math.inf), persistent=False)
        self.learned_scale: nn.Parameter | None = None
        if learn_scale:
            self.learned_scale = nn.Parameter(torch.ones(()))
        #: Zero point fixed when the step size starts being learned.
        self.register_buffer("frozen_zero_point", torch.zeros((), dtype=torch.int32), persistent=False)
        self.learning = False
        #: A range exists (host-side mirror of ``initialized``: no device sync in the forward).
        self.ready = False
        self._seen = False
        #: Record the range of every forward (eval included) and pass values through (:func:`calibrate`).
        self.calibrating = False

    @property
    def qmin(self) -> int:
        """Smallest level (0)."""
        return 0

    @property
    def qmax(self) -> int:
        """Largest level, ``2^bits - 1``."""
        return 2**self.bits - 1

    # ------------------------------------------------------------------ ranges
    def _range(self) -> tuple[Tensor, Tensor]:
        mn = torch.where(self.initialized, self.min_val, self.pending_min)
        mx = torch.where(self.initialized, self.max_val, self.pending_max)
        return mn, mx

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the current range (the range always includes 0)."""
        if self.learning and self.learned_scale is not None:
            return self.learned_scale.detach().abs().clamp_min(_EPS), self.frozen_zero_point
        return _affine_qparams(*self._range(), self.qmin, self.qmax)

    def commit(self, batch_min: Tensor, batch_max: Tensor) -> None:
        """Fold one step's (rank-reduced) batch range into the observer (no-op when it saw nothing)."""
        with torch.no_grad():
            seen = torch.isfinite(batch_min) & torch.isfinite(batch_max)
            c = self.averaging_constant
            new_min = torch.where(self.initialized, self.min_val + c * (batch_min - self.min_val), batch_min)
            new_max = torch.where(self.initialized, self.max_val + c * (batch_max - self.max_val), batch_max)
            self.min_val.copy_(torch.where(seen, new_min, self.min_val))
            self.max_val.copy_(torch.where(seen, new_max, self.max_val))
            self.initialized.logical_or_(seen)
            self.pending_min.fill_(math.inf)
            self.pending_max.fill_(-math.inf)
            self.ready = self.ready or self._seen
            self._seen = False
            if self.learned_scale is not None and not self.learning:
                # Until the step size is learned it follows the observer, so LSQ starts from there.
                self.learned_scale.copy_(self.qparams()[0])

    def set_range(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        """Set the range directly (calibration, data-free initialisation, checkpoint restore)."""
        with torch.no_grad():
            self.min_val.fill_(float(min_val))
            self.max_val.fill_(float(max_val))
            self.initialized.fill_(True)
            self.ready = True
            if self.learned_scale is not None and not self.learning:
                self.learned_scale.copy_(self.qparams()[0])

    def start_learning(self) -> None:
        """Freeze the zero point and learn the step size from now on (LSQ); needs ``learn_scale``."""
        if self.learned_scale is None or self.learning:
            return
        with torch.no_grad():
            scale, zero = _affine_qparams(*self._range(), self.qmin, self.qmax)
            self.learned_scale.copy_(scale)
            self.frozen_zero_point.copy_(zero)
        self.learning = True

    def prepare_export(self) -> None:
        """Fix the quantization parameters as constants and switch to the 8-bit export grid."""
        scale, zero = self.qparams()
        self.export_qparams = (float(scale), int(zero))
        self.export_int8 = True

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Observe (training, observing) and fake-quantize ``x`` (identity while disabled)."""
        if self.calibrating:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                torch.minimum(self.pending_min, lo, out=self.pending_min)
                torch.maximum(self.pending_max, hi, out=self.pending_max)
            return x
        if not self.enabled:
            if self.learned_scale is not None and self.training and torch.is_grad_enabled():
                # Keep the step-size parameter in the graph (DDP expects a gradient for it).
                return x + self.learned_scale * 0.0
            return x
        if self.training and self.observing and not self.learning:
            with torch.no_grad():
                lo, hi = torch.aminmax(x.detach().float())
                torch.minimum(self.pending_min, lo, out=self.pending_min)
                torch.maximum(self.pending_max, hi, out=self.pending_max)
            self._seen = True
        elif not self.ready:
            return x  # never observed data (e.g. Lightning's sanity check before the first step)
        if self.learning and self.learned_scale is not None and torch.is_grad_enabled():
            grad_factor = 1.0 / math.sqrt(x.numel() / max(x.shape[0], 1) * self.qmax)
            scale = self.learned_scale.abs().clamp_min(_EPS).reshape(1)
            zero = self.frozen_zero_point.float().reshape(1)
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero, self.qmin, self.qmax, grad_factor
            )
        if self.export_int8:
            # Constants for the exporter (the tensor-qparams op has no export rule). A `bits` < 8 input
            # is written on the uint8 grid with its trained step size and zero point: values above
            # its clipping point are kept rather than clipped (a Clip node would stop onnxruntime
            # from fusing the integer kernel).
            s, z = self.export_qparams
            return fake_quant_uint8(x, s, z)
        scale, zero = self.qparams()
        out = torch.fake_quantize_per_tensor_affine(
            x, scale.float(), zero.to(torch.int32), self.qmin, self.qmax
        )
        if self.learned_scale is not None and self.training and torch.is_grad_enabled():
            out = out + self.learned_scale * 0.0  # in the graph before LSQ starts (DDP expects a gradient)
        return out

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"bits={self.bits}, enabled={self.enabled}, observing={self.observing}, "
            f"learn_scale={self.learned_scale is not None}"
        )


def _affine_qparams(mn: Tensor, mx: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Affine ``(scale, zero_point)`` covering ``[min(mn, 0), max(mx, 0)]`` (0 exactly representable)."""
    mn = torch.clamp(torch.nan_to_num(mn.float(), nan=0.0, posinf=0.0, neginf=0.0), max=0.0)
    mx = torch.clamp(torch.nan_to_num(mx.float(), nan=0.0, posinf=0.0, neginf=0.0), min=0.0)
    scale = ((mx - mn) / float(qmax - qmin)).clamp_min(_EPS)
    zero = (qmin - torch.round(mn / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


class QuantizedLayer:
    """Mixin of the fake-quantized layers: an input quantizer, a weight quantizer, optional BN folding."""

    input_quant: ActivationQuantizer
    weight_quant: WeightQuantizer
    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quant(
        self,
        weight_bits: int,
        activation_bits: int,
        per_channel: bool,
        averaging_constant: float,
        learn_scale: bool,
        quantize_input: bool,
        quantize_output: bool = False,
    ) -> None:
        self.weight_quant = WeightQuantizer(weight_bits, per_channel)
        self.input_quant = ActivationQuantizer(activation_bits, averaging_constant, learn_scale)
        self.output_quant = ActivationQuantizer(activation_bits, averaging_constant)
        #: Whether the input is quantized (False e.g. for a first layer reading raw inputs, by choice).
        self.quantize_input = bool(quantize_input)
        #: Whether the (BatchNorm-folded) output is quantized too: the integer kernel then writes int8
        #: directly (``QLinearConv`` / ``QGemm``), whatever consumes the output.
        self.quantize_output = bool(quantize_output)
        self.__dict__["_folded_bn"] = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        averaging_constant: float = 0.01,
        learn_scale: bool = False,
        quantize_input: bool = True,
        quantize_output: bool = False,
    ) -> Any:
        """A fake-quantized copy of ``module`` that shares its ``Parameter`` objects (and hooks)."""
        new = cls.__new__(cls)
        # Share everything (parameters, buffers, hooks, attributes such as padding) with the original.
        new.__dict__.update(module.__dict__)
        new._parameters = module._parameters
        new._buffers = module._buffers
        new._modules = dict(module._modules)
        new._init_quant(
            weight_bits,
            activation_bits,
            per_channel,
            averaging_constant,
            learn_scale,
            quantize_input,
            quantize_output,
        )
        return new

    def to_float(self) -> nn.Module:
        """A plain layer of the original class sharing the same parameters (quantizers dropped)."""
        base = next(c for c in type(self).__mro__[1:] if c in QUANTIZABLE_TYPES)
        plain = base.__new__(base)
        plain.__dict__.update(self.__dict__)
        quantizers = ("input_quant", "weight_quant", "output_quant")
        plain._modules = {k: v for k, v in self._modules.items() if k not in quantizers}
        for key in ("_folded_bn", "quantize_input", "quantize_output"):
            plain.__dict__.pop(key, None)
        return plain

    # ------------------------------------------------------------------ BatchNorm folding
    @property
    def folded_bn(self) -> nn.modules.batchnorm._BatchNorm | None:
        """The BatchNorm this layer folds while training (not a submodule: the user's model owns it)."""
        return self.__dict__.get("_folded_bn")

    def bind_bn(self, bn: nn.modules.batchnorm._BatchNorm | None) -> None:
        """Fold ``bn`` (the BatchNorm that consumes this layer's output) into the quantized weight."""
        self.__dict__["_folded_bn"] = bn

    def _bn_factor(self) -> Tensor | None:
        bn = self.folded_bn
        if bn is None or not self.weight_quant.enabled:
            return None
        std = torch.sqrt(bn.running_var + bn.eps)
        factor = bn.weight / std if bn.weight is not None else 1.0 / std
        # A zero gamma (slimmed channel) has an all-zero folded weight; keep the division finite.
        return torch.where(factor.abs() < 1e-12, torch.full_like(factor, 1e-12), factor)

    def quantized_weight(self) -> Tensor:
        """The weight the forward uses: fake-quantized, with the bound BatchNorm's scale folded in."""
        factor = self._bn_factor()
        if factor is None:
            return self.weight_quant(self.weight)
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return self.weight_quant(self.weight * factor.reshape(shape))

    def _quant_forward(self, x: Tensor, raw: Any) -> Tensor:
        if self.quantize_input:
            x = self.input_quant(x)
        factor = self._bn_factor()
        if factor is None:
            y = raw(x, self.weight_quant(self.weight), self.bias)
            return self.output_quant(y) if self.quantize_output else y
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        y = raw(x, self.weight_quant(self.weight * factor.reshape(shape)), None)
        out_shape = (1, -1) + (1,) * (y.dim() - 2)
        if self.quantize_output:
            # Quantize the deployed (folded) output z = y + (b - mean) * factor + beta, then map it back
            # so that the user's BatchNorm with running statistics gives exactly z_q.
            bn = self.folded_bn
            assert bn is not None
            beta = bn.bias if bn.bias is not None else torch.zeros_like(factor)
            bias = self.bias if self.bias is not None else torch.zeros_like(factor)
            shift = (bias - bn.running_mean) * factor + beta
            z = self.output_quant(y + shift.reshape(out_shape))
            mean = bn.running_mean.reshape(out_shape)
            return (z - beta.reshape(out_shape)) / factor.reshape(out_shape) + mean
        y = y / factor.reshape(out_shape)
        return y if self.bias is None else y + self.bias.reshape(out_shape)


@register_module_class
class QuantLinear(QuantizedLayer, nn.Linear):
    """Fake-quantized ``nn.Linear`` (see the module docstring); build with :meth:`from_module`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._quant_forward(input, F.linear)


@register_module_class
class QuantConv1d(QuantizedLayer, nn.Conv1d):
    """Fake-quantized ``nn.Conv1d`` (see the module docstring); build with :meth:`from_module`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._quant_forward(input, self._conv_forward)


@register_module_class
class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """Fake-quantized ``nn.Conv2d`` (see the module docstring); build with :meth:`from_module`."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self._quant_forward(input, self._conv_forward)


_QUANT_CLASS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
}


def quant_class(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quantized class for ``module`` (``None`` when its type has none)."""
    if isinstance(module, QuantizedLayer):
        return type(module)
    return _QUANT_CLASS.get(type(module))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """``{name: layer}`` of every fake-quantized layer in ``model`` (``named_modules`` order)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    weight_bits: int = 8,
    activation_bits: int = 8,
    per_channel: bool = True,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    averaging_constant: float = 0.01,
    learn_scales: bool = False,
    bn_pairs: dict[str, nn.Module] | None = None,
    enabled: bool = True,
    owner: str = "quantize_model",
    quantize_outputs: bool | Collection[str] = False,
) -> dict[str, QuantizedLayer]:
    """Swap the selected Linear / Conv1d / Conv2d layers of ``model`` for fake-quantized ones, in place.

    The new layers share the old ones' ``Parameter`` objects. Layers already quantized are kept.

    Args:
        model: The model (changed in place).
        weight_bits: Weight bit width, 2..8.
        activation_bits: Input-activation bit width, 2..8.
        per_channel: Per-output-channel weight scales (else one per tensor).
        targets: fnmatch patterns over module names (default every supported layer).
        exclude: Patterns removed from ``targets``.
        averaging_constant: EMA constant of the activation observers.
        learn_scales: Give activation quantizers a learnable step size (LSQ).
        bn_pairs: ``{layer name: BatchNorm module}`` to fold while training.
        enabled: Enable the quantizers now (``False``: they pass values through until enabled).
        owner: Name used in error messages.
        quantize_outputs: Also quantize each layer's (BatchNorm-folded) output, so the integer kernel
            writes int8 whatever consumes it (a residual add, global pooling, the network output):
            ``True`` for every layer, or the names of the layers that need it
            (:func:`layers_needing_output_quant`).

    Returns:
        ``{name: quantized layer}`` for the selected layers.

    Raises:
        ValueError: A bad bit width, a pattern that matches nothing, or a targeted layer whose type
            cannot be quantized (named in the message).
    """
    check_bits("weight_bits", weight_bits)
    check_bits("activation_bits", activation_bits)
    targets = ["*"] if targets is None else list(targets)
    exclude = [] if exclude is None else list(exclude)
    names = select_quantizable(model, targets, exclude, owner)
    out: dict[str, QuantizedLayer] = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, QuantizedLayer):
            cls = quant_class(module)
            assert cls is not None
            module = cls.from_module(  # type: ignore[attr-defined]
                module,
                weight_bits=weight_bits,
                activation_bits=activation_bits,
                per_channel=per_channel,
                averaging_constant=averaging_constant,
                learn_scale=learn_scales,
                quantize_output=(
                    quantize_outputs if isinstance(quantize_outputs, bool) else name in quantize_outputs
                ),
            )
            _set_submodule(model, name, module)
        if bn_pairs and name in bn_pairs:
            module.bind_bn(bn_pairs[name])  # type: ignore[arg-type]
        module.weight_quant.enabled = enabled
        module.input_quant.enabled = enabled
        module.output_quant.enabled = enabled and module.quantize_output
        out[name] = module  # type: ignore[assignment]
    return out


def select_quantizable(
    model: nn.Module, targets: Sequence[str], exclude: Sequence[str], owner: str
) -> list[str]:
    """Names of the layers ``targets`` / ``exclude`` select that can be quantized.

    Wildcard patterns (``"*"``, ``"encoder.*"``) quietly skip layers without a fake-quantized
    counterpart (a ``Conv3d``, or a ``Linear`` subclass such as ``nn.MultiheadAttention``'s
    ``out_proj``, whose weight the attention kernel reads directly); a pattern without wildcards that
    names such a layer is an error naming the layer and its type.

    Raises:
        ValueError: A named layer cannot be quantized, or nothing quantizable is selected.
    """
    kinds = ", ".join(t.__name__ for t in QUANTIZABLE_TYPES)
    explicit = {p for p in targets if not any(ch in p for ch in "*?[")}
    for pattern in explicit:
        try:
            module = model.get_submodule(pattern)
        except AttributeError:
            continue  # select_modules reports patterns that match nothing
        if quant_class(module) is None:
            raise ValueError(
                f"{owner}: target layer {pattern!r} is a {type(module).__name__}, which cannot be quantized; "
                f"supported layer types: {kinds} (exactly, not subclasses). Remove it from `targets`."
            )
    candidates = (*QUANTIZABLE_TYPES, QuantizedLayer, nn.modules.conv._ConvNd)
    names = select_modules(model, targets, exclude, candidates, owner)
    chosen = [name for name in names if quant_class(model.get_submodule(name)) is not None]
    if not chosen:
        raise ValueError(
            f"{owner}: no quantizable layer matches targets={list(targets)!r} exclude={list(exclude)!r}; "
            f"supported layer types: {kinds}. Matched but not quantizable: {names}."
        )
    return chosen


#: Ops that onnxruntime's QDQ passes carry a quantized tensor through (Relu folded into the next
#: QuantizeLinear, QuantizeLinear propagated across pooling and reshapes); BatchNorm is folded.
_PASS_THROUGH_OPS = frozenset(
    {
        "relu",
        "relu_",
        "hardtanh",  # ReLU6: its Clip folds into the next QuantizeLinear (range within [0, 6])
        "hardtanh_",
        "relu6",
        "max_pool1d",
        "max_pool2d",
        "max_pool2d_with_indices",
        "view",
        "reshape",
        "flatten",
        "_unsafe_view",
        "clone",
        "contiguous",
        "dropout",
        "batch_norm",
        "_native_batch_norm_legit_no_training",
    }
)
_LAYER_OPS = frozenset({"linear", "conv1d", "conv2d", "convolution"})


def _op_name(target: Any) -> str:
    parts = str(target).split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else str(target)


def layers_needing_output_quant(model: nn.Module, example_input: Any, names: Collection[str]) -> set[str]:
    """The layers among ``names`` whose output does not reach a quantized layer's input directly.

    A layer's output is already quantized in deployment when every path from it goes through ReLU,
    max pooling, reshapes / flattening or BatchNorm (folded) into the input of another of ``names``
    (whose input quantizer onnxruntime moves back onto it). Any other consumer (a residual add,
    global average pooling, concatenation, the network output) would leave the layer as a float
    kernel, so it gets an output quantizer. Found on a ``torch.export`` trace of ``model`` in eval
    mode; when the model cannot be traced, every layer is returned (always correct, a little slower).
    """
    from torch.utils._pytree import tree_map_only

    names = set(names)
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        if isinstance(example_input, dict):
            args, kwargs = (), dict(example_input)
        elif isinstance(example_input, tuple):
            args, kwargs = example_input, {}
        else:
            args, kwargs = (example_input,), {}
        args, kwargs = tree_map_only(Tensor, lambda t: t.detach(), (args, kwargs))
        with torch.no_grad():
            graph = torch.export.export(model, tuple(args), kwargs, strict=False).graph
    except Exception:
        return names
    finally:
        for module, flag in training.items():
            module.training = flag
    layer_of: dict[Any, str] = {}
    for node in graph.nodes:
        if node.op != "call_function" or _op_name(node.target) not in _LAYER_OPS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path = list(stack.values())[-1][0]
            path = path.removeprefix("L['self'].")
            if path in names:
                layer_of[node] = path
    need = set(names) - set(layer_of.values())  # not found in the trace: be safe
    for node, name in layer_of.items():
        todo, ok = [node], True
        while todo and ok:
            current = todo.pop()
            for user in current.users:
                if user in layer_of and user.args and user.args[0] is current:
                    continue  # read as the input of a quantized layer
                if user.op == "call_function" and _op_name(user.target) in _PASS_THROUGH_OPS:
                    todo.append(user)
                else:
                    ok = False
                    break
        if not ok:
            need.add(name)
    return need


def unbind_stale_bns(model: nn.Module) -> list[str]:
    """Stop folding BatchNorms that are no longer part of ``model`` (e.g. replaced by layer fusion).

    Returns:
        The names of the layers that were unbound.
    """
    present = {id(m) for m in model.modules()}
    out = []
    for name, layer in quantized_layers(model).items():
        bn = layer.folded_bn
        if bn is not None and id(bn) not in present:
            layer.bind_bn(None)
            out.append(name)
    return out


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every fake-quantized layer back to its float class, in place (same parameters)."""
    for name, layer in list(quantized_layers(model).items()):
        _set_submodule(model, name, layer.to_float())
    return model


def commit_observations(layers: Sequence[QuantizedLayer]) -> None:
    """Fold every observer's pending batch range into its running range, identically on every rank.

    One collective for all layers: the pending minima and the negated maxima are stacked in the
    given (fixed) order and reduced with ``MIN``, so each rank commits the min of mins and the max of
    maxes.
    """
    quants = [layer.input_quant for layer in layers if layer.quantize_input and layer.input_quant.enabled]
    quants += [layer.output_quant for layer in layers if layer.quantize_output and layer.output_quant.enabled]
    if not quants:
        return
    stacked = torch.stack([q.pending_min for q in quants] + [-q.pending_max for q in quants])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.MIN)
    n = len(quants)
    # Which layers any rank saw this step (one host read per step), so `ready` agrees across ranks.
    seen = (torch.isfinite(stacked[:n]) & torch.isfinite(stacked[n:])).tolist()
    for i, q in enumerate(quants):
        q._seen = bool(seen[i])
        q.commit(stacked[i], -stacked[n + i])


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any]) -> None:
    """Set the activation ranges of ``model``'s quantized layers from ``batches`` and freeze them.

    Each batch is passed as ``model(batch)`` (``model(*batch)`` for a tuple, ``model(**batch)`` for a
    dict) in eval mode; every input quantizer records the min / max over all batches (not an EMA),
    then ranges are fixed and quantization is enabled. The model's training mode is restored.

    Raises:
        ValueError: ``model`` has no quantized layer, or no batch was given.
    """
    layers = list(quantized_layers(model).values())
    if not layers:
        raise ValueError("calibrate: `model` has no quantized layer; call quantize_model(model) first.")
    was_training = model.training
    model.eval()
    ranges: dict[int, tuple[float, float]] = {}
    hooks = []
    for layer in layers:

        def hook(module: Any, args: tuple[Any, ...], _id: int = id(layer)) -> None:
            x = args[0].detach().float()
            lo, hi = float(x.min()), float(x.max())
            old = ranges.get(_id)
            ranges[_id] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

        hooks.append(layer.register_forward_pre_hook(hook))
        layer.input_quant.enabled = False  # observe the float activations
        layer.weight_quant.enabled = True
        layer.output_quant.calibrating = layer.quantize_output
    try:
        n = 0
        for batch in batches:
            call_model(model, batch)
            n += 1
        if n == 0:
            raise ValueError("calibrate: `batches` is empty; give at least one input batch.")
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            layer.output_quant.calibrating = False
        model.train(was_training)
    for layer in layers:
        seen = ranges.get(id(layer))
        if seen is not None:
            layer.input_quant.set_range(*seen)
        layer.input_quant.enabled = True
        layer.input_quant.observing = False
        out = layer.output_quant
        if layer.quantize_output and math.isfinite(float(out.pending_min)):
            out.set_range(out.pending_min.clone(), out.pending_max.clone())
        out.pending_min.fill_(math.inf)
        out.pending_max.fill_(-math.inf)
        out.enabled = layer.quantize_output
        out.observing = False
