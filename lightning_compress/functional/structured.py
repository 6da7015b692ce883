"""Choosing which channels to remove: pure kernels over per-group score vectors (no Lightning)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "global_channel_keep",
    "keep_lowest_removed",
    "local_channel_keep",
    "rounded_removal",
    "search_removal",
]


def rounded_removal(size: int, n_remove: int, round_to: int | None, floor: int = 1) -> int:
    """Channels removed from a group of ``size`` when ``n_remove`` are asked for.

    At least ``floor`` channels stay. With ``round_to`` the kept width is rounded to the *nearest*
    multiple of ``round_to`` (halves up), at least one multiple, never above ``size`` (a width that
    is not a multiple itself stays whole unless enough is removed), so hardware-friendly widths
    cost at most half a block of the requested amount either way.
    """
    n_remove = min(max(int(n_remove), 0), size - floor)
    if n_remove <= 0:
        return 0
    if not round_to or round_to <= 1:
        return n_remove
    kept = math.floor((size - n_remove) / round_to + 0.5) * round_to
    kept = min(size, max(kept, round_to, floor))
    return size - kept


def keep_lowest_removed(scores: Tensor, n_remove: int, previous: Tensor | None = None) -> Tensor:
    """Keep-mask removing the ``n_remove`` lowest-scored channels; ``previous`` removals go first.

    Ties are broken by channel index (stable sort), so every DDP rank picks the same channels.
    """
    s = scores.to(torch.float64).clone()
    if previous is not None:
        s[~previous.to(torch.bool)] = -math.inf
    keep = torch.ones(len(s), dtype=torch.bool)
    if n_remove > 0:
        order = torch.sort(s, stable=True).indices
        keep[order[:n_remove]] = False
    return keep


def local_channel_keep(
    scores: Sequence[Tensor],
    ratio: float,
    round_to: int | None = None,
    previous: Sequence[Tensor] | None = None,
    floor: int = 1,
) -> list[Tensor]:
    """Remove ``round(ratio * size)`` channels of every group (rounded as :func:`rounded_removal`)."""
    out = []
    for i, s in enumerate(scores):
        prev = None if previous is None else previous[i]
        n_prev = 0 if prev is None else int((~prev.to(torch.bool)).sum())
        n = rounded_removal(len(s), round(ratio * len(s)), round_to, floor)
        out.append(keep_lowest_removed(s, max(n, n_prev), prev))
    return out


def global_channel_keep(
    scores: Sequence[Tensor],
    n_remove: int,
    round_to: int | None = None,
    previous: Sequence[Tensor] | None = None,
    floor: int = 1,
) -> list[Tensor]:
    """Remove the ``n_remove`` lowest-scored channels over all groups (one global threshold).

    Previously removed channels count first; every group keeps its ``floor`` best channels; the
    per-group counts are then rounded as :func:`rounded_removal` (so the total may differ a little:
    search ``n_remove`` for an exact total, as ``StructuredPruning`` does).
    """
    pooled, owners = [], []
    n_prev_total = 0
    for i, s in enumerate(scores):
        s = s.to(torch.float64).clone()
        if previous is not None:
            dropped = ~previous[i].to(torch.bool)
            s[dropped] = -math.inf
            n_prev_total += int(dropped.sum())
        if floor > 0:
            top = torch.sort(s, descending=True, stable=True).indices[: min(floor, len(s))]
            s[top] = math.inf
        pooled.append(s)
        owners.append(torch.full((len(s),), i, dtype=torch.long))
    flat, owner = torch.cat(pooled), torch.cat(owners)
    n = min(max(int(n_remove), n_prev_total), int(torch.isfinite(flat).sum()) + n_prev_total)
    counts = [0] * len(scores)
    if n > 0:
        chosen = torch.sort(flat, stable=True).indices[:n]
        for i, c in zip(*torch.unique(owner[chosen], return_counts=True)):
            counts[int(i)] = int(c)
    out = []
    for i, s in enumerate(scores):
        prev = None if previous is None else previous[i]
        n_prev = 0 if prev is None else int((~prev.to(torch.bool)).sum())
        k = max(rounded_removal(len(s), counts[i], round_to, floor), n_prev)
        out.append(keep_lowest_removed(s, k, prev))
    return out


def search_removal(kept_cost: Callable[[int], float], target: float, low: int, high: int) -> int:
    """Smallest ``n`` in ``[low, high]`` with ``kept_cost(n) <= target`` (``kept_cost`` non-increasing).

    Returns ``high`` when even that does not reach the target (the caller checks reachability).
    """
    if kept_cost(low) <= target:
        return low
    while high - low > 1:
        mid = (low + high) // 2
        if kept_cost(mid) <= target:
            high = mid
        else:
            low = mid
    return high
