r"""Binary and ternary weight networks during training, as a Lightning callback.

:class:`LowBitWeights` trains a network whose Linear / Conv weights take one or two bits:

* ``mode="binary"``: BinaryConnect (Courbariaux et al., 2015) with the per-output-channel scale of
  XNOR-Net (Rastegari et al., 2016), :math:`W_b = \alpha_c \operatorname{sign}(W_r)`;
* ``mode="ternary"``: Ternary Weight Networks (Li et al., 2016), :math:`W_t = \alpha
  \operatorname{sign}(W)[|W| > \Delta]` with :math:`\Delta = 0.7\operatorname{mean}|W|`;
* ``mode="ttq"``: Trained Ternary Quantization (Zhu et al., 2017), values :math:`\{-W^n, 0, W^p\}`
  with two scales per layer learned alongside the weights.

All three train with the straight-through estimator on a real-valued *shadow* copy of the weights,
kept in the callback's state. The model's ``Parameter`` objects always hold the low-bit values
outside the optimizer step, so every forward pass, validation, checkpoint and the model returned by
``trainer.fit`` use them (deployable: a checkpoint loads into the plain module and holds low-bit
weights). Two constraints of the trainer's compression engine do the swap around each step:

1. before ``optimizer.step()`` (phase ``regularize``; the gradient was computed at the low-bit
   weights): the parameters take the shadow values, so the optimizer (its momentum, Adam moments and
   weight decay) updates the real-valued weights. TTQ first takes the gradients of its scales and
   rescales the latent gradient (eqs. 6-8 of the paper) and updates the scales with Adam;
2. after it (phase ``quantize``, after pruning masks are applied in phase ``mask``): the updated
   parameters become the new shadow (BinaryConnect clips it to ``[-1, 1]``) and the parameters take
   their binary / ternary values again.

Each is a constant number of fused ``torch._foreach_*`` copies plus a short per-layer loop for the
per-layer thresholds and scales; nothing synchronises with the host.

References:
    M. Courbariaux, Y. Bengio and J.-P. David, "BinaryConnect: Training Deep Neural Networks with
    binary weights during propagations", NeurIPS 2015.

    M. Rastegari, V. Ordonez, J. Redmon and A. Farhadi, "XNOR-Net: ImageNet Classification Using
    Binary Convolutional Neural Networks", ECCV 2016.

    F. Li, B. Zhang and B. Liu, "Ternary Weight Networks", arXiv:1605.04711, 2016.

    C. Zhu, S. Han, H. Mao and W. J. Dally, "Trained Ternary Quantization", ICLR 2017.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.engine import QUANTIZE, REGULARIZE, Constraint
from lightning_compress.core.schedules import StepSchedule
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.functional.lowbit import (
    binarize,
    binary_activation,
    ternarize_ttq,
    ternarize_twn,
    ttq_gradients,
    ttq_init_scales,
)

ModeName = Literal["binary", "ternary", "ttq"]
#: The accepted values of ``LowBitWeights(mode=...)``.
MODES: tuple[str, ...] = ("binary", "ternary", "ttq")

#: Adam constants of the TTQ scale update.
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8

#: Defaults of the mode-specific arguments (giving another value with another mode is an error).
_DEFAULTS: dict[str, tuple[str, Any]] = {
    "per_channel": ("binary", True),
    "delta_factor": ("ternary", 0.7),
    "ttq_threshold": ("ttq", 0.05),
    "scale_lr": ("ttq", 1e-3),
}


def _binarize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the first input becomes ``sign(x)`` (hard-tanh straight-through estimator)."""
    if not args or not isinstance(args[0], Tensor):
        return None
    return (binary_activation(args[0]), *args[1:])


def add_binary_activations(model: nn.Module, layers: Sequence[str]) -> list[RemovableHandle]:
    """Binarise the input of each named layer of ``model`` with a forward pre-hook.

    The input becomes ``+1`` where it is positive and ``-1`` elsewhere, with the hard-tanh
    straight-through estimator in the backward pass
    (:func:`~lightning_compress.functional.lowbit.binary_activation`). :class:`LowBitWeights` with
    ``binary_activations=True`` adds these hooks while it trains and leaves them on the model; a
    model reloaded from a checkpoint gets them back with
    ``add_binary_activations(model, callback.activation_layers)`` (the names are in the callback's
    checkpoint state as well). The model's ``forward`` is never wrapped.

    Args:
        model: The module (the compression root) the names are relative to.
        layers: Module names, e.g. ``["conv2", "fc1"]``.

    Returns:
        The hook handles (``handle.remove()`` undoes one).
    """
    return [model.get_submodule(name).register_forward_pre_hook(_binarize_input) for name in layers]


