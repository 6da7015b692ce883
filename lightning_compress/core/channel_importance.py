"""How important each channel of a :class:`~lightning_compress.core.channels.ChannelGroup` is.

Scoring objects for structured pruning, separate from the algorithm and the schedule (as in
Torch-Pruning). Each returns one non-negative float64 score per group channel; higher = keep.

* ``l1`` / ``l2``: norm of the filters that produce the channel (Li et al., ICLR 2017, "Pruning
  Filters for Efficient ConvNets"); in a coupled group (a residual stage) the producers' norms add.
* ``fpgm``: distance of each filter to the others, summed (He et al., CVPR 2019, "Filter Pruning via
  Geometric Median"): filters near the geometric median are replaceable by the rest.
* ``bn_scale``: ``|gamma|`` of the BatchNorm after the channel (Liu et al., ICCV 2017, "Learning
  Efficient Convolutional Networks through Network Slimming"); averaged over a group's BatchNorms.
* ``taylor``: first-order Taylor estimate of the loss change when the whole channel is removed,
  ``(sum_{s in channel} g_s w_s)^2`` over every parameter of the group, averaged over the training
  steps since the last update (Molchanov et al., CVPR 2019, "Importance Estimation for Neural
  Network Pruning"). Gradients are read in the engine's ``observe`` phase, after DDP averaged them;
  the accumulators are reduced across ranks anyway, in a fixed order, before scoring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.channels import OUT, ChannelGroup, GroupMember
from lightning_compress.core.engine import OBSERVE, Constraint

__all__ = [
    "CHANNEL_CRITERIA",
    "BNScaleImportance",
    "ChannelImportance",
    "FPGMImportance",
    "GroupTaylorImportance",
    "NormImportance",
    "make_channel_importance",
]

CHANNEL_CRITERIA: tuple[str, ...] = ("l1", "l2", "fpgm", "bn_scale", "taylor")


def _param(root: nn.Module, name: str) -> Tensor:
    return root.get_parameter(name)


def _per_position(member: GroupMember, tensor: Tensor) -> Tensor:
    """``tensor`` moved so that ``member.dim`` is first, restricted to the member's positions, flattened."""
    t = tensor.detach().movedim(member.dim, 0)
    return t.index_select(0, member.positions.to(t.device)).reshape(len(member.positions), -1)


def _scatter(group: ChannelGroup, member: GroupMember, values: Tensor, out: Tensor) -> None:
    out.index_add_(0, member.channels, values.to(torch.float64).cpu())


