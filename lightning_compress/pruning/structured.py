"""Structured (filter / channel) pruning that physically removes channels while the model trains."""

from __future__ import annotations

import math
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback, InputCapture
from lightning_compress.core.channel_importance import (
    CHANNEL_CRITERIA,
    ChannelImportance,
    make_channel_importance,
)
from lightning_compress.core.channels import (
    ChannelCost,
    ChannelGroup,
    build_channel_groups,
    channel_masks,
    removal_ops,
)
from lightning_compress.core.engine import Constraint
from lightning_compress.core.masks import MaskSet
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at, validate_step_arg
from lightning_compress.core.surgery import channel_widths
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.functional.structured import (
    global_channel_keep,
    local_channel_keep,
    rounded_removal,
    search_removal,
)

__all__ = ["StructuredPruning"]

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]
ChannelCriterion = Literal["l1", "l2", "fpgm", "bn_scale", "taylor"]
ScopeName = Literal["global", "local"]
_LAYER_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _like_model(example: Any, root: nn.Module) -> Any:
    """``example`` on the model's device, floating tensors in its dtype (bf16-true, 64-true, ...)."""
    p = next(root.parameters(), None)
    if p is None:
        return example

    def cast(t: Tensor) -> Tensor:
        return t.to(p.device, p.dtype) if t.is_floating_point() else t.to(p.device)

    return tree_map_only(Tensor, cast, example)