def _execution_order(
    pl_module: pl.LightningModule, root: nn.Module, types: tuple[type[nn.Module], ...]
) -> list[str] | None:
    """Names of the ``types`` layers of ``root`` in the order a forward of ``example_input_array`` calls them.

    The forward runs in eval mode under ``no_grad`` (no BatchNorm statistics change). ``None`` when
    the module has no example input or the forward fails (the caller falls back to registration order).
    """
    example = getattr(pl_module, "example_input_array", None)
    if example is None:
        return None
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
        for name, module in root.named_modules()
        if name and isinstance(module, types)
    ]
    modes = {m: m.training for m in pl_module.modules()}
    try:
        first = next(iter(pl_module.parameters()), None)
        if first is not None:
            example = move_data_to_device(example, first.device)
        pl_module.eval()
        with torch.no_grad():
            if isinstance(example, (list, tuple)):
                pl_module(*example)
            elif isinstance(example, dict):
                pl_module(**example)
            else:
                pl_module(example)
    except Exception as err:  # the user's forward on the example input: fall back, do not fail the fit
        rank_zero_warn(
            f"LowBitWeights: the forward of `example_input_array` failed ({type(err).__name__}: {err}); "
            "the first and last layers are taken in registration order instead."
        )
        return None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return calls or None


