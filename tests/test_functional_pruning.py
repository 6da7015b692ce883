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
