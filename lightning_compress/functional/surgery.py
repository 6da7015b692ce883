"""Pure kernels of dynamic network surgery (Guo, Yao & Chen, NeurIPS 2016).

The pruning / splicing rule, its calibration to a sparsity, and the update probability. No Lightning
import; the callback is :class:`lightning_compress.DynamicNetworkSurgery`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: The hysteresis band of Guo et al.: prune below ``LOW * t``, splice back above ``HIGH * t``.
LOW, HIGH = 0.9, 1.1


def surgery_thresholds(mu: float, sigma: float, c: float) -> tuple[float, float]:
    r"""Pruning and splicing thresholds ``(a, b)`` of one layer.

    .. math:: a = 0.9 \max(\mu + c\sigma, 0), \qquad b = 1.1 \max(\mu + c\sigma, 0)

    with :math:`\mu`, :math:`\sigma` the mean and standard deviation of ``|W|`` when surgery started.
    """
    t = mu + c * sigma
    t = t if t > 0.0 else 0.0  # also a NaN (c = -inf with sigma = 0): prune nothing
    return LOW * t, HIGH * t


def surgery_mask(weight: Tensor, mask: Tensor, a: float, b: float) -> Tensor:
    """One surgery update: ``|w| < a`` pruned, ``|w| > b`` spliced back, the band keeps ``mask``."""
    magnitude = weight.abs()
    return (magnitude > b) | (mask & (magnitude >= a))


def critical_c(weight: Tensor, mask: Tensor, mu: float, sigma: float) -> Tensor:
    r"""Per entry, the ``c`` above which the next update leaves it pruned.

    A kept entry is pruned when :math:`|w| < 0.9(\mu + c\sigma)`, i.e. :math:`c > (|w|/0.9 - \mu)/\sigma`;
    a pruned one stays pruned unless :math:`|w| > 1.1(\mu + c\sigma)`, i.e. while
    :math:`c \ge (|w|/1.1 - \mu)/\sigma`. Entries ranked by this value are therefore pruned in order as
    ``c`` grows: calibrating ``c`` to a sparsity is a selection of the ``k`` lowest values (exact, no
    search), with the hysteresis of the band built in.
    """
    band = torch.where(mask, torch.full_like(weight, LOW), torch.full_like(weight, HIGH))
    return (weight.abs() / band - mu) / max(sigma, 1e-12)


def kth_smallest(values: Tensor, k: int, hint: float | None = None, band: float = 0.05) -> Tensor:
    """The ``k``-th smallest entry (1-based) of the flat tensor ``values``, as a 0-d tensor.

    Surgery updates run at almost every step early on and the threshold moves little between them,
    so with a ``hint`` (the previous threshold) only the entries within ``hint * (1 +- band)`` are
    ranked: two comparisons over all entries and a selection over a few percent of them, ~10x
    cheaper than a full selection on LeNet-300-100. Falls back to the full ``kthvalue`` when the
    answer lies outside the band.
    """
    if hint is not None and hint > 0:
        lo, hi = hint * (1.0 - band), hint * (1.0 + band)
        below = int((values < lo).sum())
        need = k - below
        if need > 0:
            inside = values[(values >= lo) & (values <= hi)]
            if need <= inside.numel():
                return inside.kthvalue(need).values
    return values.kthvalue(k).values


def threshold_masks(
    scores: Sequence[Tensor],
    sparsity: float,
    scope: str,
    min_keep: Sequence[int] | None = None,
    hints: Sequence[float] | None = None,
) -> tuple[list[Tensor], list[float]]:
    """Keep-masks ``score > t`` that prune ``round(sparsity * n)`` entries, and each tensor's ``t``.

    ``scope="global"``: one ``t`` over every tensor, except that a tensor whose kept count would fall
    below its ``min_keep`` floor keeps its top-``floor`` entries (its own, lower ``t``) and the others
    share a new ``t`` (water-filling); ``"local"``: one ``t`` per tensor. Ties at ``t`` are all
    pruned (scores of continuous weights practically never tie).

    ``hints``, the thresholds this function returned last time, make the selection cheap (see
    :func:`kth_smallest`): in global scope the tensors whose threshold was below the largest one were
    at their floor, and are tried at their floor first (checked, with a fall-back to the full
    water-filling when a guess no longer holds).
    """
    flat = [s.detach().flatten() for s in scores]
    n = len(flat)
    sizes = [f.numel() for f in flat]
    prev: list[float | None] = list(hints) if hints is not None and len(hints) == n else [None] * n
    if scope == "local":
        ts = []
        for f, h in zip(flat, prev):
            k = round(sparsity * f.numel())
            ts.append(kth_smallest(f, k, h) if k > 0 else f.new_tensor(-math.inf))
        return [(f > t).view_as(s) for f, t, s in zip(flat, ts, scores)], [float(t) for t in ts]

    floors = [0 if min_keep is None else min(min_keep[i], sizes[i]) for i in range(n)]
    k_total = round(sparsity * sum(sizes))
    known = [h for h in prev if h is not None]
    top = max(known) if len(known) == n else None
    guess = [i for i, h in enumerate(prev) if top is not None and h is not None and h < top and floors[i]]

    def at_floor(i: int, hint: float | None) -> Tensor:
        prune = sizes[i] - floors[i]
        return kth_smallest(flat[i], prune, hint) if prune > 0 else flat[i].new_tensor(-math.inf)

    def solve(clamped: list[int], hint: float | None) -> tuple[list[Tensor], bool]:
        ts: list[Tensor | None] = [None] * n
        for i in clamped:
            ts[i] = at_floor(i, prev[i])
        free = [i for i in range(n) if i not in clamped]
        k = k_total - sum(sizes[i] - floors[i] for i in clamped)
        while free:
            cat = torch.cat([flat[i] for i in free])
            t = kth_smallest(cat, k, hint) if k > 0 else cat.new_tensor(-math.inf)
            kept = torch.stack([(flat[i] > t).sum() for i in free]).tolist()
            clamp = [i for i, c in zip(free, kept) if c < floors[i]]
            if not clamp:
                for i in free:
                    ts[i] = t
                break
            for i in clamp:  # at its floor: the top-`floor` entries
                ts[i] = at_floor(i, None)
                k -= sizes[i] - floors[i]
            free = [i for i in free if i not in clamp]
            hint = None
        # A guessed floor holds if the shared threshold would still leave that tensor under it.
        shared = max(float(t) for t in ts if t is not None)
        ok = all(int((flat[i] > shared).sum()) < floors[i] for i in clamped)
        return [t for t in ts if t is not None], ok

    ts, ok = solve(guess, top) if guess else (None, False)
    if not ok:
        ts, _ = solve([], top)
    return [(f > t).view_as(s) for f, t, s in zip(flat, ts, scores)], [float(t) for t in ts]


def update_probability(iteration: int, gamma: float, power: float) -> float:
    """``(1 + gamma * iteration) ** -power``: how likely a mask update is ``iteration`` steps into surgery."""
    return (1.0 + gamma * iteration) ** (-power)


__all__ = [
    "HIGH",
    "LOW",
    "critical_c",
    "kth_smallest",
    "surgery_mask",
    "surgery_thresholds",
    "threshold_masks",
    "update_probability",
]
