"""Change a model's structure while it trains, and rebuild it from a checkpoint afterwards.

Two primitives, each a plain dictionary so that it can be stored in a checkpoint (the *structure
recipe*) and replayed on a fresh instance of the user's module:

* ``{"op": "slice", "tensor": "fc1.weight", "dim": 0, "index": [0, 2, 5]}``: keep only the given
  entries of a parameter or buffer along ``dim`` (physical channel / neuron removal). Module
  attributes that describe shapes (``out_features``, ``in_channels``, ``num_features``, ...) are
  updated from the new shapes.
* ``{"op": "replace", "module": "fc1", "class_path": "pkg.mod.Class", "init_args": {...}}``: swap a
  submodule for ``Class.from_module(old, **init_args)`` (or ``Class(**init_args)`` when the class has
  no ``from_module``). ``from_module`` keeps the old module's ``Parameter`` objects where shapes are
  kept, so an optimizer that holds them stays valid. Only classes registered with
  :func:`register_module_class` can be named, so a checkpoint cannot make the loader import and run
  arbitrary code. ``torch.nn.Identity`` is registered (layer fusion replaces folded BatchNorms by it).
* ``{"op": "add_bias", "module": "conv1"}``: give a Conv / Linear layer a zero ``bias`` if it has
  none (layer fusion folds a BatchNorm's shift into it).

During training :meth:`CompressionEngine.change_structure
<lightning_compress.core.engine.CompressionEngine.change_structure>` applies ops between steps:
every op is validated before any is applied (nothing is half-applied), then the optimizers and LR
schedulers are rebuilt through the module's own ``configure_optimizers`` and the strategy, their
state carried over to the surviving entries (momentum, Adam moments sliced like the parameter; step
counts, the scheduler position and the current learning rate copied), DDP re-wrapped, and a
:class:`StructureChange` event per parameter published so every callback (masks included) follows.

Resuming (``trainer.fit(ckpt_path=...)``) replays the recipe in ``setup()``, before Lightning loads
the weights; :func:`load_checkpoint` rebuilds the compressed model without a Trainer.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.saving import _convert_loaded_hparams
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "StructureChange",
    "applied_recipe",
    "apply_ops",
    "channel_widths",
    "load_checkpoint",
    "read_recipe",
    "reconcile_recipe",
    "register_module_class",
    "replay_recipe",
    "validate_ops",
]

_REGISTERED: dict[str, type[nn.Module]] = {}
#: The op kinds a structure recipe may hold.
OPS: tuple[str, ...] = ("slice", "replace", "add_bias")
#: ``root.__dict__`` key of the layer widths before the first slice (see :func:`channel_widths`).
_WIDTHS_KEY = "_lightning_compress_widths"
#: ``root.__dict__`` key of the ops applied to a module so far (see :func:`applied_recipe`).
_RECIPE_KEY = "_lightning_compress_recipe"


def register_module_class(cls: type[nn.Module]) -> type[nn.Module]:
    """Allow ``cls`` in ``replace`` ops (usable as a class decorator).

    Registered under its import path ``f"{cls.__module__}.{cls.__qualname__}"``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_class expects an nn.Module subclass, got {cls!r}.")
    _REGISTERED[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


register_module_class(nn.Identity)


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(output, input) width of a layer whose channels can be removed, else ``None``."""
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(module.out_channels), int(module.in_channels)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return int(module.num_features), int(module.num_features)
    return None


def channel_widths(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Layers whose width was changed by structure ops applied to ``model`` (this process).

    Returns:
        ``{layer: {"out": (original, now), "in": (original, now)}}`` for every Linear, Conv or
        BatchNorm layer whose output or input width differs from the width it had before the first
        structure op touched it (ops applied by the engine during training or replayed by
        :func:`load_checkpoint`).
    """
    before: dict[str, tuple[int, int]] = model.__dict__.get(_WIDTHS_KEY, {})
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for name, (out0, in0) in before.items():
        try:
            now = _widths(model.get_submodule(name))
        except AttributeError:
            continue
        if now is not None and now != (out0, in0):
            out[name] = {"out": (out0, now[0]), "in": (in0, now[1])}
    return out


def _resolve_class(class_path: str) -> type[nn.Module]:
    # No import by name: a checkpoint must not be able to make the loader import (and so run) an
    # arbitrary module. The program that registered the class has imported its module already.
    cls = _REGISTERED.get(class_path)
    if cls is None:
        raise ValueError(
            f"structure recipe: class {class_path!r} is not registered for module replacement; "
            "decorate it with lightning_compress.core.surgery.register_module_class and import its "
            "module before loading "
            f"(registered: {sorted(_REGISTERED) or 'none'})."
        )
    return cls


@dataclass(frozen=True)
class StructureChange:
    """What happened to one parameter in a structure change.

    Attributes:
        old_name: Parameter FQN before the change (relative to the LightningModule).
        new_name: Its FQN after the change, or ``None`` when the parameter was removed.
        kept: ``{dim: kept indices}`` for every sliced dimension (empty when the shape is unchanged).
        old_shape: Shape before the change.
        new_shape: Shape after the change (``None`` when removed).
    """

    old_name: str
    new_name: str | None
    kept: dict[int, list[int]] = field(default_factory=dict)
    old_shape: tuple[int, ...] = ()
    new_shape: tuple[int, ...] | None = None

    def slice(self, tensor: Tensor) -> Tensor:
        """Apply the kept indices to a tensor shaped like the old parameter (masks, optimizer state)."""
        out = tensor
        for dim, index in sorted(self.kept.items()):
            out = out.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=out.device))
        return out


