"""core/: targets, masks and schedules (pure functions checked against direct formulas)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_compress.core.masks import MaskSet
from lightning_compress.core.schedules import (
    is_update_step,
    next_update_step,
    resolve_step,
    sparsity_at,
    validate_step_arg,
)
from lightning_compress.core.targets import select_modules


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)),
        nn.BatchNorm1d(4),
    )


# ---------------------------------------------------------------- targets
def test_select_modules_patterns_and_exclude() -> None:
    net = _net()
    assert select_modules(net) == ["0", "2.0", "2.1"]
    assert select_modules(net, ["2.*"]) == ["2.0", "2.1"]
    assert select_modules(net, ["*"], ["2.1"]) == ["0", "2.0"]
    assert select_modules(net, ["*"], types=(nn.Linear,)) == ["2.0", "2.1"]


def test_select_modules_no_match_names_what_exists() -> None:
    with pytest.raises(ValueError, match=r"MyTech: no layer matches targets=\['fc\*'\].*\[0, 2\.0, 2\.1\]"):
        select_modules(_net(), ["fc*"], owner="MyTech")


# ---------------------------------------------------------------- masks
def test_maskset_masks_weights_and_grads() -> None:
    lin = nn.Linear(4, 3)
    masks = MaskSet()
    masks.bind(lin, ["weight"])
    keep = torch.tensor([[1, 0, 1, 0]] * 3, dtype=torch.bool)
    masks.set("weight", keep)
    assert not lin.weight[~keep].any()
    lin.weight.data.fill_(1.0)
    lin.weight.grad = torch.ones_like(lin.weight)
    masks.apply_to_grads_()
    masks.apply_to_weights_()
    assert torch.equal(lin.weight.grad != 0, keep)
    assert torch.equal(lin.weight != 0, keep)
    assert masks.counts() == {"weight": (6, 12)}
    assert masks.sparsity() == 0.5


def test_maskset_momentum_cannot_revive_pruned_weights() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    masks = MaskSet()
    masks.bind(lin, ["weight"])
    # Build momentum on every weight first, then prune half: the classic revival bug.
    for _ in range(3):
        lin(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    keep = torch.rand(8, 8) > 0.5
    masks.set("weight", keep)
    opt.register_step_post_hook(lambda *_: masks.apply_to_weights_())
    for _ in range(5):
        lin(torch.randn(4, 8)).pow(2).sum().backward()
        masks.apply_to_grads_()
        opt.step()
        opt.zero_grad()
        assert not lin.weight[~keep].any()


def test_maskset_state_roundtrip_and_shape_errors() -> None:
    lin = nn.Linear(4, 3)
    masks = MaskSet()
    masks.bind(lin, ["weight"])
    with pytest.raises(
        ValueError, match=r"mask for 'weight' has shape \(4, 3\) but the parameter has shape \(3, 4\)"
    ):
        masks.set("weight", torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(KeyError, match="'bias' is not bound"):
        masks.set("bias", torch.ones(3, dtype=torch.bool))
    masks.set("weight", torch.eye(3, 4, dtype=torch.bool))
    state = masks.state_dict()
    other = MaskSet()
    other.load_state_dict(state)
    fresh = nn.Linear(4, 3)
    other.bind(fresh, ["weight"])
    other.apply_to_weights_()
    assert int((fresh.weight != 0).sum()) <= 3
    with pytest.raises(
        ValueError, match=r"masks exist for \['weight'\] but the model selection is \['bias'\]"
    ):
        other.bind(fresh, ["bias"])
    with pytest.raises(ValueError, match="'nope' is not a parameter of Linear"):
        MaskSet().bind(fresh, ["nope"])
    with pytest.raises(ValueError, match=r"expected torch\.bool"):
        MaskSet().load_state_dict({"weight": torch.ones(3, 4)})


# ---------------------------------------------------------------- schedules
def test_cubic_matches_zhu_gupta_formula() -> None:
    s_i, s_f, t0, n, dt = 0.1, 0.9, 10, 8, 5
    for k in range(n + 1):
        t = t0 + k * dt
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert math.isclose(
            sparsity_at(t, schedule="cubic", start=t0, end=t0 + n * dt, final=s_f, initial=s_i), expected
        )


def test_schedule_shapes() -> None:
    kw = {"start": 0, "end": 100, "final": 0.8}
    assert sparsity_at(50, schedule="linear", **kw) == pytest.approx(0.4)
    assert sparsity_at(50, schedule="constant", **kw) == 0.8
    assert sparsity_at(-1, schedule="constant", start=0, end=10, final=0.8, initial=0.1) == 0.1
    assert sparsity_at(50, schedule="polynomial", power=2, **kw) == pytest.approx(0.8 - 0.8 * 0.25)
    # exponential: density halves... geometric interpolation of density 1 -> 0.2
    assert sparsity_at(50, schedule="exponential", **kw) == pytest.approx(1 - 0.2**0.5)
    for sched in ("linear", "cubic", "exponential", "polynomial", "constant"):
        assert sparsity_at(100, schedule=sched, **kw) == pytest.approx(0.8)
        assert sparsity_at(10_000, schedule=sched, **kw) == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"`schedule`='cos' is not supported"):
        sparsity_at(1, schedule="cos", **kw)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["linear", "cubic", "exponential", "polynomial", "constant"]),
    st.integers(0, 50),
    st.integers(0, 200),
    st.floats(0.0, 0.99),
    st.floats(0.0, 1.0),
)
def test_schedules_are_monotone_and_bounded(
    sched: str, start: int, length: int, final: float, frac: float
) -> None:
    initial = final * frac
    end = start + length
    values = [
        sparsity_at(t, schedule=sched, start=start, end=end, final=final, initial=initial)
        for t in range(end + 5)
    ]
    assert all(initial - 1e-12 <= v <= final + 1e-12 for v in values)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(0, 100), st.integers(1, 30), st.sampled_from(["cubic", "constant"]))
def test_next_update_step_agrees_with_is_update_step(start: int, length: int, freq: int, sched: str) -> None:
    end = start + length
    updates = [t for t in range(end + 10) if is_update_step(t, start, end, freq, sched)]
    assert updates[0] == start
    if sched == "cubic":
        assert updates[-1] == end
    for t in range(end + 10):
        expected = next((u for u in updates if u >= t), None)
        assert next_update_step(t, start, end, freq, sched) == expected


def test_step_args_resolution_and_errors() -> None:
    assert resolve_step(7, None) == 7
    assert resolve_step(0.5, 101) == 50
    with pytest.raises(
        ValueError, match=r"`end`=0.5 is a fraction of training, but the number of optimizer steps is unknown"
    ):
        resolve_step(0.5, float("inf"), "end")
    assert validate_step_arg("start", 3) == 3
    for bad, msg in [
        (True, "expected an int"),
        ("1", "expected an int"),
        (-2, "negative step"),
        (1.01, "outside"),
    ]:
        with pytest.raises(ValueError, match=msg):
            validate_step_arg("start", bad)


# ---------------------------------------------------------------- validation
def test_validation_messages_name_argument_value_and_accepted() -> None:
    from lightning_compress.core.validation import check_bool, check_choice, check_int, check_number

    assert check_choice("mode", "a", ["a", "b"]) == "a"
    with pytest.raises(ValueError, match=r"^`mode`='c' is not supported; expected one of \['a', 'b'\]\.$"):
        check_choice("mode", "c", ["a", "b"])
    assert check_int("n", 3, minimum=1) == 3
    for bad in (0, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"expected an int >= 1\.$"):
            check_int("n", bad, minimum=1)
    assert check_number("p", 0, 0.0, 1.0, high_open=True) == 0.0
    cases = [
        ({"low": 0.0, "high": 1.0, "high_open": True}, 1.0, r"a number in \[0, 1\)"),
        ({"low": 0.0, "high": 1.0, "low_open": True, "high_open": True}, 0.0, r"a number in \(0, 1\)"),
        ({"low": 0.0, "low_open": True}, 0, r"a number > 0"),
        ({"low": 0.0}, -1, r"a number >= 0"),
        ({"high": 2.0}, 3, r"a number <= 2"),
        ({}, float("nan"), r"expected a number\.$"),
        ({}, True, r"expected a number\.$"),
    ]
    for kwargs, value, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_number("p", value, **kwargs)
    assert check_bool("flag", False) is False
    with pytest.raises(ValueError, match=r"`flag`=1 is not supported; expected true or false\."):
        check_bool("flag", 1)
