"""Select the parameters a technique acts on, beyond the ``weight`` of Linear and Conv layers.

:func:`lightning_compress.core.targets.select_modules` answers "which layers"; this module answers
"which tensors of those layers", so that pruning also reaches the fused ``in_proj_weight`` of
:class:`torch.nn.MultiheadAttention` (the query/key/value projections of every Transformer built from
``torch.nn``) and, on request, embedding tables. Every selected tensor comes with what an
activation-based score needs: which forward argument multiplies it and along which dimension of that
argument its input features lie (:func:`activation_input`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_compress.core.targets import select_modules, validate_patterns

#: Per module type, the names of the parameters that can be scored and masked. A name applies when
#: the module has it as a parameter that is not ``None``: ``nn.MultiheadAttention`` registers
#: ``in_proj_weight`` when query, key and value share the embedding size (``_qkv_same_embed_dim``)
#: and ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` otherwise. Its ``out_proj`` is an
#: ``nn.Linear`` subclass and is selected as a module of its own. ``nn.Embedding`` is only used with
#: ``include_embeddings=True``.
PRUNABLE_PARAMS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight",),
    nn.Conv1d: ("weight",),
    nn.Conv2d: ("weight",),
    nn.Conv3d: ("weight",),
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    nn.Embedding: ("weight",),
}

#: Types in :data:`PRUNABLE_PARAMS` that are selected only on request (``include_embeddings=True``).
OPT_IN_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding,)

#: Which argument of ``nn.MultiheadAttention.forward`` multiplies each projection weight. The fused
#: ``in_proj_weight`` is attributed to the query: exact for self-attention (query, key and value are
#: the same tensor), an approximation for cross-attention, whose key/value rows multiply ``key`` and
#: ``value``.
_MHA_ROLES = {
    "in_proj_weight": "query",
    "q_proj_weight": "query",
    "k_proj_weight": "key",
    "v_proj_weight": "value",
}

#: Position of each role among the forward's positional arguments (``forward(query, key, value, ...)``).
_ARG_POSITION = {"input": 0, "query": 0, "key": 1, "value": 2}


@dataclass(frozen=True)
class TargetParam:
    """One selected parameter and how its input activations are found.

    Attributes:
        module: FQN of the owning module relative to the root (``"layers.0.self_attn"``).
        param: FQN of the parameter relative to the root (``"layers.0.self_attn.in_proj_weight"``).
        kind: Class name of the owning module (``"Linear"``, ``"MultiheadAttention"``, ...).
        input_dim: Dimension of the forward argument (see ``role``) that holds the input features
            multiplied by this parameter: ``-1`` for Linear, MultiheadAttention and Embedding; the
            channel dimension for Conv, counted from the end (``-2``, ``-3``, ``-4`` for Conv1d/2d/3d,
            i.e. dim 1 of a batched input and dim 0 of an unbatched one).
        weight_dim: Dimension of the parameter that lines up with those input features: ``1`` for
            Linear, Conv and the attention projections, ``0`` for an embedding table (one row per
            index).
        role: The forward argument that multiplies the parameter: ``"input"`` (the first argument)
            or, for MultiheadAttention, ``"query"``, ``"key"`` or ``"value"``.
        observable: Whether a forward hook on ``module`` sees that argument. ``False`` for the
            ``out_proj`` of an ``nn.MultiheadAttention``: the attention reads ``out_proj.weight``
            inside ``F.multi_head_attention_forward`` and never calls ``out_proj``, so its hooks never
            fire and activation statistics are not available (score it by magnitude instead).
    """

    module: str
    param: str
    kind: str
    input_dim: int
    weight_dim: int
    role: str
    observable: bool = True

    @property
    def attr(self) -> str:
        """The parameter's attribute name on its module (``"weight"``, ``"in_proj_weight"``, ...)."""
        return self.param.rsplit(".", 1)[-1]


def _prunable_names(module: nn.Module) -> tuple[str, ...]:
    for kind, names in PRUNABLE_PARAMS.items():
        if isinstance(module, kind):
            return names
    return ()


