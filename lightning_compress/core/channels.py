"""Coupled channel groups from Torch-Pruning's dependency graph, and what removing channels costs.

Removing output channel ``c`` of a convolution also removes input channel ``c`` of every layer that
reads it, the matching BatchNorm entries, the channel in every tensor added to it in a residual
block, the ``H*W`` columns of a Linear after ``flatten``, a depthwise convolution's filter, the right
slice of a concatenation... Torch-Pruning's ``DependencyGraph`` (Fang et al., CVPR 2023, "DepGraph:
Towards Any Structural Pruning") traces these couplings through autograd; we do not write our own
tracer. :func:`build_channel_groups` turns each of its pruning groups into a
:class:`ChannelGroup`: for every tensor the group touches, the dimension and the positions of
each group channel in it, in names relative to the compression root. Everything downstream (masks,
structure ops, costs) is plain tensor indexing on those members, so the graph is needed only once.

A group is left alone (with a reason) when the forward returns its channels (the classifier's
classes, or features the model also returns), when it passes through a split / slice of the
channels, touches tied weights or a layer we cannot slice exactly (LayerNorm, grouped non-depthwise
convs, attention, recurrent layers, bare ``nn.Parameter`` tensors), or holds a layer excluded by
``targets`` / ``exclude``; and, as a last line of defence, when removing its channels from a copy
of the model does not compute what masking them computes (a view or permute the graph cannot map).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "ChannelCost",
    "ChannelGroup",
    "GroupMember",
    "build_channel_groups",
    "call_model",
    "channel_masks",
    "plain_copy",
    "removal_ops",
    "removal_preserves_function",
]

#: Roles of a member tensor in its group.
OUT, IN, NORM = "out", "in", "norm"


@dataclass
class GroupMember:
    """One tensor dimension a channel group touches.

    Attributes:
        module: Name of the layer owning the tensor (relative to the root).
        tensor: Tensor name relative to the root, e.g. ``"features.0.weight"``.
        dim: The dimension the channels live on.
        positions: Indices along ``dim`` that belong to the group (``LongTensor``).
        channels: The group channel of each position (same length; a Linear after ``flatten`` has
            ``H*W`` positions per channel).
        role: ``"out"`` (produces the channel: filters, biases), ``"in"`` (reads it) or ``"norm"``
            (BatchNorm / LayerNorm entries and statistics).
        is_param: Whether the tensor is a parameter (else a buffer such as ``running_mean``).
    """

    module: str
    tensor: str
    dim: int
    positions: Tensor
    channels: Tensor
    role: str
    is_param: bool


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        name: The layer whose output channels define the group (Torch-Pruning's root layer).
        size: Number of channels.
        members: Every tensor dimension the group touches.
        layers: Conv / Linear layers producing the channels (``"out"`` members), in graph order.
    """

    name: str
    size: int
    members: list[GroupMember] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    def weights(self, role: str) -> list[GroupMember]:
        """Conv / Linear ``weight`` members with ``role``."""
        return [m for m in self.members if m.role == role and m.tensor.endswith(".weight")]

    def norms(self) -> list[GroupMember]:
        """BatchNorm / LayerNorm scale (``weight``) members."""
        return [m for m in self.members if m.role == NORM and m.is_param and m.tensor.endswith(".weight")]


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _member_tensors(module: nn.Module, kind: str) -> list[tuple[str, int, str]] | None:
    """``(attribute, dim, role)`` of the tensors a channel of ``module`` lives in; ``None`` = unsupported."""
    has = {n for n, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}

    def only(items: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
        return [it for it in items if it[0] in has]

    if isinstance(module, nn.Linear):
        return only([("weight", 0, OUT), ("bias", 0, OUT)] if kind == OUT else [("weight", 1, IN)])
    if isinstance(module, nn.modules.conv._ConvNd):
        if _is_depthwise(module):  # one filter per channel: its input and output are the same channel
            return only([("weight", 0, OUT), ("bias", 0, OUT)])
        if module.groups != 1:
            return None
        if module.transposed:
            return only([("weight", 1, OUT), ("bias", 0, OUT)] if kind == OUT else [("weight", 0, IN)])
        return only([("weight", 0, OUT), ("bias", 0, OUT)] if kind == OUT else [("weight", 1, IN)])
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return only([(n, 0, NORM) for n in ("weight", "bias", "running_mean", "running_var")])
    if isinstance(module, nn.LayerNorm):
        return None  # its statistics include the masked channels: masking != removing
    if isinstance(module, nn.PReLU):
        return only([("weight", 0, NORM)]) if module.num_parameters > 1 else []
    if isinstance(module, nn.Embedding):
        return only([("weight", 1, OUT)])
    if not has and not any(True for _ in module.children()):
        return []  # activations, pooling, dropout, flatten: nothing to slice
    return None


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(example)``: a tensor is one argument, a tuple / list positional ones, a dict keywords."""
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _trace(root: nn.Module, example_input: Any, owner: str) -> tuple[Any, set[Any]]:
    """Torch-Pruning's graph of ``root``, and the autograd nodes of every tensor the forward returns."""
    import torch_pruning as tp

    returned: list[Any] = []

    def forward(model: nn.Module, inputs: Any) -> Any:
        out = call_model(model, inputs)
        returned.append(out)
        return out

    modes = {m: m.training for m in root.modules()}
    root.eval()  # tracing runs a forward: keep BatchNorm statistics and dropout out of it
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                root, example_inputs=example_input, forward_fn=forward, verbose=False
            )
    except Exception as err:
        raise ValueError(
            f"{owner}: Torch-Pruning could not trace {type(root).__name__} to find which channels are "
            f"coupled ({type(err).__name__}: {err}). The model's forward must run on its example input "
            "(`example_input_array`, or the first training batch) with autograd enabled and return "
            "tensors (or tuples / lists / dicts of them); exclude the layers it cannot follow or use "
            "unstructured pruning (GradualPruning)."
        ) from err
    finally:
        for m, training in modes.items():
            m.training = training
    outputs = {t.grad_fn for t in tree_leaves(returned) if isinstance(t, Tensor) and t.grad_fn is not None}
    return graph, outputs


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its hooks.

    A hook that is a callback's bound method would drag the callback, and the trainer it holds, into
    the copy.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for name, value in vars(sub).items():
            if name.startswith("_") and "hooks" in name and isinstance(value, dict):
                memo[id(value)] = type(value)()
    return copy.deepcopy(module, memo)


