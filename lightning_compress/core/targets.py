"""Select the modules and parameters a technique acts on.

Every technique takes ``targets`` (fnmatch patterns over module names) and ``exclude`` (patterns
removed afterwards) and a tuple of module types it supports. The result is a list of fully
qualified names (FQNs) in ``model.named_modules()`` order, so selection is deterministic and the
same on every rank.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

#: Layers whose ``weight`` the pruning techniques know how to score and mask.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def validate_patterns(name: str, patterns: object) -> list[str]:
    """Check that ``patterns`` is a list of non-empty strings and return it as a list.

    Args:
        name: The argument name, used in the error message.
        patterns: The user's value.

    Raises:
        ValueError: When ``patterns`` is not a list/tuple of non-empty strings.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ValueError(
            f"`{name}`={patterns!r} is not supported; expected a list of fnmatch patterns over module "
            f"names, e.g. ['*'] or ['features.*', 'classifier.0']."
        )
    out = list(patterns)
    for p in out:
        if not isinstance(p, str) or not p:
            raise ValueError(f"`{name}` entries must be non-empty strings; got {p!r} in {out!r}.")
    return out


def select_modules(
    model: nn.Module,
    targets: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = PRUNABLE_TYPES,
    owner: str = "compression",
) -> list[str]:
    """Return the FQNs of modules of ``types`` whose name matches ``targets`` and no ``exclude`` pattern.

    Args:
        model: The model to search.
        targets: fnmatch patterns over module names (``"*"`` matches every module).
        exclude: fnmatch patterns removed from the selection.
        types: Module classes that qualify.
        owner: Name of the technique, for the error message.

    Returns:
        Module names in ``named_modules()`` order.

    Raises:
        ValueError: When nothing matches, or an ``exclude`` pattern matches no module at all (a
            misspelled exclusion would otherwise silently compress the layer it meant to keep);
            the message lists the names that exist.
    """
    all_names = [name for name, _ in model.named_modules() if name]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            shown = ", ".join(all_names[:12]) + (" ..." if len(all_names) > 12 else "")
            raise ValueError(
                f"{owner}: `exclude` pattern {pattern!r} matches no module, so it would exclude nothing. "
                f"Patterns match full module names, e.g. [{shown}]; use '*{pattern.lstrip('*')}' to match "
                "a name at any depth."
            )
    candidates = [name for name, m in model.named_modules() if name and isinstance(m, types)]
    chosen = [
        name
        for name in candidates
        if any(fnmatch.fnmatchcase(name, p) for p in targets)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]
    if not chosen:
        kinds = ", ".join(t.__name__ for t in types)
        shown = ", ".join(candidates[:20]) + (" ..." if len(candidates) > 20 else "")
        raise ValueError(
            f"{owner}: no layer matches targets={list(targets)!r} exclude={list(exclude)!r}. "
            f"Supported layer types: {kinds}. Matching-type layers in this model: [{shown or 'none'}]."
        )
    return chosen
