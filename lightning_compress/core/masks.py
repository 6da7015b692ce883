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

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn


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

    def __init__(self) -> None:
        self._masks: dict[str, Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        # Hot-path caches: parallel lists of parameters and their masks in the parameter's dtype.
        self._plist: list[nn.Parameter] = []
        self._mlist: list[Tensor] = []

    # ------------------------------------------------------------------ binding and editing
    def bind(self, model: nn.Module, names: Iterable[str]) -> None:
        """Attach to ``model``'s parameters ``names``; masks start all-True unless already set.

        Re-binding (a new fit, a model moved to another device) keeps existing masks, checks their
        shapes and moves them to the parameter's device.

        Raises:
            ValueError: A name is not a parameter of ``model`` or a kept mask has the wrong shape.
        """
        params: dict[str, nn.Parameter] = {}
        for name in names:
            try:
                params[name] = model.get_parameter(name)
            except AttributeError as err:
                raise ValueError(f"MaskSet: {name!r} is not a parameter of {type(model).__name__}.") from err
        unknown = set(self._masks) - set(params)
        if unknown:
            raise ValueError(
                f"MaskSet: masks exist for {sorted(unknown)} but the model selection is {sorted(params)}; "
                "the targets or the model changed since the masks were made."
            )
        self._params = params
        for name, p in params.items():
            mask = self._masks.get(name)
            if mask is None:
                mask = torch.ones_like(p, dtype=torch.bool)
            self._masks[name] = self._checked(name, mask, p)
        self._refresh()

    def set(self, name: str, mask: Tensor) -> None:
        """Replace the mask of parameter ``name`` (shape-checked) and zero the pruned weights."""
        self.update({name: mask})

    def update(self, masks: Mapping[str, Tensor]) -> None:
        """Replace several masks at once and zero the newly pruned weights.

        All masks are checked before any is stored, so a bad one leaves every mask unchanged.
        """
        for name in masks:
            if name not in self._params:
                raise KeyError(f"MaskSet: {name!r} is not bound; bound parameters: {sorted(self._params)}.")
        checked = {name: self._checked(name, m, self._params[name]) for name, m in masks.items()}
        self._masks.update(checked)
        self._refresh()
        with torch.no_grad():
            for name, m in checked.items():
                self._params[name].mul_(m)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load masks saved by :meth:`state_dict`; they are bound to parameters by the next :meth:`bind`."""
        for name, mask in state.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"MaskSet: saved mask {name!r} has dtype {mask.dtype}; expected torch.bool.")
        self._masks = {name: mask.clone() for name, mask in state.items()}
        self._params, self._plist, self._mlist = {}, [], []

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

    def _refresh(self) -> None:
        self._plist = list(self._params.values())
        self._mlist = [self._masks[n].to(p.dtype) for n, p in self._params.items()]

    # ------------------------------------------------------------------ the hot path
    @torch.no_grad()
    def apply_to_weights_(self) -> None:
        """Zero every pruned weight in place (one fused multiply over all masked tensors)."""
        if self._plist:
            torch._foreach_mul_(self._plist, self._mlist)

    @torch.no_grad()
    def apply_to_grads_(self) -> None:
        """Zero the gradients of pruned weights in place, skipping parameters without a gradient."""
        grads = [p.grad for p in self._plist]
        if all(g is not None for g in grads):  # (`None in grads` would compare tensors: slow)
            torch._foreach_mul_(grads, self._mlist)
        elif any(g is not None for g in grads):
            pairs = [(g, m) for g, m in zip(grads, self._mlist) if g is not None]
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

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

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (pruned, total)}`` per mask. Synchronises with the device: call off the hot path."""
        return {name: (int(m.numel() - m.sum()), m.numel()) for name, m in self._masks.items()}

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masks (0.0 when empty)."""
        counts = self.counts().values()
        total = sum(t for _, t in counts)
        return sum(z for z, _ in counts) / total if total else 0.0