# ---------------------------------------------------------------------------- validation
def _tensor_owner(root: nn.Module, name: str) -> tuple[nn.Module, str, Tensor]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = root.get_submodule(module_name) if module_name else root
    except AttributeError as err:
        raise ValueError(f"structure op: no module {module_name!r} for tensor {name!r}.") from err
    tensor = module._parameters.get(attr)
    if tensor is None:
        tensor = module._buffers.get(attr)
    if tensor is None:
        raise ValueError(
            f"structure op: {name!r} is neither a parameter nor a buffer of {type(module).__name__} "
            f"{module_name!r}."
        )
    return module, attr, tensor


def validate_ops(root: nn.Module, ops: Sequence[dict[str, Any]]) -> None:
    """Check every op against ``root`` without changing anything.

    Raises:
        ValueError: An op is malformed, names a missing module/tensor, or indexes out of range.
    """
    shapes: dict[str, list[int]] = {}
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or op.get("op") not in OPS:
            raise ValueError(f"structure op #{i} {op!r}: expected a dict with 'op' in {list(OPS)}.")
        if op["op"] == "add_bias":
            module_name = op.get("module")
            try:
                module = root.get_submodule(module_name) if isinstance(module_name, str) else None
            except AttributeError:
                module = None
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                raise ValueError(
                    f"structure op #{i} {op!r}: 'add_bias' needs the name of a Linear or Conv layer."
                )
            continue
        if op["op"] == "slice":
            name, dim, index = op.get("tensor"), op.get("dim"), op.get("index")
            if not isinstance(name, str) or not isinstance(dim, int) or not isinstance(index, (list, tuple)):
                raise ValueError(
                    f"structure op #{i} {op!r}: a slice needs 'tensor' (str), 'dim' (int), 'index' (list)."
                )
            if name not in shapes:
                shapes[name] = list(_tensor_owner(root, name)[2].shape)
            shape = shapes[name]
            if not -len(shape) <= dim < len(shape):
                raise ValueError(
                    f"structure op #{i}: dim {dim} is out of range for {name!r} of shape {shape}."
                )
            size = shape[dim]
            if not index or any(not isinstance(j, int) or not 0 <= j < size for j in index):
                raise ValueError(
                    f"structure op #{i}: 'index' for {name!r} dim {dim} must be a non-empty list of ints in "
                    f"[0, {size}); got {list(index)[:10]}{'...' if len(index) > 10 else ''}."
                )
            if len(set(index)) != len(index) or list(index) != sorted(index):
                raise ValueError(f"structure op #{i}: 'index' for {name!r} must be strictly increasing.")
            shape[dim] = len(index)
        else:
            module_name = op.get("module")
            if not isinstance(module_name, str) or not module_name:
                raise ValueError(f"structure op #{i} {op!r}: a replace needs a non-empty 'module' name.")
            try:
                root.get_submodule(module_name)
            except AttributeError as err:
                raise ValueError(f"structure op #{i}: no module {module_name!r} to replace.") from err
            _resolve_class(str(op.get("class_path")))
            if not isinstance(op.get("init_args", {}), dict):
                raise ValueError(f"structure op #{i}: 'init_args' must be a dict.")


