"""Quantization-aware training as a Lightning callback.

:class:`QuantizationAwareTraining` swaps the selected ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d``
layers of the compression root for the fake-quantized layers of
:mod:`lightning_compress.quantization.fake_quant` in ``setup()`` (before the optimizers are built;
the swapped layers share the user's ``Parameter`` objects either way), so:

* the user's ``forward`` is never wrapped: any input signature, several inputs, keyword arguments;
* the model ``state_dict`` keeps the user's keys and holds the float weights: a checkpoint loads
  into the plain module (``MyModule.load_from_checkpoint(path)``); the quantizer state (observer
  ranges, learned step sizes, which BatchNorm each layer folds) is the callback's checkpoint state,
  so a resumed fit continues exactly and ``lightning-compress export`` can rebuild the int8 model;
* pruning composes: weights are fake-quantized in the forward from the (masked) float weights, and
  zero is on every symmetric grid, so pruned weights stay exactly zero in the quantized model.

Schedule (``StepSchedule`` points: an int training step or a float fraction of training):

* ``start``: quantizers pass values through before it (a float warm-up) and fake-quantize after;
* ``freeze_observers_at``: activation ranges stop moving (and LSQ step sizes start being learned
  when ``learn_scales=True``);
* ``freeze_bn_at``: the folded BatchNorms switch to their running statistics and stop updating them
  (Krishnamoorthi, 2018, Section 3.2), so the rest of training sees exactly the deployed layer.

Activation observers record each step's batch range in every forward and commit it once per training
step (the engine's ``begin_step``), after one ``MIN`` all-reduce over all layers, so under DDP every
rank holds the same ranges.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback, InputCapture, is_distributed
from lightning_compress.core.schedules import StepSchedule
from lightning_compress.core.validation import check_bool, check_choice, check_number
from lightning_compress.quantization.fake_quant import (
    QUANTIZABLE_TYPES,
    QuantizedLayer,
    check_bits,
    commit_observations,
    dequantize_model,
    quantize_model,
    quantized_layers,
    select_quantizable,
    unbind_stale_bns,
)

__all__ = ["QuantizationAwareTraining", "restore_quantization"]

#: Version of the callback's checkpoint state.
_STATE_VERSION = 1
_INIT: tuple[str, ...] = ("observe", "data_free")


def _point(name: str, value: int | float | None) -> StepSchedule | None:
    return None if value is None else StepSchedule(value, None, None, names=(name, name))


class QuantizationAwareTraining(CompressionCallback):
    """Train with fake-quantized weights and activations, ready for an int8 ONNX export.

    Args:
        weight_bits: Weight bit width, 2..8 (symmetric, per output channel by default).
        activation_bits: Bit width of every quantized layer's input, 2..8 (per tensor, affine).
        start: When quantization starts (int training step or float fraction of training).
        freeze_observers_at: When activation ranges stop updating (``None``: never).
        freeze_bn_at: When folded BatchNorms switch to running statistics (``None``: never); not
            before ``start``.
        targets: fnmatch patterns over layer names (relative to the compression root).
        exclude: Patterns removed from ``targets``.
        per_channel: Per-output-channel weight scales (``False``: one per layer).
        fold_bn: Fold each Conv / Linear's following BatchNorm into its quantized weight while
            training (needs ``example_input_array`` or sees the first batch to trace the model).
        learn_scales: Learn activation step sizes (LSQ, Esser et al., 2020) once the observers are
            frozen (needs ``freeze_observers_at``); the step sizes are parameters the module's
            ``configure_optimizers`` sees when it uses ``self.parameters()``.
        averaging_constant: EMA constant of the activation observers, in (0, 1].
        init: ``"observe"`` starts the ranges from the first quantized batch; ``"data_free"`` first
            applies cross-layer equalization to the float model and initialises every range from
            BatchNorm-distilled synthetic data (Nagel et al., 2019; Cai et al., 2020).
        quantize_outputs: Also quantize the (BatchNorm-folded) output of the layers whose output
            does not flow (through ReLU, max pooling, reshapes) straight into another quantized
            layer's input: before a residual add, global pooling or the logits. onnxruntime then runs
            every quantized layer as an integer kernel. Found on a ``torch.export`` trace of
            ``example_input_array`` (every layer when there is none); ``False`` quantizes inputs only.

    Raises:
        ValueError: At construction for a bad argument (named in the message); in ``setup`` for a
            targeted layer that cannot be quantized; at fit start for a schedule point before
            ``start`` (the model is restored to float first).
    """

    supported_types = (*QUANTIZABLE_TYPES, QuantizedLayer)

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        start: int | float = 0.0,
        freeze_observers_at: int | float | None = None,
        freeze_bn_at: int | float | None = None,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        per_channel: bool = True,
        fold_bn: bool = True,
        learn_scales: bool = False,
        averaging_constant: float = 0.01,
        init: Literal["observe", "data_free"] = "observe",
        quantize_outputs: bool = True,
    ) -> None:
        super().__init__(targets, exclude, flush_denormal=False)
        self.weight_bits = check_bits("weight_bits", weight_bits)
        self.activation_bits = check_bits("activation_bits", activation_bits)
        self.start_schedule = StepSchedule(start, None, None, names=("start", "start"))
        self.start = start
        self.freeze_observers_at = freeze_observers_at
        self.freeze_bn_at = freeze_bn_at
        self.observer_schedule = _point("freeze_observers_at", freeze_observers_at)
        self.bn_schedule = _point("freeze_bn_at", freeze_bn_at)
        for name, value in (("freeze_observers_at", freeze_observers_at), ("freeze_bn_at", freeze_bn_at)):
            if value is not None and type(value) is type(start) and value < start:
                raise ValueError(
                    f"`{name}`={value!r} is before `start`={start!r}; expected {name} >= start "
                    "(there is nothing to freeze before quantization starts)."
                )
        if (
            freeze_observers_at is not None
            and type(freeze_observers_at) is type(start)
            and freeze_observers_at == start
            and init != "data_free"
        ):
            raise ValueError(
                f"`freeze_observers_at`={freeze_observers_at!r} equals `start`: the observers would never "
                "see data; expected freeze_observers_at > start (or init='data_free', which sets the "
                "ranges before training)."
            )
        self.per_channel = check_bool("per_channel", per_channel)
        self.fold_bn = check_bool("fold_bn", fold_bn)
        self.learn_scales = check_bool("learn_scales", learn_scales)
        if self.learn_scales and freeze_observers_at is None:
            raise ValueError(
                "`learn_scales`=True needs `freeze_observers_at`: step sizes are learned once the "
                "observers are frozen (LSQ starts from the observed ranges)."
            )
        self.averaging_constant = check_number(
            "averaging_constant", averaging_constant, low=0.0, high=1.0, low_open=True
        )
        self.init = check_choice("init", init, _INIT)
        self.quantize_outputs = check_bool("quantize_outputs", quantize_outputs)
        self.layers: dict[str, QuantizedLayer] = {}
        self.bn_names: dict[str, str] = {}
        self._loaded: dict[str, Any] | None = None
        self._capture: InputCapture | None = None
        self._stage: tuple[bool, bool, bool] | None = None

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {"targets": self.targets, "exclude": self.exclude, "weight_bits": self.weight_bits}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [s for s in (self.start_schedule, self.observer_schedule, self.bn_schedule) if s is not None]

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)
        root = self.root(pl_module)
        names = select_quantizable(root, self.targets, self.exclude, self.name)  # refuses bad targets first
        calibration = None
        from lightning_compress.core.surgery import pending_checkpoint_path

        resuming = pending_checkpoint_path(trainer) is not None
        if self.init == "data_free" and not self.layers and not resuming:
            calibration = self._equalize(root)
        bn_pairs: dict[str, nn.Module] = {}
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in root.modules())
        if self.fold_bn and has_bn:
            example = getattr(root, "example_input_array", None)
            if example is not None:
                bn_pairs = self._find_bn_pairs(root, example)
            elif not self.layers:
                self._capture = InputCapture(root, self.name)
        outputs: bool | set[str] = self.quantize_outputs
        example = getattr(root, "example_input_array", None)
        if self.quantize_outputs and example is not None and not self.layers:
            from lightning_compress.quantization.fake_quant import layers_needing_output_quant
            from lightning_compress.quantization.fusion import _resolve_example_input

            example = _resolve_example_input(root, example, self.name)
            outputs = layers_needing_output_quant(root, example, names)
        self.layers = quantize_model(
            root,
            self.weight_bits,
            self.activation_bits,
            self.per_channel,
            self.targets,
            self.exclude,
            self.averaging_constant,
            self.learn_scales,
            bn_pairs,
            enabled=False,
            owner=self.name,
            quantize_outputs=outputs,
        )
        self._stage = None
        if calibration is not None:
            from lightning_compress.quantization.fake_quant import calibrate

            calibrate(root, calibration)  # ranges from the synthetic data; the schedule decides the rest
            self._stage = None

    def _rebind_bns(self, root: nn.Module) -> None:
        """Bind each layer to the BatchNorm *now* at its recorded name.

        The strategy may have replaced the module object since ``setup`` (``sync_batchnorm=True``
        swaps in ``SyncBatchNorm``), and a resumed fit restores the names from the checkpoint.
        """
        for layer_name, bn_name in list(self.bn_names.items()):
            layer = self.layers.get(layer_name)
            try:
                bn = root.get_submodule(bn_name)
            except AttributeError:
                bn = None
            if layer is None or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                self.bn_names.pop(layer_name, None)
                if layer is not None:
                    layer.bind_bn(None)
                continue
            layer.bind_bn(bn)
        if self.bn_names and self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _find_bn_pairs(self, root: nn.Module, example: Any) -> dict[str, nn.Module]:
        from lightning_compress.quantization.fusion import _resolve_example_input, find_fusion_pairs

        example = _resolve_example_input(root, example, self.name)
        selected = set(select_quantizable(root, self.targets, self.exclude, self.name))
        pairs = [(layer, bn) for layer, bn in find_fusion_pairs(root, example) if layer in selected]
        self.bn_names = dict(pairs)
        return {layer: root.get_submodule(bn) for layer, bn in pairs}

    def _equalize(self, root: nn.Module) -> list[Any]:
        """``init="data_free"``: equalize in place (CLE), then BatchNorm-distilled inputs (ZeroQ)."""
        from lightning_compress.functional.equalization import cross_layer_equalize
        from lightning_compress.quantization.data_free import distill_data

        example = getattr(root, "example_input_array", None)
        if not isinstance(example, torch.Tensor):
            raise ValueError(
                f"{self.name}: `init`='data_free' needs a tensor `example_input_array` on "
                f"{type(root).__name__} (to trace the layer pairs and shape the synthetic data)."
            )
        cross_layer_equalize(root, example_input=example)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in root.modules()):
            return [example]  # nothing to distill from: start the ranges from the example input
        return distill_data(root, num_batches=2, batch_size=32, iterations=200, seed=0)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            super().on_fit_start(trainer, pl_module)
            start = self.start_schedule.start_step or 0
            for name, schedule in (
                ("freeze_observers_at", self.observer_schedule),
                ("freeze_bn_at", self.bn_schedule),
            ):
                if schedule is None:
                    continue
                early = name == "freeze_observers_at" and (schedule.start_step or 0) <= start
                if self.init == "data_free":
                    early = False
                if (schedule.start_step or 0) < start or early:
                    raise ValueError(
                        f"{self.name}: `{name}`={getattr(self, name)!r} resolves to training step "
                        f"{schedule.start_step}, {'not after' if early else 'before'} `start`={self.start!r} "
                        f"(step {start}); expected {name} {'>' if early else '>='} start."
                    )
        except Exception:
            # Nothing half-applied: give the user back the float model.
            if self._capture is not None:
                self._capture.remove()
                self._capture = None
            dequantize_model(self.root(pl_module))
            self.layers = {}
            raise

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            self._apply_state(self._loaded)
            self._loaded = None
        elif self.init == "data_free" and is_distributed():
            # Synthetic calibration ran on each rank's own (pre-DDP-broadcast) weights: use rank 0's.
            import torch.distributed as dist

            for layer in self.layers.values():
                for buffer in (layer.input_quant.min_val, layer.input_quant.max_val):
                    dist.broadcast(buffer, src=0)
        self._rebind_bns(self.root(pl_module))
        self._apply_stage(self.engine.clock if self.engine is not None else 0)

    # ------------------------------------------------------------------ per step
    def _points(self) -> tuple[int, int | None, int | None]:
        start = self.start_schedule.start_step or 0
        obs = None if self.observer_schedule is None else self.observer_schedule.start_step
        bn = None if self.bn_schedule is None else self.bn_schedule.start_step
        return start, obs, bn

    def _apply_stage(self, step: int) -> None:
        start, obs, bn = self._points()
        enabled = step >= start
        observing = obs is None or step < obs
        bn_frozen = bn is not None and step >= bn
        stage = (enabled, observing, bn_frozen)
        if stage != self._stage:
            for layer in self.layers.values():
                layer.weight_quant.enabled = enabled
                layer.input_quant.enabled = enabled
                layer.input_quant.observing = observing
                layer.output_quant.enabled = enabled and layer.quantize_output
                layer.output_quant.observing = observing
                if not observing and self.learn_scales:
                    layer.input_quant.start_learning()
            self._stage = stage
        if bn_frozen:
            # Lightning calls module.train() at every epoch start and after validation: re-freeze.
            for layer in self.layers.values():
                norm = layer.folded_bn
                if norm is not None and norm.training:
                    norm.eval()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.engine is not None:
            self._apply_stage(self.engine.clock)

    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self._capture is not None:
            example = self._capture.take("to find the BatchNorms to fold (or pass fold_bn=False)")
            self._capture = None
            root = self.root(pl_module)
            for name, bn in self._find_bn_pairs(root, example).items():
                self.layers[name].bind_bn(bn)  # type: ignore[arg-type]
        enabled, observing, _ = self._stage or (False, True, False)
        if enabled and observing:
            commit_observations(list(self.layers.values()))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.layers or not (self._stage or (False,))[0]:
            return
        scales = [layer.input_quant.qparams()[0] for layer in self.layers.values() if layer.input_quant.ready]
        if scales:
            pl_module.log("qat/activation_scale_mean", torch.stack(scales).mean(), sync_dist=False)

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        root = self.root(pl_module)
        unbind_stale_bns(root)
        present = quantized_layers(root)
        self.layers = {name: present[name] for name in self.layers if name in present}
        self._rebind_bns(root)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        never = [
            name
            for name, layer in self.layers.items()
            if layer.input_quant.enabled and not layer.input_quant.ready
        ]
        if never:
            rank_zero_warn(
                f"{self.name}: the inputs of {never} were never observed (the layers did not run while "
                "quantization was on); export_onnx will refuse the model until they are calibrated."
            )

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        layers: dict[str, Any] = {}
        for name, layer in self.layers.items():
            q = layer.input_quant
            layers[name] = {
                "min_val": q.min_val.detach().cpu().clone(),
                "max_val": q.max_val.detach().cpu().clone(),
                "initialized": bool(q.initialized.item()),
                "ready": q.ready,
                "learning": q.learning,
                "learned_scale": None if q.learned_scale is None else q.learned_scale.detach().cpu().clone(),
                "frozen_zero_point": q.frozen_zero_point.detach().cpu().clone(),
                "quantize_input": layer.quantize_input,
                "quantize_output": layer.quantize_output,
                "out_min_val": layer.output_quant.min_val.detach().cpu().clone(),
                "out_max_val": layer.output_quant.max_val.detach().cpu().clone(),
                "out_initialized": bool(layer.output_quant.initialized.item()),
                "out_ready": layer.output_quant.ready,
            }
        return {
            "version": _STATE_VERSION,
            "config": {
                "weight_bits": self.weight_bits,
                "activation_bits": self.activation_bits,
                "per_channel": self.per_channel,
                "learn_scales": self.learn_scales,
                "averaging_constant": self.averaging_constant,
                "quantize_outputs": self.quantize_outputs,
            },
            "bn_names": dict(self.bn_names),
            "layers": layers,
            "schedules": [s.state_dict() for s in self.schedules()],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for schedule, saved in zip(self.schedules(), state_dict.get("schedules", [])):
            schedule.load_state_dict(saved)
        if self.layers:
            self._apply_state(state_dict)
        else:
            self._loaded = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        apply_layer_state(self.layers, state.get("layers", {}))
        if state.get("bn_names") and not self.bn_names and self.fold_bn:
            self.bn_names = dict(state["bn_names"])
        self._stage = None


def apply_layer_state(layers: dict[str, QuantizedLayer], saved: dict[str, Any]) -> None:
    """Restore observer ranges / learned step sizes saved by :meth:`QuantizationAwareTraining.state_dict`."""
    with torch.no_grad():
        for name, layer in layers.items():
            entry = saved.get(name)
            if entry is None:
                continue
            q = layer.input_quant
            device = q.min_val.device
            q.min_val.copy_(entry["min_val"].to(device))
            q.max_val.copy_(entry["max_val"].to(device))
            q.initialized.fill_(bool(entry["initialized"]))
            q.ready = bool(entry.get("ready", entry["initialized"]))
            q.frozen_zero_point.copy_(entry["frozen_zero_point"].to(device))
            if entry.get("learned_scale") is not None and q.learned_scale is not None:
                q.learned_scale.copy_(entry["learned_scale"].to(device))
            q.learning = bool(entry.get("learning", False)) and q.learned_scale is not None
            layer.quantize_input = bool(entry.get("quantize_input", True))
            layer.quantize_output = bool(entry.get("quantize_output", False))
            if "out_min_val" in entry:
                out = layer.output_quant
                out.min_val.copy_(entry["out_min_val"].to(device))
                out.max_val.copy_(entry["out_max_val"].to(device))
                out.initialized.fill_(bool(entry["out_initialized"]))
                out.ready = bool(entry.get("out_ready", entry["out_initialized"]))


def _find_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, value in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("QuantizationAwareTraining") and isinstance(value, dict) and "layers" in value:
            return value
    return None


def restore_quantization(
    model: nn.Module, checkpoint: dict[str, Any] | str, weights_only: bool = True
) -> dict[str, QuantizedLayer]:
    """Rebuild the fake-quantized model a QAT checkpoint describes, in place.

    The checkpoint's model ``state_dict`` holds the float weights (load it first, e.g. with
    :func:`~lightning_compress.core.surgery.load_checkpoint`); this re-applies the
    :class:`QuantizationAwareTraining` callback state: the same layers quantized with the same bit
    widths, the same BatchNorm folding, the saved activation ranges, quantization enabled. Names are
    relative to the compression root of ``model``.

    Args:
        model: The (float) model the checkpoint's weights were loaded into.
        checkpoint: A checkpoint dictionary or a path to one.
        weights_only: Passed to ``torch.load`` for a path (``False`` for trusted checkpoints whose
            hyper-parameters hold arbitrary objects).

    Returns:
        ``{name: quantized layer}``, empty when the checkpoint has no QAT state.
    """
    from lightning_compress.core.callback import compression_root

    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    state = _find_state(checkpoint)
    if state is None:
        return {}
    root = compression_root(model)[0]
    config = state["config"]
    names = list(state["layers"])
    bn_pairs = {}
    for layer, bn in state.get("bn_names", {}).items():
        try:
            module = root.get_submodule(bn)
        except AttributeError:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_pairs[layer] = module
    layers = quantize_model(
        root,
        config["weight_bits"],
        config["activation_bits"],
        config["per_channel"],
        targets=names,
        averaging_constant=config["averaging_constant"],
        learn_scales=config["learn_scales"],
        bn_pairs=bn_pairs,
        enabled=True,
        owner="restore_quantization",
        quantize_outputs=bool(config.get("quantize_outputs", False)),
    )
    apply_layer_state(layers, state["layers"])
    for layer in layers.values():
        layer.input_quant.observing = False
        layer.output_quant.observing = False
        layer.output_quant.enabled = layer.quantize_output
    return layers