def _outputs_match(a: Any, b: Any) -> bool:
    la = [t for t in tree_leaves(a) if isinstance(t, Tensor)]
    lb = [t for t in tree_leaves(b) if isinstance(t, Tensor)]
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False
        if x.is_floating_point():
            scale = float(x.abs().max()) if x.numel() else 0.0
            if not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4 * max(scale, 1.0)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def removal_preserves_function(
    root: nn.Module, example_input: Any, groups: Sequence[ChannelGroup], keep: Sequence[Tensor]
) -> bool:
    """Whether physically removing the channels ``keep`` drops computes what masking them computes.

    Both are done on hook-free copies in eval mode, on ``example_input``; every returned tensor must
    have the same shape and values (1e-4 relative). This catches what a graph cannot promise: a
    view, permute or reshape whose channel mapping the tracer does not know.
    """
    masked, pruned = plain_copy(root).eval(), plain_copy(root).eval()
    try:
        with torch.no_grad():
            for name, mask in channel_masks(masked, groups, keep).items():
                masked.get_parameter(name).mul_(mask)
            from lightning_compress.core.surgery import apply_ops

            apply_ops(pruned, removal_ops(pruned, groups, keep))
            return _outputs_match(call_model(masked, example_input), call_model(pruned, example_input))
    except Exception:
        return False


