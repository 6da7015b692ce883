"""Sparsity-inducing regularization as a gradient transform: L1 and group lasso.

References:
    * Tibshirani, 1996, "Regression shrinkage and selection via the lasso" (L1).
    * Yuan & Lin, 2006, "Model selection and estimation in regression with grouped variables"
      (group lasso, groups weighted by the square root of their size).
    * Wen et al., 2016, "Learning structured sparsity in deep neural networks" (SSL: group lasso
      over filters and channels of CNNs).
    * Alvarez & Salzmann, 2016, "Learning the number of neurons in deep networks" (group lasso
      over neurons, combined with L1 as the sparse group lasso).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.callback import CompressionCallback
from lightning_compress.core.engine import REGULARIZE, Constraint
from lightning_compress.core.params import TargetParam, select_parameters
from lightning_compress.core.schedules import SCHEDULES, StepSchedule, sparsity_at
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number

GROUPS: tuple[str, ...] = ("output", "input", "both")

ScheduleName = Literal["constant", "linear", "cubic", "exponential", "polynomial"]
GroupsName = Literal["output", "input", "both"]

#: The ``"exponential"`` ramp: ``(1 - r^p) / (1 - r)`` with this ``r`` (the strength covers 90% of
#: its range in the first third of the ramp; ``sparsity_at``'s exponential with a final value of 1
#: would be a step at ``start``).
_EXP_RATIO = 1e-3


class _Strength:
    """The current, already scheduled, coefficients: Python floats the per-step closures read.

    Updated once per training step in :meth:`SparsityRegularizer.begin_step`; reading a float costs
    no device synchronisation.
    """

    __slots__ = ("group_lasso", "l1", "multiplier")

    def __init__(self) -> None:
        self.multiplier = 0.0
        self.l1 = 0.0
        self.group_lasso = 0.0


def group_dims(weight: Tensor, groups: str) -> list[tuple[tuple[int, ...], int]]:
    """The reduction dimensions and group size of each grouping of ``weight`` (``groups`` in :data:`GROUPS`).

    ``"output"``: one group per index of dim 0 (a neuron / filter), norms over every other dim;
    ``"input"``: one group per index of dim 1 (an input feature / channel); ``"both"``: both lists.
    """
    out: list[tuple[tuple[int, ...], int]] = []
    for dim in (0,) if groups == "output" else (1,) if groups == "input" else (0, 1):
        dims = tuple(d for d in range(weight.dim()) if d != dim)
        out.append((dims, weight.numel() // max(weight.shape[dim], 1)))
    return out


def group_norms(weight: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``||w_g||_2`` of every group of ``weight``, reducing over ``dims`` (kept, size 1, to broadcast).

    A reduction whose dims include 0 (input groups: the reduced elements are strided through memory)
    runs as square -> sum -> sqrt, ~7x faster on CPU than ``torch.linalg.vector_norm`` there; groups
    over trailing dims (output groups, contiguous rows) use ``vector_norm`` directly.
    """
    if 0 in dims:
        return weight.square().sum(dims, keepdim=True).sqrt_()
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