# ---------------------------------------------------------------------------- applying
def _sync_shape_attributes(module: nn.Module) -> None:
    """Update the attributes that describe a layer's shape from its (sliced) tensors."""
    weight = module._parameters.get("weight")
    if (
        isinstance(module, nn.modules.conv._ConvNd)
        and weight is not None
        and not module.transposed
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and weight.shape[1] == 1
    ):
        # A depthwise conv (one filter per channel): removing a channel removes its group.
        module.groups = int(weight.shape[0])
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        if module.transposed:
            module.in_channels = int(weight.shape[0])
            module.out_channels = int(weight.shape[1]) * module.groups
        else:
            module.out_channels = int(weight.shape[0])
            module.in_channels = int(weight.shape[1]) * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        ref = weight if weight is not None else module._buffers.get("running_mean")
        if ref is not None:
            module.num_features = int(ref.shape[0])
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(int(s) for s in weight.shape)
    elif isinstance(module, nn.Embedding) and weight is not None:
        module.num_embeddings, module.embedding_dim = int(weight.shape[0]), int(weight.shape[1])


def apply_ops(root: nn.Module, ops: Sequence[dict[str, Any]]) -> list[StructureChange]:
    """Validate, then apply structure ops to ``root`` (no optimizer involved).

    Returns:
        One :class:`StructureChange` per parameter that was sliced, moved or removed, in first-touch
        order (several slices of one parameter are merged into one event).
    """
    validate_ops(root, ops)
    names_before = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    shapes_before = {n: tuple(p.shape) for n, p in root.named_parameters(remove_duplicate=False)}
    kept: dict[str, dict[int, list[int]]] = {}
    replaced_names: list[str] = []
    widths: dict[str, tuple[int, int]] = root.__dict__.setdefault(_WIDTHS_KEY, {})
    for op in ops:
        if op["op"] == "add_bias":
            module = root.get_submodule(op["module"])
            if module.bias is None:
                weight = module.weight
                size = (
                    weight.shape[1] * module.groups
                    if getattr(module, "transposed", False)
                    else weight.shape[0]
                )
                module.bias = nn.Parameter(torch.zeros(size, dtype=weight.dtype, device=weight.device))
            continue
        if op["op"] == "slice":
            module, attr, tensor = _tensor_owner(root, op["tensor"])
            module_name = op["tensor"].rpartition(".")[0]
            if module_name not in widths and _widths(module) is not None:
                widths[module_name] = _widths(module)
            dim = op["dim"] % tensor.dim()
            index = list(op["index"])
            with torch.no_grad():
                new = tensor.detach().index_select(dim, torch.as_tensor(index, device=tensor.device)).clone()
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(new, requires_grad=tensor.requires_grad)
                prev = kept.setdefault(op["tensor"], {})
                # compose with an earlier slice of the same dim: indices are relative to the sliced tensor
                prev[dim] = [prev[dim][j] for j in index] if dim in prev else index
            else:
                module._buffers[attr] = new
            _sync_shape_attributes(module)
        else:
            parent_name, _, child = op["module"].rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            old = parent.get_submodule(child)
            replaced_names.extend(
                f"{op['module']}.{n}" for n, _ in old.named_parameters(remove_duplicate=False)
            )
            cls = _resolve_class(op["class_path"])
            init_args = dict(op.get("init_args", {}))
            factory = getattr(cls, "from_module", None)
            new_module = factory(old, **init_args) if callable(factory) else cls(**init_args)
            setattr(parent, child, new_module)
    root.__dict__.setdefault(_RECIPE_KEY, []).extend(copy.deepcopy(list(ops)))
    names_after = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
    params_after = dict(root.named_parameters(remove_duplicate=False))
    changes: list[StructureChange] = []
    seen: set[str] = set()
    for name, index_by_dim in kept.items():
        seen.add(name)
        if name not in params_after:  # sliced, then its module replaced (a BatchNorm fused away)
            changes.append(StructureChange(name, None, dict(index_by_dim), shapes_before[name], None))
            continue
        changes.append(
            StructureChange(
                name, name, dict(index_by_dim), shapes_before[name], tuple(params_after[name].shape)
            )
        )
    for pid, old_name in names_before.items():
        if old_name in seen or (old_name not in replaced_names and old_name in params_after):
            continue
        new_name = names_after.get(pid)  # the same Parameter object kept by a module swap
        if (
            new_name is None
            and old_name in params_after
            and params_after[old_name].shape == shapes_before[old_name]
        ):
            new_name = old_name  # a fresh Parameter at the same place and shape
        changes.append(
            StructureChange(
                old_name,
                new_name,
                {},
                shapes_before[old_name],
                None if new_name is None else tuple(params_after[new_name].shape),
            )
        )
    return changes


def replay_recipe(root: nn.Module, recipe: Sequence[dict[str, Any]]) -> list[StructureChange]:
    """Re-apply a structure recipe to a freshly built module (before its weights are loaded)."""
    return apply_ops(root, list(recipe))


