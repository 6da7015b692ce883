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


def unstructured_masks(
    scores: Sequence[Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Sequence[Tensor] | None = None,
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

    Returns:
        Boolean keep-masks shaped like ``scores``. Exactly ``round(sparsity * n)`` entries are pruned
        (per tensor for local scope), which makes the reached sparsity exact.
    """
    if scope not in ("global", "local"):
        raise ValueError(f"`scope`={scope!r} is not supported; expected one of ['global', 'local'].")
    flat = [s.detach().float().flatten() for s in scores]
    alive = (
        [m.flatten() for m in previous]
        if previous is not None
        else [torch.ones_like(f, dtype=torch.bool) for f in flat]
    )
    if scope == "local":
        keeps = [_prune_lowest(f, a, round(sparsity * f.numel())) for f, a in zip(flat, alive)]
    else:
        cat = torch.cat(flat)
        keeps = list(
            _prune_lowest(cat, torch.cat(alive), round(sparsity * cat.numel())).split(
                [f.numel() for f in flat]
            )
        )
    return [k.view_as(s) for k, s in zip(keeps, scores)]


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