class _PenaltyConstraint(Constraint):
    """REGULARIZE-phase constraint: adds the scheduled penalty gradients to ``p.grad``.

    Per step, for the parameters one optimizer owns: L1 is two fused calls (``_foreach_sign``,
    ``_foreach_add_`` with ``alpha``); group lasso is one group-norm reduction per parameter and
    grouping (:func:`group_norms`, in a Python loop over layers: the norms reduce over different
    dimensions of tensors of different shapes, which no ``_foreach`` kernel does) followed by three
    fused calls
    (``_foreach_clamp_min_``, ``_foreach_reciprocal_``, ``_foreach_addcmul_``). Parameters without
    a gradient in a step (unused by the forward, frozen) are skipped, exactly as the optimizer skips
    them.
    """

    def __init__(self, reg: SparsityRegularizer, params: Sequence[nn.Parameter]) -> None:
        super().__init__(REGULARIZE, params, reg.name)
        self.reg = reg
        self._slots = list(reg._slots)

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        plist = list(params)
        if not plist:
            return None
        strength = self.reg._strength
        eps = self.reg.eps
        use_l1 = self.reg.l1 > 0
        # Group-lasso terms, flattened: (index into plist, reduction dims, group coefficient).
        terms: list[tuple[int, tuple[int, ...], float]] = []
        if self.reg.group_lasso > 0:
            for i, p in enumerate(plist):
                for dims, size in group_dims(p, self.reg.groups):
                    terms.append((i, dims, math.sqrt(size) if self.reg.scale_by_size else 1.0))
        cache: dict[str, Any] = {"gl": None, "scalars": []}

        def scalars(gl: float) -> list[float]:
            if cache["gl"] != gl:  # the strength changes at most once per step
                cache["gl"], cache["scalars"] = gl, [gl * c for _, _, c in terms]
            return cache["scalars"]

        def run() -> None:
            l1, gl = strength.l1, strength.group_lasso
            if l1 == 0.0 and gl == 0.0:  # before `start`: nothing to add
                return
            grads = [p.grad for p in plist]
            complete = all(g is not None for g in grads)
            if use_l1 and l1 != 0.0:
                if complete:
                    torch._foreach_add_(grads, torch._foreach_sign(plist), alpha=l1)
                else:
                    live = [i for i, g in enumerate(grads) if g is not None]
                    if live:
                        signs = torch._foreach_sign([plist[i] for i in live])
                        torch._foreach_add_([grads[i] for i in live], signs, alpha=l1)
            if terms and gl != 0.0:
                todo = terms if complete else [t for t in terms if grads[t[0]] is not None]
                if not todo:
                    return
                coef = scalars(gl) if complete else [gl * c for _, _, c in todo]
                weights = [plist[i] for i, _, _ in todo]
                # ||w_g|| per group, broadcastable against the weight (keepdim).
                inv = [group_norms(w, d) for w, (_, d, _) in zip(weights, todo)]
                torch._foreach_clamp_min_(inv, eps)
                torch._foreach_reciprocal_(inv)
                # grad += gl * c_g * w / max(||w_g||, eps)
                torch._foreach_addcmul_([grads[i] for i, _, _ in todo], weights, inv, coef)

        return run

    @override
    def verify(self) -> None:
        for name, module, attr, param in self._slots:
            if module._parameters.get(attr) is not param:
                raise RuntimeError(
                    f"{self.owner}: parameter {name!r} was replaced by a new object after the regularizer "
                    "bound it, so its penalty would act on a stale tensor. Change model structure through "
                    "lightning_compress.core.surgery (CompressionEngine.change_structure)."
                )