def applied_recipe(model: nn.Module) -> list[dict[str, Any]]:
    """Every structure op applied to ``model`` so far (by the engine, a replay or ``fuse``), in order."""
    return model.__dict__.get(_RECIPE_KEY, [])


def reconcile_recipe(model: nn.Module, path: str | os.PathLike) -> list[StructureChange]:
    """Give ``model`` the structure of checkpoint ``path`` before its weights are loaded.

    The checkpoint's recipe must extend the ops ``model`` already has: the missing ones are applied
    (a fresh module, or one pruned further by a later fit). A checkpoint from *before* changes the
    module already went through cannot be loaded into it (channels cannot be put back).

    Raises:
        RuntimeError: The checkpoint's structure is not reachable from the module's, with what to do.
    """
    wanted, have = read_recipe(path), applied_recipe(model)
    if wanted[: len(have)] == have:
        return replay_recipe(model, wanted[len(have) :]) if len(wanted) > len(have) else []
    if have[: len(wanted)] == wanted:
        raise RuntimeError(
            f"checkpoint {str(path)!r} was saved before this {type(model).__name__} went through "
            f"{len(have) - len(wanted)} more structure ops (channels removed, layers fused), so its weights "
            "do not fit this model; load it into a fresh instance: "
            f"lightning_compress.load_checkpoint({type(model).__name__}, path)."
        )
    raise RuntimeError(
        f"checkpoint {str(path)!r} records structure changes that differ from the ones this "
        f"{type(model).__name__} has been through; load it into a fresh instance: "
        f"lightning_compress.load_checkpoint({type(model).__name__}, path)."
    )


# ---------------------------------------------------------------------------- training state
@dataclass
class _Snapshot:
    names: dict[int, str]
    shapes: dict[str, tuple[int, ...]]
    opt_states: list[dict[str, dict[str, Any]]]
    opt_groups: list[list[dict[str, Any]]]
    opt_types: list[type]
    sched_states: list[dict[str, Any]]
    sched_types: list[type]


def snapshot_training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Snapshot:
    """Record optimizer and LR-scheduler state by parameter *name* before a structure change."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in pl_module.named_parameters()}
    opt_states, opt_groups = [], []
    for opt in trainer.optimizers:
        states = {}
        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state and id(p) in names:
                    states[names[id(p)]] = dict(opt.state[p])
        opt_states.append(states)
        opt_groups.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    return _Snapshot(
        names,
        shapes,
        opt_states,
        opt_groups,
        [type(o) for o in trainer.optimizers],
        [s.state_dict() for s in scheds],
        [type(s) for s in scheds],
    )


def rebuild_training_state(
    trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: _Snapshot, changes: list[StructureChange]
) -> None:
    """Rebuild optimizers / schedulers after ``changes`` and carry their state over; re-wrap DDP."""
    strategy = trainer.strategy
    if not trainer.optimizers:
        return
    # Where did each current parameter come from? (new name -> old name, change)
    origin: dict[str, tuple[str, StructureChange | None]] = {}
    moved = {c.old_name for c in changes}
    for c in changes:
        if c.new_name is not None:
            origin[c.new_name] = (c.old_name, c)
    for name, _ in pl_module.named_parameters():
        if name not in origin and name not in moved and name in snapshot.shapes:
            origin[name] = (name, None)

    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        # The reducer's buckets were built for the old parameters: wrap the module again.
        strategy.model = strategy._setup_model(pl_module)
        strategy._register_ddp_hooks()

    strategy.setup_optimizers(trainer)
    new_opts = trainer.optimizers
    if [type(o) for o in new_opts] != snapshot.opt_types:
        raise RuntimeError(
            "structure change: configure_optimizers() returned different optimizers after the change "
            f"({[t.__name__ for t in map(type, new_opts)]} vs {[t.__name__ for t in snapshot.opt_types]}); "
            "their state cannot be carried over."
        )
    for opt, old_states, old_groups in zip(new_opts, snapshot.opt_states, snapshot.opt_groups):
        if len(old_groups) == len(opt.param_groups):
            for group, old in zip(opt.param_groups, old_groups):
                group.update(old)  # current lr (scheduler position), initial_lr, betas, ...
        names = {id(p): n for n, p in pl_module.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                new_name = names.get(id(p))
                if new_name is None or new_name not in origin:
                    continue
                old_name, change = origin[new_name]
                old_state = old_states.get(old_name)
                if old_state is None:
                    continue
                old_shape = snapshot.shapes[old_name]
                carried = {}
                for key, value in old_state.items():
                    if isinstance(value, Tensor) and tuple(value.shape) == old_shape and old_shape != ():
                        value = change.slice(value) if change is not None else value
                        carried[key] = value.to(p.device).clone()
                    elif isinstance(value, Tensor):
                        carried[key] = value.clone()
                    else:
                        carried[key] = value
                opt.state[p] = carried
    scheds = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
    if [type(s) for s in scheds] == snapshot.sched_types:
        for sched, state in zip(scheds, snapshot.sched_states):
            sched.load_state_dict(state)
    # Lightning wraps optimizers once more (LightningOptimizer): refresh that list too.
    strategy.optimizers = list(new_opts)


# ---------------------------------------------------------------------------- checkpoints
def pending_checkpoint_path(trainer: pl.Trainer) -> str | None:
    """The checkpoint the running ``trainer.fit`` / ``validate`` / ... is about to restore, if any.

    Lightning resolves ``ckpt_path`` before ``Trainer._run`` but stores it only when restoring,
    which happens after the ``setup`` hooks; the structure recipe must be replayed before that, so
    the path is read from ``Trainer._run``'s arguments on the call stack (or ``trainer.ckpt_path``
    when the user set it).
    """
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return None if path is None else str(path)
        frame = frame.f_back
    path = trainer.ckpt_path
    return None if path is None else str(path)


def _load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    from lightning_fabric.utilities.cloud_io import _load as fabric_load

    return fabric_load(path, map_location=map_location, weights_only=True)


def read_recipe(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The structure recipe stored in a checkpoint (empty for a checkpoint without one)."""
    from lightning_compress.core.engine import CHECKPOINT_KEY

    section = _load(path).get(CHECKPOINT_KEY) or {}
    return list(section.get("recipe", []))


