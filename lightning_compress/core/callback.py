"""The lifecycle every compression callback shares.

A :class:`CompressionCallback` does not hook the optimizer itself: in ``setup()`` it registers with
the trainer's one :class:`~lightning_compress.core.engine.CompressionEngine`, which runs

* :meth:`CompressionCallback.begin_step` once per training step (gradients final, weights not yet
  updated; gradient accumulation, several optimizers and AMP-skipped steps handled by the engine),
* every :class:`~lightning_compress.core.engine.Constraint` returned by
  :meth:`CompressionCallback.constraints`, by phase (gradient transforms before the step, weight
  constraints after it), whatever the order of the callbacks,

and calls :meth:`CompressionCallback.on_structure_change` when a technique changes shapes.

The base class also refuses strategies whose sharding would make a technique silently wrong, gives
each instance a checkpoint key derived from its arguments, resolves the *compression root* (the
LightningModule, or the module it names in ``compression_root``, e.g. a distillation wrapper's
student) and its ``StepSchedule`` objects.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_debug
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only
from typing_extensions import override

from lightning_compress.core.engine import CompressionEngine, Constraint, flushing_denormals, get_engine
from lightning_compress.core.schedules import StepSchedule
from lightning_compress.core.targets import PRUNABLE_TYPES, select_modules, validate_patterns
from lightning_compress.core.validation import check_bool

#: Strategies under which every technique is known to be correct. Everything else (FSDP, DeepSpeed,
#: model parallel) shards parameters, so per-parameter masks would see only a shard: refused.
SUPPORTED_STRATEGIES: tuple[type, ...] = (SingleDeviceStrategy, DDPStrategy)
#: Subclasses of a supported strategy that shard nonetheless (DeepSpeedStrategy derives from DDPStrategy).
REFUSED_STRATEGIES: tuple[type, ...] = (DeepSpeedStrategy,)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def compression_root(pl_module: nn.Module) -> tuple[nn.Module, str]:
    """The module compression acts on, and its name prefix inside ``pl_module``.

    A LightningModule that wraps other networks (a distillation wrapper holding a student and a
    teacher) declares the one to compress with a ``compression_root`` attribute or property
    returning that submodule; targets, masks, logs and callback state then use the student's own
    names, and teacher layers can never be selected. Default: ``pl_module`` itself, prefix ``""``.

    Raises:
        ValueError: ``compression_root`` is not a submodule of ``pl_module``.
    """
    root = getattr(pl_module, "compression_root", None)
    if root is None:
        return pl_module, ""
    if callable(root) and not isinstance(root, nn.Module):
        root = root()
    if root is pl_module:
        return pl_module, ""
    for name, module in pl_module.named_modules():
        if module is root and name:
            return root, name + "."
    raise ValueError(
        f"{type(pl_module).__name__}.compression_root is {type(root).__name__}, which is not a submodule "
        "of the LightningModule; it must return one of its own submodules (e.g. self.student)."
    )


class InputCapture:
    """Keep the latest input of a module's forward (a forward pre-hook) until :meth:`take`.

    For techniques that need the model's input and have no ``example_input_array``: the input of the
    compression root's forward during the first training step, replayable as ``module(*value)`` or
    ``module(**value)``.

    Args:
        module: The module whose forward input to keep (the compression root).
        owner: The technique's name, for error messages.
    """

    def __init__(self, module: nn.Module, owner: str) -> None:
        self.owner = owner
        self.module_name = type(module).__name__
        self.value: Any = None
        self._handle: Any = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The hook: keep the input as a tuple of positional or a dict of keyword arguments."""
        patched = module.__dict__.get("forward")
        if patched is not None and "_ForwardRedirection" in getattr(patched, "__qualname__", ""):
            # Lightning's DDP wrapper routes `training_step(batch, batch_idx)` through the module's
            # __call__ with a patched forward: not a model input. The real forward comes next.
            return
        args, kwargs = tree_map_only(Tensor, lambda t: t.detach(), (args, kwargs))
        if not kwargs:
            self.value = tuple(args)
            return
        if not args:
            self.value = dict(kwargs)
            return
        signature = inspect.signature(module.forward)
        try:  # positional and keyword arguments: bind them all by name
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            bound = None
        if bound is None or any(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()
        ):
            self.value = ValueError(
                f"{self.owner}: the training forward of {type(module).__name__} mixed positional and "
                "keyword arguments that cannot be replayed; set `example_input_array` on the "
                "LightningModule."
            )
            return
        self.value = dict(bound.arguments)

    def remove(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self, purpose: str) -> Any:
        """Remove the hook and return the kept input.

        Raises:
            ValueError: No replayable input was seen; the message says ``purpose`` and what to do.
        """
        self.remove()
        value, self.value = self.value, None
        if isinstance(value, Exception):
            raise value
        if value is None:
            raise ValueError(
                f"{self.owner} needs the model's input {purpose}: the training step did not call the "
                f"forward of the compression root ({self.module_name}), so no batch could be captured. "
                "Set `example_input_array` on the LightningModule (an input its forward accepts)."
            )
        return value


