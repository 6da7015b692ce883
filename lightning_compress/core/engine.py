"""The one owner of the per-step work of every compression callback on a Trainer.

Several techniques can run on one ``Trainer`` (pruning + quantization, a regularizer + structured
pruning, ...). If each hooked the optimizer itself, the order of their weight constraints would be
the order of the ``callbacks`` list, and each would need its own once-per-step guard. Instead every
:class:`~lightning_compress.core.callback.CompressionCallback` registers with the trainer's single
:class:`CompressionEngine` (a hidden callback added to ``trainer.callbacks`` on first use):

* **constraints** (:class:`Constraint`): tensor work on a fixed list of parameters, applied by
  phase, never by registration order:

  - before ``optimizer.step()`` (gradients final, DDP-averaged, unscaled):
    :data:`OBSERVE` (read gradients, e.g. Taylor statistics) -> :data:`REGULARIZE` (add penalty
    gradients) -> :data:`MASK_GRADS` (zero the gradients of pruned entries);
  - after it: :data:`MASK` (zero pruned weights) -> :data:`CLUSTER` (project onto shared values)
    -> :data:`QUANTIZE` (snap onto a low-bit grid).

  Each constraint is bound once per optimizer to the parameters that optimizer owns (so with
  several optimizers each step touches only its own parameters) and runs as a constant number of
  fused ``torch._foreach_*`` calls: no per-layer Python loop, no host synchronisation.
* **clients** (:class:`EngineClient`): once per *training step* (a batch in which at least one
  real optimizer step happens), :meth:`EngineClient.begin_step` runs before the first optimizer
  step of the batch: the place for schedule updates and mask changes.

The engine owns the clock: :attr:`CompressionEngine.step` counts training steps, i.e. stepping
batches, the unit of ``trainer.estimated_stepping_batches``. With automatic optimization it equals
``trainer.global_step``; with manual optimization and two optimizers (a GAN) it counts batches,
where ``global_step`` counts both optimizers' steps. A step the AMP ``GradScaler`` skips (inf or
NaN gradients) advances the clock but runs no constraint and no client work, so neither statistics
nor masks ever see those gradients.

It also applies structure changes (:mod:`lightning_compress.core.surgery`) at safe points, records
them as a structure recipe in every checkpoint (``checkpoint["lightning_compress"]``) and replays
that recipe in ``setup()`` when a fit resumes, before Lightning loads the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from torch import nn
from typing_extensions import override

#: Phases, in the order the engine runs them. Before the optimizer step:
OBSERVE = "observe"
REGULARIZE = "regularize"
MASK_GRADS = "mask_grads"
#: After the optimizer step:
MASK = "mask"
CLUSTER = "cluster"
QUANTIZE = "quantize"

GRADIENT_PHASES: tuple[str, ...] = (OBSERVE, REGULARIZE, MASK_GRADS)
WEIGHT_PHASES: tuple[str, ...] = (MASK, CLUSTER, QUANTIZE)
PHASES: tuple[str, ...] = GRADIENT_PHASES + WEIGHT_PHASES

#: Key of the engine's section in a Lightning checkpoint (structure recipe, format version).
CHECKPOINT_KEY = "lightning_compress"


class Constraint:
    """Per-step tensor work on a fixed list of parameters, in one engine phase.

    Subclasses implement :meth:`bind`: given the subset of :attr:`params` that one optimizer owns
    (in :attr:`params` order), return a closure that does the work with a constant number of fused
    tensor calls. The engine calls it after every real step of that optimizer.

    Args:
        phase: One of :data:`PHASES`.
        params: The parameters the constraint acts on.
        owner: Name shown in errors (usually the callback's class name).
    """

    def __init__(self, phase: str, params: Sequence[nn.Parameter], owner: str = "constraint") -> None:
        if phase not in PHASES:
            raise ValueError(f"`phase`={phase!r} is not supported; expected one of {list(PHASES)}.")
        self.phase = phase
        self.params = list(params)
        self.owner = owner

    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        """Return the step closure for ``params`` (a subset of :attr:`params`), or ``None`` for no work."""
        raise NotImplementedError

    def verify(self) -> None:
        """Raise if a parameter was replaced behind the constraint's back (cheap; called once per step)."""


class FunctionConstraint(Constraint):
    """A constraint from a plain function ``fn(params)`` (handy for custom techniques and tests).

    Args:
        phase: One of :data:`PHASES`.
        params: The parameters the constraint acts on.
        fn: Called with the list of parameters one optimizer owns, under ``torch.no_grad()``.
        owner: Name shown in errors.

    Example:
        >>> snap = FunctionConstraint(QUANTIZE, model.parameters(),
        ...     lambda ps: [p.copy_(p.mul(16).round().div(16)) for p in ps])  # doctest: +SKIP
    """

    def __init__(
        self,
        phase: str,
        params: Sequence[nn.Parameter],
        fn: Callable[[list[nn.Parameter]], Any],
        owner: str = "constraint",
    ) -> None:
        super().__init__(phase, list(params), owner)
        self.fn = fn

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        subset = list(params)

        @torch.no_grad()
        def run() -> None:
            self.fn(subset)

        return run


@runtime_checkable
class EngineClient(Protocol):
    """What a compression callback offers the engine (all optional but ``constraints``)."""

    def constraints(self) -> list[Constraint]:
        """The constraints to apply every step (re-read whenever the engine rebinds)."""
        ...

    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Once per training step, before its first real optimizer step."""
        ...

    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        """Parameters were sliced or replaced (:class:`~.surgery.StructureChange` events)."""
        ...


def flushing_denormals() -> bool:
    """True when this thread already flushes denormal floats to zero (x86 FTZ/DAZ)."""
    return bool((torch.tensor([1e-39]) * 1.0).item() == 0.0)


def _param_signature(optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """A cheap fingerprint of what ``optimizer`` owns: (param_groups list, number of groups, of params).

    Checked before every optimizer step, so O(#groups) and no per-parameter work. It changes when a
    group is added (``add_param_group``) or the group list is replaced (``optimizer.param_groups =
    ...``, as BaseFinetuning does when it restores its groups on resume, or ``load_state_dict``).
    """
    groups = optimizer.param_groups
    return id(groups), len(groups), sum(len(g["params"]) for g in groups)


def _scaler_skips(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """True when the AMP GradScaler found inf/NaN gradients for ``optimizer`` (the step will be skipped).

    Lightning unscales before ``on_before_optimizer_step``, so the scaler already knows; reading its
    flag synchronises with the device, but only under fp16 AMP, where ``scaler.step`` synchronises on
    the same flag anyway.
    """
    if scaler is None or not scaler.is_enabled():
        return False
    state = scaler._per_optimizer_states.get(id(optimizer))
    if not state or not state.get("found_inf_per_device"):
        return False
    return any(bool(v.item()) for v in state["found_inf_per_device"].values())


class CompressionEngine(pl.Callback):
    """Runs the per-step work of every compression callback of one Trainer (see the module docstring).

    Not created by users: :func:`get_engine` adds one to ``trainer.callbacks`` the first time a
    compression callback asks for it, and every compression callback registers with it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[Any] = []
        #: Training steps begun so far (checkpointed); the current step is ``clock - 1`` inside a batch.
        self.clock = 0
        #: The current training step (index of the stepping batch being run).
        self.step = 0
        self._stepped_this_batch = False
        self._skip_this_batch = False
        self._grad_fns: dict[int, list[Callable[[], None]]] = {}
        self._weight_fns: dict[int, list[Callable[[], None]]] = {}
        self._n_observe: dict[int, int] = {}
        #: Per optimizer: :func:`_param_signature` at bind time (see ``on_before_optimizer_step``).
        self._signatures: dict[int, tuple[int, int, int]] = {}
        self._pl_module: nn.Module | None = None
        #: The optimizer whose step is in progress (inside ``begin_step`` and gradient transforms).
        self.current_optimizer: torch.optim.Optimizer | None = None
        self._constraints: list[Constraint] = []
        self._handles: list[Any] = []
        self._toggle_ftz = False
        self._bound = False
        self._pending: list[tuple[list[dict[str, Any]], str, bool]] = []
        self._fit_global_step0 = 0
        self._fit_batches = 0
        self._scaler: Any = None
        self._begin_fns: list[Callable[..., None]] = []
        self._length_measured = True

    @property
    @override
    def state_key(self) -> str:
        return "CompressionEngine"

    # ------------------------------------------------------------------ registration
    def register(self, client: Any) -> None:
        """Add a client (idempotent); its constraints are bound at the next (re)bind."""
        if client not in self.clients:
            self.clients.append(client)
        self._bound = False

    def unregister(self, client: Any) -> None:
        """Remove a client and its constraints."""
        if client in self.clients:
            self.clients.remove(client)
        self._bound = False

    def invalidate(self) -> None:
        """Clients' constraints changed: rebind before the next optimizer step."""
        self._bound = False

    def rebind(self, trainer: pl.Trainer) -> None:
        """Re-read every client's constraints and bind them to the trainer's current optimizers.

        Called lazily before the first optimizer step of a fit, after structure changes, whenever a
        client's parameter list changed, and when an optimizer's param groups changed since the last
        bind (a group added mid-training, e.g. by ``BackboneFinetuning``). Also (re-)registers the
        ``optimizer.step`` post-hooks.
        """
        self._remove_hooks()
        constraints = [c for client in self.clients for c in client.constraints()]
        self._begin_fns = [f for f in (getattr(c, "begin_step", None) for c in self.clients) if f is not None]
        order = {phase: i for i, phase in enumerate(PHASES)}
        # Stable sort: within a phase, registration order (constraints of one phase commute).
        constraints.sort(key=lambda c: order[c.phase])
        self._constraints = constraints
        self._grad_fns, self._weight_fns, self._n_observe = {}, {}, {}
        self._signatures = {}
        for opt in trainer.optimizers:
            self._signatures[id(opt)] = _param_signature(opt)
            owned = {id(p) for group in opt.param_groups for p in group["params"]}
            grad_fns, weight_fns, n_observe = [], [], 0
            for c in constraints:
                subset = [p for p in c.params if id(p) in owned]
                fn = c.bind(subset) if subset else None
                if fn is not None:
                    (grad_fns if c.phase in GRADIENT_PHASES else weight_fns).append(fn)
                    n_observe += c.phase == OBSERVE
            self._grad_fns[id(opt)] = grad_fns
            self._n_observe[id(opt)] = n_observe
            self._weight_fns[id(opt)] = weight_fns
            self._handles.append(opt.register_step_post_hook(self._post_step))
        self._bound = True

    # ------------------------------------------------------------------ Lightning hooks
    @property
    def recipe(self) -> list[dict[str, Any]]:
        """Structure recipe: every structure op applied to the LightningModule so far, in order.

        It lives on the module itself (:func:`~lightning_compress.core.surgery.applied_recipe`), so a
        second ``Trainer`` or a later ``trainer.test`` sees the changes an earlier fit made.
        """
        from lightning_compress.core.surgery import applied_recipe

        return [] if self._pl_module is None else applied_recipe(self._pl_module)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pl_module = pl_module
        from lightning_compress.core.surgery import pending_checkpoint_path, reconcile_recipe

        path = pending_checkpoint_path(trainer)
        if path is not None:
            # Before Lightning loads the weights: give the module the checkpoint's structure (a resumed
            # fit, or validate / test / predict with ckpt_path). Idempotent: setup may run twice.
            reconcile_recipe(pl_module, path)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._toggle_ftz = (
            any(getattr(c, "flush_denormal", False) for c in self.clients)
            and pl_module.device.type == "cpu"
            and not flushing_denormals()
        )
        # Bound lazily at the first optimizer step: the clients bind their own state in their
        # on_train_start, which Lightning may call after this one.
        self.invalidate()
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.clock == 0 and trainer.global_step > 0 and pl_module.automatic_optimization:
            # Resumed from a checkpoint without engine state (written before the engine existed):
            # with automatic optimization the training step is the global step.
            self.clock = trainer.global_step
        self._fit_global_step0 = trainer.global_step
        self._fit_batches = 0
        self._length_measured = pl_module.automatic_optimization

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._stepped_this_batch = False
        self._skip_this_batch = False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        first = not self._stepped_this_batch
        if first:
            self._stepped_this_batch = True
            self.step = self.clock
            self.clock += 1
            self._skip_this_batch = False
        if self._scaler is not None and _scaler_skips(self._scaler, optimizer):
            # The scaler will not step: no statistics, no mask update from these gradients. The
            # clock still advances (training time passes); work due now happens at the next real step.
            self._stepped_this_batch = first or self._stepped_this_batch
            if first:
                self._skip_this_batch = True
            return
        if self._skip_this_batch:  # the batch's first optimizer was skipped: this one does the batch work
            self._skip_this_batch = False
            first = True
        if not self._bound:
            self.rebind(trainer)
        fns = self._grad_fns.get(id(optimizer))
        if fns is None or self._signatures.get(id(optimizer)) != _param_signature(optimizer):
            # An optimizer built behind our back (e.g. by the user), or one whose param groups changed
            # since the bind: Lightning's BackboneFinetuning (BaseFinetuning.unfreeze_and_add_param_group)
            # adds the unfrozen backbone as a new group at an epoch start. The closures bound before
            # would skip the new parameters, so their pruned weights would revive: bind again now.
            self.rebind(trainer)
            fns = self._grad_fns.get(id(optimizer), [])
        self.current_optimizer = optimizer
        with torch.no_grad():
            if first:
                for c in self._constraints:
                    c.verify()
                # Observers of this optimizer first (their statistics include this step), then the
                # once-per-step client work (schedules, mask updates), then the gradient transforms.
                n_obs = self._n_observe.get(id(optimizer), 0)
                for fn in fns[:n_obs]:
                    fn()
                for begin in self._begin_fns:
                    begin(trainer, pl_module, self.step)
                if not self._bound:  # a client changed its parameter list
                    self.rebind(trainer)
                    fns = self._grad_fns.get(id(optimizer), [])
                    n_obs = self._n_observe.get(id(optimizer), 0)
                for fn in fns[n_obs:]:
                    fn()
            else:  # a second optimizer in the same training step (manual optimization)
                for fn in fns:
                    fn()
        if self._toggle_ftz:  # gradient clipping and the optimizer step run with FTZ/DAZ on
            torch.set_flush_denormal(True)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.current_optimizer = None
        if self._toggle_ftz:
            torch.set_flush_denormal(False)
        fns = self._weight_fns.get(id(optimizer))
        if fns:
            with torch.no_grad():
                for fn in fns:
                    fn()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._fit_batches += 1
        if not self._length_measured and self._stepped_this_batch and not self._skip_this_batch:
            self._length_measured = True
            total = self._measured_length(trainer)
            if total is not None:
                for client in self.clients:
                    handler = getattr(client, "on_training_length", None)
                    if handler is not None:
                        handler(trainer, pl_module, total)
        if self._pending:
            pending, self._pending = self._pending, []
            for ops, owner, carry_state in pending:
                self.change_structure(trainer, pl_module, ops, owner, carry_state=carry_state)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _measured_length(self, trainer: pl.Trainer) -> int | None:
        """Training steps of this run under manual optimization, from its first stepping batch.

        Lightning's ``estimated_stepping_batches`` counts batches (manual optimization ignores
        ``accumulate_grad_batches``) capped by ``max_steps``, which counts *optimizer* steps. A
        training step here is a batch with at least one optimizer step, so after the first one the
        engine knows how many batches make a step (``b``, manual accumulation) and how many
        optimizer steps a training step takes (``k``, several optimizers) and rescales, assuming the
        pattern repeats. ``None`` when the length is unknown.
        """
        import math

        k = max(trainer.global_step - self._fit_global_step0, 1)
        b = max(self._fit_batches, 1)
        candidates = []
        epochs = trainer.max_epochs
        per_epoch = trainer.num_training_batches
        if epochs is not None and epochs >= 0 and math.isfinite(per_epoch):
            candidates.append(int(per_epoch * epochs) // b)
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            candidates.append(-(-(trainer.max_steps - self._fit_global_step0) // k) + self.clock - 1)
        return min(candidates) if candidates else None

    def _remove_hooks(self) -> None:
        if self._toggle_ftz:
            torch.set_flush_denormal(False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._bound = False

    # ------------------------------------------------------------------ structure changes
    def request_structure_change(
        self, ops: list[dict[str, Any]], owner: str, carry_state: bool = True
    ) -> None:
        """Queue structure-changing ops; they are applied at the end of the current batch.

        Use this from hooks that run inside ``optimizer.step()`` (``begin_step``): rebuilding the
        optimizer there would pull it out from under the step in progress.
        """
        from lightning_compress.core.surgery import validate_ops

        if self._pl_module is None:
            raise RuntimeError("request_structure_change() needs a running fit.")
        validate_ops(self._pl_module, with_dependent_ops(self._pl_module, ops))
        self._pending.append((ops, owner, carry_state))

    def change_structure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        ops: list[dict[str, Any]],
        owner: str,
        carry_state: bool = True,
        rebuild: bool = True,
    ) -> list[Any]:
        """Apply structure-changing ops now (between steps) and tell every client.

        Validates every op first (nothing is half-applied), slices or replaces the modules, rebuilds
        the optimizers and LR schedulers carrying their state over, re-wraps DDP, records the ops in
        the structure recipe and publishes the :class:`~lightning_compress.core.surgery.StructureChange`
        events. Returns the events.

        Args:
            trainer: The running trainer.
            pl_module: The LightningModule (op names are relative to it).
            ops: Structure ops (see :mod:`lightning_compress.core.surgery`).
            owner: Name of the technique, for messages.
            carry_state: Carry optimizer state (momentum, Adam moments) over to the surviving entries;
                ``False`` starts the rebuilt optimizers from empty state (for comparisons).
            rebuild: Rebuild optimizers and schedulers at all (``False`` after training, e.g. layer
                fusion at fit end).
        """
        from lightning_compress.core.surgery import apply_ops, rebuild_training_state, snapshot_training_state

        ops = with_dependent_ops(pl_module, ops)
        snapshot = snapshot_training_state(trainer, pl_module) if rebuild else None
        changes = apply_ops(pl_module, ops)
        if snapshot is not None:
            if not carry_state:
                snapshot.opt_states = [{} for _ in snapshot.opt_states]
            rebuild_training_state(trainer, pl_module, snapshot, changes)
        for client in self.clients:
            handler = getattr(client, "on_structure_change", None)
            if handler is not None:
                handler(pl_module, changes)
        if self._handles or self._bound:
            self.rebind(trainer)
        return changes

    # ------------------------------------------------------------------ checkpointing
    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for c in self._constraints:
            c.verify()
        from lightning_compress.core.surgery import applied_recipe

        recipe = applied_recipe(pl_module)
        checkpoint[CHECKPOINT_KEY] = {"version": 1, "recipe": [dict(op) for op in recipe]}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clock = int(state_dict.get("clock", 0))
        self.step = max(self.clock - 1, 0)


def with_dependent_ops(pl_module: nn.Module, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``ops`` plus the ops the LightningModule adds for tensors outside the compression root.

    A wrapper whose own layers read the root's outputs (the hint adapters of a distillation wrapper
    read the student's feature maps) defines ``dependent_structure_ops(ops) -> list[dict]``: e.g. a
    slice of the adapter's input channels for every slice of the student layer's output channels.
    The extra ops go through the same validation, optimizer carry-over and structure recipe.
    """
    extend = getattr(pl_module, "dependent_structure_ops", None)
    if not callable(extend):
        return list(ops)
    return [*ops, *extend(list(ops))]


def get_engine(trainer: pl.Trainer) -> CompressionEngine:
    """The trainer's :class:`CompressionEngine`, added to ``trainer.callbacks`` on first use."""
    for cb in trainer.callbacks:
        if isinstance(cb, CompressionEngine):
            return cb
    engine = CompressionEngine()
    # First, so its hooks run before user callbacks look at gradients or weights. A new list, not an
    # insertion: this runs inside Lightning's loop over trainer.callbacks (setup), which keeps
    # iterating the old list; inserting into it would make that loop visit a callback twice.
    trainer.callbacks = [engine, *trainer.callbacks]
    return engine


__all__ = [
    "CHECKPOINT_KEY",
    "CLUSTER",
    "GRADIENT_PHASES",
    "MASK",
    "MASK_GRADS",
    "OBSERVE",
    "PHASES",
    "QUANTIZE",
    "REGULARIZE",
    "WEIGHT_PHASES",
    "CompressionEngine",
    "Constraint",
    "EngineClient",
    "FunctionConstraint",
    "flushing_denormals",
    "get_engine",
    "with_dependent_ops",
]