class LowBitWeights(CompressionCallback):
    r"""Train binary or ternary weights (BinaryConnect / XNOR-Net, TWN, TTQ), straight through.

    The targeted layers' ``weight`` takes low-bit values from the start step on (by default from the
    first training forward). The optimizer steps a real-valued shadow copy kept in this callback's
    state, with gradients taken at the low-bit weights (the straight-through estimator); see the
    module docstring for how the trainer's compression engine swaps them around each step. After
    ``trainer.fit`` the model holds the low-bit weights, and so does every checkpoint (it loads into
    the plain module with ``MyModule.load_from_checkpoint(path)``); biases stay in floating point.

    Modes (one scale per layer unless said otherwise):

    * ``"binary"``: :math:`W_b = \alpha_c \operatorname{sign}(W_r)` with
      :math:`\alpha_c = \operatorname{mean}|W_{r,c}|` per output channel (XNOR-Net; one per layer with
      ``per_channel=False``). The shadow is clipped to ``[-1, 1]`` after every step, as in
      BinaryConnect, so the hard-tanh straight-through estimator's gradient cancellation
      (:math:`|w_r| > 1`) never applies and is not needed. At most two values per output channel.
    * ``"ternary"``: TWN, :math:`\Delta = \text{delta\_factor}\cdot\operatorname{mean}|W|`,
      :math:`\alpha = \operatorname{mean}_{|W|>\Delta}|W|`, values :math:`\{-\alpha, 0, \alpha\}`.
    * ``"ttq"``: :math:`\Delta = t\max|W|` (``ttq_threshold``), values :math:`\{-W^n, 0, W^p\}`
      with :math:`W^p, W^n` learned per layer, initialised to the mean of :math:`\pm W` beyond the
      threshold. Their gradients are the sums of the ternary weights' gradient over the positive /
      negative positions (the paper's eqs. 6 and 7; with the chain rule's sign for :math:`-W^n`),
      the latent weights' gradient is scaled by :math:`W^p`, 1 or :math:`W^n` (eq. 8), and the
      scales take one bias-corrected Adam step of learning rate ``scale_lr`` per optimizer step
      (kept in this callback's state).

    **Layers.** The ``weight`` of Linear and Conv1d/2d/3d layers matching ``targets`` and not
    ``exclude``. With ``exclude_first_last`` (the default, as in the papers) the network's first and
    last such layers stay in floating point: the first and last called by a forward pass of the
    LightningModule's ``example_input_array`` (traced once in ``setup``, in eval mode without
    gradients), or the first and last registered ones when there is none.

    **Binary activations.** With ``binary_activations=True`` the input of every quantized layer is
    replaced by ``+1`` where it is positive and ``-1`` elsewhere, with the hard-tanh
    straight-through estimator ``grad * (|x| <= 1)``, by a forward pre-hook on the layer (the
    model's ``forward`` is never wrapped). With ``exclude_first_last`` the first layer, which reads
    the network input, is not quantized and its input is left alone. The hooks stay on the model
    after the fit so that ``trainer.test`` evaluates the trained network; a reloaded model gets them
    back with :func:`add_binary_activations` and :attr:`activation_layers`.

    **With pruning.** Pruning masks are applied to the weights in the engine's ``mask`` phase, after
    the optimizer step and before this callback's ``quantize`` phase, so the shadow is masked too
    (a pruned weight's shadow is zero) and a pruned weight stays exactly zero in every mode
    (``sign(0) = 0`` for the binary one; its channel scale counts it as zero). A pruning criterion
    scored in the engine's ``begin_step`` (``GradualPruning``'s magnitude) sees the low-bit weights.

    **Distributed training.** The shadow and the TTQ scales are updated from the DDP-averaged
    gradients only, so they stay identical on every rank.

    Logs ``lowbit/zero_fraction`` (fraction of zero weights over the quantized layers) once per
    training epoch.

    Args:
        mode: ``"binary"``, ``"ternary"`` or ``"ttq"``.
        start: Training step (int) or fraction of training (float) from which the weights are
            low-bit; the forward of that step already uses them. ``0``: from the first step.
        targets: fnmatch patterns over module names (default: every Linear / Conv layer).
        exclude: fnmatch patterns to keep in floating point.
        exclude_first_last: Keep the network's first and last Linear / Conv layers in floating point.
        binary_activations: Also binarise the input of every quantized layer (XNOR-Net style).
        per_channel: ``mode="binary"``: one scale per output channel (XNOR-Net) or per layer.
        delta_factor: ``mode="ternary"``: the factor of ``mean|W|`` in the threshold :math:`\Delta`, > 0.
        ttq_threshold: ``mode="ttq"``: ``t`` of :math:`\Delta = t\max|W|`, in (0, 1).
        scale_lr: ``mode="ttq"``: Adam learning rate of the scales :math:`W^p, W^n`, > 0.
        flush_denormal: On CPU, flush denormals on the main thread during optimizer steps.

    Raises:
        ValueError: An argument is out of range or of the wrong type, or a mode-specific argument is
            given with another mode (the message names the argument).

    Example:
        >>> trainer = pl.Trainer(callbacks=[LowBitWeights(mode="ternary")])  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: ModeName = "ternary",
        start: int | float = 0,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        exclude_first_last: bool = True,
        binary_activations: bool = False,
        per_channel: bool = True,
        delta_factor: float = 0.7,
        ttq_threshold: float = 0.05,
        scale_lr: float = 1e-3,
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, flush_denormal=flush_denormal)
        self.mode = check_choice("mode", mode, MODES)
        self.step_schedule = StepSchedule(start, None, None, names=("start", "end"))
        self.start = self.step_schedule.start
        self.exclude_first_last = check_bool("exclude_first_last", exclude_first_last)
        self.binary_activations = check_bool("binary_activations", binary_activations)
        self.per_channel = check_bool("per_channel", per_channel)
        self.delta_factor = check_number("delta_factor", delta_factor, 0.0, math.inf, True, True)
        self.ttq_threshold = check_number("ttq_threshold", ttq_threshold, 0.0, 1.0, True, True)
        self.scale_lr = check_number("scale_lr", scale_lr, 0.0, math.inf, True, True)
        given = {
            "per_channel": per_channel,
            "delta_factor": delta_factor,
            "ttq_threshold": ttq_threshold,
            "scale_lr": scale_lr,
        }
        for name, value in given.items():
            owner_mode, default = _DEFAULTS[name]
            if owner_mode != self.mode and value != default:
                raise ValueError(
                    f"`{name}`={value!r} only applies with mode={owner_mode!r}, but `mode`={self.mode!r}; "
                    f"drop it or set mode={owner_mode!r}."
                )

        #: Parameter names (relative to the compression root) of the quantized weights.
        self.param_names: list[str] = []
        #: The layers kept in floating point by ``exclude_first_last``.
        self.first_last: list[str] = []
        #: The layers whose input is binarised (``binary_activations=True``).
        self.activation_layers: list[str] = []
        #: The real-valued weights the optimizer steps, by parameter name.
        self.shadow: dict[str, Tensor] = {}
        #: TTQ: ``(W^p, W^n)`` per parameter name, and their Adam state.
        self.scales: dict[str, Tensor] = {}
        self.scale_exp_avg: dict[str, Tensor] = {}
        self.scale_exp_avg_sq: dict[str, Tensor] = {}
        self.scale_steps: dict[str, int] = {}
        #: Whether the weights are low-bit (from the start step on).
        self.started = False
        #: Fraction of zero weights over the quantized layers at the last epoch end.
        self.zero_fraction = 0.0
        self._params: dict[str, nn.Parameter] = {}
        self._slots: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        self._open: set[str] = set()  # parameters holding their shadow (between the two constraints)
        self._hooks: dict[str, RemovableHandle] = {}
        self._hooked_root: nn.Module | None = None
        self._root: nn.Module | None = None

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "mode": self.mode}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [self.step_schedule]

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.first_last = []
        if self.exclude_first_last:
            root = self.root(pl_module)
            order = _execution_order(pl_module, root, self.supported_types)
            if order is None:
                order = [n for n, m in root.named_modules() if n and isinstance(m, self.supported_types)]
            self.first_last = list(dict.fromkeys([order[0], order[-1]]))
            kept = [n for n in self.module_names if n not in self.first_last]
            if not kept:
                raise ValueError(
                    f"LowBitWeights: every targeted layer ({self.module_names}) is the network's first or "
                    f"last layer ({self.first_last}), which `exclude_first_last`=True keeps in floating "
                    "point; set exclude_first_last=False or target other layers."
                )
            self.module_names = kept
        self.param_names = [f"{name}.weight" for name in self.module_names]
        self.activation_layers = list(self.module_names) if self.binary_activations else []

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._root = root = self.root(pl_module)
        self._bind(root)
        self._open.clear()
        if self.started:  # resumed (or a second fit): the shadow comes from the callback state
            unknown = set(self.shadow) ^ set(self.param_names)
            if unknown:
                raise ValueError(
                    f"LowBitWeights: the checkpoint holds shadow weights for {sorted(self.shadow)}, but the "
                    f"quantized layers are now {self.param_names}; resume with the same targets."
                )
            for name, p in self._params.items():
                self.shadow[name] = self.shadow[name].to(device=p.device, dtype=p.dtype)
                if self.mode == "ttq":
                    for store in (self.scales, self.scale_exp_avg, self.scale_exp_avg_sq):
                        store[name] = store[name].to(device=p.device, dtype=torch.float32)
            with torch.no_grad():
                self._quantize_(self.param_names, store=False)
            self._attach_hooks(root)
        else:
            self._maybe_start()

    def _bind(self, root: nn.Module) -> None:
        self._params, self._slots = {}, []
        for name in self.param_names:
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name)
            param = module._parameters[attr]
            self._params[name] = param
            self._slots.append((name, module, attr, param))

    def verify(self) -> None:
        """Fail clearly when a quantized parameter was replaced behind the callback's back.

        Raises:
            RuntimeError: naming the parameter.
        """
        for name, module, attr, param in self._slots:
            if module._parameters.get(attr) is not param:
                raise RuntimeError(
                    f"LowBitWeights: parameter {name!r} was replaced by a new object after it was bound, so "
                    "its shadow weights would act on a stale tensor. Change model structure through "
                    "lightning_compress.core.surgery (CompressionEngine.change_structure)."
                )

    def _maybe_start(self) -> None:
        start = self.step_schedule.start_step
        if self.started or self._root is None or self.engine is None or start is None:
            return
        if self.engine.clock >= start:
            self._start()

    @torch.no_grad()
    def _start(self) -> None:
        """Take the shadow copy (and TTQ's scales) and make the weights low-bit."""
        for name, p in self._params.items():
            shadow = p.detach().clone()
            if self.mode == "binary":
                shadow.clamp_(-1.0, 1.0)
            self.shadow[name] = shadow
            if self.mode == "ttq":
                wp, wn = ttq_init_scales(shadow.float(), self.ttq_threshold)
                self.scales[name] = torch.stack([wp, wn])
                self.scale_exp_avg[name] = torch.zeros(2, device=p.device)
                self.scale_exp_avg_sq[name] = torch.zeros(2, device=p.device)
                self.scale_steps[name] = 0
        self._quantize_(self.param_names, store=False)
        self.started = True
        if self._root is not None:
            self._attach_hooks(self._root)
        if self.engine is not None:
            self.engine.invalidate()
        self.debug(f"LowBitWeights: {self.mode} weights from step {self.step} on {self.module_names}")

    # ------------------------------------------------------------------ the two steps
    def quantize(self, name: str, shadow: Tensor) -> Tensor:
        """The low-bit values of parameter ``name`` for real-valued weights ``shadow``."""
        if self.mode == "binary":
            return binarize(shadow, self.per_channel)
        if self.mode == "ternary":
            return ternarize_twn(shadow, self.delta_factor)
        scales = self.scales[name].to(shadow.dtype)
        return ternarize_ttq(shadow, scales[0], scales[1], self.ttq_threshold)

    def _quantize_(self, names: Sequence[str], store: bool = True) -> None:
        """``store``: shadow <- parameters (clipped for BinaryConnect); then parameters <- low-bit values."""
        if not names:
            return
        plist = [self._params[n] for n in names]
        slist = [self.shadow[n] for n in names]
        if store:
            torch._foreach_copy_(slist, plist)
            if self.mode == "binary":
                torch._foreach_clamp_min_(slist, -1.0)
                torch._foreach_clamp_max_(slist, 1.0)
        torch._foreach_copy_(plist, [self.quantize(n, s) for n, s in zip(names, slist)])
        self._open.difference_update(names)

    def _load_shadow_(self, names: Sequence[str]) -> None:
        """Before the step: TTQ's gradients and scale update, then parameters <- shadow."""
        if self.mode == "ttq":
            self._ttq_step(names)
        torch._foreach_copy_([self._params[n] for n in names], [self.shadow[n] for n in names])
        self._open.update(names)

    def _ttq_step(self, names: Sequence[str]) -> None:
        """Scale gradients (eqs. 6, 7), latent gradient (eq. 8), one Adam step of the scales."""
        names = [n for n in names if self._params[n].grad is not None]
        if not names:
            return
        grads = []
        for name in names:
            grad = self._params[name].grad
            scales = self.scales[name]
            latent, g_p, g_n = ttq_gradients(
                self.shadow[name], grad, scales[0], scales[1], self.ttq_threshold
            )
            grad.copy_(latent)
            grads.append(torch.stack([g_p, g_n]).to(scales.dtype))
        scales = [self.scales[n] for n in names]
        exp_avg = [self.scale_exp_avg[n] for n in names]
        exp_avg_sq = [self.scale_exp_avg_sq[n] for n in names]
        for name in names:
            self.scale_steps[name] += 1
        steps = [self.scale_steps[n] for n in names]
        torch._foreach_lerp_(exp_avg, grads, 1.0 - _BETA1)
        torch._foreach_mul_(exp_avg_sq, _BETA2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - _BETA2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1.0 - _BETA2**t) for t in steps])
        torch._foreach_add_(denom, _EPS)
        torch._foreach_addcdiv_(scales, exp_avg, denom, [-self.scale_lr / (1.0 - _BETA1**t) for t in steps])
        torch._foreach_clamp_min_(scales, 0.0)

    @override
    def constraints(self) -> list[Constraint]:
        if not self.started or not self._params:
            return []
        return [_LoadShadow(self), _StoreAndQuantize(self)]

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._open:  # the shadow went in, but no optimizer step took it out (a skipped step)
            with torch.no_grad():
                self._quantize_([n for n in self.param_names if n in self._open])
        self._maybe_start()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.started or not self._params:
            return
        with torch.no_grad():
            zeros = torch.stack([(p == 0).sum() for p in self._params.values()]).sum()
        total = sum(p.numel() for p in self._params.values())
        self.zero_fraction = float(zeros) / total  # one synchronisation per epoch
        pl_module.log("lowbit/zero_fraction", self.zero_fraction, on_step=False, on_epoch=True)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._open:  # leave low-bit weights for an OnExceptionCheckpoint
            with torch.no_grad():
                self._quantize_([n for n in self.param_names if n in self._open])

    def _attach_hooks(self, root: nn.Module) -> None:
        if not self.activation_layers:
            return
        if self._hooked_root is not root:
            self.remove_activation_hooks()
        todo = [n for n in self.activation_layers if n not in self._hooks]
        self._hooks.update(zip(todo, add_binary_activations(root, todo)))
        self._hooked_root = root

    def remove_activation_hooks(self) -> None:
        """Remove the binary-activation hooks this callback added (they outlive the fit otherwise)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._hooked_root = None

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        prefix = self.root_prefix
        by_old = {c.old_name: c for c in changes}
        kept: list[str] = []
        for name in self.param_names:
            change = by_old.get(prefix + name)
            if change is None:
                kept.append(name)
                continue
            if change.new_name is None or not change.new_name.startswith(prefix):
                self._drop(name)
                continue
            new = change.new_name[len(prefix) :]
            if name in self.shadow:
                self.shadow[new] = change.slice(self.shadow.pop(name))
            for store in (self.scales, self.scale_exp_avg, self.scale_exp_avg_sq, self.scale_steps):
                if name in store:
                    store[new] = store.pop(name)
            kept.append(new)
        self.param_names = kept
        self.module_names = [n.rpartition(".")[0] for n in kept]
        self._open.clear()
        root = self.root(pl_module)
        self._bind(root)
        if self.started and self.shadow:
            # Thresholds and scales depend on the whole tensor: quantize the sliced shadow again, so
            # the weights are what the next step would produce (validation, checkpoints in between).
            with torch.no_grad():
                self._quantize_([n for n in self.param_names if n in self.shadow], store=False)

    def _drop(self, name: str) -> None:
        for store in (self.shadow, self.scales, self.scale_exp_avg, self.scale_exp_avg_sq, self.scale_steps):
            store.pop(name, None)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        def cpu(store: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t.detach().cpu().clone() for n, t in store.items()}

        return {
            "mode": self.mode,
            "started": self.started,
            "shadow": cpu(self.shadow),
            "scales": cpu(self.scales),
            "scale_exp_avg": cpu(self.scale_exp_avg),
            "scale_exp_avg_sq": cpu(self.scale_exp_avg_sq),
            "scale_steps": dict(self.scale_steps),
            "activation_layers": list(self.activation_layers),
            "zero_fraction": self.zero_fraction,
            "schedule": self.step_schedule.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mode = state_dict.get("mode", self.mode)
        if mode != self.mode:
            raise ValueError(
                f"LowBitWeights: the checkpoint was trained with mode={mode!r}, but `mode`={self.mode!r}; "
                "resume with the same mode."
            )
        self.started = bool(state_dict.get("started", False))
        self.shadow = {n: t.clone() for n, t in state_dict.get("shadow", {}).items()}
        self.scales = {n: t.clone() for n, t in state_dict.get("scales", {}).items()}
        self.scale_exp_avg = {n: t.clone() for n, t in state_dict.get("scale_exp_avg", {}).items()}
        self.scale_exp_avg_sq = {n: t.clone() for n, t in state_dict.get("scale_exp_avg_sq", {}).items()}
        self.scale_steps = {n: int(v) for n, v in state_dict.get("scale_steps", {}).items()}
        self.zero_fraction = float(state_dict.get("zero_fraction", 0.0))
        if "schedule" in state_dict:
            self.step_schedule.load_state_dict(state_dict["schedule"])


class _LowBitConstraint(Constraint):
    """Engine adapter: the subset of the callback's parameters one optimizer owns."""

    def __init__(self, owner: LowBitWeights, phase: str) -> None:
        super().__init__(phase, list(owner._params.values()), owner.name)
        self.owner_cb = owner

    def _names(self, params: Sequence[nn.Parameter]) -> list[str]:
        by_id = {id(p): n for n, p in self.owner_cb._params.items()}
        return [by_id[id(p)] for p in params if id(p) in by_id]


class _LoadShadow(_LowBitConstraint):
    """Before the step: the parameters take their shadow values (TTQ: scales and gradients first)."""

    def __init__(self, owner: LowBitWeights) -> None:
        super().__init__(owner, REGULARIZE)

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        names = self._names(params)
        if not names:
            return None
        cb = self.owner_cb
        return lambda: cb._load_shadow_(names)

    @override
    def verify(self) -> None:
        self.owner_cb.verify()


class _StoreAndQuantize(_LowBitConstraint):
    """After the step (and after pruning masks): shadow <- parameters, parameters <- low-bit values."""

    def __init__(self, owner: LowBitWeights) -> None:
        super().__init__(owner, QUANTIZE)

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        names = self._names(params)
        if not names:
            return None
        cb = self.owner_cb
        return lambda: cb._quantize_(names)


__all__ = ["MODES", "LowBitWeights", "add_binary_activations"]
