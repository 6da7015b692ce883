"""Pure tensor kernels for pruning: importance scores and mask selection.

No Lightning import and no state: the callbacks in :mod:`lightning_compress.pruning` are thin shells
around these functions, and the tests check them against direct reference implementations.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """Parse an ``"N:M"`` pattern (keep N of every M consecutive weights); ``None`` for other strings.

    Raises:
        ValueError: For an ``N:M`` string with ``N < 1`` or ``N >= M``.
    """
    match = _NM.match(pattern)
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(f"`pattern`={pattern!r}: N:M needs 1 <= N < M (keep N of every M weights).")
    return n, m


# ---------------------------------------------------------------------------- scores
def magnitude_score(weight: Tensor) -> Tensor:
    """``|w|`` (Han et al., 2015, "Learning both Weights and Connections")."""
    return weight.detach().abs()


def taylor_score(weight: Tensor, grad: Tensor) -> Tensor:
    """First-order Taylor importance ``|w * dL/dw|`` (Molchanov et al., 2017/2019)."""
    return (weight.detach() * grad.detach()).abs()


def activation_score(weight: Tensor, mean_abs_input: Tensor) -> Tensor:
    """``|w_ij| * E|x_j|``: weight magnitude times the mean absolute input on its input channel.

    The score of Wanda (Sun et al., 2023) with the L1 instead of the L2 input norm; ``mean_abs_input``
    has one entry per input feature (Linear) or input channel (Conv), broadcast along dim 1.
    """
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight.detach().abs() * mean_abs_input.to(weight.dtype).view(shape)


def channel_mean_abs(x: Tensor, channel_dim: int) -> Tensor:
    """Mean of ``|x|`` over every dimension but ``channel_dim`` (float32)."""
    x = x.detach().float().abs()
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.mean(dim=dims) if dims else x


def lamp_score(weight: Tensor) -> Tensor:
    r"""Layer-adaptive magnitude score (LAMP; Lee, Park, Mo, Ahn & Shin, ICLR 2021).

    With the squared magnitudes of one tensor sorted ascending, :math:`w_1^2 \le ... \le w_n^2`,

    .. math:: \mathrm{score}(u) = \frac{w_u^2}{\sum_{v \ge u} w_v^2}

    (ties broken by sort order). Within a tensor it orders entries exactly like ``|w|``; across
    tensors it makes one global threshold allocate sparsity layer by layer (the largest entry of
    every tensor scores 1, so no layer is emptied), which holds accuracy better than plain global
    magnitude at extreme sparsity.
    """
    w2 = weight.detach().flatten().float() ** 2
    sorted_w2, order = torch.sort(w2)
    tail = torch.flip(torch.cumsum(torch.flip(sorted_w2, [0]), 0), [0])
    score = torch.empty_like(w2)
    score[order] = sorted_w2 / tail.clamp_min(torch.finfo(torch.float32).tiny)
    return score.view_as(weight)


def random_score(shape: Sequence[int], step: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Uniform random scores from a generator seeded by ``(seed, step)``.

    The same on every rank and after a resume: no hidden RNG state.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(tuple(shape), generator=gen).to(device)


# ---------------------------------------------------------------------------- mask selection
def _prune_lowest(scores: Tensor, alive: Tensor, k: int) -> Tensor:
    """Keep-mask (flat) pruning exactly ``k`` entries: every dead one plus the lowest-scored live ones.

    Only live entries are ranked, and ``topk`` runs on whichever side is smaller (entries to prune
    or entries to keep), so late updates of a gradual schedule cost little.
    """
    keep = alive.clone()
    live = alive.nonzero().squeeze(1)
    extra = k - (alive.numel() - live.numel())  # live entries still to prune
    if extra <= 0:
        return keep
    if extra >= live.numel():
        keep.zero_()
        return keep
    live_scores = scores[live]
    if extra <= live.numel() // 2:
        keep[live[torch.topk(live_scores, extra, largest=False, sorted=False).indices]] = False
    else:
        keep.zero_()
        keep[live[torch.topk(live_scores, live.numel() - extra, largest=True, sorted=False).indices]] = True
    return keep


def _kept_per_tensor(keep: Tensor, segments: Tensor, count: int) -> list[int]:
    """Number of kept entries of every tensor in a concatenated keep-mask (one host sync)."""
    return (
        torch.zeros(count, dtype=torch.long, device=keep.device).index_add_(0, segments, keep.long()).tolist()
    )


def _segments(sizes: list[int], device: torch.device) -> Tensor:
    """Tensor index of every entry of a concatenation of tensors with ``sizes`` entries."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, dtype=torch.long, device=device)
    )


