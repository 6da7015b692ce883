"""The one place that owns pruning masks.

A :class:`MaskSet` keeps one boolean mask per parameter, keyed by the parameter's fully qualified
name (FQN) in the user's module, so checkpoints keep the user's names and masks survive any
wrapping (DDP, ``torch.compile``) that keeps ``Parameter`` objects.

Masks constrain the weights themselves, not only the gradients: after every real optimizer step
the weights are multiplied by their masks, and before it the gradients are, so momentum, Adam
moments and weight decay can never revive a pruned weight. Both run as one fused
``torch._foreach_mul_`` over all masked tensors: a constant number of kernel launches per step and
no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_compress.core.engine import MASK, MASK_GRADS, Constraint
from lightning_compress.core.surgery import StructureChange


class MaskSet:
    """Boolean masks keyed by parameter FQN, bound to the parameters of one model.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> masks = MaskSet()
        >>> masks.bind(model, ["weight"])
        >>> masks.set("weight", torch.tensor([[True, False, True, False]] * 2))
        >>> masks.apply_to_weights_()
        >>> int((model.weight == 0).sum())
        4
    """

    def __init__(self, owner: str = "MaskSet") -> None:
        self.owner = owner
        self._masks: dict[str, Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        # Hot-path tensors: one mask per parameter in the parameter's dtype. They are updated in
        # place, so closures bound by the engine stay valid across mask updates.
        self._fmasks: dict[str, Tensor] = {}
        self._slots: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        self._dirty: set[str] = set()

    # ------------------------------------------------------------------ binding and editing
    def bind(self, model: nn.Module, names: Iterable[str]) -> None:
        """Attach to ``model``'s parameters ``names``; masks start all-True unless already set.

        Re-binding (a new fit, a model moved to another device) keeps existing masks, checks their
        shapes and moves them to the parameter's device.

        Raises:
            ValueError: A name is not a parameter of ``model`` or a kept mask has the wrong shape.
        """
        params: dict[str, nn.Parameter] = {}
        slots = []
        for name in names:
            try:
                params[name] = model.get_parameter(name)
            except AttributeError as err:
                raise ValueError(f"MaskSet: {name!r} is not a parameter of {type(model).__name__}.") from err
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            slots.append((name, module, attr, params[name]))
        unknown = set(self._masks) - set(params)
        if unknown:
            raise ValueError(
                f"MaskSet: masks exist for {sorted(unknown)} but the model selection is {sorted(params)}; "
                "the targets or the model changed since the masks were made."
            )
        masks = {}
        for name, p in params.items():
            mask = self._masks.get(name)
            if mask is None:
                mask = torch.ones_like(p, dtype=torch.bool)
            masks[name] = self._checked(name, mask, p)
        self._params, self._masks, self._slots = params, masks, slots
        self._fmasks = {n: self._masks[n].to(p.dtype) for n, p in params.items()}

    def set(self, name: str, mask: Tensor) -> None:
        """Replace the mask of parameter ``name`` (shape-checked) and zero the pruned weights."""
        self.update({name: mask})

    def update(
        self, masks: Mapping[str, Tensor], zero_now: Iterable[Tensor] | None = None, apply: bool = True
    ) -> None:
        """Replace several masks at once and zero the newly pruned weights.

        All masks are checked before any is stored, so a bad one leaves every mask unchanged.

        Args:
            masks: New keep-masks by parameter name.
            zero_now: If given, only these parameters (e.g. those of the optimizer about to step) are
                zeroed at once. The others are zeroed lazily, right before their own optimizer's next
                step (their backward is done then) or by :meth:`flush`. Zeroing a parameter of another
                network in place in the middle of a step would invalidate an autograd graph that still
                needs it (a GAN's generator graph reused after the discriminator's step).
            apply: ``False`` only stores the masks and touches no weight (for a technique that sets
                the weights itself, such as dynamic network surgery from its dense copy).
        """
        self.verify()
        for name in masks:
            if name not in self._params:
                raise KeyError(f"MaskSet: {name!r} is not bound; bound parameters: {sorted(self._params)}.")
        checked = {name: self._checked(name, m, self._params[name]) for name, m in masks.items()}
        self._masks.update(checked)
        now = None if zero_now is None else {id(p) for p in zero_now}
        with torch.no_grad():
            for name, m in checked.items():
                self._fmasks[name].copy_(m)
                if not apply:
                    continue
                if now is None or id(self._params[name]) in now:
                    self._params[name].mul_(self._fmasks[name])
                else:
                    self._dirty.add(name)

    def flush(self, names: Iterable[str] | None = None) -> None:
        """Zero the weights whose masks changed but were not applied yet (all, or those in ``names``)."""
        if not self._dirty:  # the common case, on every batch: no tensor work, no grad-mode switch
            return
        todo = self._dirty if names is None else self._dirty.intersection(names)
        with torch.no_grad():
            for name in list(todo):
                self._params[name].mul_(self._fmasks[name])
                self._dirty.discard(name)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load masks saved by :meth:`state_dict`; they are bound to parameters by the next :meth:`bind`."""
        for name, mask in state.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"MaskSet: saved mask {name!r} has dtype {mask.dtype}; expected torch.bool.")
        self._masks = {name: mask.clone() for name, mask in state.items()}
        self._params, self._fmasks, self._slots = {}, {}, []

    def state_dict(self) -> dict[str, Tensor]:
        """Return the masks as CPU bool tensors (safe for ``torch.load(weights_only=True)``)."""
        return {name: mask.detach().cpu().clone() for name, mask in self._masks.items()}

    @staticmethod
    def _checked(name: str, mask: Tensor, p: Tensor) -> Tensor:
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(
                f"MaskSet: mask for {name!r} has shape {tuple(mask.shape)} but the parameter has "
                f"shape {tuple(p.shape)}."
            )
        return mask.to(device=p.device, dtype=torch.bool)

    def verify(self) -> None:
        """Fail clearly when a bound parameter was replaced behind the masks' back.

        A ``Parameter`` swapped by user code (``model.fc.weight = nn.Parameter(...)``) or by a module
        replacement that did not go through :mod:`lightning_compress.core.surgery` would otherwise
        leave the masks multiplying a stale tensor: silently wrong. Identity checks only, no tensor work.

        Raises:
            RuntimeError: naming the parameter.
        """
        for name, module, attr, param in self._slots:
            if module._parameters.get(attr) is not param:
                raise RuntimeError(
                    f"{self.owner}: parameter {name!r} was replaced by a new object after its mask was "
                    "bound, so the mask would act on a stale tensor. Change model structure through "
                    "lightning_compress.core.surgery (CompressionEngine.change_structure), which keeps "
                    "masks, optimizer state and checkpoints consistent."
                )

    def structure_changed(
        self, model: nn.Module, changes: Iterable[StructureChange], prefix: str = ""
    ) -> None:
        """Follow a structure change: slice / rename / drop masks, then re-bind to ``model``.

        Args:
            model: The compression root the names are relative to.
            changes: Events from :mod:`lightning_compress.core.surgery` (names relative to the
                LightningModule).
            prefix: The root's name inside the LightningModule (``""`` or e.g. ``"student."``).
        """
        masks = dict(self._masks)
        for change in changes:
            old = change.old_name[len(prefix) :] if change.old_name.startswith(prefix) else None
            if old is None or old not in masks:
                continue
            mask = masks.pop(old)
            if change.new_name is None or not change.new_name.startswith(prefix):
                continue
            masks[change.new_name[len(prefix) :]] = change.slice(mask)
        self._masks = masks
        self.bind(model, list(masks))

    # ------------------------------------------------------------------ engine constraints
    def weight_constraint(self) -> Constraint:
        """The engine constraint that zeroes pruned weights after every optimizer step (phase ``mask``)."""
        return _MaskConstraint(self, grads=False)

    def grad_constraint(self) -> Constraint:
        """The engine constraint that zeroes pruned gradients before every step (phase ``mask_grads``)."""
        return _MaskConstraint(self, grads=True)

    # ------------------------------------------------------------------ the hot path
    @torch.no_grad()
    def apply_to_weights_(self) -> None:
        """Zero every pruned weight in place (one fused multiply over all masked tensors)."""
        if self._params:
            torch._foreach_mul_(list(self._params.values()), list(self._fmasks.values()))

    @torch.no_grad()
    def apply_to_grads_(self) -> None:
        """Zero the gradients of pruned weights in place, skipping parameters without a gradient."""
        _mul_grads(list(self._params.values()), list(self._fmasks.values()))

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        """Parameter FQNs in binding order."""
        return list(self._masks)

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def parameter(self, name: str) -> nn.Parameter:
        """The bound parameter ``name``."""
        return self._params[name]

    def float_mask(self, name: str) -> Tensor:
        """The mask of ``name`` in its parameter's dtype, updated in place (safe to hold in a closure)."""
        return self._fmasks[name]

    def parameters(self) -> list[nn.Parameter]:
        """The bound parameters in binding order."""
        return list(self._params.values())

    def name_of(self, param: Tensor) -> str | None:
        """The FQN a bound parameter is masked under (``None`` if it is not bound)."""
        for name, p in self._params.items():
            if p is param:
                return name
        return None

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (pruned, total)}`` per mask. One device synchronisation: call off the hot path."""
        if not self._masks:
            return {}
        kept = torch.stack([m.sum() for m in self._masks.values()]).tolist()
        return {name: (m.numel() - int(k), m.numel()) for (name, m), k in zip(self._masks.items(), kept)}

    def layer_sparsity(self) -> tuple[float, dict[str, float]]:
        """Overall sparsity and sparsity per module (parameters of one module, e.g. q/k/v, pooled)."""
        per_module: dict[str, list[int]] = {}
        for name, (pruned, total) in self.counts().items():
            acc = per_module.setdefault(name.rpartition(".")[0], [0, 0])
            acc[0] += pruned
            acc[1] += total
        total = sum(t for _, t in per_module.values())
        overall = sum(z for z, _ in per_module.values()) / total if total else 0.0
        return overall, {m: z / t for m, (z, t) in per_module.items()}

    def clean_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> int:
        """Reset the optimizer state of every masked entry (see :func:`clean_optimizer_state`)."""
        if not self._masks:
            return 0
        masks = {id(self._params[n]): m for n, m in self._masks.items() if n in self._params}
        return clean_optimizer_state(optimizers, masks)

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masks (0.0 when empty)."""
        counts = self.counts().values()
        total = sum(t for _, t in counts)
        return sum(z for z, _ in counts) / total if total else 0.0