def _describe(module_name: str, attr: str, module: nn.Module, mha_out_projs: set[int]) -> TargetParam:
    param = f"{module_name}.{attr}" if module_name else attr
    kind = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return TargetParam(module_name, param, kind, input_dim=-1, weight_dim=1, role=_MHA_ROLES[attr])
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        spatial = len(module.kernel_size)
        return TargetParam(module_name, param, kind, input_dim=-(spatial + 1), weight_dim=1, role="input")
    if isinstance(module, nn.Embedding):
        return TargetParam(module_name, param, kind, input_dim=-1, weight_dim=0, role="input")
    observable = id(module) not in mha_out_projs
    return TargetParam(
        module_name, param, kind, input_dim=-1, weight_dim=1, role="input", observable=observable
    )


def select_parameters(
    root: nn.Module,
    targets: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    include_embeddings: bool = False,
    owner: str = "compression",
) -> list[TargetParam]:
    """Return the prunable parameters of the modules whose names match ``targets`` and no ``exclude``.

    Modules are matched exactly as :func:`~lightning_compress.core.targets.select_modules` matches
    them (fnmatch over module names, the root itself is not a candidate); the parameters of each
    module type are those of :data:`PRUNABLE_PARAMS`.

    Args:
        root: The model to search.
        targets: fnmatch patterns over module names (``"*"`` matches every module).
        exclude: fnmatch patterns removed from the selection.
        include_embeddings: Also select ``nn.Embedding`` tables (off by default: pruning rows of an
            embedding removes tokens, which few recipes want).
        owner: Name of the technique, for error messages.

    Returns:
        Targets in ``root.named_modules()`` order, then parameter order within a module. A parameter
        shared by several modules (tied weights) appears once, under its first module. Parameters
        that are not floating point, or not materialized yet (lazy modules), are skipped.

    Raises:
        ValueError: For malformed ``targets``/``exclude``/``include_embeddings``, when no module
            matches (the message lists the supported layers that exist), or when the matching modules
            hold no floating-point prunable parameter.
    """
    targets = validate_patterns("targets", targets)
    exclude = validate_patterns("exclude", exclude)
    if not isinstance(include_embeddings, bool):
        raise ValueError(
            f"`include_embeddings`={include_embeddings!r} is not supported; expected True or False."
        )
    types = tuple(t for t in PRUNABLE_PARAMS if include_embeddings or t not in OPT_IN_TYPES)
    chosen = set(select_modules(root, targets, exclude, types=types, owner=owner))
    out: list[TargetParam] = []
    seen: set[int] = set()
    mha_out_projs = {id(m.out_proj) for m in root.modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in root.named_modules():
        if name not in chosen:
            continue
        for attr in _prunable_names(module):
            p = module._parameters.get(attr)
            if p is None or isinstance(p, nn.parameter.UninitializedParameter) or not p.is_floating_point():
                continue
            if id(p) in seen:  # tied weights: one mask per tensor
                continue
            seen.add(id(p))
            out.append(_describe(name, attr, module, mha_out_projs))
    if not out:
        raise ValueError(
            f"{owner}: the layers matching targets={targets!r} exclude={exclude!r} "
            f"([{', '.join(sorted(chosen))}]) hold no floating-point prunable parameter."
        )
    return out


def activation_input(
    target: TargetParam, args: Sequence[object], kwargs: Mapping[str, object]
) -> Tensor | None:
    """The forward argument that multiplies ``target``'s parameter, from a forward hook's arguments.

    Meant for hooks registered with ``module.register_forward_hook(hook, with_kwargs=True)`` (or the
    pre-hook equivalent) on the module ``target.module``, which receive ``(module, args, kwargs, ...)``.
    The argument is found by position or by keyword (``query``/``key``/``value`` for
    MultiheadAttention, ``input`` otherwise). Its input features lie along ``target.input_dim``.
    Targets with ``observable=False`` (an attention's ``out_proj``) never reach such a hook.

    Args:
        target: A parameter from :func:`select_parameters`.
        args: The positional arguments of the forward call.
        kwargs: The keyword arguments of the forward call.

    Returns:
        The tensor, or ``None`` when it is absent or not a floating-point tensor (an embedding's
        integer indices, for instance).
    """
    position = _ARG_POSITION[target.role]
    x = args[position] if len(args) > position else kwargs.get(target.role)
    if isinstance(x, Tensor) and x.is_floating_point():
        return x
    return None