class StructuredPruning(CompressionCallback):
    r"""Filter / channel pruning with physical removal during training.

    Channels that must go together (a convolution's filter, the BatchNorm entries after it, the
    next layers' input channels, every branch of a residual sum, the columns of a Linear after
    ``flatten``, depthwise filters) come from Torch-Pruning's dependency graph
    (:mod:`lightning_compress.core.channels`); layers whose channels are the model's output are left
    alone automatically.

    Every ``frequency`` steps between ``start`` and ``end`` the removed amount follows the schedule
    (cubic by default, Zhu & Gupta 2017) and the chosen channel groups are *soft-masked*: every
    tensor of a removed channel is zeroed after each optimizer step and its gradients before it (the
    engine's mask constraint), so the masked model computes exactly what the smaller one will. At
    ``hard_prune_at`` the channels are **physically removed** (``lightning_compress.core.surgery``)
    and training continues on the smaller, faster model: the optimizer state of surviving channels
    (momentum, Adam moments) is carried over, the LR scheduler keeps its position, DDP is
    re-wrapped, and the change is recorded in the checkpoint so that
    ``lightning_compress.load_checkpoint(MyModule, path)`` rebuilds the pruned model.

    How much is removed: ``target_ratio``, the fraction of channels removed (counted over the
    prunable groups), or a budget: ``target_macs`` / ``target_params``, the fraction of the model's
    MACs / parameters to keep, met exactly through the cost model (a layer's MACs scale with the
    kept fractions of its input and output channels).

    Args:
        target_ratio: Fraction of channels to remove, in [0, 1) (default 0.5 unless a budget is given).
        criterion: Channel importance: ``"l1"`` (Li et al. 2017, filter L1 norm), ``"l2"``,
            ``"fpgm"`` (geometric median, He et al. 2019), ``"bn_scale"`` (``|gamma|``, Liu et al.
            2017; groups without BatchNorm are left alone), ``"taylor"`` (group first-order Taylor,
            Molchanov et al. 2019). See :mod:`lightning_compress.core.channel_importance`.
        scope: ``"global"``: one threshold over all groups (scores divided by their group's mean so
            layers compare, as Torch-Pruning does; ``bn_scale`` is thresholded raw, as in the paper);
            ``"local"``: every group loses the same fraction.
        hard_prune_at: When channels are physically removed: ``"end"`` (the schedule's ``end``
            step), an int training step or a float fraction of training; not before ``end``.
        round_to: Kept widths are rounded to the nearest multiple of this (at least one multiple; e.g.
            8 for SIMD-friendly widths); a group narrower than ``round_to`` is an error. With
            ``target_ratio`` in global scope the total removed still reaches the target.
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"``, ``"polynomial"`` or ``"constant"``
            (one-shot at ``start``).
        start: First update (int step or float fraction of training).
        end: Step or fraction at which the target is reached.
        frequency: Training steps between updates.
        targets: fnmatch patterns over layer names whose output channels may be removed.
        exclude: Layers whose output channels must stay (a pattern that matches nothing is an error).
        target_macs: Fraction of the model's MACs to keep, in (0, 1] (instead of ``target_ratio``).
        target_params: Fraction of the model's parameters to keep, in (0, 1].
        carry_optimizer_state: Carry the optimizer state to the surviving channels at the hard
            prune (``False`` restarts it: the comparison in ``benchmarks/structured.py``).
        power: Exponent of the ``"polynomial"`` schedule.
        log_per_layer: Also log ``channels/<layer>`` (kept fraction) for every group.
        flush_denormal: See :class:`~lightning_compress.core.callback.CompressionCallback`.

    The model's input for tracing and for the cost model is the root's ``example_input_array``
    (then bad arguments fail in ``setup()``), else the first training batch's input to the root's
    forward (checked at the first training step, before any weight changes).

    Example:
        >>> pruning = StructuredPruning(target_ratio=0.5, round_to=8)
        >>> trainer = pl.Trainer(callbacks=[pruning])  # doctest: +SKIP
    """

    changes_structure = True
    supported_types = _LAYER_TYPES

    def __init__(
        self,
        target_ratio: float | None = None,
        criterion: ChannelCriterion = "l1",
        scope: ScopeName = "global",
        hard_prune_at: int | float | str = "end",
        round_to: int | None = None,
        schedule: ScheduleName = "cubic",
        start: int | float = 0.0,
        end: int | float = 0.5,
        frequency: int = 100,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        target_macs: float | None = None,
        target_params: float | None = None,
        carry_optimizer_state: bool = True,
        power: float = 3.0,
        log_per_layer: bool = False,
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, flush_denormal=flush_denormal)
        self.criterion = check_choice("criterion", criterion, CHANNEL_CRITERIA)
        self.scope = check_choice("scope", scope, ("global", "local"))
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        given = [
            n for n, v in (("target_macs", target_macs), ("target_params", target_params)) if v is not None
        ]
        if len(given) > 1 or (given and target_ratio is not None):
            both = (["target_ratio"] if target_ratio is not None else []) + given
            raise ValueError(
                f"{' and '.join(f'`{n}`' for n in both)} were both given; expected one of target_ratio "
                "(fraction of channels removed), target_macs or target_params (fraction kept)."
            )
        self.budget: str | None = None
        if given:
            self.budget = "macs" if given[0] == "target_macs" else "params"
            value = target_macs if self.budget == "macs" else target_params
            self.target_kept = check_number(given[0], value, 0.0, 1.0, low_open=True)
            self.final_amount = 1.0 - self.target_kept
            self.target_ratio = None
        else:
            self.target_ratio = check_number(
                "target_ratio", 0.5 if target_ratio is None else target_ratio, 0.0, 1.0, high_open=True
            )
            self.target_kept = None
            self.final_amount = self.target_ratio
        self.target_macs, self.target_params = target_macs, target_params
        if round_to is not None:
            round_to = check_int("round_to", round_to, minimum=1)
        self.round_to = round_to
        self.step_schedule = StepSchedule(start, end, frequency)
        self.start, self.end, self.frequency = start, end, self.step_schedule.frequency
        if isinstance(hard_prune_at, str):
            if hard_prune_at != "end":
                raise ValueError(
                    f"`hard_prune_at`={hard_prune_at!r} is not supported; expected 'end', an int training "
                    "step or a float fraction of training in [0, 1]."
                )
            self.hard_schedule: StepSchedule | None = None
        else:
            validate_step_arg("hard_prune_at", hard_prune_at)
            self.hard_schedule = StepSchedule(
                hard_prune_at, None, None, names=("hard_prune_at", "hard_prune_at")
            )
        self.hard_prune_at = hard_prune_at
        self.carry_optimizer_state = check_bool("carry_optimizer_state", carry_optimizer_state)
        self.power = check_number("power", power, low=0.0, low_open=True)
        self.log_per_layer = check_bool("log_per_layer", log_per_layer)

        self.importance: ChannelImportance = self.build_importance()
        self.masks = MaskSet(owner=self.name)
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self.keep: list[Tensor] = []
        self.cost: ChannelCost | None = None
        self.applied = 0.0  # scheduled amount of the last update
        self.last_update_step = -1
        self.hard_pruned = False
        self.channel_ratio = 0.0  # fraction of prunable channels removed
        self.macs_kept = 1.0
        self.params_kept = 1.0
        self.removed: dict[str, list[int]] = {}  # layer -> [original, kept] output channels
        self._restored: dict[str, Any] | None = None
        self._capture: InputCapture | None = None
        self._root: nn.Module | None = None
        self._trainer: pl.Trainer | None = None
        self._next_update: int | None = None
        self._hard_requested = False
        self._stale = False
        self._removal_logged = False
        self._hard_tensors: set[str] = set()

    # ------------------------------------------------------------------ configuration
    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "criterion": self.criterion}

    @override
    def schedules(self) -> list[StepSchedule]:
        return [self.step_schedule] + ([self.hard_schedule] if self.hard_schedule is not None else [])

    def build_importance(self) -> ChannelImportance:
        """The channel importance object. Override to plug in your own criterion."""
        return make_channel_importance(self.criterion)

    def allowed(self, layer: str) -> bool:
        """Whether ``layer``'s output channels may be removed (``targets`` / ``exclude``)."""
        return layer in self._allowed

    @override
    def select_targets(self, root: nn.Module) -> list[str]:
        names = super().select_targets(root)
        self._allowed = set(names)
        return names

    # ------------------------------------------------------------------ setup
    def _owns(self, op: dict[str, Any]) -> bool:
        return op.get("owner") == self.state_key

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._trainer = trainer
        self._root = root = self.root(pl_module)
        assert self.engine is not None
        if any(self._owns(op) for op in self.engine.recipe):
            return  # resumed after our hard prune: the recipe already rebuilt the smaller model
        example = getattr(root, "example_input_array", None) if isinstance(root, pl.LightningModule) else None
        if example is not None:
            self._build(example, "`example_input_array`")

    def _build(self, example: Any, source: str) -> None:
        """Trace the groups, check the target is reachable, build the cost model (before any change).

        On an error nothing is kept: the callback stays unbound and the model untouched.
        """
        try:
            self._build_checked(example, source)
        except Exception:
            self.groups, self.skipped, self.cost = [], {}, None
            raise

    def _build_checked(self, example: Any, source: str) -> None:
        root = self._root
        assert root is not None
        example = _like_model(example, root)
        groups, skipped = build_channel_groups(root, example, self.allowed, owner=self.name)
        kept = []
        for g in groups:
            reason = self.importance.supports(g)
            if reason is None:
                kept.append(g)
            else:
                skipped[g.name] = reason
        if not kept:
            reasons = "; ".join(f"{k!r}: {v}" for k, v in list(skipped.items())[:8]) or (
                "Torch-Pruning found no Conv / Linear layer on the forward's path"
            )
            raise ValueError(
                f"{self.name}: no channel group of {type(root).__name__} can be pruned ({reasons}). "
                "Check `targets` / `exclude` and the criterion."
            )
        self.groups, self.skipped = kept, skipped
        if self.round_to is not None:
            for g in kept:
                if g.size < self.round_to:
                    raise ValueError(
                        f"{self.name}: `round_to`={self.round_to} is larger than the width of layer "
                        f"{g.name!r} ({g.size} channels); expected round_to <= {g.size}, or exclude "
                        "the layer."
                    )
        from lightning_compress.core.cost import model_costs

        try:
            cost = model_costs(root, example)
        except Exception as err:
            raise RuntimeError(
                f"{self.name}: the forward on {source} that measures MACs failed: {err}"
            ) from err
        layer_macs = {r.name: int(r.dense_macs) for r in cost.layers if r.dense_macs}
        self.cost = ChannelCost(root, kept, layer_macs, sum(cost.unattributed.values()))
        self._check_reachable()
        if self._restored is not None:
            self._apply_restored()

    @property
    def _floor(self) -> int:
        return max(1, self.round_to or 1)

    def _max_keep(self) -> list[Tensor]:
        """The most that can be removed: every group down to its floor."""
        n = [rounded_removal(g.size, g.size, self.round_to, self._floor) for g in self.groups]
        return [torch.arange(g.size) >= k for g, k in zip(self.groups, n)]

    def _check_reachable(self) -> None:
        total = sum(g.size for g in self.groups)
        if self.budget is None:
            ratio = float(self.target_ratio or 0.0)
            if self.scope == "local":
                for g in self.groups:
                    if round(ratio * g.size) >= g.size:  # (round_to rounds a partial removal, never this)
                        raise ValueError(
                            f"{self.name}: `target_ratio`={ratio!r} with scope='local' would empty layer "
                            f"{g.name!r} ({g.size} channels); expected target_ratio < "
                            f"{(g.size - 0.5) / g.size:.4f}, or exclude the layer."
                        )
                return
            most = (
                sum(rounded_removal(g.size, g.size, self.round_to, self._floor) for g in self.groups) / total
            )
            if ratio > most + 1e-9:
                raise ValueError(
                    f"{self.name}: `target_ratio`={ratio!r} cannot be met without emptying a layer: at most "
                    f"{math.floor(most * 1e4) / 1e4:.4f} of the {total} prunable channels can go (every "
                    "group "
                    f"keeps {self._floor}); expected target_ratio <= {math.floor(most * 1e4) / 1e4:.4f}."
                )
            return
        assert self.cost is not None
        assert self.target_kept is not None
        least = self.cost.kept_fraction(self._max_keep(), self.budget)
        if self.target_kept < least - 1e-9:
            arg = "target_macs" if self.budget == "macs" else "target_params"
            raise ValueError(
                f"{self.name}: `{arg}`={self.target_kept!r} cannot be met without emptying a layer: removing "
                f"every prunable channel but {self._floor} per group still keeps {least:.4f} of the model's "
                f"{self.budget} (layers outside the prunable groups: {sorted(self.skipped) or 'none'}); "
                f"expected {arg} >= {math.ceil(least * 1e4) / 1e4:.4f}."
            )

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        self._root = root = self.root(pl_module)
        if self.hard_pruned:
            self._next_update = None
            return
        if not self.groups:  # no example_input_array: trace on the first batch
            if self._capture is None:
                self._capture = InputCapture(root, self.name)
        else:
            self._bind()
        self._plan_next_update(self.engine.clock if self.engine is not None else trainer.global_step)

    def _bind(self) -> None:
        root = self._root
        assert root is not None
        if not self.keep:
            self.keep = [torch.ones(g.size, dtype=torch.bool) for g in self.groups]
        masks = channel_masks(root, self.groups, self.keep)
        self.masks.bind(root, list(masks))
        self.masks.update(masks, zero_now=None)
        self.importance.attach(root, self.groups)
        if self._trainer is not None:
            self._clean_optimizer_state(self._trainer)
        if self.engine is not None:
            self.engine.invalidate()

    def _hard_step(self) -> int:
        end = self.step_schedule.end_step
        assert end is not None
        if self.hard_schedule is None:
            return end
        hard = max(int(self.hard_schedule.start_step or 0), end)
        total = self.step_schedule.total
        if total is not None and hard > int(total) - 1:
            hard = max(int(total) - 1, end)  # after the last step: remove the channels at the last one
        return hard

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.hard_schedule is not None and not self.hard_pruned:
            hard, end = self.hard_schedule.start_step, self.step_schedule.end_step
            if hard is not None and end is not None and hard < end:
                raise ValueError(
                    f"{self.name}: `hard_prune_at`={self.hard_prune_at!r} (step {hard}) is before `end`="
                    f"{self.end!r} (step {end}); expected hard_prune_at >= end (channels are removed once "
                    "the target is reached), or 'end'."
                )

    def _plan_next_update(self, step: int) -> None:
        sched = self.step_schedule
        if self.hard_pruned:
            self._next_update = None
        elif self.last_update_step < 0 and step > (sched.start_step or 0):
            self._next_update = step
        else:
            self._next_update = sched.next_update(max(step, self.last_update_step + 1), self.schedule)

    @override
    def schedules_changed(self) -> None:
        self._plan_next_update(self.engine.clock if self.engine is not None else 0)

    @override
    def constraints(self) -> list[Constraint]:
        if self.hard_pruned or not len(self.masks) or self._root is None:
            return []
        return [*self.importance.constraints(), self.masks.grad_constraint(), self.masks.weight_constraint()]

    # ------------------------------------------------------------------ per step
    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if self.hard_pruned or self._hard_requested:
            return
        if not self.groups:
            capture, self._capture = self._capture, None
            if capture is None:
                capture = InputCapture(self._root, self.name)
            example = capture.take("to trace its channels")
            self._build(example, "the first training batch")
            self._bind()
        self.importance.begin_step()
        if self._stale:
            raise RuntimeError(
                f"{self.name}: another callback changed the model's structure before the channel "
                "schedule finished; put StructuredPruning's hard prune first (hard_prune_at <= the other "
                "change) or run them one after the other."
            )
        if self._next_update is not None and step >= self._next_update:
            self.update(step)
        if step >= self._hard_step() and (self._next_update is None or self._next_update > step):
            self._request_hard_prune()

    def scheduled(self, step: int) -> float:
        """The amount the schedule gives at ``step`` (channel ratio, or fraction of the budget removed)."""
        sched = self.step_schedule
        return sparsity_at(
            step,
            schedule=self.schedule,
            start=sched.start_step,
            end=sched.end_step,
            final=self.final_amount,
            initial=0.0,
            power=self.power,
        )

    def channel_scores(self) -> list[Tensor]:
        """Per-group channel scores (higher = keep), normalised for a global threshold.

        Override to customize the criterion without writing a :class:`ChannelImportance`.
        """
        assert self._root is not None
        scores = self.importance.scores(self._root, self.groups)
        if self.scope == "global" and not self.importance.comparable:
            scores = [s / s.mean().clamp_min(1e-30) for s in scores]
        return scores

    def update(self, step: int) -> None:
        """Choose the channels to remove for the schedule's amount at ``step`` and mask them."""
        amount = self.scheduled(step)
        trainer = self._trainer
        if amount > self.applied + 1e-12:
            if trainer is not None:
                self.importance.reduce(lambda t, op: trainer.strategy.reduce(t, reduce_op=op))
            scores = self.channel_scores()
            self.keep = self.select(scores, amount)
            if trainer is not None and trainer.world_size > 1:
                # Scores agree across ranks already; broadcasting rank 0's choice makes the shapes agree
                # even if they did not (a data-dependent cost model, a float tie): ranks never diverge.
                self.keep = [k.to(torch.bool) for k in trainer.strategy.broadcast(self.keep, src=0)]
            self.apply_keep()
            self.applied = amount
            self.debug(
                f"{self.name}: step {step}: {self.channel_ratio:.3f} of channels removed, MACs kept "
                f"{self.macs_kept:.3f}, params kept {self.params_kept:.3f}"
            )
        self.importance.reset()
        self.last_update_step = step
        self._next_update = self.step_schedule.next_update(step + 1, self.schedule)

    def select(self, scores: list[Tensor], amount: float) -> list[Tensor]:
        """Keep-masks per group for the scheduled ``amount``."""
        prev, floor, round_to = self.keep, self._floor, self.round_to
        sizes = [g.size for g in self.groups]
        if self.budget is None:
            if self.scope == "local":
                return local_channel_keep(scores, amount, round_to, prev, floor)
            wanted = round(amount * sum(sizes))
            if not round_to or round_to <= 1:
                return global_channel_keep(scores, wanted, round_to, prev, floor)

            def short_of(n: int) -> float:  # non-increasing in n: rounding never undoes a removal
                removed = sum(int((~k).sum()) for k in global_channel_keep(scores, n, round_to, prev, floor))
                return float(wanted - removed)

            n = search_removal(
                short_of, 0.0, sum(int((~k).sum()) for k in prev), sum(s - floor for s in sizes)
            )
            return global_channel_keep(scores, n, round_to, prev, floor)
        cost = self.cost
        assert cost is not None
        target = 1.0 - amount
        if self.scope == "local":
            grid = 1000  # ratio in steps of 0.001
            low, high = 0, grid

            def kept_local(i: int) -> float:
                return cost.kept_fraction(
                    local_channel_keep(scores, i / grid, round_to, prev, floor), self.budget
                )

            return local_channel_keep(
                scores, search_removal(kept_local, target, low, high) / grid, round_to, prev, floor
            )
        n_prev = sum(int((~k).sum()) for k in prev)
        n_max = sum(s - floor for s in sizes)

        def kept_global(n: int) -> float:
            return cost.kept_fraction(global_channel_keep(scores, n, round_to, prev, floor), self.budget)

        return global_channel_keep(
            scores, search_removal(kept_global, target, n_prev, n_max), round_to, prev, floor
        )

    def apply_keep(self) -> None:
        """Mask the removed channels (weights of the stepping optimizer at once, others lazily)."""
        root = self._root
        assert root is not None
        masks = channel_masks(root, self.groups, self.keep)
        stepping = self.engine.current_optimizer if self.engine is not None else None
        zero_now = None if stepping is None else [p for g in stepping.param_groups for p in g["params"]]
        self.masks.update(masks, zero_now=zero_now)
        if self._trainer is not None:
            self._clean_optimizer_state(self._trainer)
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        total = sum(g.size for g in self.groups)
        removed = sum(int((~k).sum()) for k in self.keep)
        self.channel_ratio = removed / max(total, 1)
        if self.cost is not None:
            params, macs = self.cost.evaluate(self.keep)
            self.params_kept = params / max(self.cost.dense_params, 1)
            self.macs_kept = macs / max(self.cost.dense_macs, 1)

    def _request_hard_prune(self) -> None:
        assert self._root is not None
        assert self.engine is not None
        ops = removal_ops(self._root, self.groups, self.keep, prefix=self.root_prefix, owner=self.state_key)
        self._hard_requested = True
        self._hard_tensors = {op["tensor"] for op in ops}
        if not ops:  # nothing was removed (target 0): just stop masking
            self._finish({})
            return
        self.engine.request_structure_change(ops, self.name, carry_state=self.carry_optimizer_state)

    def _finish(self, widths: dict[str, dict[str, tuple[int, int]]]) -> None:
        self.removed = {layer: list(w["out"]) for layer, w in widths.items() if w["out"][0] != w["out"][1]}
        self.hard_pruned = True
        self._hard_requested = False
        self.masks = MaskSet(owner=self.name)
        self.groups, self.keep = [], []
        if self._root is not None:
            self.importance.attach(self._root, [])
        self._next_update = None
        if self.engine is not None:
            self.engine.invalidate()
        shown = ", ".join(f"{k} {v[0]}->{v[1]}" for k, v in self.removed.items())
        rank_zero_info(
            f"{self.name}: removed {self.channel_ratio:.1%} of the prunable channels physically "
            f"(MACs kept {self.macs_kept:.3f}, parameters kept {self.params_kept:.3f}): {shown or 'none'}"
        )

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        root = self.root(pl_module)
        if self._hard_requested and any(c.old_name in self._hard_tensors for c in changes):
            widths = channel_widths(pl_module)
            prefix = self.root_prefix
            self._finish({k[len(prefix) :]: v for k, v in widths.items() if k.startswith(prefix)})
            return
        if len(self.masks):
            self.masks.structure_changed(root, changes, self.root_prefix)
            self._stale = not self.hard_pruned

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if len(self.masks):
            self.masks.flush()
        if self.hard_pruned and not self._removal_logged:
            # Once, straight to every logger (not only on log_every_n_steps): the kept width per layer.
            self._removal_logged = True
            if trainer.is_global_zero and self.removed:
                metrics = {f"channels_kept/{layer}": float(w[1]) for layer, w in self.removed.items()}
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and (self.groups or self.hard_pruned):
            pl_module.log("structured/channel_ratio", self.channel_ratio, on_step=True, on_epoch=False)
            pl_module.log("structured/macs_kept", self.macs_kept, on_step=True, on_epoch=False)
            pl_module.log("structured/params_kept", self.params_kept, on_step=True, on_epoch=False)
            if self.log_per_layer and self.keep:
                for g, k in zip(self.groups, self.keep):
                    pl_module.log(f"channels/{g.name}", float(k.float().mean()), on_step=True, on_epoch=False)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied > 0 and len(self.masks):
            self._clean_optimizer_state(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_capture()
        if (
            self.hard_pruned
            or self._hard_requested
            or not self.keep
            or not any((~k).any() for k in self.keep)
        ):
            return
        # Training stopped before hard_prune_at (early stopping, max_time, should_stop): remove what is
        # masked now rather than leave a full-size model with dead channels.
        rank_zero_warn(
            f"{self.name}: training ended at step {self.step} before the channels were removed (hard prune "
            f"due at step {self._hard_step()}); removing the {self.channel_ratio:.1%} of channels masked so "
            f"far now (the schedule had reached {self.applied:.3f} of {self.final_amount:.3f})."
        )
        assert self._root is not None
        ops = removal_ops(self._root, self.groups, self.keep, prefix=self.root_prefix, owner=self.state_key)
        self._hard_requested, self._hard_tensors = True, {op["tensor"] for op in ops}
        engine = self.engine
        assert engine is not None
        engine.change_structure(trainer, pl_module, ops, self.name, rebuild=False)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_capture()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_capture()
        super().teardown(trainer, pl_module, stage)

    def _remove_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _clean_optimizer_state(self, trainer: pl.Trainer) -> None:
        self.masks.clean_optimizer_state(trainer.optimizers)

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "hard_pruned": self.hard_pruned,
            "applied": self.applied,
            "last_update_step": self.last_update_step,
            "channel_ratio": self.channel_ratio,
            "macs_kept": self.macs_kept,
            "params_kept": self.params_kept,
            "removed": {k: list(v) for k, v in self.removed.items()},
            "schedule": self.step_schedule.state_dict(),
        }
        if self.hard_schedule is not None:
            state["hard_schedule"] = self.hard_schedule.state_dict()
        if not self.hard_pruned and self.groups:
            state["groups"] = [g.name for g in self.groups]
            state["keep"] = [k.clone() for k in self.keep]
            state["importance"] = self.importance.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hard_pruned = bool(state_dict.get("hard_pruned", False))
        self.applied = float(state_dict.get("applied", 0.0))
        self.last_update_step = int(state_dict.get("last_update_step", -1))
        self.channel_ratio = float(state_dict.get("channel_ratio", 0.0))
        self.macs_kept = float(state_dict.get("macs_kept", 1.0))
        self.params_kept = float(state_dict.get("params_kept", 1.0))
        self.removed = {k: list(v) for k, v in state_dict.get("removed", {}).items()}
        if "schedule" in state_dict:
            self.step_schedule.load_state_dict(state_dict["schedule"])
        if self.hard_schedule is not None and "hard_schedule" in state_dict:
            self.hard_schedule.load_state_dict(state_dict["hard_schedule"])
        self._restored = dict(state_dict) if "keep" in state_dict else None
        if self._restored is not None and self.groups:
            self._apply_restored()

    def _apply_restored(self) -> None:
        restored, self._restored = self._restored, None
        assert restored is not None
        names = [g.name for g in self.groups]
        if list(restored.get("groups", [])) != names:
            raise RuntimeError(
                f"{self.name}: the checkpoint's channel groups {restored.get('groups')} do not match this "
                f"model's {names}; resume with the same model and the same targets / exclude."
            )
        self.keep = [k.to(torch.bool).clone() for k in restored["keep"]]
        self.importance.load_state_dict(restored.get("importance", {}))
        self._refresh_stats()
