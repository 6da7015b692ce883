"""functional/pruning.py kernels against direct reference implementations."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.functional.pruning import (
    activation_score,
    channel_mean_abs,
    lamp_score,
    magnitude_score,
    nm_mask,
    parse_nm,
    random_score,
    taylor_score,
    unstructured_masks,
)


def test_scores_match_formulas() -> None:
    w, g = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.equal(magnitude_score(w), w.abs())
    assert torch.equal(taylor_score(w, g), (w * g).abs())
    act = torch.rand(6)
    ref = torch.stack([w[i].abs() * act for i in range(5)])
    torch.testing.assert_close(activation_score(w, act), ref)
    conv = torch.randn(4, 3, 2, 2)
    act3 = torch.rand(3)
    torch.testing.assert_close(activation_score(conv, act3)[:, 1], conv[:, 1].abs() * act3[1])
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(channel_mean_abs(x, 1), x.abs().permute(1, 0, 2, 3).reshape(3, -1).mean(1))
    torch.testing.assert_close(channel_mean_abs(torch.randn(2, 7, 6), -1).shape, torch.Size([6]))


def test_random_score_is_a_pure_function_of_seed_and_step() -> None:
    assert torch.equal(random_score((3, 4), 7, 1), random_score((3, 4), 7, 1))
    assert not torch.equal(random_score((3, 4), 7, 1), random_score((3, 4), 8, 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.floats(0.0, 0.99), st.integers(0, 10_000))
def test_global_masks_prune_exactly_the_lowest(sizes: list[int], sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=gen) for n in sizes]
    masks = unstructured_masks(scores, sparsity, "global")
    flat, keep = torch.cat(scores), torch.cat(masks)
    k = round(sparsity * flat.numel())
    assert int((~keep).sum()) == k
    if 0 < k < flat.numel():  # every pruned score <= every kept score (reference: sort)
        assert flat[~keep].max() <= flat[keep].min()


def test_local_scope_prunes_each_tensor_to_the_same_sparsity() -> None:
    scores = [torch.rand(100), torch.rand(10, 10) * 100, torch.rand(40)]
    masks = unstructured_masks(scores, 0.3, "local")
    assert [int((~m).sum()) for m in masks] == [30, 30, 12]
    for s, m in zip(scores, masks):
        assert s[~m].max() <= s[m].min()
    with pytest.raises(ValueError, match=r"`scope`='x' is not supported"):
        unstructured_masks(scores, 0.3, "x")


def test_masks_only_shrink_even_when_scores_tie() -> None:
    scores = [torch.zeros(10)]  # all tied: without `previous` any subset could be chosen
    first = unstructured_masks(scores, 0.3, previous=[torch.ones(10, dtype=torch.bool)])[0]
    second = unstructured_masks(scores, 0.5, previous=[first])[0]
    assert not bool((second & ~first).any())  # nothing pruned before comes back
    assert int((~second).sum()) == 5


def _nm_reference(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    keep = torch.zeros_like(score, dtype=torch.bool)
    for out, *rest in itertools.product(*[range(d) for i, d in enumerate(score.shape) if i != 1]):
        for g in range(0, score.shape[1], m):
            vals = torch.stack([score[(out, g + j, *rest)] for j in range(m)])
            for j in vals.topk(n).indices.tolist():
                keep[(out, g + j, *rest)] = True
    return keep


@pytest.mark.parametrize(
    ("shape", "n", "m"),
    [
        ((3, 8), 2, 4),
        ((3, 8), 1, 4),
        ((3, 8), 3, 8),
        ((2, 4, 3, 3), 2, 4),
        ((2, 4, 3, 3), 1, 4),
        ((2, 8, 2), 2, 4),
        ((2, 8, 2), 3, 8),
    ],
)
def test_nm_mask_matches_reference(shape: tuple[int, ...], n: int, m: int) -> None:
    torch.manual_seed(0)
    score = torch.rand(shape)
    keep = nm_mask(score, n, m)
    assert torch.equal(keep, _nm_reference(score, n, m))
    assert keep.float().mean().item() == pytest.approx(n / m)


def test_nm_mask_errors_and_parse() -> None:
    with pytest.raises(
        ValueError,
        match=r"needs the input dimension \(dim 1\) to be a multiple of 4; got a weight of shape \(3, 6\)",
    ):
        nm_mask(torch.rand(3, 6), 2, 4)
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 1 : 8 ") == (1, 8)
    assert parse_nm("unstructured") is None
    with pytest.raises(ValueError, match="N:M needs 1 <= N < M"):
        parse_nm("0:4")


@settings(max_examples=80, deadline=None)
@given(
    st.integers(2, 300),
    st.floats(0.0, 0.9),
    st.floats(0.0, 0.99),
    st.integers(0, 10_000),
    st.sampled_from(["global", "local"]),
)
def test_masks_with_previous_rank_only_live_entries(
    n: int, dead_frac: float, sparsity: float, seed: int, scope: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=gen), torch.rand(n // 2 + 1, generator=gen)]
    previous = [torch.rand(s.shape, generator=gen) >= dead_frac for s in scores]
    masks = unstructured_masks(scores, sparsity, scope, previous)
    groups = (
        [(scores, previous, masks)]
        if scope == "global"
        else [([s], [p], [m]) for s, p, m in zip(scores, previous, masks)]
    )
    for sc, prev, new in groups:
        s, p, m = torch.cat(sc), torch.cat(prev), torch.cat(new)
        assert not bool((m & ~p).any())  # nothing revived
        k = round(sparsity * s.numel())
        assert int((~m).sum()) == max(k, int((~p).sum()))
        newly = p & ~m
        if newly.any() and m.any():  # newly pruned live entries score no higher than any kept one
            assert s[newly].max() <= s[m].min()


# ---------------------------------------------------------------------------- min_keep (density floors)
def _floors_reference(
    scores: list[torch.Tensor], sparsity: float, previous: list[torch.Tensor], min_keep: list[int]
) -> list[torch.Tensor] | None:
    """Brute force: sort every live entry, prune greedily from the lowest while its tensor is above its floor.

    Returns None when the floors make the exact count infeasible.
    """
    sizes = [s.numel() for s in scores]
    k = round(sparsity * sum(sizes))
    keeps = [p.flatten().clone() for p in previous]
    alive = [int(p.sum()) for p in keeps]
    extra = k - (sum(sizes) - sum(alive))
    if extra <= 0:
        return [m.view_as(s) for m, s in zip(keeps, scores)]
    floors = [min(m, a) for m, a in zip(min_keep, alive)]
    if sum(floors) > sum(sizes) - k:
        return None
    live = [
        (float(s.flatten()[j]), t, j)
        for t, s in enumerate(scores)
        for j in range(s.numel())
        if bool(keeps[t][j])
    ]
    kept = list(alive)
    for _, t, j in sorted(live):
        if extra == 0:
            break
        if kept[t] > floors[t]:
            keeps[t][j] = False
            kept[t] -= 1
            extra -= 1
    assert extra == 0
    return [m.view_as(s) for m, s in zip(keeps, scores)]


def _check_against_reference(
    scores: list[torch.Tensor],
    sparsity: float,
    previous: list[torch.Tensor],
    min_keep: list[int],
    masks: list[torch.Tensor],
    ref: list[torch.Tensor],
) -> None:
    k = round(sparsity * sum(s.numel() for s in scores))
    prev_dead = sum(int((~p).sum()) for p in previous)
    assert [m.shape for m in masks] == [s.shape for s in scores]
    assert all(m.dtype == torch.bool for m in masks)
    assert sum(int((~m).sum()) for m in masks) == max(k, prev_dead)  # exact total count
    for s, p, m, floor in zip(scores, previous, masks, min_keep):
        assert not bool((m & ~p).any())  # monotone: nothing revived
        assert int(m.sum()) >= min(floor, int(p.sum()))  # floor held
        newly = p & ~m
        if newly.any() and m.any():  # inside a tensor the lowest live entries go first
            assert s[newly].max() <= s[m].min()
    # Lowest-score choice under the floors: the multiset of newly pruned scores is the reference's
    # (all optimal solutions of this partition-matroid greedy share it, whatever the tie-breaking).
    got = torch.cat([s[p & ~m] for s, p, m in zip(scores, previous, masks)]).sort().values
    want = torch.cat([s[p & ~r] for s, p, r in zip(scores, previous, ref)]).sort().values
    assert torch.equal(got, want)
    # Exchange condition: no kept entry of a tensor above its floor scores below a pruned entry.
    floors = [min(f, int(p.sum())) for f, p in zip(min_keep, previous)]
    pruned_max = max(
        (float(s[p & ~m].max()) for s, p, m in zip(scores, previous, masks) if (p & ~m).any()), default=None
    )
    if pruned_max is not None:
        for s, m, floor in zip(scores, masks, floors):
            if int(m.sum()) > floor:
                assert float(s[m].min()) >= pruned_max


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(1, 30), min_size=1, max_size=5),
    st.floats(0.0, 0.99),
    st.floats(0.0, 0.8),
    st.integers(0, 10_000),
    st.booleans(),
)
def test_min_keep_matches_brute_force(
    sizes: list[int], sparsity: float, dead_frac: float, seed: int, ties: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Ties: few distinct values, so many scores tie within and across tensors.
    scores = [
        torch.randint(0, 4, (n,), generator=gen).float() if ties else torch.rand(n, generator=gen)
        for n in sizes
    ]
    previous = [torch.rand(n, generator=gen) >= dead_frac for n in sizes]
    min_keep = [int(torch.randint(0, n + 2, (), generator=gen)) for n in sizes]
    ref = _floors_reference(scores, sparsity, previous, min_keep)
    if ref is None:
        with pytest.raises(ValueError, match=r"`min_keep`=.* cannot be met"):
            unstructured_masks(scores, sparsity, "global", previous, min_keep)
        return
    masks = unstructured_masks(scores, sparsity, "global", previous, min_keep)
    _check_against_reference(scores, sparsity, previous, min_keep, masks, ref)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ties", [False, True])
def test_min_keep_floors_binding_on_several_tensors(seed: int, ties: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Low-scored tensors that a plain global threshold would empty, next to high-scored ones; the
    # floors of the low ones bind, and clamping them raises the threshold so a middle one binds next.
    shapes = [(8, 6), (30,), (5, 4, 2), (50,), (12,)]
    offsets = [0.0, 0.0, 0.5, 2.0, 1.0]
    scores = [
        (torch.randint(0, 3, s, generator=gen).float() / 3 if ties else torch.rand(s, generator=gen)) + o
        for s, o in zip(shapes, offsets)
    ]
    previous = [torch.rand(s, generator=gen) >= 0.2 for s in shapes]
    min_keep = [10, 6, 12, 5, 4]
    sparsity = 0.6
    ref = _floors_reference(scores, sparsity, previous, min_keep)
    assert ref is not None
    masks = unstructured_masks(scores, sparsity, "global", previous, min_keep)
    _check_against_reference(scores, sparsity, previous, min_keep, masks, ref)
    plain = unstructured_masks(scores, sparsity, "global", previous)
    alive = [int(p.sum()) for p in previous]
    assert sum(int(m.sum()) < min(f, a) for m, f, a in zip(plain, min_keep, alive)) >= 2  # floors bind
    assert [int(m.sum()) for m in masks][:2] == [min(10, alive[0]), min(6, alive[1])]


def test_min_keep_small_example_exact() -> None:
    scores = [
        torch.tensor([0.1, 0.2, 0.3, 0.4]),
        torch.tensor([0.5, 0.6, 0.7, 0.8]),
        torch.tensor([0.9, 1.0]),
    ]
    # Prune 6 of 10: plain global empties tensor 0 and prunes 0.5, 0.6 of tensor 1.
    assert [m.tolist() for m in unstructured_masks(scores, 0.6)] == [
        [False] * 4,
        [False, False, True, True],
        [True, True],
    ]
    masks = unstructured_masks(scores, 0.6, min_keep=[2, 0, 0])
    assert [m.tolist() for m in masks] == [
        [False, False, True, True],  # top-2 kept
        [False, False, False, False],  # the budget moves here
        [True, True],
    ]
    masks = unstructured_masks(scores, 0.6, min_keep=[2, 1, 1])  # floors sum to the 4 kept: forced
    assert [m.tolist() for m in masks] == [
        [False, False, True, True],
        [False, False, False, True],
        [False, True],
    ]
    with pytest.raises(
        ValueError, match=r"pruning exactly 6 of 10 entries keeps 4, but the floors .* need 5"
    ):
        unstructured_masks(scores, 0.6, min_keep=[2, 2, 1])


def test_min_keep_cascade_second_floor_binds_only_after_the_first_clamp() -> None:
    a, b, c = (
        torch.tensor([0.1, 0.2, 0.3, 0.4]),
        torch.tensor([1.1, 1.2, 1.3, 1.4]),
        2 + torch.arange(1, 9) / 10,
    )
    # Prune 7 of 16. Plain threshold: all of a and 3 of b (b keeps 1 = its floor, fine; a breaks its
    # floor 3). Clamping a hands 3 back: now all of b would go, below its floor 1; clamping b too
    # moves the rest onto c.
    masks = unstructured_masks([a, b, c], 7 / 16, min_keep=[3, 1, 0])
    assert [m.tolist() for m in masks] == [
        [False, True, True, True],
        [False, False, False, True],
        [False, False, False, True, True, True, True, True],
    ]


def test_min_keep_with_previous_below_floor_keeps_every_live_entry() -> None:
    scores = [torch.arange(6.0), torch.arange(10.0, 16.0)]
    previous = [torch.tensor([False, False, False, False, True, True]), torch.ones(6, dtype=torch.bool)]
    masks = unstructured_masks(scores, 0.75, previous=previous, min_keep=[3, 0])  # prune 9 of 12
    assert masks[0].tolist() == previous[0].tolist()  # 2 alive < floor 3: kept, not pruned further
    assert int((~masks[1]).sum()) == 5  # the other 5 come from tensor 1, lowest first
    assert masks[1].tolist() == [False] * 5 + [True]
    # Already sparser than asked: unchanged, floors or not.
    again = unstructured_masks(scores, 0.3, previous=masks, min_keep=[6, 6])
    assert [m.tolist() for m in again] == [m.tolist() for m in masks]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=4), st.floats(0.0, 0.99), st.integers(0, 10_000))
def test_min_keep_that_does_not_bind_is_the_plain_global_result(
    sizes: list[int], sparsity: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=gen) for n in sizes]
    plain = unstructured_masks(scores, sparsity, "global")
    loose = [int(m.sum()) for m in plain]  # floors exactly at what the plain threshold keeps
    for min_keep in (None, [0] * len(sizes), loose):
        masks = unstructured_masks(scores, sparsity, "global", min_keep=min_keep)
        assert all(torch.equal(a, b) for a, b in zip(masks, plain))


def test_min_keep_local_scope_ignores_it_and_validation() -> None:
    scores = [torch.rand(10), torch.rand(20)]
    local = unstructured_masks(scores, 0.5, "local", min_keep=[10, 20])
    assert [int((~m).sum()) for m in local] == [5, 10]
    with pytest.raises(ValueError, match=r"`min_keep` has 1 entries but there are 2 score tensors"):
        unstructured_masks(scores, 0.5, min_keep=[1])
    with pytest.raises(ValueError, match=r"`min_keep`\[1\]=-1 is not supported; expected a non-negative int"):
        unstructured_masks(scores, 0.5, min_keep=[1, -1])
    with pytest.raises(ValueError, match=r"`min_keep`\[0\]=1.5 is not supported"):
        unstructured_masks(scores, 0.5, min_keep=[1.5, 1])
    with pytest.raises(ValueError, match=r"`min_keep`=3 is not supported; expected a list"):
        unstructured_masks(scores, 0.5, min_keep=3)


def _lamp_reference(w: torch.Tensor) -> torch.Tensor:
    flat = w.flatten().double() ** 2
    out = torch.empty_like(flat)
    order = torch.argsort(flat, stable=True)
    for rank, i in enumerate(order.tolist()):  # the paper's formula, entry by entry
        out[i] = flat[i] / flat[order[rank:]].sum()
    return out.view_as(w).float()


@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 3, 3), (7,)])
def test_lamp_score_matches_the_papers_formula(shape: tuple[int, ...]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    torch.testing.assert_close(lamp_score(w), _lamp_reference(w), rtol=1e-5, atol=1e-7)
    assert torch.equal(torch.argsort(lamp_score(w).flatten()), torch.argsort(w.abs().flatten()))
    assert lamp_score(w).max().item() == pytest.approx(1.0)  # every layer keeps its largest weight


def test_lamp_global_allocation_differs_from_magnitude() -> None:
    small = torch.full((2, 2), 0.1)  # a small-magnitude layer: global |w| would empty it
    small[0, 0] = 0.2
    big = torch.linspace(0.5, 2.0, 16).view(4, 4)
    by_magnitude = unstructured_masks([small.abs(), big.abs()], 0.5)
    by_lamp = unstructured_masks([lamp_score(small), lamp_score(big)], 0.5)
    assert int(by_magnitude[0].sum()) == 0
    assert int(by_lamp[0].sum()) >= 1