def _validate_min_keep(min_keep: object, count: int) -> list[int]:
    """Check ``min_keep`` (one non-negative int per score tensor) and return it as a list."""
    if isinstance(min_keep, (str, Tensor)) or not isinstance(min_keep, Sequence):
        raise ValueError(
            f"`min_keep`={min_keep!r} is not supported; expected a list with one non-negative int per "
            f"score tensor ({count} here), or None."
        )
    out = list(min_keep)
    if len(out) != count:
        raise ValueError(
            f"`min_keep` has {len(out)} entries but there are {count} score tensors; expected one "
            f"non-negative int per tensor."
        )
    for i, m in enumerate(out):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"`min_keep`[{i}]={m!r} is not supported; expected a non-negative int.")
    return out


def _global_masks_with_floors(
    flat: list[Tensor], alive: list[Tensor], k: int, min_keep: list[int]
) -> list[Tensor]:
    """Global keep-masks pruning exactly ``k`` entries while every tensor keeps its floor.

    Water-filling: prune the globally lowest live scores (one threshold); every tensor that would
    drop below its floor ``min(min_keep[i], alive_i)`` is clamped to keep exactly its top-``floor``
    live entries, and the rest of the budget is spread over the unclamped tensors with a new global
    threshold. Clamping only hands budget back to the others, so their threshold only rises and a
    clamped tensor stays clamped: at most one pass per tensor, usually one or two. The result is the
    lowest-score choice under the floors (greedy on a partition matroid), ties aside.
    """
    sizes = [f.numel() for f in flat]
    count = len(flat)
    cat, alive_cat = torch.cat(flat), torch.cat(alive)
    segments = _segments(sizes, cat.device)
    alive_n = _kept_per_tensor(alive_cat, segments, count)
    n_dead = sum(sizes) - sum(alive_n)
    if k <= n_dead:  # nothing left to prune: previous masks unchanged (as without floors)
        return list(alive_cat.split(sizes))
    floors = [min(m, a) for m, a in zip(min_keep, alive_n)]
    to_keep = sum(sizes) - k
    if sum(floors) > to_keep:
        raise ValueError(
            f"`min_keep`={min_keep!r} cannot be met: pruning exactly {k} of {sum(sizes)} entries keeps "
            f"{to_keep}, but the floors (capped at the {alive_n} entries still alive per tensor) need "
            f"{sum(floors)}. Lower `min_keep` or the sparsity."
        )
    # Fast path: the plain global threshold; in most calls no floor binds.
    keep_cat = _prune_lowest(cat, alive_cat, k)
    kept = _kept_per_tensor(keep_cat, segments, count)
    if all(c >= f for c, f in zip(kept, floors)):
        return list(keep_cat.split(sizes))
    keeps = list(keep_cat.split(sizes))
    free = list(range(count))
    budget = k - n_dead  # live entries still to prune, over the unclamped tensors
    while True:
        clamp = [i for i in free if kept[i] < floors[i]]
        if not clamp:
            break
        for i in clamp:  # keep exactly the top-`floor` live entries
            keeps[i] = _prune_lowest(flat[i], alive[i], sizes[i] - floors[i])
            budget -= alive_n[i] - floors[i]
        free = [i for i in free if i not in clamp]
        # Feasibility guarantees at least one free tensor remains and 0 <= budget <= its live entries.
        dead_free = sum(sizes[i] - alive_n[i] for i in free)
        sub = _prune_lowest(
            torch.cat([flat[i] for i in free]), torch.cat([alive[i] for i in free]), dead_free + budget
        )
        free_sizes = [sizes[i] for i in free]
        for i, part in zip(free, sub.split(free_sizes)):
            keeps[i] = part
        sub_segments = _segments(free_sizes, cat.device)
        kept = [floors[i] for i in range(count)]  # clamped tensors sit exactly at their floor
        for i, c in zip(free, _kept_per_tensor(sub, sub_segments, len(free))):
            kept[i] = c
    return keeps


