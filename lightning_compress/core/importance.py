"""Importance scores as objects: own hooks and statistics, checkpoint themselves, agree across ranks.

An importance object scores every entry of the parameters a technique targets (higher = keep). The
technique (pruning, structured pruning, ...) decides *what* to remove and *when*; the importance
object only answers *how important* each entry is:

* :class:`MagnitudeImportance`: ``|w|`` (Han et al., 2015).
* :class:`TaylorImportance`: ``sum_t |w_t * g_t|`` over the steps since the last update, the
  first-order Taylor estimate of the loss change when an entry is removed (Molchanov et al., 2017,
  2019). Gathered by an engine constraint in the ``observe`` phase, so it sees the final (unscaled,
  DDP-averaged) gradients exactly once per real optimizer step and never those of a step the AMP
  scaler skips.
* :class:`ActivationImportance`: ``|w_ij| * E|x_j|``, weight magnitude times the mean absolute input
  on its input feature / channel (Wanda, Sun et al., 2023, with the L1 norm), from forward hooks
  that run only during a calibration window before each update.
* :class:`LAMPImportance`: layer-adaptive magnitude (Lee et al., 2021) for global scope.
* :class:`RandomImportance`: uniform scores seeded by ``(seed, step)``; a baseline.

Cross-rank agreement: statistics are reduced with ``trainer.strategy.reduce`` in the fixed order
of the targets, flattened into one tensor; a layer that did not run on this rank contributes zeros
(and a zero count), so data-dependent forward paths can neither hang the collective nor make ranks
disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.engine import OBSERVE, Constraint
from lightning_compress.core.params import TargetParam, activation_input
from lightning_compress.functional.pruning import channel_mean_abs, lamp_score, magnitude_score, random_score

__all__ = [
    "ActivationImportance",
    "Importance",
    "LAMPImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
    "make_importance",
]


class Importance:
    """Base class: scores for the targeted parameters. Stateless unless a subclass gathers statistics.

    Lifecycle (driven by the technique): :meth:`attach` once per fit, :meth:`constraints` handed to
    the engine, :meth:`wants_window` / :meth:`open_window` / :meth:`close_window` around updates,
    :meth:`reduce` (all ranks, same order) and :meth:`scores` at an update, :meth:`reset` after it.
    """

    name = "importance"

    def __init__(self) -> None:
        self.targets: list[TargetParam] = []
        self.params: list[nn.Parameter] = []

    def attach(self, root: nn.Module, targets: Sequence[TargetParam]) -> None:
        """Bind to the targeted parameters of ``root`` (called at every train start and structure change)."""
        self.targets = list(targets)
        self.params = [root.get_parameter(t.param) for t in self.targets]

    def constraints(self) -> list[Constraint]:
        """Engine constraints that gather statistics (none by default)."""
        return []

    def wants_window(self, steps_to_update: int) -> bool:
        """Whether statistics should be gathered during a batch ``steps_to_update`` steps before an update."""
        return False

    def open_window(self, root: nn.Module) -> None:
        """Start gathering statistics (attach hooks)."""

    def close_window(self) -> None:
        """Stop gathering statistics (remove hooks); gathered statistics are kept."""

    def reduce(self, reduce_fn: Callable[[Tensor, str], Tensor]) -> None:
        """Agree on statistics across ranks; ``reduce_fn(tensor, op)`` is ``trainer.strategy.reduce``."""

    def scores(self, step: int) -> list[Tensor]:
        """One score tensor per target, shaped like its parameter (higher = keep)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget gathered statistics (after an update)."""

    def state_dict(self) -> dict[str, Any]:
        """Statistics to checkpoint (plain tensors and numbers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before :meth:`attach`)."""


class MagnitudeImportance(Importance):
    """``|w|`` (Han et al., 2015, "Learning both Weights and Connections")."""

    name = "magnitude"

    @override
    def scores(self, step: int) -> list[Tensor]:
        return [magnitude_score(p) for p in self.params]


class LAMPImportance(Importance):
    """Layer-adaptive magnitude (LAMP; Lee et al., ICLR 2021): ``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2``.

    Ranks like magnitude inside a layer; in global scope it decides how sparse each layer gets
    (see :func:`lightning_compress.functional.pruning.lamp_score`).
    """

    name = "lamp"

    @override
    def scores(self, step: int) -> list[Tensor]:
        return [lamp_score(p) for p in self.params]


class RandomImportance(Importance):
    """Uniform random scores from a generator seeded by ``(seed, step)``: identical on every rank."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    @override
    def scores(self, step: int) -> list[Tensor]:
        # one stream per target, so adding a layer does not change the others' scores
        return [
            random_score(p.shape, step * 7919 + i, self.seed, p.device) for i, p in enumerate(self.params)
        ]


