"""``DistillationModule``: train the user's student LightningModule against a frozen teacher.

The wrapper is a LightningModule whose only trainable network is the student (plus the learned hint
adapters). Everything the student already defines is reused: its ``training_step`` gives the task
loss (and logs its metrics under its own names), its ``configure_optimizers`` the optimizer and LR
schedulers, its ``validation_step`` / ``test_step`` / ``predict_step`` and hooks run unchanged. The
teacher is held outside the module tree: it never appears in ``parameters()``, the optimizer, DDP,
``state_dict`` / checkpoints, ``train()`` calls or compression targets; the checkpoint records how to
rebuild it instead.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only
from typing_extensions import override

from lightning_compress.core.schedules import StepSchedule, sparsity_at
from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number
from lightning_compress.distillation.cache import (
    INDEX_KEY,
    SAMPLE_KEY,
    OutputCache,
    check_cache_arg,
    positional_limit,
    probe_training_data,
    split_batch,
    tensors_version,
)
from lightning_compress.functional.distillation import hint_loss, soft_target_loss

#: ``checkpoint`` key of the wrapper's record (how to rebuild the teacher, schedule state).
CHECKPOINT_KEY = "lightning_compress_distillation"
#: Interpolations of ``temperature`` / ``alpha`` from their start to their ``*_end`` value.
TEMPERATURE_SCHEDULES = ("linear", "cubic", "exponential", "constant")

# Hooks the trainer calls on the LightningModule that are forwarded to the student unchanged.
_FORWARDED_HOOKS = (
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_predict_start",
    "on_predict_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
    "on_predict_epoch_start",
    "on_predict_epoch_end",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "prepare_data",
)
# Batch hooks: forwarded with the batch stripped of its sample indices.
_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)
# Hooks whose mere presence changes what Lightning does: the wrapper has them only if the student
# overrides them (set on the instance in __init__).
_OPTIONAL_HOOKS = (
    "validation_step",
    "test_step",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "transfer_batch_to_device",
    "on_before_batch_transfer",
    "on_after_batch_transfer",
    "optimizer_step",
    "optimizer_zero_grad",
    "lr_scheduler_step",
    "configure_gradient_clipping",
    "configure_model",
    "backward",
    "on_validation_model_eval",
    "on_validation_model_train",
    "on_validation_model_zero_grad",
    "on_test_model_eval",
    "on_test_model_train",
    "on_predict_model_eval",
)
_STEP_HOOKS = ("validation_step", "test_step")
# Hooks that receive a batch first and return a batch: the sample indices are kept around them.
_BATCH_TRANSFER_HOOKS = ("transfer_batch_to_device", "on_before_batch_transfer", "on_after_batch_transfer")
#: Per-parameter-group lists of torch (and timm) LR schedulers, extended when a group is appended.
_PER_GROUP_ATTRS = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
    "base_values",
)


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"`teacher`={path!r} is not an import path such as 'my_package.models.Teacher'.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`teacher`={path!r} cannot be imported: {err}.") from None


def _load_weights(teacher: nn.Module, path: str) -> None:
    """Load a Lightning checkpoint's (or a plain) state dict into ``teacher``, replaying its recipe."""
    from lightning_compress.core.engine import CHECKPOINT_KEY as RECIPE_KEY
    from lightning_compress.core.surgery import applied_recipe, replay_recipe

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"`teacher_checkpoint`={path!r} holds no state dict.")
    recipe = (checkpoint.get(RECIPE_KEY) or {}).get("recipe", []) if isinstance(checkpoint, Mapping) else []
    if recipe and not applied_recipe(teacher):
        replay_recipe(teacher, recipe)
    try:
        result = teacher.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"`teacher_checkpoint`={path!r} does not fit the teacher {type(teacher).__name__} (built with "
            f"other sizes?): {str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"`teacher_checkpoint`={path!r} does not match the teacher {type(teacher).__name__}: missing "
            f"{list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}."
        )


def build_teacher(teacher: Any, teacher_checkpoint: str | None) -> nn.Module:
    """The teacher network from a module, a class or an import path, plus an optional checkpoint.

    * a module: used as is (``teacher_checkpoint``, if given, is loaded into it);
    * a LightningModule class (or its import path) with ``teacher_checkpoint``:
      :func:`~lightning_compress.load_checkpoint` (``load_from_checkpoint`` that also replays a
      structure recipe, so a pruned-and-shrunk teacher loads too);
    * another ``nn.Module`` class: built without arguments, then the checkpoint is loaded.
    """
    if isinstance(teacher, str):
        teacher = _import(teacher)
    if isinstance(teacher, nn.Module):
        if teacher_checkpoint is not None:
            _load_weights(teacher, teacher_checkpoint)
        return teacher
    if isinstance(teacher, type) and issubclass(teacher, nn.Module):
        if teacher_checkpoint is None:
            raise ValueError(
                f"`teacher` is the class {teacher.__name__} but `teacher_checkpoint` is None: a class needs "
                "the checkpoint of the trained teacher (or pass a trained module)."
            )
        if issubclass(teacher, pl.LightningModule):
            from lightning_compress.core.surgery import load_checkpoint

            return load_checkpoint(teacher, teacher_checkpoint)
        module = teacher()
        _load_weights(module, teacher_checkpoint)
        return module
    raise ValueError(
        f"`teacher`={teacher!r} is not supported; expected an nn.Module (or LightningModule), an nn.Module "
        "class or its import path with `teacher_checkpoint`."
    )


