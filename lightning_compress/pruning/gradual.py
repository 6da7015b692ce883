"""Gradual pruning during training (Zhu & Gupta, 2017, "To prune, or not to prune")."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.engine import Constraint
from lightning_compress.core.importance import Importance, make_importance
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.params import TargetParam, select_parameters
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.functional.pruning import nm_mask, parse_nm, unstructured_masks

CRITERIA: tuple[str, ...] = ("magnitude", "taylor", "activation", "random", "lamp")
SCOPES: tuple[str, ...] = ("global", "local")

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]
CriterionName = Literal["magnitude", "taylor", "activation", "random", "lamp"]
ScopeName = Literal["global", "local"]


class GradualPruning(CompressionCallback):
    r"""Prune weights gradually while the model trains, to an exact target sparsity.

    Every ``frequency`` training steps between ``start`` and ``end`` the mask is recomputed so that
    the pruned fraction follows the schedule; with the default cubic schedule (Zhu & Gupta, 2017)

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n \Delta t}\right)^3 .

    Between updates the mask is enforced on the weights after every real optimizer step and on
    the gradients before it (both through the trainer's compression engine), so momentum, Adam
    moments and weight decay cannot revive a pruned weight; checkpoints therefore hold truly sparse
    weights under the user's parameter names.

    What is pruned: the ``weight`` of Linear and Conv1d/2d/3d layers, the input projection of
    ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``; its ``out_proj`` is a
    Linear) and, with ``include_embeddings=True``, ``nn.Embedding`` tables.

    Args:
        target_sparsity: Final fraction of zero weights, in [0, 1). Default 0.9 for
            ``pattern="unstructured"``; for ``N:M`` patterns it is fixed at ``1 - N/M`` (giving
            another value is an error).
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"polynomial"`` or ``"constant"``
            (one-shot at ``start``). See :func:`lightning_compress.core.schedules.sparsity_at`.
        start: First update: an int training step, or a float fraction of training.
        end: Step (int) or fraction (float) at which ``target_sparsity`` is reached; clamped to the
            last step the run actually takes, so ``end=1.0`` reaches the target.
        frequency: Training steps between mask updates.
        criterion: Importance score: ``"magnitude"`` ``|w|``; ``"taylor"`` ``|w * grad|`` averaged
            over the steps since the last update; ``"activation"`` ``|w| * E|x|`` with the mean
            absolute input per input feature/channel, gathered by forward hooks during the
            ``calibration_steps`` steps before each update only; ``"lamp"`` layer-adaptive magnitude
            ``w_u^2 / sum_{|w_v|>=|w_u|} w_v^2`` (Lee et al., 2021: same order as ``|w|`` inside a
            layer, better per-layer allocation in global scope); ``"random"`` (a baseline).
        scope: ``"global"`` (one threshold over all targeted layers) or ``"local"`` (every layer
            pruned to the same sparsity).
        pattern: ``"unstructured"`` or an ``"N:M"`` string such as ``"2:4"`` (keep N of every M
            consecutive weights along the input dimension; sparsity ramps per group).
        targets: fnmatch patterns over module names (default all supported layers).
        exclude: fnmatch patterns to leave dense, e.g. the final classifier (``["fc3"]``,
            ``["*decoder"]``); a pattern that matches no module is an error.
        initial_sparsity: ``s_i`` of the schedule.
        power: Exponent of the ``"polynomial"`` schedule.
        calibration_steps: Training steps of activation statistics before each update
            (``criterion="activation"`` only).
        seed: Seed of the ``"random"`` criterion (combined with the step; identical on every rank).
        log_per_layer: Also log ``sparsity/<layer>`` for every pruned layer.
        flush_denormal: On CPU, also flush denormals on the main thread during each optimizer step.
            The optimizer state of pruned entries is reset at every mask update and epoch start
            anyway, which is what keeps worker threads out of the denormal range.
        min_density: Global scope only: no layer keeps fewer than ``ceil(min_density * n)`` of its
            ``n`` weights, so a small layer whose weights are small (an output projection, a
            classifier) is never pruned away entirely. Must not exceed ``1 - target_sparsity``;
            0 turns the floor off.
        include_embeddings: Also prune ``nn.Embedding`` tables (opt-in).

    Example:
        >>> trainer = pl.Trainer(callbacks=[GradualPruning(target_sparsity=0.9, end=0.75)])  # doctest: +SKIP
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        schedule: ScheduleName = "cubic",
        start: int | float = 0.0,
        end: int | float = 0.75,
        frequency: int = 100,
        criterion: CriterionName = "magnitude",
        scope: ScopeName = "global",
        pattern: str = "unstructured",
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        initial_sparsity: float = 0.0,
        power: float = 3.0,
        calibration_steps: int = 8,
        seed: int = 0,
        log_per_layer: bool = False,
        flush_denormal: bool = True,
        min_density: float = 0.01,
        include_embeddings: bool = False,
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
        self.step_schedule = StepSchedule(start, end, frequency)
        self.frequency = self.step_schedule.frequency
        self.start, self.end = self.step_schedule.start, self.step_schedule.end
        self.power = check_number("power", power, low=0.0, low_open=True)
        self.calibration_steps = check_int("calibration_steps", calibration_steps, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)
        self.min_density = check_number("min_density", min_density, 0.0, 1.0, high_open=True)
        if (
            self.nm is None
            and self.scope == "global"
            and self.min_density > 1.0 - self.target_sparsity + 1e-12
        ):
            raise ValueError(
                f"`min_density`={min_density!r} is above the density that `target_sparsity`="
                f"{self.target_sparsity!r} leaves ({1.0 - self.target_sparsity:g}); expected min_density <= "
                "1 - target_sparsity (0 turns the per-layer floor off)."
            )
        self.include_embeddings = check_bool("include_embeddings", include_embeddings)

        self.masks = MaskSet(owner="GradualPruning")
        self.importance: Importance = self.build_importance()
        self.target_params: list[TargetParam] = []
        self.param_names: list[str] = []
        self.applied_sparsity = 0.0  # schedule value of the last update
        self.last_update_step = -1
        self.sparsity = 0.0  # reached sparsity (from the masks) after the last update
        self.layer_sparsity: dict[str, float] = {}
        self._next_update: int | None = None
        self._scores: dict[str, Tensor] = {}
        self._root: nn.Module | None = None
        self._trainer: pl.Trainer | None = None

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "pattern": self.pattern, "criterion": self.criterion}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [self.step_schedule]

    # ------------------------------------------------------------------ setup
    @override
    def select_targets(self, root: nn.Module) -> list[str]:
        self.target_params = select_parameters(
            root, self.targets, self.exclude, self.include_embeddings, owner=self.name
        )
        self.param_names = [t.param for t in self.target_params]
        if self.nm is not None:
            m = self.nm[1]
            for t in self.target_params:
                weight = root.get_parameter(t.param)
                if weight.dim() < 2 or weight.shape[1] % m:
                    raise ValueError(
                        f"GradualPruning(pattern={self.pattern!r}) cannot prune layer {t.module!r}: "
                        "its input "
                        f"dimension {weight.shape[1] if weight.dim() > 1 else None} is not a multiple of {m} "
                        f"({t.param!r} has shape {tuple(weight.shape)}). Add {t.module!r} to `exclude`."
                    )
        return list(dict.fromkeys(t.module for t in self.target_params))

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._root = root = self.root(pl_module)
        self._trainer = trainer
        self.masks.bind(root, self.param_names)
        self.masks.apply_to_weights_()
        self.importance.attach(root, self.target_params)
        self._clean_optimizer_state(trainer)
        self._plan_next_update(self.engine.clock if self.engine is not None else trainer.global_step)

    @override
    def schedules_changed(self) -> None:
        self._plan_next_update(self.engine.clock if self.engine is not None else 0)

    def _plan_next_update(self, step: int) -> None:
        sched = self.step_schedule
        if self.last_update_step < 0 and step > sched.start_step:
            self._next_update = step  # attached after its start step: catch up now
        else:
            self._next_update = sched.next_update(max(step, self.last_update_step + 1), self.schedule)

    @override
    def constraints(self) -> list[Constraint]:
        if not len(self.masks) or self._root is None:
            return []
        return [*self.importance.constraints(), self.masks.grad_constraint(), self.masks.weight_constraint()]

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            self._next_update is not None
            and self.engine is not None
            and self._root is not None
            and self.importance.wants_window(self._next_update - self.engine.clock)
        ):
            self.importance.open_window(self._root)

    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self._next_update is not None and step >= self._next_update:
            self.update_masks(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.masks.flush()  # weights of optimizers that did not step after the last mask update
        # Aligned with Lightning's own log_every_n_steps so the value reaches every logger.
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("sparsity", self.sparsity, on_step=True, on_epoch=False)
            if self.log_per_layer:
                for name, value in self.layer_sparsity.items():
                    pl_module.log(f"sparsity/{name}", value, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Second moments of pruned entries (set to 1.0 at updates) decay by beta2 each step; renew
        # them once per epoch so they never reach the denormal range, however long training runs.
        if self.applied_sparsity > 0:
            self._clean_optimizer_state(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.importance.close_window()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Remove the hooks but keep partial statistics: OnExceptionCheckpoint may save them next.
        self.importance.close_window()

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        root = self.root(pl_module)
        self.masks.structure_changed(root, changes, self.root_prefix)
        renamed = {c.old_name: c.new_name for c in changes}
        kept = []
        for t in self.target_params:
            full = self.root_prefix + t.param
            new = renamed.get(full, full)
            if new is not None and new[len(self.root_prefix) :] in self.masks:
                kept.append(t if new == full else _renamed(t, new[len(self.root_prefix) :]))
        self.target_params = kept
        self.param_names = [t.param for t in kept]
        self.importance.attach(root, kept)

    # ------------------------------------------------------------------ scoring
    def build_importance(self) -> Importance:
        """The importance object that scores weights. Override to plug in your own.

        The default builds the one named by ``criterion`` (see :mod:`lightning_compress.core.importance`).
        """
        return make_importance(self.criterion, self.seed, self.calibration_steps)

    def score(self, name: str, weight: Tensor, step: int) -> Tensor:
        """Importance of every entry of parameter ``name`` (higher = keep). Override to customize.

        The default returns the criterion's score; data-dependent statistics are already averaged
        across DDP ranks when this is called.
        """
        return self._scores[name]

    def scheduled(self, step: int, final: float, initial: float) -> float:
        """The value the schedule (``schedule``, ``start``, ``end``, ``power``) gives at ``step``."""
        sched = self.step_schedule
        return sparsity_at(
            step,
            schedule=self.schedule,
            start=sched.start_step,
            end=sched.end_step,
            final=final,
            initial=initial,
            power=self.power,
        )

    def update_masks(self, step: int) -> None:
        """Recompute the masks for the schedule's sparsity at ``step``.

        Masks agree on every rank: weights are identical under DDP, Taylor and activation
        statistics are reduced across ranks first, and random scores are seeded by the step.
        """
        sched = self.step_schedule
        target = self.scheduled(step, self.target_sparsity, self.initial_sparsity)
        self.importance.close_window()
        trainer = self._trainer
        if target > self.applied_sparsity:
            if trainer is not None:
                self.importance.reduce(lambda t, op: trainer.strategy.reduce(t, reduce_op=op))
            weights = [self.masks.parameter(n) for n in self.param_names]
            self._scores = dict(zip(self.param_names, self.importance.scores(step)))
            scores = [self.score(n, w, step) for n, w in zip(self.param_names, weights)]
            self._scores = {}
            previous = [self.masks[n] for n in self.param_names]
            if self.nm is None:
                min_keep = None
                if self.scope == "global" and self.min_density > 0:
                    min_keep = [math.ceil(self.min_density * w.numel()) for w in weights]
                new = unstructured_masks(scores, target, self.scope, previous, min_keep=min_keep)
            else:
                n_keep, m = self.nm
                prune = min(math.floor(target * m + 1e-9), m - n_keep)
                new = [nm_mask(s, n_keep, m, prune, prev) for s, prev in zip(scores, previous)]
            self.apply_masks(new)
            self.applied_sparsity = target
            self.sparsity, self.layer_sparsity = self.masks.layer_sparsity()
            self.debug(f"GradualPruning: step {step}: sparsity {self.sparsity:.4f} (target {target:.4f})")
        self.last_update_step = step
        self.importance.reset()
        self._next_update = sched.next_update(step + 1, self.schedule)

    def apply_masks(self, new: list[Tensor]) -> None:
        """Store new keep-masks (``param_names`` order), zero what they prune, clean optimizer state.

        Weights of the optimizer stepping now are zeroed at once; the others lazily (see
        :meth:`MaskSet.update`), so another network's autograd graph stays valid mid-step.
        """
        stepping = self.engine.current_optimizer if self.engine is not None else None
        zero_now = None
        if stepping is not None:
            zero_now = [p for g in stepping.param_groups for p in g["params"]]
        self.masks.update(dict(zip(self.param_names, new)), zero_now=zero_now)
        if self._trainer is not None:
            self._clean_optimizer_state(self._trainer)

    def _clean_optimizer_state(self, trainer: pl.Trainer) -> None:
        self.masks.clean_optimizer_state(trainer.optimizers)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "applied_sparsity": self.applied_sparsity,
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
            "layer_sparsity": dict(self.layer_sparsity),
            "schedule": self.step_schedule.state_dict(),
            "importance": self.importance.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks.load_state_dict(state_dict["masks"])
        self.applied_sparsity = float(state_dict["applied_sparsity"])
        self.last_update_step = int(state_dict["last_update_step"])
        self.sparsity = float(state_dict.get("sparsity", 0.0))
        self.layer_sparsity = dict(state_dict.get("layer_sparsity", {}))
        if "schedule" in state_dict:
            self.step_schedule.load_state_dict(state_dict["schedule"])
        self.importance.load_state_dict(state_dict.get("importance", {}))


def _renamed(target: TargetParam, new_param: str) -> TargetParam:
    from dataclasses import replace

    return replace(target, param=new_param, module=new_param.rpartition(".")[0])


__all__ = ["CRITERIA", "SCOPES", "GradualPruning"]