class _TaylorObserver(Constraint):
    def __init__(self, owner: TaylorImportance) -> None:
        super().__init__(OBSERVE, owner.params, "TaylorImportance")
        self.owner = owner

    @override
    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        index = {id(p): i for i, p in enumerate(self.owner.params)}
        plist = [p for p in params if id(p) in index]
        slots = [index[id(p)] for p in plist]
        owner = self.owner

        def run() -> None:
            pairs = [(p, i) for p, i in zip(plist, slots) if p.grad is not None]
            if not pairs:
                return
            prods = torch._foreach_mul([p.detach() for p, _ in pairs], [p.grad for p, _ in pairs])
            torch._foreach_abs_(prods)
            torch._foreach_add_([owner.acc[i] for _, i in pairs], prods)
            for _, i in pairs:
                owner.steps[i] += 1

        return run


class TaylorImportance(Importance):
    """First-order Taylor importance ``mean_t |w_t * g_t|`` since the last update (Molchanov et al., 2017).

    The mean runs over the steps in which the parameter had a gradient, so a network whose optimizer
    steps less often (a frozen phase, a WGAN generator's ``n_critic`` schedule) is not pruned harder
    in global scope merely for having fewer terms.
    """

    name = "taylor"

    def __init__(self) -> None:
        super().__init__()
        self.acc: list[Tensor] = []
        self.steps: list[int] = []
        self._saved: dict[str, Tensor] = {}
        self._saved_steps: dict[str, int] = {}

    @override
    def attach(self, root: nn.Module, targets: Sequence[TargetParam]) -> None:
        old = {t.param: a for t, a in zip(self.targets, self.acc)}
        old_steps = {t.param: n for t, n in zip(self.targets, self.steps)}
        old.update(self._saved)
        old_steps.update(self._saved_steps)
        self._saved, self._saved_steps = {}, {}
        super().attach(root, targets)
        self.acc, self.steps = [], []
        for t, p in zip(self.targets, self.params):
            prev = old.get(t.param)
            ok = prev is not None and prev.shape == p.shape
            self.acc.append(
                prev.to(p.device, torch.float32) if ok else torch.zeros_like(p, dtype=torch.float32)
            )
            self.steps.append(int(old_steps.get(t.param, 0)) if ok else 0)

    @override
    def constraints(self) -> list[Constraint]:
        return [_TaylorObserver(self)] if self.params else []

    @override
    def reduce(self, reduce_fn: Callable[[Tensor, str], Tensor]) -> None:
        if not self.acc:
            return
        flat = reduce_fn(torch.cat([a.flatten() for a in self.acc]), "mean")
        for a, part in zip(self.acc, flat.split([a.numel() for a in self.acc])):
            a.copy_(part.view_as(a))

    @override
    def scores(self, step: int) -> list[Tensor]:
        return [a / max(n, 1) for a, n in zip(self.acc, self.steps)]

    @override
    def reset(self) -> None:
        for a in self.acc:
            a.zero_()
        self.steps = [0] * len(self.acc)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "acc": {t.param: a.detach().cpu().clone() for t, a in zip(self.targets, self.acc)},
            "steps": {t.param: n for t, n in zip(self.targets, self.steps)},
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = dict(state.get("acc", {}))
        self._saved_steps = {k: int(v) for k, v in state.get("steps", {}).items()}