def _walk(obj: Any) -> Iterator[Any]:
    """Every leaf of nested lists / tuples / dicts (what ``configure_optimizers`` may return)."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


def _extend_scheduler(scheduler: Any, n_groups: int) -> None:
    """A param group was appended to the scheduler's optimizer: give it group 0's per-group state.

    Only the known per-group lists of torch's (and timm's) schedulers are extended; composite
    schedulers (``SequentialLR``, ``ChainedScheduler``) are recursed into, their own lists
    (milestones, children) left alone.
    """
    for name in _PER_GROUP_ATTRS:
        value = getattr(scheduler, name, None)
        if isinstance(value, list) and len(value) == n_groups:
            value.append(copy.copy(value[0]))
    for inner in getattr(scheduler, "_schedulers", None) or []:
        _extend_scheduler(inner, n_groups)


def _feature_width(module: nn.Module) -> tuple[int, str] | None:
    """(channels, kind) of a layer's output, kind ``"linear"`` or ``"conv1d"`` / ``"conv2d"``."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = (m.out_features, "linear")
        elif isinstance(m, nn.Conv1d):
            last = (m.out_channels, "conv1d")
        elif isinstance(m, nn.Conv2d):
            last = (m.out_channels, "conv2d")
        elif isinstance(m, nn.BatchNorm1d) and last is not None:
            last = (m.num_features, last[1])
        elif isinstance(m, nn.BatchNorm2d):
            last = (m.num_features, "conv2d")
    return last


def _output_tensor(module: nn.Module, name: str) -> str | None:
    """The weight whose dim 0 are the channels of ``module``'s output, or ``None``.

    That is the weight of its last Linear / Conv / BatchNorm, named under ``name``.
    """
    last = None
    for sub, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            last = sub
    if last is None:
        return None
    return f"{name}.{last}.weight" if last else f"{name}.weight"


def _adapter(student_width: int, teacher_width: int, kind: str) -> nn.Module:
    """The learned FitNets regressor: a 1x1 convolution or a linear map, student -> teacher width."""
    if kind == "conv2d":
        return nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=False)
    if kind == "conv1d":
        return nn.Conv1d(student_width, teacher_width, kernel_size=1, bias=False)
    return nn.Linear(student_width, teacher_width, bias=False)


def _adapter_key(student_layer: str, teacher_layer: str) -> str:
    return f"{student_layer}__to__{teacher_layer}".replace(".", "_")