def unstructured_masks(
    scores: Sequence[Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Sequence[Tensor] | None = None,
    min_keep: Sequence[int] | None = None,
) -> list[Tensor]:
    """Keep-masks that prune exactly ``round(sparsity * n)`` entries with the lowest scores.

    Args:
        scores: One score tensor per parameter (higher = more important).
        sparsity: Fraction to prune, in [0, 1).
        scope: ``"global"`` ranks all entries together (one threshold); ``"local"`` prunes every
            tensor to ``sparsity`` separately.
        previous: Current keep-masks. Entries already pruned stay pruned (masks only shrink), which
            keeps a gradual schedule monotone even when many scores tie at zero. If more entries are
            already pruned than ``sparsity`` asks for, ``previous`` is returned unchanged.
        min_keep: Global scope only (ignored, though validated, for local scope): per tensor, the
            least number of entries that stay kept, a per-layer density floor so that a global
            threshold cannot empty a layer. A tensor with fewer live entries than its floor keeps
            all of them. Under the floors the lowest global scores are still pruned (water-filling:
            tensors at their floor keep their top ``floor`` entries, the others share one threshold).

    Returns:
        Boolean keep-masks shaped like ``scores``. Exactly ``round(sparsity * n)`` entries are pruned
        (per tensor for local scope), which makes the reached sparsity exact.

    Raises:
        ValueError: For an unknown ``scope``, a malformed ``min_keep``, or floors that cannot be met
            (their sum, each capped at the tensor's live entries, exceeds the entries left to keep).
    """
    if scope not in ("global", "local"):
        raise ValueError(f"`scope`={scope!r} is not supported; expected one of ['global', 'local'].")
    floors = None if min_keep is None else _validate_min_keep(min_keep, len(scores))
    flat = [s.detach().float().flatten() for s in scores]
    alive = (
        [m.flatten() for m in previous]
        if previous is not None
        else [torch.ones_like(f, dtype=torch.bool) for f in flat]
    )
    k = round(sparsity * sum(f.numel() for f in flat))
    if scope == "local":
        keeps = [_prune_lowest(f, a, round(sparsity * f.numel())) for f, a in zip(flat, alive)]
    elif floors is not None and any(floors):
        keeps = _global_masks_with_floors(flat, alive, k, floors)
    else:
        keeps = list(_prune_lowest(torch.cat(flat), torch.cat(alive), k).split([f.numel() for f in flat]))
    return [m.view_as(s) for m, s in zip(keeps, scores)]


def nm_mask(
    score: Tensor, n: int, m: int, prune_per_group: int | None = None, previous: Tensor | None = None
) -> Tensor:
    """N:M keep-mask along the input dimension (dim 1).

    In every group of ``m`` consecutive input weights of one output (and one kernel position),
    keep the ``n`` highest scores.

    This is the 2:4 pattern that sparse tensor cores accelerate (Mishra et al., 2021).

    Args:
        score: Scores shaped like the weight ``(out, in, *kernel)``; ``in`` must divide by ``m``.
        n: Weights kept per group at the end.
        m: Group size.
        prune_per_group: Weights pruned per group now (default ``m - n``); a gradual schedule
            raises it from 0 to ``m - n``.
        previous: Current keep-mask; pruned entries stay pruned.

    Raises:
        ValueError: When the input dimension is not a multiple of ``m``.
    """
    if score.dim() < 2 or score.shape[1] % m:
        raise ValueError(
            f"N:M pattern {n}:{m} needs the input dimension (dim 1) to be a multiple of {m}; "
            f"got a weight of shape {tuple(score.shape)}."
        )
    prune = m - n if prune_per_group is None else prune_per_group
    s = score.detach().float()
    if previous is not None:
        s = s.masked_fill(~previous, float("-inf"))
    moved = s.movedim(1, -1)  # (out, *kernel, in): groups are consecutive input channels
    groups = moved.reshape(-1, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    if prune > 0:
        idx = torch.topk(groups, prune, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, idx, False)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()
