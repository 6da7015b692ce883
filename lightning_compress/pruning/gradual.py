"""Gradual pruning during training (Zhu & Gupta, 2017, "To prune, or not to prune")."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback, all_reduce_mean_
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.schedules import (
    SCHEDULES,
    next_update_step,
    resolve_step,
    sparsity_at,
    validate_step_arg,
)
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.functional.pruning import (
    activation_score,
    channel_mean_abs,
    magnitude_score,
    nm_mask,
    parse_nm,
    random_score,
    unstructured_masks,
)

CRITERIA: tuple[str, ...] = ("magnitude", "taylor", "activation", "random")
SCOPES: tuple[str, ...] = ("global", "local")


class GradualPruning(CompressionCallback):
    r"""Prune weights gradually while the model trains, to an exact target sparsity.

    Every ``frequency`` optimizer steps between ``start`` and ``end`` the mask is recomputed so that
    the pruned fraction follows the schedule; with the default cubic schedule (Zhu & Gupta, 2017)

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n \Delta t}\right)^3 .

    Between updates the mask is enforced on the weights after every real optimizer step and on
    the gradients before it, so momentum, Adam moments and weight decay cannot revive a pruned
    weight; checkpoints therefore hold truly sparse weights under the user's parameter names.

    Args:
        target_sparsity: Final fraction of zero weights, in [0, 1). Default 0.9 for
            ``pattern="unstructured"``; for ``N:M`` patterns it is fixed at ``1 - N/M`` (giving
            another value is an error).
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"polynomial"`` or ``"constant"``
            (one-shot at ``start``). See :func:`lightning_compress.core.schedules.sparsity_at`.
        start: First update: an int optimizer step, or a float fraction of training.
        end: Step (int) or fraction (float) at which ``target_sparsity`` is reached.
        frequency: Optimizer steps between mask updates.
        criterion: Importance score: ``"magnitude"`` ``|w|``; ``"taylor"`` ``|w * grad|`` accumulated
            over the steps since the last update; ``"activation"`` ``|w| * E|x|`` with the mean
            absolute input per input feature/channel, gathered by forward hooks during the
            ``calibration_steps`` steps before each update only; ``"random"`` (a baseline).
        scope: ``"global"`` (one threshold over all targeted layers) or ``"local"`` (every layer
            pruned to the same sparsity).
        pattern: ``"unstructured"`` or an ``"N:M"`` string such as ``"2:4"`` (keep N of every M
            consecutive weights along the input dimension; sparsity ramps per group).
        targets: fnmatch patterns over module names (Linear and Conv layers; default all).
        exclude: fnmatch patterns to leave dense (e.g. the classifier).
        initial_sparsity: ``s_i`` of the schedule.
        power: Exponent of the ``"polynomial"`` schedule.
        calibration_steps: Optimizer steps of activation statistics before each update
            (``criterion="activation"`` only).
        seed: Seed of the ``"random"`` criterion (combined with the step; identical on every rank).
        log_per_layer: Also log ``sparsity/<layer>`` for every pruned layer.
        flush_denormal: On CPU, flush denormal floats to zero during each optimizer step; see
            :class:`~lightning_compress.core.callback.CompressionCallback`.

    Example:
        >>> trainer = pl.Trainer(callbacks=[GradualPruning(target_sparsity=0.9, end=0.75)])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        schedule: str = "cubic",
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        criterion: str = "magnitude",
        scope: str = "global",
        pattern: str = "unstructured",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        initial_sparsity: float = 0.0,
        power: float = 3.0,
        calibration_steps: int = 8,
        seed: int = 0,
        log_per_layer: bool = False,
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, flush_denormal=flush_denormal)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        self.scope = check_choice("scope", scope, SCOPES)
        if not isinstance(pattern, str) or (pattern != "unstructured" and parse_nm(pattern) is None):
            raise ValueError(
                f"`pattern`={pattern!r} is not supported; expected 'unstructured' or an 'N:M' string "
                "such as '2:4'."
            )
        self.pattern = pattern
        self.nm = parse_nm(pattern)
        if self.nm is None:
            self.target_sparsity = check_number(
                "target_sparsity",
                0.9 if target_sparsity is None else target_sparsity,
                0.0,
                1.0,
                high_open=True,
            )
        else:
            n, m = self.nm
            self.target_sparsity = 1.0 - n / m
            if target_sparsity is not None and not math.isclose(target_sparsity, self.target_sparsity):
                raise ValueError(
                    f"`target_sparsity`={target_sparsity!r} contradicts `pattern`={pattern!r}, which "
                    f"fixes the sparsity at 1 - {n}/{m} = {self.target_sparsity:g}; "
                    "leave target_sparsity unset."
                )
        self.initial_sparsity = check_number("initial_sparsity", initial_sparsity, 0.0, 1.0, high_open=True)
        if self.initial_sparsity > self.target_sparsity:
            raise ValueError(
                f"`initial_sparsity`={initial_sparsity!r} is above "
                f"`target_sparsity`={self.target_sparsity!r}; expected initial_sparsity <= target_sparsity."
            )
        self.start = validate_step_arg("start", start)
        self.end = validate_step_arg("end", end)
        if type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(f"`end`={end!r} is before `start`={start!r}; expected end >= start.")
        self.frequency = check_int("frequency", frequency, minimum=1)
        self.power = check_number("power", power, low=0.0, low_open=True)
        self.calibration_steps = check_int("calibration_steps", calibration_steps, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)

        self.masks = MaskSet()
        self.param_names: list[str] = []
        self.applied_sparsity = 0.0  # schedule value of the last update
        self.last_update_step = -1
        self.sparsity = 0.0  # reached sparsity (from the masks) after the last update
        self.layer_sparsity: dict[str, float] = {}
        self._start_step = 0
        self._end_step = 0
        self._next_update: int | None = None
        self._taylor: dict[str, Tensor] = {}
        # activation criterion: per layer, the sum of per-batch mean |input| and the batch count
        self._act_sum: dict[str, Tensor] = {}
        self._act_count: dict[str, int] = {}
        self._act_handles: list[Any] = []

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "pattern": self.pattern, "criterion": self.criterion}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.param_names = [f"{name}.weight" for name in self.module_names]
        if self.nm is not None:
            m = self.nm[1]
            for name in self.module_names:
                weight = pl_module.get_submodule(name).weight
                if weight.shape[1] % m:
                    raise ValueError(
                        f"GradualPruning(pattern={self.pattern!r}) cannot prune layer {name!r}: its input "
                        f"dimension {weight.shape[1]} is not a multiple of {m}. Add it to `exclude`."
                    )

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self._start_step = resolve_step(self.start, total, "start")
        self._end_step = resolve_step(self.end, total, "end")
        if self._end_step < self._start_step:
            raise ValueError(
                f"`end`={self.end!r} resolves to step {self._end_step}, before `start`={self.start!r} "
                f"(step {self._start_step}); expected end >= start."
            )
        self.masks.bind(pl_module, self.param_names)
        self.masks.apply_to_weights_()
        for n in self.param_names:
            p = self.masks.parameter(n)
            if self.criterion == "taylor":
                acc = self._taylor.get(n)
                self._taylor[n] = (
                    torch.zeros_like(p) if acc is None or acc.shape != p.shape else acc.to(p.device)
                )
            module = n.rsplit(".", 1)[0]
            if module in self._act_sum:  # partial activation statistics restored from a checkpoint
                self._act_sum[module] = self._act_sum[module].to(p.device)
        step = trainer.global_step
        if self.last_update_step < 0 and step > self._start_step:
            self._next_update = step  # attached after its start step: catch up now
        else:
            self._next_update = next_update_step(
                max(step, self.last_update_step + 1),
                self._start_step,
                self._end_step,
                self.frequency,
                self.schedule,
            )

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.criterion == "activation"
            and not self._act_handles
            and self._next_update is not None
            and self._next_update - trainer.global_step < self.calibration_steps
        ):
            self._attach_activation_hooks(pl_module)

    @override
    def before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.criterion == "taylor":
            self._accumulate_taylor()
        if self._next_update is not None and step >= self._next_update:
            self.update_masks(step)
        self.masks.apply_to_grads_()

    @override
    def after_optimizer_step(self) -> None:
        self.masks.apply_to_weights_()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Aligned with Lightning's own log_every_n_steps so the value reaches every logger.
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("sparsity", self.sparsity, on_step=True, on_epoch=False)
            if self.log_per_layer:
                for name, value in self.layer_sparsity.items():
                    pl_module.log(f"sparsity/{name}", value, on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._detach_activation_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._detach_activation_hooks()

    # ------------------------------------------------------------------ scoring
    def score(self, name: str, weight: Tensor, step: int) -> Tensor:
        """Importance of every entry of parameter ``name`` (higher = keep). Override to customize.

        Data-dependent statistics are already averaged across DDP ranks when this is called.
        """
        if self.criterion == "magnitude":
            return magnitude_score(weight)
        if self.criterion == "taylor":
            return self._taylor[name]
        if self.criterion == "activation":
            module = name.rsplit(".", 1)[0]
            if module not in self._act_sum:
                return magnitude_score(weight)  # layer saw no input in the window: fall back to |w|
            return activation_score(weight, self._act_sum[module])
        return random_score(weight.shape, step, self.seed, weight.device)

    def update_masks(self, step: int) -> None:
        """Recompute the masks for the schedule's sparsity at ``step``.

        Masks agree on every rank: weights are identical under DDP, Taylor and activation
        statistics are averaged across ranks first, and random scores are seeded by the step.
        """
        target = sparsity_at(
            step,
            schedule=self.schedule,
            start=self._start_step,
            end=self._end_step,
            final=self.target_sparsity,
            initial=self.initial_sparsity,
            power=self.power,
        )
        if target > self.applied_sparsity:
            if self.criterion == "taylor":
                all_reduce_mean_(list(self._taylor.values()))
            elif self.criterion == "activation":
                for module, total in self._act_sum.items():
                    total.div_(self._act_count[module])  # sum of batch means -> mean
                all_reduce_mean_(list(self._act_sum.values()))
            weights = [self.masks.parameter(n) for n in self.param_names]
            scores = [self.score(n, w, step) for n, w in zip(self.param_names, weights)]
            previous = [self.masks[n] for n in self.param_names]
            if self.nm is None:
                new = unstructured_masks(scores, target, self.scope, previous)
            else:
                n_keep, m = self.nm
                prune = min(math.floor(target * m + 1e-9), m - n_keep)
                new = [nm_mask(s, n_keep, m, prune, prev) for s, prev in zip(scores, previous)]
            self.masks.update(dict(zip(self.param_names, new)))
            self.applied_sparsity = target
            counts = self.masks.counts()
            self.sparsity = sum(z for z, _ in counts.values()) / sum(t for _, t in counts.values())
            self.layer_sparsity = {n.rsplit(".", 1)[0]: z / t for n, (z, t) in counts.items()}
            self.debug(f"GradualPruning: step {step}: sparsity {self.sparsity:.4f} (target {target:.4f})")
        self.last_update_step = step
        for acc in self._taylor.values():
            acc.zero_()
        self._detach_activation_hooks()
        self._next_update = next_update_step(
            step + 1, self._start_step, self._end_step, self.frequency, self.schedule
        )

    @torch.no_grad()
    def _accumulate_taylor(self) -> None:
        weights, accs = [], []
        for n in self.param_names:
            w = self.masks.parameter(n)
            if w.grad is not None:
                weights.append(w)
                accs.append(self._taylor[n])
        if not weights:
            return
        prods = torch._foreach_mul([w.detach() for w in weights], [w.grad for w in weights])
        torch._foreach_abs_(prods)
        torch._foreach_add_(accs, prods)

    def _attach_activation_hooks(self, pl_module: pl.LightningModule) -> None:
        for name in self.module_names:
            module = pl_module.get_submodule(name)
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            self._act_handles.append(module.register_forward_hook(self._make_act_hook(name, channel_dim)))

    def _make_act_hook(self, name: str, channel_dim: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not module.training:
                return
            stat = channel_mean_abs(args[0], channel_dim)
            if name in self._act_sum:
                self._act_sum[name] += stat
                self._act_count[name] += 1
            else:
                self._act_sum[name], self._act_count[name] = stat, 1

        return hook

    def _detach_activation_hooks(self) -> None:
        for handle in self._act_handles:
            handle.remove()
        self._act_handles.clear()
        self._act_sum, self._act_count = {}, {}

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "applied_sparsity": self.applied_sparsity,
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
            "layer_sparsity": dict(self.layer_sparsity),
            "taylor": {n: t.detach().cpu().clone() for n, t in self._taylor.items()},
            "activation_sum": {n: t.detach().cpu().clone() for n, t in self._act_sum.items()},
            "activation_count": dict(self._act_count),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks.load_state_dict(state_dict["masks"])
        self.applied_sparsity = float(state_dict["applied_sparsity"])
        self.last_update_step = int(state_dict["last_update_step"])
        self.sparsity = float(state_dict.get("sparsity", 0.0))
        self.layer_sparsity = dict(state_dict.get("layer_sparsity", {}))
        self._taylor = dict(state_dict.get("taylor", {}))
        self._act_sum = dict(state_dict.get("activation_sum", {}))
        self._act_count = dict(state_dict.get("activation_count", {}))


__all__ = ["CRITERIA", "SCOPES", "GradualPruning"]
