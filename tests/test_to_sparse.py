"""to_sparse / SparseLinear: CSR inference layers chosen by measured latency."""

from __future__ import annotations

import copy
import io
import logging
import re

import pytest
import torch
from torch import nn

import lightning_compress.export.sparse as sparse_mod
from lightning_compress.demos import LeNet300100
from lightning_compress.export import SparseLinear, SparseReport, to_sparse

FAST = {"repeats": 3, "warmup": 1}  # real timings, kept short: the tests check logic, not speed
LAYERS = ("fc1", "fc2", "fc3")


def prune_top_k(model: nn.Module, sparsity: float) -> nn.Module:
    """Keep the largest-magnitude (1 - sparsity) weights of every Linear (per layer top-k)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                keep = max(1, round(w.numel() * (1 - sparsity)))
                idx = w.abs().flatten().topk(keep).indices
                mask = torch.zeros(w.numel(), dtype=torch.bool)
                mask[idx] = True
                w.mul_(mask.view_as(w))
    return model


def lenet(seed: int = 0, sparsity: float = 0.98) -> LeNet300100:
    torch.manual_seed(seed)
    return prune_top_k(LeNet300100(), sparsity).eval()


@pytest.fixture
def pruned() -> LeNet300100:
    return lenet()


def x_mnist(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("batch", [1, 64])
def test_forced_outputs_equal_dense(pruned, batch):
    sparse = to_sparse(pruned, layers=list(LAYERS), force=True)
    assert all(isinstance(getattr(sparse, n), SparseLinear) for n in LAYERS)
    x = x_mnist(batch)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), pruned(x), rtol=0, atol=1e-5)
    # With gradients enabled too (autograd-free weights, the input may require grad).
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(sparse(xg), pruned(x), rtol=0, atol=1e-5)


def test_measured_conversion_outputs_equal_and_report(pruned):
    sparse = to_sparse(pruned, x_mnist(8), **FAST)
    report = sparse.sparse_report
    assert isinstance(report, SparseReport)
    assert [d.name for d in report.layers] == list(LAYERS)
    assert report.batch_sizes == (1, 64)
    assert report.threads == torch.get_num_threads()
    assert not report.forced
    for d in report.layers[:2]:  # candidates: timed at both batch sizes
        assert d.candidate
        assert set(d.dense_s) == set(d.sparse_s) == {1, 64}
        assert d.max_abs_diff < 1e-5
        assert d.converted == all(d.sparse_s[b] < d.dense_s[b] for b in (1, 64))
        assert isinstance(getattr(sparse, d.name), SparseLinear) == d.converted
    fc3 = report.layers[2]
    assert not fc3.candidate
    assert not fc3.converted
    assert not fc3.dense_s
    assert "below the thresholds" in fc3.reason
    assert report.max_abs_diff is not None
    assert report.max_abs_diff < 1e-5
    for batch in (1, 64):
        with torch.no_grad():
            torch.testing.assert_close(sparse(x_mnist(batch)), pruned(x_mnist(batch)), rtol=0, atol=1e-5)
    assert "| fc1 | 300x784 | 98.0% |" in report.to_markdown()


def test_force_swaps_candidates_only(pruned):
    sparse = to_sparse(pruned, force=True)
    # fc3 (1,000 weights) is below min_numel=4096: never a candidate by the thresholds.
    assert [type(getattr(sparse, n)) for n in LAYERS] == [SparseLinear, SparseLinear, nn.Linear]
    assert sparse.sparse_report.converted == ["fc1", "fc2"]
    assert sparse.sparse_report.forced
    assert sparse.sparse_report.layers[0].reason.startswith("forced")
    only = to_sparse(pruned, layers=["fc3"], force=True)
    assert [type(getattr(only, n)) for n in LAYERS] == [nn.Linear, nn.Linear, SparseLinear]
    assert only.sparse_report.layers[0].reason == "not in `layers`"
    both = to_sparse(pruned, layers=["fc[12]"], force=True)  # fnmatch patterns
    assert both.sparse_report.converted == ["fc1", "fc2"]


def test_extra_leading_dims():
    torch.manual_seed(0)
    model = prune_top_k(nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 80)), 0.9)
    sparse = to_sparse(model, force=True)
    assert isinstance(sparse[0], SparseLinear)
    assert isinstance(sparse[2], SparseLinear)
    for shape in [(2, 5, 96), (3, 1, 4, 96), (1, 1, 96), (96,), (0, 96)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            out = sparse(x)
            assert out.shape == (*shape[:-1], 80)
            torch.testing.assert_close(out, model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- decision
def fake_timer(csr: float, dense: float, csr_at_64: float | None = None):
    def timer(module, x, *, repeats, warmup):
        assert repeats == 3
        assert warmup == 1
        if isinstance(module, SparseLinear):
            return csr_at_64 if csr_at_64 is not None and x.shape[0] == 64 else csr
        assert type(module) is nn.Linear
        return dense

    return timer


def test_decision_follows_measurement(pruned, monkeypatch):
    monkeypatch.setattr(sparse_mod, "measure_latency", fake_timer(csr=2.0, dense=1.0))
    slow = to_sparse(pruned, **FAST)
    assert [type(getattr(slow, n)) for n in LAYERS] == [nn.Linear] * 3
    fc1 = slow.sparse_report.layers[0]
    assert fc1.dense_s == {1: 1.0, 64: 1.0}
    assert fc1.sparse_s == {1: 2.0, 64: 2.0}
    assert fc1.reason == "CSR not faster at batch 1, 64 (batch 1: 0.50x, batch 64: 0.50x)"
    assert slow.sparse_report.converted == []

    monkeypatch.setattr(sparse_mod, "measure_latency", fake_timer(csr=0.5, dense=1.0))
    fast = to_sparse(pruned, **FAST)
    assert fast.sparse_report.converted == ["fc1", "fc2"]
    assert fast.sparse_report.layers[0].speedup == {1: 2.0, 64: 2.0}

    # The rule is "faster at every batch size": faster at 64 but not at 1 stays dense.
    monkeypatch.setattr(sparse_mod, "measure_latency", fake_timer(csr=1.5, dense=1.0, csr_at_64=0.1))
    mixed = to_sparse(pruned, **FAST)
    assert mixed.sparse_report.converted == []
    assert mixed.sparse_report.layers[1].reason.startswith("CSR not faster at batch 1 (")


def test_decisions_are_logged(pruned, monkeypatch, caplog):
    monkeypatch.setattr(sparse_mod, "measure_latency", fake_timer(csr=0.5, dense=1.0))
    with caplog.at_level(logging.INFO, logger="lightning_compress.export.sparse"):
        to_sparse(pruned, **FAST)
    text = caplog.text
    assert "to_sparse(LeNet300100): fc1 -> CSR: CSR faster at every batch size" in text
    assert "fc3 -> dense: below the thresholds" in text
    assert "2 of 3 Linear layer(s) to CSR ['fc1', 'fc2']" in text


# ---------------------------------------------------------------------------- copies and state
def test_original_untouched_unless_inplace(pruned):
    before = copy.deepcopy(pruned.state_dict())
    sparse = to_sparse(pruned, force=True)
    assert sparse is not pruned
    assert all(type(getattr(pruned, n)) is nn.Linear for n in LAYERS)
    assert not hasattr(pruned, "sparse_report")
    after = pruned.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    same = to_sparse(pruned, force=True, inplace=True)
    assert same is pruned
    assert isinstance(pruned.fc1, SparseLinear)


def test_training_flags_restored_after_example_input(pruned):
    pruned.train()
    sparse = to_sparse(pruned, x_mnist(2), force=True)
    assert all(m.training for m in pruned.modules())
    assert all(m.training for m in sparse.modules())


def test_state_dict_round_trip(pruned):
    sparse = to_sparse(pruned, force=True)
    sd = sparse.state_dict()
    for name in ("fc1", "fc2"):
        assert {f"{name}.{k}" for k in ("crow_indices", "col_indices", "values", "bias")} <= sd.keys()
        assert f"{name}.weight" not in sd
    assert sd["fc1.values"].numel() == sparse.fc1.nnz == round(235_200 * 0.02)
    assert sd["fc1.crow_indices"].dtype == torch.int32
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    x = x_mnist(16)
    for other in (lenet(seed=7), lenet(seed=7, sparsity=0.9)):  # other pattern; other nnz too
        fresh = to_sparse(other, force=True)
        with torch.no_grad():
            assert not torch.equal(fresh(x), sparse(x))
        fresh.load_state_dict(loaded)
        assert fresh.fc1.nnz == sparse.fc1.nnz
        with torch.no_grad():
            assert torch.equal(fresh(x), sparse(x))


def test_shared_module_replaced_everywhere():
    torch.manual_seed(0)
    shared = nn.Linear(128, 128)
    model = prune_top_k(nn.Sequential(shared, nn.ReLU(), shared), 0.95)
    sparse = to_sparse(model, force=True)
    assert isinstance(sparse[0], SparseLinear)
    assert sparse[0] is sparse[2]
    assert [d.name for d in sparse.sparse_report.layers] == ["0"]
    x = torch.randn(4, 128)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- SparseLinear
def test_sparse_linear_round_trip_and_repr():
    torch.manual_seed(0)
    linear = prune_top_k(nn.Linear(40, 30), 0.9)
    layer = SparseLinear.from_linear(linear)
    assert (layer.in_features, layer.out_features, layer.nnz) == (40, 30, 120)
    assert layer.sparsity == pytest.approx(0.9)
    assert repr(layer) == "SparseLinear(in_features=40, out_features=30, bias=True, nnz=120, sparsity=90.00%)"
    assert list(layer.parameters()) == []
    assert layer.weight_csr.layout == torch.sparse_csr
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    assert torch.equal(dense.weight, linear.weight)
    assert torch.equal(dense.bias, linear.bias)
    assert dense.weight.requires_grad


def test_sparse_linear_no_bias_and_input_grad():
    torch.manual_seed(0)
    linear = prune_top_k(nn.Linear(50, 20, bias=False), 0.8)
    layer = SparseLinear.from_linear(linear)
    assert "bias=False" in repr(layer)
    assert layer.bias is None
    for batch in (1, 7):
        x = torch.randn(batch, 50, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(batch, 50))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-5)


def test_sparse_linear_copies_and_dtype_changes():
    torch.manual_seed(0)
    linear = prune_top_k(nn.Linear(30, 10), 0.7)
    layer = SparseLinear.from_linear(linear)
    x = torch.randn(3, 30)
    expected = layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.values.mul_(2)  # in-place edits show through, in the copy only
        clone.bias.zero_()
    torch.testing.assert_close(clone(x), 2 * (expected - linear.bias.detach()))
    torch.testing.assert_close(layer(x), expected)
    double = copy.deepcopy(layer).double()
    assert double.values.dtype == torch.float64
    torch.testing.assert_close(double(x.double()), expected.double(), rtol=0, atol=1e-5)
    layer.values = torch.zeros_like(layer.values)  # replacing a buffer rebuilds the CSR weight
    torch.testing.assert_close(layer(x), linear.bias.detach().expand(3, 10))
    with pytest.raises(TypeError, match=r"expects an nn\.Linear, got Conv1d"):
        SparseLinear.from_linear(nn.Conv1d(1, 1, 1))


# ---------------------------------------------------------------------------- errors
def test_dense_model_raises_and_lists_layers():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"no sparse nn\.Linear") as err:
        to_sparse(LeNet300100())
    assert str(err.value) == (
        "to_sparse: LeNet300100 has no sparse nn.Linear layer to convert. A layer qualifies with weight "
        "sparsity >= `min_sparsity`=0.5 and at least `min_numel`=4096 weights (or by being named in "
        "`layers`). Its nn.Linear layers: fc1 (300x784, 235,200 weights, sparsity 0.0%); "
        "fc2 (100x300, 30,000 weights, sparsity 0.0%); fc3 (10x100, 1,000 weights, sparsity 0.0%). "
        "Prune the model first (e.g. GradualPruning) or lower the thresholds."
    )
    with pytest.raises(ValueError, match=r"Its nn.Linear layers: none\."):
        to_sparse(nn.Sequential(nn.Conv2d(1, 1, 3)))
    # 98 % sparse but fc1 needs 99 %: still nothing to convert.
    with pytest.raises(
        ValueError, match=r"`min_sparsity`=0.99 .* fc1 \(300x784, 235,200 weights, sparsity 98.0%\)"
    ):
        to_sparse(lenet(), min_sparsity=0.99)


def test_layers_entry_not_a_linear_raises_before_changes(pruned):
    with pytest.raises(ValueError, match="relu1") as err:
        to_sparse(pruned, layers=["fc1", "relu1"], force=True, inplace=True)
    assert str(err.value) == (
        "to_sparse: `layers` entry 'relu1' is not an nn.Linear of LeNet300100 (it is a ReLU); "
        "its nn.Linear layers are: fc1, fc2, fc3."
    )
    assert type(pruned.fc1) is nn.Linear
    assert not hasattr(pruned, "sparse_report")
    with pytest.raises(
        ValueError, match=r"`layers` entry 'fc9' is not an nn.Linear of LeNet300100 \(no such module\)"
    ):
        to_sparse(pruned, layers=["fc9"])
    mha = nn.Sequential(nn.MultiheadAttention(64, 4))
    with pytest.raises(
        ValueError,
        match=r"'0.out_proj' .*it is a NonDynamicallyQuantizableLinear; only modules of exact type nn.Linear",
    ):
        to_sparse(mha, layers=["0.out_proj"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"batch_sizes": ()},
            "`batch_sizes`=() is not supported; expected a non-empty list of ints >= 1, e.g. (1, 64).",
        ),
        (
            {"batch_sizes": (1, 0)},
            "`batch_sizes`=(1, 0) is not supported; expected a non-empty list of ints >= 1",
        ),
        ({"batch_sizes": [-4]}, "`batch_sizes`=[-4] is not supported"),
        ({"batch_sizes": 64}, "`batch_sizes`=64 is not supported"),
        ({"min_sparsity": 1.0}, "`min_sparsity`=1.0 is not supported; expected a number in [0, 1)."),
        ({"min_sparsity": -0.1}, "`min_sparsity`=-0.1 is not supported; expected a number in [0, 1)."),
        ({"min_numel": -1}, "`min_numel`=-1 is not supported; expected an int >= 0."),
        ({"repeats": 0}, "`repeats`=0 is not supported; expected an int >= 1."),
        ({"warmup": -1}, "`warmup`=-1 is not supported; expected an int >= 0."),
        ({"force": 1}, "`force`=1 is not supported; expected true or false."),
        (
            {"layers": "fc1"},
            "`layers`='fc1' is not supported; expected None or a non-empty list of module names",
        ),
        ({"layers": []}, "`layers`=[] is not supported"),
        ({"layers": ["fc1", ""]}, "`layers` entries must be non-empty module names; got '' in ['fc1', '']."),
    ],
)
def test_bad_arguments(pruned, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        to_sparse(pruned, **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"to_sparse expects an nn\.Module, got dict"):
        to_sparse({})


def test_output_is_row_major_so_view_works(pruned):
    class Flattens(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).view(-1)  # fails on a transposed (non-contiguous) output

    model = Flattens(copy.deepcopy(pruned))
    fast = to_sparse(model, layers=["inner.fc1"], force=True)
    x = x_mnist(64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)


def test_inplace_error_in_example_input_puts_the_dense_layers_back(pruned):
    class Picky(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if isinstance(self.inner.fc1, SparseLinear):
                raise RuntimeError("this model only runs dense layers")
            return self.inner(x)

    model = Picky(copy.deepcopy(pruned))
    with pytest.raises(RuntimeError, match="only runs dense layers"):
        to_sparse(model, x_mnist(2), layers=["inner.fc1"], force=True, inplace=True)
    assert type(model.inner.fc1) is nn.Linear  # nothing half-applied
    assert model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layers_stay_dense_with_a_reason(pruned, dtype):
    model = copy.deepcopy(pruned).to(dtype)
    fast = to_sparse(model, layers=["fc1"], force=True)
    assert type(fast.fc1) is nn.Linear
    (decision,) = [d for d in fast.sparse_report.layers if d.name == "fc1"]
    assert not decision.converted
    assert str(dtype) in decision.reason