def _instantiate_from_cli(
    cls: type[pl.LightningModule], hparams: dict[str, Any]
) -> pl.LightningModule | None:
    """Rebuild a module LightningCLI instantiated, through its trusted instantiator (as Lightning does).

    LightningCLI stores ``_instantiator`` and ``_class_path`` with the configuration, whose nested
    ``class_path`` / ``init_args`` (e.g. a distillation wrapper's student and teacher) only the
    instantiator turns back into modules. ``None`` when the checkpoint was not written that way.
    """
    from pytorch_lightning.core.saving import _ALLOWED_INSTANTIATORS, _is_imported_subclass

    path = hparams.get("_instantiator")
    if not isinstance(path, str) or path not in _ALLOWED_INSTANTIATORS:
        return None
    class_path = hparams.get("_class_path")
    if class_path is not None and not _is_imported_subclass(class_path, cls):
        return None
    module_path, _, name = path.rpartition(".")
    instantiator = getattr(__import__(module_path, fromlist=[name]), name)
    kwargs = {k: v for k, v in hparams.items() if k not in ("_instantiator",)}
    spec = inspect.getfullargspec(cls.__init__)
    if not spec.varkw:  # as Lightning's _load_state: only the __init__ arguments
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
    return instantiator(cls, kwargs)


def load_checkpoint(
    cls: type[pl.LightningModule],
    checkpoint_path: str | os.PathLike,
    map_location: Any = "cpu",
    strict: bool = True,
    **kwargs: Any,
) -> pl.LightningModule:
    """Rebuild a compressed LightningModule from a checkpoint, without a Trainer.

    Like ``cls.load_from_checkpoint(path)``, but the structure recipe stored in the checkpoint
    (channels removed, modules swapped) is replayed on the fresh instance before the weights load,
    so shape-changing techniques load too. For checkpoints without a recipe it is equivalent.

    Args:
        cls: The user's LightningModule class.
        checkpoint_path: Path (or URL) of a Lightning checkpoint.
        map_location: Where tensors are loaded (default CPU).
        strict: Passed to ``load_state_dict``.
        **kwargs: Override the hyper-parameters saved in the checkpoint.

    Returns:
        The model with the compressed structure and weights.
    """
    from lightning_compress.core.engine import CHECKPOINT_KEY

    checkpoint = _load(checkpoint_path, map_location)
    hparams: dict[str, Any] = {}
    if cls.CHECKPOINT_HYPER_PARAMS_KEY in checkpoint:
        hparams.update(checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}))
        hparams = dict(_convert_loaded_hparams(hparams, checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_TYPE)))
    hparams.update(kwargs)
    model = _instantiate_from_cli(cls, hparams)
    if model is None:
        signature = inspect.signature(cls.__init__)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            hparams = {k: v for k, v in hparams.items() if k in signature.parameters and k != "self"}
        model = cls(**hparams)
    if is_overridden("configure_model", model):
        model.configure_model()
    recipe = (checkpoint.get(CHECKPOINT_KEY) or {}).get("recipe", [])
    if recipe:
        replay_recipe(model, recipe)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model