def _filter_scores(
    root: nn.Module, groups: Sequence[ChannelGroup], per_filter: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Per-channel scores from the filters that produce each group's channels.

    ``per_filter`` maps a producing weight's rows (one float64 row per channel position) to one
    value per row; the values are summed onto the group's channels over its producers.
    """
    out = []
    for g in groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.weights(OUT):
            _scatter(g, m, per_filter(_per_position(m, _param(root, m.tensor)).to(torch.float64)), s)
        out.append(s)
    return out


class ChannelImportance:
    """Base class: per-channel scores of channel groups.

    Subclasses implement :meth:`scores`. Data-dependent ones also use :meth:`attach`,
    :meth:`constraints`, :meth:`begin_step`, :meth:`reduce`, :meth:`reset` and the state methods.
    """

    #: Whether scores of different groups are on a common scale (no per-group normalisation needed
    #: for a global threshold).
    comparable: bool = False

    def supports(self, group: ChannelGroup) -> str | None:
        """``None`` when the group can be scored, else the reason it cannot."""
        return None

    def attach(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> None:
        """Bind to the model's groups (once per fit, and after a structure change)."""

    def constraints(self) -> list[Constraint]:
        """Per-step work (gradient statistics)."""
        return []

    def begin_step(self) -> None:
        """A new training step starts (close the previous step's statistics)."""

    def reduce(self, reduce_fn: Callable[[Tensor, str], Tensor]) -> None:
        """Average data-dependent statistics across ranks (``reduce_fn(tensor, "mean")``)."""

    def scores(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> list[Tensor]:
        """One float64 CPU score vector (length ``group.size``) per group."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget statistics after an update."""

    def state_dict(self) -> dict[str, Any]:
        """Statistics to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class NormImportance(ChannelImportance):
    """``l1`` / ``l2``: the p-norm of each channel's filters, summed over the group's producers.

    Args:
        p: 1 or 2.
    """

    def __init__(self, p: int = 1) -> None:
        self.p = p

    @override
    def scores(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> list[Tensor]:
        if self.p == 2:
            return _filter_scores(root, groups, lambda rows: rows.norm(dim=1))
        return _filter_scores(root, groups, lambda rows: rows.abs().sum(1))


class FPGMImportance(ChannelImportance):
    """Filter Pruning via Geometric Median: a filter's summed distance to the layer's other filters."""

    @override
    def scores(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> list[Tensor]:
        return _filter_scores(root, groups, lambda rows: torch.cdist(rows, rows).sum(1))


class BNScaleImportance(ChannelImportance):
    """Network slimming's ``|gamma|``: mean over the BatchNorm layers of the group."""

    comparable = True  # Liu et al. threshold raw |gamma| across all layers

    @override
    def supports(self, group: ChannelGroup) -> str | None:
        return None if group.norms() else "it has no BatchNorm scale (criterion 'bn_scale')"

    @override
    def scores(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> list[Tensor]:
        out = []
        for g in groups:
            s = torch.zeros(g.size, dtype=torch.float64)
            norms = g.norms()
            for m in norms:
                _scatter(g, m, _per_position(m, _param(root, m.tensor)).abs().sum(1), s)
            out.append(s / max(len(norms), 1))
        return out


class _TaylorObserver(Constraint):
    def __init__(self, owner: GroupTaylorImportance, params: list[nn.Parameter]) -> None:
        super().__init__(OBSERVE, params, owner="GroupTaylorImportance")
        self.owner = owner

    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        ids = {id(p) for p in params}
        work = [w for w in self.owner._work if id(w[1]) in ids]
        if not work:
            return None
        owner = self.owner

        @torch.no_grad()
        def run() -> None:
            # Per member: (g * w) summed over everything but the channel positions, scattered onto the
            # group's channels. Indices live on the parameter's device: no host transfer, no sync.
            for gi, p, dim, positions, channels in work:
                if p.grad is None:
                    continue
                rows = (p.grad * p).movedim(dim, 0).index_select(0, positions)
                owner._current[gi].index_add_(0, channels, rows.reshape(len(positions), -1).sum(1))
            owner._touched = True

        return run


class GroupTaylorImportance(ChannelImportance):
    """Group first-order Taylor importance ``(sum_s g_s w_s)^2``, averaged over training steps.

    Statistics stay on the parameters' device (float32 sums per step, float64 accumulators); the
    only host transfer is at scoring time.
    """

    def __init__(self) -> None:
        self._work: list[tuple[int, nn.Parameter, int, Tensor, Tensor]] = []
        self._current: list[Tensor] = []
        self._sum: list[Tensor] = []
        self._steps = 0
        self._touched = False
        self._restored: dict[str, Any] | None = None

    @override
    def attach(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> None:
        self._work = []
        for gi, g in enumerate(groups):
            for m in g.members:
                if m.is_param:
                    p = root.get_parameter(m.tensor)
                    self._work.append((gi, p, m.dim, m.positions.to(p.device), m.channels.to(p.device)))
        device = self._work[0][1].device if self._work else torch.device("cpu")
        dtype = self._work[0][1].dtype if self._work else torch.float32
        self._current = [torch.zeros(g.size, dtype=dtype, device=device) for g in groups]
        restored, self._restored = self._restored, None
        if restored and [len(s) for s in restored.get("sum", [])] == [g.size for g in groups]:
            self._sum = [s.to(device, torch.float64).clone() for s in restored["sum"]]
            self._steps = int(restored.get("steps", 0))
        else:
            self._sum = [torch.zeros(g.size, dtype=torch.float64, device=device) for g in groups]
            self._steps = 0

    @override
    def constraints(self) -> list[Constraint]:
        params = list({id(p): p for _, p, _, _, _ in self._work}.values())
        return [_TaylorObserver(self, params)] if params else []

    @override
    def begin_step(self) -> None:
        if self._touched:
            for s, c in zip(self._sum, self._current):
                s.add_(c.to(torch.float64).square())
                c.zero_()
            self._steps += 1
            self._touched = False

    @override
    def reduce(self, reduce_fn: Callable[[Tensor, str], Tensor]) -> None:
        self.begin_step()
        if not self._sum:
            return
        flat = reduce_fn(torch.cat(self._sum), "mean")  # one collective, in group order
        self._sum = list(flat.to(torch.float64).split([len(s) for s in self._sum]))

    @override
    def scores(self, root: nn.Module, groups: Sequence[ChannelGroup]) -> list[Tensor]:
        self.begin_step()
        if self._steps == 0:  # no gradient seen yet (an update at the very first step): magnitude
            return NormImportance(2).scores(root, groups)
        return [(s / self._steps).cpu() for s in self._sum]

    @override
    def reset(self) -> None:
        for s in self._sum:
            s.zero_()
        for c in self._current:
            c.zero_()
        self._steps = 0
        self._touched = False

    @override
    def state_dict(self) -> dict[str, Any]:
        self.begin_step()
        return {"sum": [s.cpu().clone() for s in self._sum], "steps": self._steps}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state) if state else None


def make_channel_importance(criterion: str) -> ChannelImportance:
    """The importance object for a criterion name in :data:`CHANNEL_CRITERIA`."""
    if criterion == "l1":
        return NormImportance(1)
    if criterion == "l2":
        return NormImportance(2)
    if criterion == "fpgm":
        return FPGMImportance()
    if criterion == "bn_scale":
        return BNScaleImportance()
    if criterion == "taylor":
        return GroupTaylorImportance()
    raise ValueError(f"`criterion`={criterion!r} is not supported; expected one of {list(CHANNEL_CRITERIA)}.")