def _probe_keep(groups: Sequence[ChannelGroup], seed: int = 0) -> list[Tensor]:
    """Random keep-masks removing about half of every group (never all of it), for self-checks."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for g in groups:
        k = torch.rand(g.size, generator=gen) < 0.5
        k[int(torch.randint(g.size, (1,), generator=gen))] = True
        if g.size > 1 and bool(k.all()):
            k[0] = False
        keep.append(k)
    return keep


def build_channel_groups(
    root: nn.Module,
    example_input: Any,
    allowed: Callable[[str], bool] | None = None,
    owner: str = "StructuredPruning",
    verify: bool = True,
) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Trace ``root`` on ``example_input`` and return its prunable channel groups.

    Torch-Pruning's groups are taken as they are, except that a group is left alone (with the reason)
    when its channels are returned by the forward (the classes, or an intermediate tensor the model
    also returns), when it passes through a split / slice / unbind / expand, when one tensor position
    would belong to two channels, when it touches a tensor shared by two layers (tied weights), or a
    layer that cannot be sliced exactly (LayerNorm, attention, recurrent layers, grouped convs). With
    ``verify`` the remaining groups are checked on copies of the model: removing random channels
    must compute what masking them computes; groups that fail (a view or permute the graph does not
    map) are left alone too.

    Args:
        root: The model (compression root).
        example_input: Input for one forward (tensor, tuple of positional tensors or dict).
        allowed: Which layers may lose output channels (``targets`` / ``exclude``); a group whose
            producing Conv / Linear layers are not all allowed is skipped. ``None`` allows all.
        owner: Name used in error messages.
        verify: Check removal against masking on copies of the model (two forwards).

    Returns:
        The groups (in graph order) and ``{group root layer: reason}`` for the groups left alone.

    Raises:
        ValueError: Torch-Pruning cannot trace the model (the message says what to do).
    """
    import torch_pruning as tp

    graph, returned = _trace(root, example_input, owner)
    names = {m: n for n, m in root.named_modules()}
    param_names: dict[int, list[str]] = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(n)
    tied = {n for ns in param_names.values() if len(ns) > 1 for n in ns}
    unmappable = {tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND}
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    for tp_group in graph.get_all_groups():
        items = list(tp_group.items)
        root_module = items[0].dep.target.module
        group_name = names.get(root_module, type(root_module).__name__)
        size = len(items[0].idxs)
        members: dict[tuple[str, int], tuple[GroupMember, dict[int, int]]] = {}
        reason = None
        for item in items:
            node, handler = item.dep.target, item.dep.handler
            module = node.module
            name = names.get(module) if isinstance(module, nn.Module) else None
            kind = OUT if getattr(handler, "__name__", "") == "prune_out_channels" else IN
            # A node nothing reads, or whose output the forward returns, hands its channels to the
            # caller (the classes, or features the model also returns). Only its output channels
            # matter: a final Linear's *input* channels may go.
            produces = name is None or kind == OUT
            if node.type == tp.ops.OPTYPE.OUTPUT or (
                produces and (not node.outputs or node.grad_fn in returned)
            ):
                reason = "its channels are returned by the model's forward"
                break
            if node.type in unmappable:
                reason = f"it passes through a {node.type.name.lower()} of the channel dimension"
                break
            if name is None:
                if node.type == tp.ops.OPTYPE.PARAMETER:
                    reason = "it reaches a bare nn.Parameter"
                    break
                continue  # reshape, add, concat, ...: operators without tensors
            tensors = _member_tensors(module, kind)
            if tensors is None:
                reason = (
                    f"it reaches layer {name!r} ({type(module).__name__}), which cannot be sliced exactly"
                )
                break
            root_idxs = getattr(item, "root_idxs", None)
            if root_idxs is None or any(r is None for r in root_idxs):
                reason = f"Torch-Pruning gives no channel mapping for layer {name!r}"
                break
            for attr, dim, role in tensors:
                key = (f"{name}.{attr}" if name else attr, dim)
                if key[0] in tied:
                    reason = f"its tensor {key[0]!r} is shared with another layer (tied weights)"
                    break
                if key not in members:
                    is_param = attr in module._parameters
                    members[key] = (
                        GroupMember(name, key[0], dim, torch.empty(0), torch.empty(0), role, is_param),
                        {},
                    )
                mapping = members[key][1]
                for pos, ch in zip(item.idxs, root_idxs):
                    if mapping.setdefault(int(pos), int(ch)) != int(ch):
                        reason = f"a position of {key[0]!r} would belong to two channels"
                        break
                if reason is not None:
                    break
            if reason is not None:
                break
        if reason is None and allowed is not None:
            blocked = [
                m.module
                for m, _ in members.values()
                if m.role == OUT
                and isinstance(root.get_submodule(m.module), (nn.Linear, nn.modules.conv._ConvNd))
                and not allowed(m.module)
            ]
            if blocked:
                reason = f"layer {blocked[0]!r} is not in `targets` or is in `exclude`"
        if reason is None and not any(m.role == OUT for m, _ in members.values()):
            reason = "no layer produces its channels"
        if reason is not None:
            skipped[group_name] = reason
            continue
        group = ChannelGroup(group_name, size)
        for member, mapping in members.values():
            pos = sorted(mapping)
            member.positions = torch.tensor(pos, dtype=torch.long)
            member.channels = torch.tensor([mapping[p] for p in pos], dtype=torch.long)
            group.members.append(member)
            if member.role == OUT and member.module not in group.layers:
                group.layers.append(member.module)
        groups.append(group)
    if verify and groups and not removal_preserves_function(root, example_input, groups, _probe_keep(groups)):
        good = []
        for i, g in enumerate(groups):
            if removal_preserves_function(root, example_input, [g], _probe_keep([g], seed=i)):
                good.append(g)
            else:
                skipped[g.name] = (
                    "removing its channels would change what the model computes (a view, permute or "
                    "reshape of the channels that Torch-Pruning does not map)"
                )
        groups = good
    return groups, skipped


def _tensor(root: nn.Module, name: str) -> Tensor:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    tensor = module._parameters.get(attr)
    return tensor if tensor is not None else module._buffers[attr]


def _removed_positions(
    groups: Sequence[ChannelGroup], keep: Sequence[Tensor]
) -> dict[tuple[str, int], Tensor]:
    out: dict[tuple[str, int], list[Tensor]] = {}
    for group, k in zip(groups, keep):
        drop = ~k.to(torch.bool).cpu()
        for m in group.members:
            removed = m.positions[drop[m.channels]]
            if removed.numel():
                out.setdefault((m.tensor, m.dim), []).append(removed)
    return {key: torch.cat(parts).unique() for key, parts in out.items()}