class SparsityRegularizer(CompressionCallback):
    r"""Add sparsity-inducing penalties (L1, group lasso) to the gradients, for any optimizer.

    The penalty

    .. math::

        R_t(W) = \lambda_{1,t} \sum_l \lVert W_l \rVert_1
            + \lambda_{g,t} \sum_l \sum_{g \in \mathcal{G}(W_l)} c_g \lVert w_g \rVert_2,
        \qquad c_g = \sqrt{|g|} \text{ (or 1 with scale\_by\_size=False)}

    (``G(W)`` the groups of ``W``, see below; for ``groups="both"`` its output and its input groups)
    is not added to the loss: its (sub)gradient is added to the weights' gradients by the trainer's
    compression engine in its ``regularize`` phase, after the gradients are final (accumulated,
    DDP-averaged, AMP-unscaled, AMP-skipped steps excluded) and before ``optimizer.step()``. That
    makes it work unchanged with every optimizer (SGD, AdamW, ...), several optimizers (manual
    optimization), gradient accumulation (added once per optimizer step, exactly what a penalty in
    the loss gives once the accumulated losses are averaged) and AMP (one exception: with fp16 AMP
    and an optimizer that unscales inside its own step, ``fused=True`` Adam / AdamW / SGD,
    Lightning hands over still-scaled gradients, so the penalty acts divided by the loss scale;
    use the default, non-fused optimizers or bf16), and lets it compose with
    :class:`~lightning_compress.pruning.gradual.GradualPruning`, whose ``mask_grads`` phase runs
    after it and zeroes the gradients of pruned entries. Gradients added:

    * L1 (lasso; Tibshirani, 1996): ``grad += l1_t * sign(w)`` (subgradient 0 at ``w = 0``);
    * group lasso (Yuan & Lin, 2006; over filters/channels as in Wen et al., 2016, "Learning
      structured sparsity in deep neural networks"; over neurons as in Alvarez & Salzmann, 2016,
      "Learning the number of neurons in deep networks"):
      ``grad_g += group_lasso_t * c_g * w_g / max(||w_g||_2, eps)`` with ``c_g = sqrt(|g|)``
      (``scale_by_size=True``, Yuan & Lin's weighting, so large groups are not favoured) or 1.

    Groups of a weight ``W`` (``nn.Linear``: ``(out, in)``; ``nn.ConvNd``: ``(out, in / groups, *k)``):
    ``"output"``: rows ``W.view(out, -1)``, one per neuron / filter (whole rows going to zero can
    then be removed physically); ``"input"``: slices ``W[:, j]``, one per input feature / channel
    (for grouped convolutions, one per channel position within a group); ``"both"``: the sum of the
    two penalties. Using ``l1`` and ``group_lasso`` together gives the sparse group lasso.

    Subgradient steps drive weights *towards* zero but rarely to exactly zero: pair the regularizer
    with a pruning callback (e.g. ``GradualPruning``, or a structured pruning that removes near-zero
    rows) to collect the sparsity.

    Which weights: the ``weight`` of Linear and Conv1d/2d/3d layers and the input projection of
    ``nn.MultiheadAttention`` selected by ``targets`` / ``exclude`` (with ``include_embeddings=True``
    also ``nn.Embedding`` tables). Biases and normalisation parameters are never regularized.

    Strength schedule: the coefficients are ``l1_t = l1 * m_t`` and ``group_lasso_t = group_lasso * m_t``
    with a multiplier ``m_t`` from 0 at ``start`` to 1 at ``end`` along ``schedule``
    (``"constant"``: 0 before ``start``, 1 from it on; ``"linear"``, ``"cubic"`` (``1 - (1 - p)^3``),
    ``"polynomial"`` (exponent ``power``), ``"exponential"`` (``(1 - r^p) / (1 - r)``, ``r = 1e-3``)),
    updated every ``frequency`` steps (held in between) and computed once per training step on the
    host: the per-step work never synchronises with the device.

    Cost per optimizer step: L1 is two fused ``torch._foreach_*`` calls over all regularized
    weights; group lasso is one group-norm reduction per layer and grouping (a per-layer loop: the
    group norms of tensors of different shapes cannot be fused) plus three fused calls. Measured on
    LeNet-300-100 (CPU, one thread, batch 64): L1 ~5% of a training step, group lasso ~5%
    (``"output"``) to ~12% (``"both"``). Before ``start`` nothing runs.

    Logging: on the steps where Lightning writes logs (``global_step % log_every_n_steps == 0``) it
    logs the current value of the penalty (with the scheduled coefficients) as
    ``regularizer/penalty``, its terms ``regularizer/l1`` and ``regularizer/group_lasso`` (each when
    its coefficient is set) and ``regularizer/multiplier``; the penalty is computed only then.

    Args:
        l1: Coefficient of the L1 penalty (>= 0).
        group_lasso: Coefficient of the group-lasso penalty (>= 0). At least one of ``l1`` and
            ``group_lasso`` must be > 0.
        groups: ``"output"``, ``"input"`` or ``"both"`` (see above).
        schedule: ``"constant"``, ``"linear"``, ``"cubic"``, ``"exponential"`` or ``"polynomial"``.
        start: Step (int) or fraction of training (float) at which the penalty starts.
        end: Step (int) or fraction (float) at which the full strength is reached; required by every
            schedule but ``"constant"`` (which ignores it).
        frequency: Training steps between updates of the multiplier.
        targets: fnmatch patterns over module names (default all supported layers).
        exclude: fnmatch patterns to leave unregularized (e.g. the classifier, ``["fc3"]``).
        scale_by_size: Weight each group by ``sqrt(|g|)`` (Yuan & Lin) instead of 1.
        eps: Floor of the group norm in the gradient ``w_g / max(||w_g||, eps)`` (> 0): a group
            that reached zero gets a zero (sub)gradient instead of a division by zero.
        power: Exponent of the ``"polynomial"`` schedule.
        include_embeddings: Also regularize ``nn.Embedding`` tables (opt-in).
        flush_denormal: On CPU, flush denormals on the main thread during each optimizer step.

    Example:
        >>> # Structured sparsity (SSL): filters / neurons whose whole row goes to zero, ramped in
        >>> # over the first half of training, then pruned away.
        >>> reg = SparsityRegularizer(group_lasso=1e-4, groups="output", schedule="linear", end=0.5)
        >>> trainer = pl.Trainer(callbacks=[reg, GradualPruning(0.5)])  # doctest: +SKIP
    """

    def __init__(
        self,
        l1: float = 0.0,
        group_lasso: float = 0.0,
        groups: GroupsName = "output",
        schedule: ScheduleName = "constant",
        start: int | float = 0,
        end: int | float | None = None,
        frequency: int = 1,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        scale_by_size: bool = True,
        eps: float = 1e-8,
        power: float = 3.0,
        include_embeddings: bool = False,
        flush_denormal: bool = True,
    ) -> None:
        super().__init__(targets=targets, exclude=exclude, flush_denormal=flush_denormal)
        self.l1 = check_number("l1", l1, 0.0, math.inf, high_open=True)
        self.group_lasso = check_number("group_lasso", group_lasso, 0.0, math.inf, high_open=True)
        if self.l1 == 0.0 and self.group_lasso == 0.0:
            raise ValueError(
                f"`l1`={l1!r} and `group_lasso`={group_lasso!r} are both 0, so there is no penalty; "
                "expected at least one of them > 0 (l1 for unstructured sparsity, group_lasso for "
                "whole rows / channels)."
            )
        self.groups = check_choice("groups", groups, GROUPS)
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        if schedule != "constant" and end is None:
            raise ValueError(
                f"`end`=None is not supported with `schedule`={schedule!r}; expected an int step or a "
                "float fraction of training at which the full strength is reached (or schedule='constant')."
            )
        self.step_schedule = StepSchedule(start, end, check_int("frequency", frequency, minimum=1))
        if schedule == "constant" and end is not None:
            raise ValueError(
                f"`end`={end!r} has no effect with `schedule`='constant' (full strength from `start`); "
                "expected end=None, or a ramping schedule such as 'linear'."
            )
        self.start, self.end, self.frequency = start, end, frequency
        self.scale_by_size = check_bool("scale_by_size", scale_by_size)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        self.power = check_number("power", power, low=0.0, low_open=True)
        self.include_embeddings = check_bool("include_embeddings", include_embeddings)

        self.target_params: list[TargetParam] = []
        self.param_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._slots: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        self._strength = _Strength()

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {
            **super()._state_key_args(),
            "l1": self.l1,
            "group_lasso": self.group_lasso,
            "groups": self.groups,
        }

    @override
    def schedules(self) -> list[StepSchedule]:
        return [self.step_schedule]

    # ------------------------------------------------------------------ schedule
    @property
    def multiplier_value(self) -> float:
        """The multiplier ``m_t`` in effect (set at the last training step begun)."""
        return self._strength.multiplier

    def multiplier(self, step: int) -> float:
        """The strength multiplier ``m_t`` in [0, 1] at training ``step``. Override to customize.

        Piecewise constant: the schedule's value at the last update step ``start + k * frequency``
        (or ``end``) at or before ``step``; 0 before ``start``, 1 from ``end`` on.
        """
        sched = self.step_schedule
        if sched.start_step is None:
            return 0.0
        start = sched.start_step
        end = start if sched.end_step is None else sched.end_step
        if step < start:
            return 0.0
        if self.schedule == "constant" or step >= end:
            return 1.0
        at = start + (step - start) // (sched.frequency or 1) * (sched.frequency or 1)
        final = 1.0 - _EXP_RATIO if self.schedule == "exponential" else 1.0
        value = sparsity_at(
            at, schedule=self.schedule, start=start, end=end, final=final, initial=0.0, power=self.power
        )
        return min(max(value / final, 0.0), 1.0)

    def _set_step(self, step: int) -> None:
        m = float(self.multiplier(step))
        s = self._strength
        s.multiplier, s.l1, s.group_lasso = m, self.l1 * m, self.group_lasso * m

    # ------------------------------------------------------------------ setup
    @override
    def select_targets(self, root: nn.Module) -> list[str]:
        self.target_params = select_parameters(
            root, self.targets, self.exclude, self.include_embeddings, owner=self.name
        )
        self.param_names = [t.param for t in self.target_params]
        return list(dict.fromkeys(t.module for t in self.target_params))

    def _bind(self, root: nn.Module) -> None:
        slots = []
        for name in self.param_names:
            module_name, _, attr = name.rpartition(".")
            module = root.get_submodule(module_name) if module_name else root
            slots.append((name, module, attr, module._parameters[attr]))
        self._slots = slots
        self._params = [s[3] for s in slots]

    @override
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind(self.root(pl_module))
        self._set_step(self.engine.clock if self.engine is not None else trainer.global_step)

    @override
    def schedules_changed(self) -> None:
        self._set_step(self.engine.clock if self.engine is not None else 0)

    @override
    def constraints(self) -> list[Constraint]:
        return [_PenaltyConstraint(self, self._params)] if self._params else []

    @override
    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        # Follow renames and removals; sliced parameters are new objects: re-fetch them all.
        renamed = {c.old_name: c.new_name for c in changes}
        prefix = self.root_prefix
        kept: list[TargetParam] = []
        for t in self.target_params:
            full = prefix + t.param
            new = renamed.get(full, full)
            if new is None or not new.startswith(prefix):
                continue
            rel = new[len(prefix) :]
            kept.append(t if rel == t.param else _renamed(t, rel))
        self.target_params = kept
        self.param_names = [t.param for t in kept]
        self._bind(self.root(pl_module))
        if self.engine is not None:
            self.engine.invalidate()

    # ------------------------------------------------------------------ per step
    @override
    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._set_step(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Aligned with Lightning's own log_every_n_steps: computed only when it is written.
        if self._params and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            values = self.penalty()
            for key, value in values.items():
                pl_module.log(f"regularizer/{key}", value, on_step=True, on_epoch=False)
            pl_module.log("regularizer/multiplier", self._strength.multiplier, on_step=True, on_epoch=False)

    @torch.no_grad()
    def penalty(self) -> dict[str, Tensor]:
        """The current penalty with the scheduled coefficients (tensors on the weights' device).

        Returns:
            ``{"penalty": total}`` plus ``"l1"`` (``l1_t * sum |w|``) when ``l1 > 0`` and
            ``"group_lasso"`` (``group_lasso_t * sum_g c_g ||w_g||``) when ``group_lasso > 0``.
        """
        s = self._strength
        out: dict[str, Tensor] = {}
        if not self._params:
            return out
        if self.l1 > 0:
            norms = torch._foreach_norm([p.detach() for p in self._params], 1)
            out["l1"] = torch.stack([n.float() for n in norms]).sum() * s.l1
        if self.group_lasso > 0:
            total = torch.zeros((), device=self._params[0].device)
            for p in self._params:
                for dims, size in group_dims(p, self.groups):
                    c = math.sqrt(size) if self.scale_by_size else 1.0
                    total = total + group_norms(p.detach().float(), dims).sum() * c
            out["group_lasso"] = total * s.group_lasso
        out["penalty"] = sum(out.values())  # type: ignore[assignment]
        return out

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.step_schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "schedule" in state_dict:
            self.step_schedule.load_state_dict(state_dict["schedule"])


def _renamed(target: TargetParam, new_param: str) -> TargetParam:
    from dataclasses import replace

    return replace(target, param=new_param, module=new_param.rpartition(".")[0])


__all__ = ["GROUPS", "SparsityRegularizer", "group_dims", "group_norms"]