class ActivationImportance(Importance):
    """``|w_ij| * E|x_j|`` from forward hooks during ``calibration_steps`` steps before each update.

    For grouped convolutions the input channel of ``w[o, j]`` is ``g(o) * C_in/groups + j``. Layers
    whose input is not a float feature tensor (embeddings) and layers that saw no input in the window
    on any rank are scored by magnitude.
    """

    name = "activation"

    def __init__(self, calibration_steps: int = 8) -> None:
        super().__init__()
        self.calibration_steps = calibration_steps
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._handles: list[Any] = []

    @override
    def wants_window(self, steps_to_update: int) -> bool:
        return 0 <= steps_to_update < self.calibration_steps

    @override
    def open_window(self, root: nn.Module) -> None:
        if self._handles:
            return
        by_module: dict[str, list[TargetParam]] = {}
        for t in self.targets:
            if t.kind != "Embedding":
                by_module.setdefault(t.module, []).append(t)
        for module_name, targets in by_module.items():
            module = root.get_submodule(module_name) if module_name else root
            self._handles.append(module.register_forward_hook(self._hook(targets), with_kwargs=True))

    @staticmethod
    def statistic(x: Tensor, channel_dim: int) -> Tensor:
        """The per-input-channel statistic of one batch (default: mean ``|x|``). Override to change it."""
        return channel_mean_abs(x, channel_dim)

    @staticmethod
    def channel_scale(mean_statistic: Tensor) -> Tensor:
        """What multiplies ``|w|`` per input channel, from the window's mean statistic (default: as is)."""
        return mean_statistic

    def _hook(self, targets: list[TargetParam]) -> Callable[..., None]:
        statistic = self.statistic

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not module.training:
                return
            for t in targets:
                x = activation_input(t, args, kwargs)
                if not isinstance(x, Tensor) or not x.is_floating_point():
                    continue
                stat = statistic(x, t.input_dim)
                if t.param in self.sums:
                    self.sums[t.param] += stat
                    self.counts[t.param] += 1
                else:
                    self.sums[t.param], self.counts[t.param] = stat, 1

        return hook

    @override
    def close_window(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @override
    def reduce(self, reduce_fn: Callable[[Tensor, str], Tensor]) -> None:
        parts, sizes = [], []
        for t, p in zip(self.targets, self.params):
            if t.kind == "Embedding":
                continue
            s = self.sums.get(t.param)
            size = s.numel() if s is not None else self._expected_size(t, p)
            parts.append(s.float() if s is not None else torch.zeros(size, device=p.device))
            parts.append(torch.tensor([float(self.counts.get(t.param, 0))], device=p.device))
            sizes += [size, 1]
        if not parts:
            return
        flat = reduce_fn(torch.cat(parts), "sum")
        chunks = flat.split(sizes)
        i = 0
        for t in self.targets:
            if t.kind == "Embedding":
                continue
            total, count = chunks[i], round(float(chunks[i + 1]))
            i += 2
            if count > 0:
                self.sums[t.param], self.counts[t.param] = total.clone(), count
            else:
                self.sums.pop(t.param, None)
                self.counts.pop(t.param, None)

    def _expected_size(self, t: TargetParam, p: Tensor) -> int:
        module_groups = getattr(self, "_groups", {}).get(t.param, 1)
        return p.shape[1] * module_groups

    @override
    def attach(self, root: nn.Module, targets: Sequence[TargetParam]) -> None:
        super().attach(root, targets)
        self._groups = {}
        for t, p in zip(self.targets, self.params):
            module = root.get_submodule(t.module) if t.module else root
            self._groups[t.param] = int(getattr(module, "groups", 1)) if t.kind.startswith("Conv") else 1
            if t.param in self.sums:  # partial statistics restored from a checkpoint
                self.sums[t.param] = self.sums[t.param].to(p.device)

    @override
    def scores(self, step: int) -> list[Tensor]:
        out = []
        for t, p in zip(self.targets, self.params):
            s = self.sums.get(t.param)
            if s is None or t.kind == "Embedding":
                out.append(magnitude_score(p))
                continue
            mean = self.channel_scale(s / self.counts[t.param])
            groups = self._groups.get(t.param, 1)
            c_out, c_in_g = p.shape[0], p.shape[1]
            if groups > 1:
                scale = (
                    mean.view(groups, 1, c_in_g)
                    .expand(groups, c_out // groups, c_in_g)
                    .reshape(c_out, c_in_g)
                )
            else:
                scale = mean.view(1, c_in_g)
            scale = scale.view(*scale.shape, *([1] * (p.dim() - 2)))
            out.append(p.detach().abs() * scale.to(p.dtype))
        return out

    @override
    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {n: s.detach().cpu().clone() for n, s in self.sums.items()},
            "counts": dict(self.counts),
        }

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state.get("sums", {}))
        self.counts = {k: int(v) for k, v in state.get("counts", {}).items()}


def make_importance(criterion: str, seed: int = 0, calibration_steps: int = 8) -> Importance:
    """The importance object for a criterion name (``magnitude``, ``taylor``, ``activation``, ``random``)."""
    if criterion == "magnitude":
        return MagnitudeImportance()
    if criterion == "taylor":
        return TaylorImportance()
    if criterion == "activation":
        return ActivationImportance(calibration_steps)
    if criterion == "random":
        return RandomImportance(seed)
    if criterion == "lamp":
        return LAMPImportance()
    raise ValueError(
        f"`criterion`={criterion!r} is not supported; expected one of "
        "['magnitude', 'taylor', 'activation', 'random', 'lamp']."
    )