def channel_masks(
    root: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Tensor]
) -> dict[str, Tensor]:
    """Element masks (True = kept) of every parameter the groups touch, for ``keep`` per group.

    Every tensor of a removed channel is masked (filters, biases, BatchNorm scale and shift, the
    next layers' input weights), so the masked model computes exactly what the model with those
    channels physically removed computes.
    """
    masks: dict[str, Tensor] = {}
    for group in groups:
        for m in group.members:
            if m.is_param and m.tensor not in masks:
                t = _tensor(root, m.tensor)
                masks[m.tensor] = torch.ones(t.shape, dtype=torch.bool, device=t.device)
    for (name, dim), removed in _removed_positions(groups, keep).items():
        if name in masks:
            masks[name].index_fill_(dim, removed.to(masks[name].device), False)
    return masks


def removal_ops(
    root: nn.Module, groups: Sequence[ChannelGroup], keep: Sequence[Tensor], prefix: str = "", **extra: Any
) -> list[dict[str, Any]]:
    """Structure ops (:mod:`lightning_compress.core.surgery`) that physically remove the channels.

    One ``slice`` op per touched tensor dimension (parameters and buffers), tensor names prefixed
    with ``prefix`` (the compression root's name inside the LightningModule); ``extra`` keys are
    added to every op (e.g. the owner, for the record).
    """
    ops = []
    for (name, dim), removed in _removed_positions(groups, keep).items():
        size = _tensor(root, name).shape[dim]
        kept = sorted(set(range(size)) - set(removed.tolist()))
        ops.append({"op": "slice", "tensor": prefix + name, "dim": dim, "index": kept, **extra})
    return ops


class ChannelCost:
    """Exact parameters and MACs of the model for any choice of kept channels.

    A layer's MACs scale with the product of the kept fractions of its weight's sliced dimensions
    (a convolution's MACs are ``out * in/groups * k * k * positions``), its parameters with the
    same product per tensor; layers the groups do not touch keep their cost.

    Args:
        root: The model.
        groups: Its channel groups.
        layer_macs: Dense MACs per sample of every layer that has some (from
            :func:`~lightning_compress.core.cost.model_costs`); MACs outside layers go in
            ``other_macs``.
        other_macs: MACs not attributed to any layer (constant).
    """

    def __init__(
        self,
        root: nn.Module,
        groups: Sequence[ChannelGroup],
        layer_macs: dict[str, int],
        other_macs: int = 0,
    ) -> None:
        self.sizes: dict[tuple[str, int], int] = {}
        self.uses: dict[tuple[str, int], list[tuple[int, Tensor]]] = {}
        for g_index, group in enumerate(groups):
            for m in group.members:
                key = (m.tensor, m.dim)
                self.sizes[key] = int(_tensor(root, m.tensor).shape[m.dim])
                counts = torch.bincount(m.channels, minlength=group.size).to(torch.float64)
                self.uses.setdefault(key, []).append((g_index, counts))
        params = dict(root.named_parameters())
        self.param_numel = {n: p.numel() for n, p in params.items()}
        self.dense_params = sum(self.param_numel.values())
        self.layer_macs = {n: int(v) for n, v in layer_macs.items() if v}
        self.dense_macs = sum(self.layer_macs.values()) + int(other_macs)
        self.other_macs = int(other_macs)

    def fractions(self, keep: Sequence[Tensor]) -> dict[tuple[str, int], float]:
        """Kept fraction of every touched tensor dimension."""
        drops = [(~k.to(torch.bool).cpu()).to(torch.float64) for k in keep]
        out = {}
        for key, uses in self.uses.items():
            removed = sum(float((counts * drops[g]).sum()) for g, counts in uses)
            out[key] = 1.0 - removed / self.sizes[key]
        return out

    def evaluate(self, keep: Sequence[Tensor]) -> tuple[float, float]:
        """``(params, MACs)`` of the model with only the ``keep`` channels (per sample)."""
        fractions = self.fractions(keep)
        per_tensor: dict[str, float] = {}
        for (name, _), f in fractions.items():
            per_tensor[name] = per_tensor.get(name, 1.0) * f
        params = sum(n * per_tensor.get(name, 1.0) for name, n in self.param_numel.items())
        macs = float(self.other_macs) + sum(
            m * per_tensor.get(f"{layer}.weight", 1.0) for layer, m in self.layer_macs.items()
        )
        return params, macs

    def kept_fraction(self, keep: Sequence[Tensor], budget: str) -> float:
        """Fraction of the dense ``"params"`` or ``"macs"`` that ``keep`` leaves."""
        params, macs = self.evaluate(keep)
        if budget == "params":
            return params / max(self.dense_params, 1)
        return macs / max(self.dense_macs, 1)