def _mul_grads(params: list[nn.Parameter], masks: list[Tensor]) -> None:
    grads = [p.grad for p in params]
    if all(g is not None for g in grads):  # (`None in grads` would compare tensors: slow)
        if grads:
            torch._foreach_mul_(grads, masks)
    elif any(g is not None for g in grads):
        pairs = [(g, m) for g, m in zip(grads, masks) if g is not None]
        torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


class _MaskConstraint(Constraint):
    """Engine adapter of a :class:`MaskSet` (weights after the step, or gradients before it)."""

    def __init__(self, masks: MaskSet, grads: bool) -> None:
        super().__init__(MASK_GRADS if grads else MASK, masks.parameters(), masks.owner)
        self.masks, self.grads = masks, grads

    def bind(self, params: Sequence[nn.Parameter]) -> Callable[[], None] | None:
        by_id = {id(p): name for name, p in self.masks._params.items()}
        plist = [p for p in params if id(p) in by_id]
        mlist = [self.masks._fmasks[by_id[id(p)]] for p in plist]
        names = [by_id[id(p)] for p in plist]
        masks = self.masks
        if not plist:
            return None
        if self.grads:

            def run() -> None:
                if masks._dirty:  # a mask update deferred zeroing these weights to this point
                    masks.flush(names)
                _mul_grads(plist, mlist)

            return run
        return lambda: torch._foreach_mul_(plist, mlist)

    def verify(self) -> None:
        self.masks.verify()