class CompressionCallback(pl.Callback):
    """Base class of every compression callback.

    Args:
        targets: fnmatch patterns over module names (relative to the compression root) to compress
            (default: every supported layer).
        exclude: fnmatch patterns removed from ``targets``.
        flush_denormal: On CPU, also flush denormal floats to zero on the main thread during each
            optimizer step (see :class:`~lightning_compress.core.engine.CompressionEngine`).

    Subclasses set :attr:`supported_types`, implement the technique hooks (:meth:`compression_setup`,
    :meth:`begin_step`, :meth:`constraints`, :meth:`on_structure_change`) and
    :meth:`state_dict` / :meth:`load_state_dict` with tensors and primitives only (Lightning loads
    checkpoints with ``weights_only=True``). :meth:`schedules` lists the
    :class:`~lightning_compress.core.schedules.StepSchedule` objects the base class validates in
    ``setup()`` and resolves in ``on_fit_start``.
    """

    #: Module types the technique can act on.
    supported_types: tuple[type[torch.nn.Module], ...] = PRUNABLE_TYPES
    #: Whether the technique changes parameter shapes (through the engine's surgery).
    changes_structure: bool = False

    def __init__(
        self, targets: list[str] | None = None, exclude: list[str] | None = None, flush_denormal: bool = True
    ) -> None:
        super().__init__()
        self.targets = validate_patterns("targets", ["*"] if targets is None else targets)
        self.exclude = validate_patterns("exclude", [] if exclude is None else exclude)
        self.flush_denormal = check_bool("flush_denormal", flush_denormal)
        self.module_names: list[str] = []
        self.root_prefix = ""
        self.engine: CompressionEngine | None = None

    # ------------------------------------------------------------------ identity
    def _state_key_args(self) -> dict[str, Any]:
        """Arguments that tell two instances of the same class apart in a checkpoint."""
        return {"targets": self.targets, "exclude": self.exclude}

    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call (profiler action names): build it once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(**self._state_key_args())
        return key

    @property
    def name(self) -> str:
        """The technique's name for messages."""
        return type(self).__name__

    def schedules(self) -> list[StepSchedule]:
        """The technique's schedules (validated in ``setup``, resolved in ``on_fit_start``)."""
        return []

    def root(self, pl_module: pl.LightningModule) -> nn.Module:
        """The compression root of ``pl_module`` (see :func:`compression_root`)."""
        return compression_root(pl_module)[0]

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy, SUPPORTED_STRATEGIES) or isinstance(strategy, REFUSED_STRATEGIES):
            raise RuntimeError(
                f"{self.name} does not support strategy {type(strategy).__name__} yet: it shards or "
                "replaces parameters, so masks and quantizer state would be wrong. Supported: "
                "single device, 'ddp', 'ddp_spawn', 'ddp_fork' (DDPStrategy)."
            )
        launcher = getattr(strategy, "_launcher", None)
        if (
            self.changes_structure
            and launcher is not None
            and type(launcher).__name__ == "_MultiProcessingLauncher"
        ):
            raise RuntimeError(
                f"{self.name} changes parameter shapes, which strategy='ddp_spawn' / 'ddp_fork' cannot "
                "carry back to the main process (Lightning reloads the workers' weights into the "
                "original, unchanged module). Use strategy='ddp' (one process per device running your "
                "script), which is supported."
            )
        for schedule in self.schedules():
            schedule.check_trainer(trainer, self.name)
        # The engine replays a stored structure recipe in its own setup, which must come first.
        self.engine = get_engine(trainer)
        self.engine.setup(trainer, pl_module, stage)
        self.engine.register(self)
        root, self.root_prefix = compression_root(pl_module)
        # Resolve targets now so a bad pattern fails before any training (and before any change).
        self.module_names = self.select_targets(root)

    def select_targets(self, root: nn.Module) -> list[str]:
        """Resolve ``targets`` / ``exclude`` against the compression root (module names)."""
        return select_modules(root, self.targets, self.exclude, self.supported_types, self.name)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After callback state is restored, before the sanity check: fractions become steps.
        total = trainer.estimated_stepping_batches
        for schedule in self.schedules():
            schedule.resolve(total, self.name)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_start runs after the checkpoint (callback state, optimizer state, loop counters)
        # is restored, so the engine's clock is the step training resumes at.
        self.compression_setup(trainer, pl_module)
        if self.engine is not None:
            self.engine.invalidate()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine is not None:
            self.engine.unregister(self)

    def on_training_length(self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: int) -> None:
        """The engine measured the run's length in training steps (manual optimization): re-resolve."""
        for schedule in self.schedules():
            schedule.refine(total, self.name)
        self.schedules_changed()

    def schedules_changed(self) -> None:
        """The resolved schedule steps changed (override to recompute derived state)."""

    @property
    def step(self) -> int:
        """The current training step (the engine's clock)."""
        return 0 if self.engine is None else self.engine.step

    # ------------------------------------------------------------------ technique hooks
    def compression_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind to the model once per fit, after checkpoint state is restored."""

    def constraints(self) -> list[Constraint]:
        """The per-step tensor work to run through the engine (read at every (re)bind)."""
        return []

    def begin_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Once per training step, before its first real optimizer step (gradients are final)."""

    def on_structure_change(self, pl_module: pl.LightningModule, changes: list[Any]) -> None:
        """Parameters were sliced, moved or removed (names relative to the LightningModule)."""

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def debug(message: str) -> None:
        """Log a progress message (rank zero only, at DEBUG level: one per schedule update)."""
        rank_zero_debug(message)


__all__ = [
    "REFUSED_STRATEGIES",
    "SUPPORTED_STRATEGIES",
    "CompressionCallback",
    "InputCapture",
    "compression_root",
    "flushing_denormals",
    "is_distributed",
]