def _call_with(module: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return module(**example)
    if isinstance(example, tuple):
        return module(*example)
    return module(example)


class DistillationModule(pl.LightningModule):
    r"""Knowledge distillation as a LightningModule wrapping the user's student and a teacher.

    The training loss (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):

    .. math::
        L = \\alpha T^2 \\, KL(\\mathrm{softmax}(z_t / T) \\,\\|\\, \\mathrm{softmax}(z_s / T))
            + (1 - \\alpha) L_{task} + \\beta \\sum_{hints} \\| r(f_s) - f_t \\|^2

    where ``L_task`` is what the student's own ``training_step`` returns (a loss, or a dict whose
    ``"loss"`` it is), ``z_s`` the output of the student's forward during that step and ``z_t`` the
    teacher's output on the same input. The optional FitNets hints (Romero et al. 2015) regress
    student features ``f_s`` (forward hooks on named layers) onto teacher features ``f_t`` through a
    learned 1x1 convolution / linear adapter ``r`` per pair; the adapters are trained with the
    student's first optimizer (a param group with the hyper-parameters of its first group) and are
    not part of the exported student.

    The student is reused unchanged: its optimizers and LR schedulers, metrics, logging names,
    ``validation_step`` / ``test_step`` / ``predict_step`` and hooks. It must use automatic
    optimization, and its ``training_step`` must call the student (``self(x)``) so the wrapper sees
    the logits and the input to give the teacher (or name the submodule that computes the logits in
    ``student_forward``). Override :meth:`task_step` when the student's ``training_step`` does more
    than return its loss, and :meth:`logits` when the forward returns more than logits.

    The teacher is frozen, put in eval mode, moved to the student's device and dtype, and never
    trained; it is kept outside the module tree, so it is not in checkpoints (unless
    ``save_teacher``), only the record of how to rebuild it. Compression callbacks act on the student
    only, with its own layer names (``compression_root``).

    With ``cache`` the teacher's outputs (logits and hint features) are computed once per training
    sample and reused in later epochs, in memory or memory-mapped on disk (see
    :class:`~lightning_compress.distillation.cache.OutputCache`), identical on every DDP rank. Samples
    need a stable identity (:class:`~lightning_compress.IndexedDataset`, or dict batches with an
    ``index_key`` entry) and no random transform (unless ``invariant_transforms``).

    Args:
        student: The user's LightningModule.
        teacher: A trained module or LightningModule; or a class / import path plus
            ``teacher_checkpoint``. In YAML: ``class_path`` / ``init_args`` plus ``teacher_checkpoint``.
        temperature: Softmax temperature ``T > 0`` (at ``schedule_start`` when ``temperature_end``).
        alpha: Weight of the soft-target term in [0, 1].
        hints: ``{student layer: teacher layer}`` pairs for feature distillation (FitNets).
        cache: ``False``; ``True`` or ``"memory"``; ``"disk"`` (memory-mapped files).
        teacher_checkpoint: Checkpoint of the teacher's weights.
        hint_weight: ``beta``, the weight of the hint losses.
        temperature_end: Temperature reached at ``schedule_end`` (``None``: constant).
        alpha_end: ``alpha`` reached at ``schedule_end`` (``None``: constant).
        schedule: Interpolation from the start to the end values.
        schedule_start: First step (int) or fraction of training (float) of the schedule.
        schedule_end: Last step or fraction of the schedule.
        cache_dir: Folder of the memory-mapped cache files (``cache="disk"``).
        invariant_transforms: Declare that the training data's randomness does not change the
            teacher's output (skips the guard that refuses the cache on random data).
        index_key: Key of the sample indices in the user's own dict batches.
        student_forward: Name of the student submodule whose forward computes the logits, when the
            student's ``training_step`` does not call the student itself.
        save_teacher: Also store the teacher's weights in checkpoints.
        export_path: Write :meth:`export_student` there at the end of ``fit`` (for CLI recipes).
        cache_check_every: With the cache, recompute the teacher on every ``n``-th cached batch and
            refuse to go on if its output changed (randomness the pre-training guard cannot see,
            e.g. augmentation inside the student's ``training_step``); 0 turns the check off, and
            ``invariant_transforms`` skips it too.

    Raises:
        ValueError: A bad argument (named in the message), a hint layer that does not exist, a teacher
            whose output shape differs from the student's on ``example_input_array``.
    """

    def __init__(
        self,
        student: pl.LightningModule,
        teacher: nn.Module | str,
        temperature: float = 4.0,
        alpha: float = 0.9,
        hints: dict[str, str] | None = None,
        cache: bool | Literal["memory", "disk"] = False,
        teacher_checkpoint: str | None = None,
        hint_weight: float = 1.0,
        temperature_end: float | None = None,
        alpha_end: float | None = None,
        schedule: Literal["linear", "cubic", "exponential", "constant"] = "linear",
        schedule_start: int | float = 0.0,
        schedule_end: int | float = 1.0,
        cache_dir: str | None = None,
        invariant_transforms: bool = False,
        index_key: str = "index",
        student_forward: str | None = None,
        save_teacher: bool = False,
        export_path: str | None = None,
        cache_check_every: int = 100,
    ) -> None:
        super().__init__()
        if not isinstance(student, pl.LightningModule):
            raise ValueError(
                f"DistillationModule: `student` must be a LightningModule, got {type(student).__name__}; "
                "wrap a plain nn.Module in a LightningModule with a training_step and configure_optimizers."
            )
        if not student.automatic_optimization:
            raise ValueError(
                f"DistillationModule: `student` {type(student).__name__} uses manual optimization "
                "(automatic_optimization=False); the wrapper adds the distillation loss to the loss its "
                "training_step returns, which needs automatic optimization."
            )
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.temperature_end = (
            None
            if temperature_end is None
            else check_number("temperature_end", temperature_end, low=0.0, low_open=True)
        )
        self.alpha_end = (
            None if alpha_end is None else check_number("alpha_end", alpha_end, low=0.0, high=1.0)
        )
        self.hint_weight = check_number("hint_weight", hint_weight, low=0.0)
        self.schedule = check_choice("schedule", schedule, TEMPERATURE_SCHEDULES)
        self.value_schedule = StepSchedule(
            schedule_start, schedule_end, names=("schedule_start", "schedule_end")
        )
        self.cache_storage = check_cache_arg("DistillationModule", cache)
        self.cache_dir = cache_dir
        self.invariant_transforms = check_bool("invariant_transforms", invariant_transforms)
        if not isinstance(index_key, str):
            raise ValueError(f"`index_key`={index_key!r} must be a string.")
        self.index_key = index_key
        self.cache_check_every = check_int("cache_check_every", cache_check_every, minimum=0)
        self.save_teacher = check_bool("save_teacher", save_teacher)
        self.export_path = export_path
        self.teacher_checkpoint = teacher_checkpoint
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

        # Under LightningCLI the hyper-parameters are the configuration (student and teacher as
        # class_path / init_args), which rebuilds the wrapper: keep them. Live modules: leave them out.
        self.save_hyperparameters(
            ignore=[] if _given_hyperparameters.get() is not None else ["student", "teacher"]
        )

        self.student = student
        teacher_module = build_teacher(teacher, teacher_checkpoint)
        if any(teacher_module is m for m in student.modules()):
            raise ValueError(
                "DistillationModule: `teacher` is (part of) the student; pass a separate network."
            )
        teacher_module.requires_grad_(False)
        teacher_module.eval()
        # Outside the module tree (no parameters, state_dict, DDP, train() calls or compression).
        object.__setattr__(self, "_teacher", teacher_module)
        self._teacher_record = self._record_teacher(teacher, teacher_module)

        self.student_forward = student_forward
        forward_module = (
            student
            if student_forward is None
            else self._submodule(student, student_forward, "student_forward", "student")
        )
        object.__setattr__(self, "_forward_module", forward_module)  # not a second registration

        hints = {} if hints is None else hints
        if not isinstance(hints, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hints.items()
        ):
            raise ValueError(
                f"`hints`={hints!r} is not supported; expected a mapping {{student layer: teacher layer}} of "
                "module names."
            )
        self.hints = dict(hints)
        hint_modules = {
            s: (
                self._submodule(student, s, "hints", "student"),
                self._submodule(teacher_module, t, "hints", "teacher"),
            )
            for s, t in self.hints.items()
        }
        self.adapters = nn.ModuleDict()
        example = getattr(student, "example_input_array", None)
        shapes = self._check_example(example, hint_modules) if example is not None else None
        for s, t in self.hints.items():
            s_module, t_module = hint_modules[s]
            s_info, t_info = _feature_width(s_module), _feature_width(t_module)
            if shapes is not None and s in shapes:
                s_shape, t_shape = shapes[s]
                # The layer type decides (a Linear acts on the last dim of (N, L, D) sequences too);
                # without one, the rank of the measured feature does.
                by_rank = {3: "conv1d", 4: "conv2d"}.get(len(s_shape), "linear")
                kind = s_info[1] if s_info is not None else by_rank
                s_width = s_shape[1] if kind != "linear" else s_shape[-1]
                t_width = t_shape[1] if kind != "linear" else t_shape[-1]
            elif s_info is not None and t_info is not None:
                (s_width, kind), (t_width, _) = s_info, t_info
            else:
                raise ValueError(
                    f"`hints`: cannot tell the width of {s!r} -> {t!r} (no Linear / Conv / BatchNorm "
                    "inside); set `example_input_array` on the student so the wrapper can measure it."
                )
            self.adapters[_adapter_key(s, t)] = _adapter(int(s_width), int(t_width), kind)
        #: Per hint: the student weight whose output channels the adapter reads (structure changes).
        self._hint_tensors = {s: _output_tensor(hint_modules[s][0], f"student.{s}") for s in self.hints}

        self._hint_handles: list[Any] = []
        self._student_features: dict[str, Tensor] = {}
        self._teacher_features: dict[str, Tensor] = {}
        self._capturing = False
        self._captured: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        for s, (s_module, t_module) in hint_modules.items():
            self._hint_handles.append(
                s_module.register_forward_hook(functools.partial(self._keep_student, s))
            )
            self._hint_handles.append(
                t_module.register_forward_hook(functools.partial(self._keep_teacher, self.hints[s]))
            )
        self._forward_handle = self._forward_module.register_forward_hook(self._keep_output, with_kwargs=True)
        self.cache: OutputCache | None = None
        self._teacher_tensors: list[Tensor] = []
        self._teacher_version = -1
        self._checked_shapes = False
        self._teacher_placed = False
        self._sums: dict[str, Tensor | float] = {}
        self._accumulated_steps = 0
        self._hits_since_check = 0

        for name in _OPTIONAL_HOOKS:
            if is_overridden(name, student, parent=pl.LightningModule):
                self.__dict__[name] = self._optional_hook(name)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _submodule(root: nn.Module, name: str, arg: str, which: str) -> nn.Module:
        try:
            return root.get_submodule(name)
        except AttributeError:
            layers = [n for n, _ in root.named_modules() if n][:12]
            raise ValueError(
                f"`{arg}`: {name!r} is not a layer of the {which} {type(root).__name__}; its layers include "
                f"{layers}."
            ) from None

    @staticmethod
    def _record_teacher(spec: Any, teacher: nn.Module) -> dict[str, Any]:
        """How to rebuild the teacher: its class, hyper-parameters and checkpoint (no weights)."""
        cls = type(teacher)
        hparams = dict(getattr(teacher, "hparams", {}) or {})
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {
                k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool, type(None)))
            },
            "spec": spec if isinstance(spec, str) else None,
        }

    def _check_example(
        self, example: Any, hint_modules: dict[str, tuple[nn.Module, nn.Module]]
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Run both networks once on the student's ``example_input_array`` (eval mode, no grad)."""
        seen: dict[str, Any] = {}
        handles = []
        for s, (s_module, t_module) in hint_modules.items():
            handles.append(s_module.register_forward_hook(lambda m, a, o, s=s: seen.__setitem__(("s", s), o)))
            handles.append(t_module.register_forward_hook(lambda m, a, o, s=s: seen.__setitem__(("t", s), o)))
        student, teacher = self.student, self._teacher
        modes = {m: m.training for m in student.modules()}  # per module: a frozen part may be in eval
        student.eval()
        try:
            with torch.no_grad():
                teacher_input = example
                if self.student_forward is None:
                    s_out = _call_with(student, example)
                else:  # the teacher gets what the named submodule gets
                    calls: list[Any] = []
                    h = self._forward_module.register_forward_hook(
                        lambda m, a, k, o: calls.append((a, k, o)), with_kwargs=True
                    )
                    try:
                        _call_with(student, example)
                    finally:
                        h.remove()
                    if not calls:
                        return {}
                    args, kwargs, s_out = calls[0]
                    teacher_input = dict(kwargs) if kwargs and not args else tuple(args)
                reference = next(
                    (t for t in [*teacher.parameters(), *teacher.buffers()] if t.is_floating_point()), None
                )
                if reference is not None:  # a teacher already on another device / in another dtype
                    teacher_input = tree_map_only(
                        Tensor,
                        lambda t: t.to(
                            reference.device, reference.dtype if t.is_floating_point() else t.dtype
                        ),
                        teacher_input,
                    )
                try:
                    t_out = _call_with(teacher, teacher_input)
                except Exception as err:
                    raise ValueError(
                        f"`teacher` {type(teacher).__name__} cannot run on the student's "
                        f"example_input_array: {type(err).__name__}: {err}"
                    ) from err
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        if s_out is not None:
            self._compare_outputs(self.logits(s_out), self.logits(t_out))
        return {
            s: (tuple(seen[("s", s)].shape), tuple(seen[("t", s)].shape))
            for s in hint_modules
            if isinstance(seen.get(("s", s)), Tensor) and isinstance(seen.get(("t", s)), Tensor)
        }

    @staticmethod
    def _compare_outputs(student_logits: Tensor, teacher_logits: Tensor) -> None:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"`teacher`: its output shape {tuple(teacher_logits.shape)} differs from the student's "
                f"{tuple(student_logits.shape)}; distillation needs logits over the same classes."
            )

    # ------------------------------------------------------------------ properties
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher

    @property
    def compression_root(self) -> nn.Module:
        """Compression callbacks act on the student, with its own layer names."""
        return self.student

    @property
    def example_input_array(self) -> Any:  # type: ignore[override]
        """The student's ``example_input_array`` (the wrapper's forward is the student's)."""
        return getattr(self.student, "example_input_array", None)

    @example_input_array.setter
    def example_input_array(self, value: Any) -> None:
        if "student" in self._modules:
            self.student.example_input_array = value

    # ------------------------------------------------------------------ overridable
    def logits(self, output: Any) -> Tensor:
        """The logits in a forward's output: the tensor itself, a ``"logits"`` entry, or the first element."""
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping) and "logits" in output:
            return output["logits"]
        if isinstance(output, (list, tuple)) and output and isinstance(output[0], Tensor):
            return output[0]
        if hasattr(output, "logits") and isinstance(output.logits, Tensor):
            return output.logits
        raise TypeError(
            f"DistillationModule: cannot find logits in a forward output of type {type(output).__name__}; "
            "override DistillationModule.logits(output)."
        )

    def task_step(self, batch: Any, batch_idx: int) -> Tensor | Mapping[str, Any] | None:
        """The student's task loss for a batch: its own ``training_step`` (override to change)."""
        limit = self._positional_limit("training_step")
        if limit is not None and limit < 2:  # Lightning allows training_step(self, batch)
            return self._call_student("training_step", batch)
        return self._call_student("training_step", batch, batch_idx)

    def temperature_at(self, step: int) -> float:
        """The temperature at optimizer ``step``."""
        return self._interpolate(step, self.temperature, self.temperature_end)

    def alpha_at(self, step: int) -> float:
        """``alpha`` at optimizer ``step``."""
        return self._interpolate(step, self.alpha, self.alpha_end)

    def _interpolate(self, step: int, start: float, end: float | None) -> float:
        if end is None or end == start:
            return start
        sched = self.value_schedule
        if not sched.resolved or sched.start_step is None or sched.end_step is None:
            return start
        if self.schedule == "exponential" and min(start, end) <= 0:
            return sparsity_at(
                step, schedule="linear", start=sched.start_step, end=sched.end_step, final=end, initial=start
            )
        if self.schedule == "exponential":
            # sparsity_at's exponential interpolates 1 - value geometrically; interpolate value itself.
            p = (
                0.0
                if step < sched.start_step
                else min(1.0, (step - sched.start_step) / max(sched.end_step - sched.start_step, 1))
            )
            return start * (end / start) ** p
        return sparsity_at(
            step, schedule=self.schedule, start=sched.start_step, end=sched.end_step, final=end, initial=start
        )

    # ------------------------------------------------------------------ delegation
    def _call_student(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a student method with this wrapper's hook name set (so ``self.log`` works there)."""
        student = self.student
        previous = student._current_fx_name
        student._current_fx_name = self._current_fx_name
        try:
            return getattr(student, name)(*args, **kwargs)
        finally:
            student._current_fx_name = previous

    def _optional_hook(self, name: str) -> Callable[..., Any]:
        # A partial of a module-level function (not a closure): the wrapper stays picklable
        # (ddp_spawn) and deep-copyable, and Lightning's is_overridden sees an override.
        return functools.partial(_call_optional_hook, self, name)

    def _positional_limit(self, name: str) -> int | None:
        """How many positional arguments the student's ``name`` takes (``None``: any number)."""
        limits = self.__dict__.setdefault("_limits", {})  # per hook, once: called on every step
        if name not in limits:
            limits[name] = positional_limit(getattr(self.student, name))
        return limits[name]

    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        args: list[Any] = [split_batch(batch, None)[1], batch_idx]
        params = inspect.signature(self.student.predict_step).parameters
        if "dataloader_idx" in params or any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            args.append(dataloader_idx)
        return self._call_student("predict_step", *args)

    @override
    def configure_optimizers(self) -> Any:
        result = self._call_student("configure_optimizers")
        if len(self.adapters) == 0:
            return result
        leaves = list(_walk(result))
        optimizers = [o for o in leaves if isinstance(o, torch.optim.Optimizer)]
        if not optimizers:
            raise ValueError(
                "DistillationModule(hints=...): the student's configure_optimizers returned no optimizer to "
                "train the hint adapters with."
            )
        optimizer = optimizers[0]
        n_groups = len(optimizer.param_groups)
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        group["params"] = list(self.adapters.parameters())
        optimizer.add_param_group(group)
        for leaf in leaves:
            if getattr(leaf, "optimizer", None) is optimizer and hasattr(leaf, "step"):
                _extend_scheduler(leaf, n_groups)
        return result

    @override
    def configure_callbacks(self) -> Any:
        return self._call_student("configure_callbacks")

    @override
    def setup(self, stage: str) -> None:
        self._call_student("setup", stage)

    @override
    def teardown(self, stage: str) -> None:
        self._call_student("teardown", stage)
        if stage == "fit" and self.cache is not None:
            self.cache.close()
            self.cache = None

    # ------------------------------------------------------------------ capture
    def _keep_output(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if self._capturing and self._captured is None:
            patched = module.__dict__.get("forward")
            if patched is not None and "_ForwardRedirection" in getattr(patched, "__qualname__", ""):
                return
            self._captured = (args, kwargs, output)

    def _keep_student(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if self._capturing and name not in self._student_features and isinstance(output, Tensor):
            self._student_features[name] = output

    def _keep_teacher(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self._teacher_features[name] = output

    # ------------------------------------------------------------------ training
    def _place_teacher(self) -> None:
        """Move the teacher to the student's device and floating dtype (once, or when they change)."""
        reference = next((p for p in self.student.parameters() if p.is_floating_point()), None)
        if reference is not None:
            current = next(
                (t for t in [*self._teacher.parameters(), *self._teacher.buffers()] if t.is_floating_point()),
                None,
            )
            if current is not None and (current.device, current.dtype) != (reference.device, reference.dtype):
                self._teacher.to(device=reference.device, dtype=reference.dtype)
                self._teacher_version = -1
        # The tensors whose in-place version counters tell whether the teacher changed (cache).
        self._teacher_tensors = [*self._teacher.parameters(), *self._teacher.buffers()]
        if self._teacher.training:
            self._teacher.eval()

    def _teacher_outputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], indices: Tensor | None, device: torch.device
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cache = self.cache
        teacher_hints = list(dict.fromkeys(self.hints.values()))
        if cache is not None and indices is not None:
            version = tensors_version(self._teacher_tensors)
            if version != self._teacher_version:
                cache.clear()
                self._teacher_version = version
            hit = cache.lookup(indices)
            if hit is not None:
                logits = hit[0].to(device, non_blocking=True)
                self._hits_since_check += 1
                check = self.cache_check_every and not self.invariant_transforms
                if check and self._hits_since_check >= self.cache_check_every:
                    self._hits_since_check = 0
                    self._check_cached(args, kwargs, logits)
                return logits, {
                    t: v.to(device, non_blocking=True) for t, v in zip(teacher_hints, hit[1:], strict=True)
                }
        self._teacher_features = {}
        with torch.no_grad():
            logits = self.logits(self._teacher(*args, **kwargs))
        features = {t: self._teacher_features[t] for t in teacher_hints}
        self._teacher_features = {}
        if cache is not None and indices is not None:
            cache.store(indices, (logits, *features.values()))
        return logits, features

    def _check_cached(self, args: tuple[Any, ...], kwargs: dict[str, Any], cached: Tensor) -> None:
        """Recompute the teacher on a cached batch: its input must not have changed since it was cached.

        The guard before training sees randomness in the dataset and the collate function only; this
        one also catches augmentation in the student's ``training_step`` or batch hooks, and datasets
        that change per epoch. Run every ``cache_check_every`` cache hits (one teacher forward).
        """
        with torch.no_grad():
            fresh = self.logits(self._teacher(*args, **kwargs))
        self._teacher_features = {}
        low = fresh.dtype in (torch.float16, torch.bfloat16)
        tol = (2e-2 if low else 1e-3) * (1.0 + float(cached.detach().abs().max()))
        if not torch.allclose(fresh.float(), cached.float(), rtol=0.0, atol=tol):
            worst = float((fresh.float() - cached.float()).abs().max())
            raise ValueError(
                "DistillationModule(cache=...): the teacher's output for cached samples changed (max "
                f"difference {worst:.3g} > {tol:.3g}): the input the student's step gives the teacher is "
                "not the same in every epoch (augmentation in training_step or a batch hook, or a dataset "
                "that changes), so cached outputs would be wrong. Turn the cache off, or pass "
                "invariant_transforms=True if the teacher's output does not depend on that randomness."
            )

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        indices, batch = split_batch(batch, self.index_key)
        if self.cache_storage is not None and indices is None:
            raise ValueError(
                "DistillationModule(cache=...): a training batch carried no sample indices; wrap the dataset "
                "in lightning_compress.IndexedDataset or yield dict batches with an "
                f"{self.index_key!r} entry."
            )
        self._captured, self._student_features = None, {}
        self._capturing = True
        try:
            out = self.task_step(batch, batch_idx)
        finally:
            self._capturing = False
        if out is None:  # the student skipped the batch
            return None
        task_loss = out if isinstance(out, Tensor) else out["loss"] if isinstance(out, Mapping) else None
        if not isinstance(task_loss, Tensor):
            raise TypeError(
                f"DistillationModule: the student's training_step returned {type(out).__name__}; expected "
                "the loss tensor or a dict with a 'loss' entry (or override DistillationModule.task_step)."
            )
        if self._captured is None:
            where = (
                f"the student's {self.student_forward!r} submodule" if self.student_forward else "the student"
            )
            raise RuntimeError(
                f"DistillationModule: the student's training_step did not call {where} (e.g. `self(x)`), so "
                "its logits and input are unknown. Call the module (not `.forward`), or set "
                "`student_forward` to the submodule that computes the logits."
            )
        args, kwargs, output = self._captured
        self._captured = None
        student_logits = self.logits(output)
        if not self._teacher_placed:  # after the strategy moved and converted the student
            self._place_teacher()
            self._teacher_placed = True
        teacher_logits, teacher_features = self._teacher_outputs(args, kwargs, indices, student_logits.device)
        if not self._checked_shapes:
            self._compare_outputs(student_logits, teacher_logits)
            self._checked_shapes = True
        step = self.trainer.global_step
        temperature, alpha = self.temperature_at(step), self.alpha_at(step)
        soft = soft_target_loss(student_logits, teacher_logits, temperature)
        loss = alpha * soft + (1.0 - alpha) * task_loss
        if self.hints:
            hint_total = student_logits.new_zeros((), dtype=torch.float32)
            for s, t in self.hints.items():
                feature = self._student_features.get(s)
                if feature is None:
                    raise RuntimeError(
                        f"DistillationModule: hint layer {s!r} of the student did not run in the step."
                    )
                hint_total = hint_total + hint_loss(
                    self.adapters[_adapter_key(s, t)](feature), teacher_features[t]
                )
            self._student_features = {}
            loss = loss + self.hint_weight * hint_total
            self._accumulate("distill/hint_loss", hint_total)
        # Every `self.log` call costs Lightning ~0.5 ms on a CPU, as much as a small student's whole
        # step: the terms are summed here and logged once per epoch (epoch means). The student's own
        # per-step logs (e.g. its train_loss) are untouched.
        self._accumulate("distill/loss", loss)
        self._accumulate("distill/soft_loss", soft)
        self._accumulate("distill/task_loss", task_loss)
        self._accumulate("distill/temperature", temperature)
        self._accumulate("distill/alpha", alpha)
        self._accumulated_steps += 1
        if isinstance(out, Mapping):
            out = dict(out)
            out["loss"] = loss
            return out
        return loss

    def _accumulate(self, name: str, value: Tensor | float) -> None:
        value = value.detach().float() if isinstance(value, Tensor) else float(value)
        total = self._sums.get(name)
        self._sums[name] = value if total is None else total + value

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self) -> None:
        if self.temperature_end is not None or self.alpha_end is not None:
            self.value_schedule.check_trainer(self.trainer, "DistillationModule")
            self.value_schedule.resolve(self.trainer.estimated_stepping_batches, "DistillationModule")
        self._call_student("on_fit_start")

    @override
    def on_train_start(self) -> None:
        self._sums, self._accumulated_steps = {}, 0
        self._place_teacher()
        self._teacher_placed = False
        self._checked_shapes = False
        if self.cache_storage is not None:
            size = probe_training_data(
                self.trainer.train_dataloader,
                "DistillationModule",
                self.index_key,
                self.invariant_transforms,
                f"cache={self.cache_storage!r}",
            )
            if self.cache is not None:
                self.cache.close()
            self.cache = OutputCache(size, self.cache_storage, self.cache_dir, name="teacher")
            self._teacher_version = -1
        self._call_student("on_train_start")

    @override
    def on_train_epoch_end(self) -> None:
        self._call_student("on_train_epoch_end")
        if self._accumulated_steps:
            for name, total in self._sums.items():
                mean = total / self._accumulated_steps
                self.log(name, mean if isinstance(mean, Tensor) else float(mean), sync_dist=True)
        self._sums, self._accumulated_steps = {}, 0
        if self.cache is not None:
            self.cache.sync(self.device if self.device.type != "cpu" else None)
            self.log("distill/cache_filled", float(self.cache.n_filled) / max(self.cache.size, 1))

    @override
    def on_fit_end(self) -> None:
        self._call_student("on_fit_end")
        if self.export_path is not None and self.trainer.is_global_zero:
            self.export_student(self.export_path)
            rank_zero_info(f"DistillationModule: student exported to {self.export_path}")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = {
            "teacher": dict(self._teacher_record, checkpoint=self.teacher_checkpoint),
            "student": f"{type(self.student).__module__}.{type(self.student).__qualname__}",
            "value_schedule": self.value_schedule.state_dict(),
        }
        if self.save_teacher:
            record["teacher_state_dict"] = {
                k: v.detach().cpu() for k, v in self._teacher.state_dict().items()
            }
        checkpoint[CHECKPOINT_KEY] = record
        self._call_student("on_save_checkpoint", checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(CHECKPOINT_KEY) or {}
        if record.get("value_schedule"):
            self.value_schedule.load_state_dict(record["value_schedule"])
        if self.save_teacher and record.get("teacher_state_dict") is not None:
            self._teacher.load_state_dict(record["teacher_state_dict"])
        self._call_student("on_load_checkpoint", checkpoint)

    def dependent_structure_ops(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Slice a hint adapter's input channels with every slice of its student layer's outputs.

        Called by the :class:`~lightning_compress.CompressionEngine` before it applies structure ops
        (channels removed by ``StructuredPruning`` / ``NetworkSlimming``), so the adapters keep
        reading the surviving channels and the structure recipe replays both.
        """
        extra = []
        for s, t in self.hints.items():
            tensor = self._hint_tensors.get(s)
            if tensor is None:
                continue
            for op in ops:
                if (
                    op.get("op") == "slice"
                    and op.get("tensor") == tensor
                    and op.get("dim") in (0, -self._ndim(tensor))
                ):
                    extra.append(
                        {
                            "op": "slice",
                            "tensor": f"adapters.{_adapter_key(s, t)}.weight",
                            "dim": 1,
                            "index": list(op["index"]),
                        }
                    )
        return extra

    def _ndim(self, tensor: str) -> int:
        try:
            return self.get_parameter(tensor).dim()
        except AttributeError:
            return 0

    # ------------------------------------------------------------------ export
    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's own ``state_dict`` (its names, no wrapper prefix, no adapters or teacher)."""
        return self.student.state_dict()

    def _student_hparams(self) -> dict[str, Any]:
        """The student's own hyper-parameters.

        Under LightningCLI every ``save_hyperparameters`` call made while the wrapper is instantiated
        receives the *wrapper's* configuration (with ``_class_path`` naming the wrapper); the
        student's arguments are then its ``init_args`` in that configuration.
        """
        hparams = dict(self.student.hparams)
        class_path = hparams.get("_class_path")
        spec = hparams.get("student")
        if (
            isinstance(class_path, str)
            and class_path.rpartition(".")[2] != type(self.student).__name__
            and isinstance(spec, Mapping)
            and "class_path" in spec
        ):
            own = dict(spec.get("init_args") or {})
            own["_class_path"] = spec["class_path"]
            if "_instantiator" in hparams:
                own["_instantiator"] = hparams["_instantiator"]
            return own
        return hparams

    def export_student(self, path: str | os.PathLike[str]) -> str:
        """Save the plain student as a Lightning checkpoint that ``MyStudent.load_from_checkpoint`` reads.

        The file holds the student's ``state_dict`` and hyper-parameters; when the wrapper is attached
        to a trainer, also the compression callbacks' state (so ``restore_quantization`` works on it)
        and the structure recipe of shape-changing techniques with the student's names (so
        :func:`~lightning_compress.load_checkpoint` rebuilds a shrunk student). No teacher, no
        adapters, no optimizer state.

        Returns:
            The path written.
        """
        from lightning_compress.core.engine import CHECKPOINT_KEY as RECIPE_KEY
        from lightning_compress.core.surgery import applied_recipe

        student = self.student
        checkpoint: dict[str, Any] = {
            "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
            "pytorch-lightning_version": pl.__version__,
            "epoch": 0,
            "global_step": 0,
        }
        trainer = self._trainer
        if trainer is not None:
            checkpoint["epoch"] = trainer.current_epoch
            checkpoint["global_step"] = trainer.global_step
            from pytorch_lightning.trainer import call

            checkpoint["callbacks"] = call._call_callbacks_state_dict(trainer)
        hparams = self._student_hparams()
        if hparams:
            checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = hparams
            if getattr(student, "_hparams_name", None):
                checkpoint[pl.LightningModule.CHECKPOINT_HYPER_PARAMS_NAME] = student._hparams_name
        prefix = "student."
        recipe = []
        for op in applied_recipe(self):
            if not str(op.get("tensor", op.get("module", ""))).startswith(prefix):
                continue  # the adapters' own ops: not part of the student
            op = dict(op)
            for key in ("tensor", "module"):
                if isinstance(op.get(key), str) and op[key].startswith(prefix):
                    op[key] = op[key][len(prefix) :]
            recipe.append(op)
        # Ops the student went through before it was wrapped (e.g. rebuilt with load_checkpoint),
        # then the ones applied through the wrapper.
        recipe = [dict(op) for op in applied_recipe(student)] + recipe
        if recipe:
            checkpoint[RECIPE_KEY] = {"version": 1, "recipe": recipe}
        student.on_save_checkpoint(checkpoint)
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        torch.save(checkpoint, path)
        return path


def _call_optional_hook(wrapper: DistillationModule, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the student's override of ``name`` (see ``DistillationModule._optional_hook``)."""
    limit = wrapper._positional_limit(name)
    if name in _BATCH_TRANSFER_HOOKS and args:
        # The student's hook sees (and returns) the plain batch; the indices go around it.
        indices, inner = split_batch(args[0], None)
        args = (inner, *args[1:])
        out = wrapper._call_student(name, *(args if limit is None else args[:limit]), **kwargs)
        if indices is None:
            return out
        if name == "transfer_batch_to_device" and len(args) > 1:
            indices = indices.to(args[1])
        return {INDEX_KEY: indices, SAMPLE_KEY: out}
    if name in _STEP_HOOKS and args:
        args = (split_batch(args[0], None)[1], *args[1:])
    return wrapper._call_student(name, *(args if limit is None else args[:limit]), **kwargs)


def _forwarder(name: str, batch_hook: bool) -> Callable[..., Any]:
    # on_*_batch_start(batch, batch_idx, ...); on_*_batch_end(outputs, batch, batch_idx, ...)
    position = 1 if name.endswith("_end") else 0

    def hook(self: DistillationModule, *args: Any, **kwargs: Any) -> Any:
        if batch_hook and len(args) > position:
            args = (*args[:position], split_batch(args[position], None)[1], *args[position + 1 :])
        elif batch_hook and "batch" in kwargs:
            kwargs["batch"] = split_batch(kwargs["batch"], None)[1]
        return self._call_student(name, *args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"Forwarded to the student's ``{name}``."
    return hook


for _name in _FORWARDED_HOOKS:
    if _name not in DistillationModule.__dict__:
        setattr(DistillationModule, _name, _forwarder(_name, batch_hook=False))
for _name in _BATCH_HOOKS:
    setattr(DistillationModule, _name, _forwarder(_name, batch_hook=True))
del _name

__all__ = ["CHECKPOINT_KEY", "TEMPERATURE_SCHEDULES", "DistillationModule", "build_teacher"]