#: Optimizer state that decays towards zero when the gradient is zero: zeroed where pruned, so it is
#: exactly zero (never denormal) and stays zero while the gradient is masked.
FIRST_MOMENT_KEYS: frozenset[str] = frozenset({"momentum_buffer", "exp_avg", "momentum", "mu_product"})
#: Second-moment estimates: set to 1.0 where pruned. Zero would make Adam take sqrt(0) (slow on some
#: CPU builds) and a decaying value passes through the denormal range; 1.0 with a zero first moment
#: and a zero gradient gives a zero update, exactly as before.
SECOND_MOMENT_KEYS: frozenset[str] = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta"})


@torch.no_grad()
def clean_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], masks: Mapping[int, Tensor]) -> int:
    """Reset the optimizer state of pruned entries so it never decays through the denormal range.

    With masked gradients, SGD momentum and Adam moments of a pruned weight decay geometrically:
    after a few hundred steps they are denormal floats, which x86 CPUs process up to ~100x slower on
    *every* thread that touches them (flush-to-zero is a per-thread setting, and intra-op worker
    threads never get it). Zeroing first moments (and setting second moments to 1.0) where the mask
    is False keeps them exactly at a normal value; the update of a pruned entry stays exactly zero.
    Called at mask updates and epoch starts, never per step.

    Args:
        optimizers: The trainer's optimizers.
        masks: ``{id(parameter): bool keep-mask}``.

    Returns:
        The number of state tensors cleaned.
    """
    cleaned = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                mask = masks.get(id(p))
                state = opt.state.get(p)
                if mask is None or not state:
                    continue
                for key, value in state.items():
                    if (
                        not isinstance(value, Tensor)
                        or value.shape != p.shape
                        or not value.is_floating_point()
                    ):
                        continue
                    if key in SECOND_MOMENT_KEYS:
                        value.masked_fill_(~mask, 1.0)
                    else:
                        value.masked_fill_(~mask, 0.0)
                    cleaned += 1
    return cleaned
